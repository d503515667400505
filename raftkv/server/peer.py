"""Links to other nodes: one pipelined connection per peer, carrying ``RAFTKV.RPC``.

A link reconnects on demand and opens with the node-identity handshake
(``RAFTKV.CHALLENGE`` -> nonce, ``RAFTKV.NODEAUTH name mac``; see
``raftkv.security``); the RPCs pipeline behind it.  A call either returns the peer's decoded reply
or raises ``PeerUnreachable``, whose ``sent`` says whether the message may
have reached the peer (then its effect is unknown) or surely did not
(connection refused or not yet open: nothing ran).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis

from raftkv import protocol
from raftkv.server import rpc


class PeerUnreachable(Exception):
    """The call did not get a reply; ``sent``: the message may have been delivered."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class PeerLink:
    """One pipelined RESP connection to another node."""

    def __init__(self, host: str, port: int, identify: Callable[[bytes], list[bytes]], ssl_ctx: Any = None) -> None:
        self.host, self.port = host, port
        self.ssl = ssl_ctx
        self.identify = identify  # challenge nonce -> the RAFTKV.NODEAUTH command that answers it
        self.writer: asyncio.StreamWriter | None = None
        self.waiting: list[asyncio.Future] = []
        self.lock = asyncio.Lock()

    async def rpc(self, message: tuple, timeout: float) -> Any:
        """Send one RPC message; its decoded reply (an ``Error`` reply comes back as an ``Error``)."""
        reply = await self._call([rpc.COMMAND, rpc.encode(message)], timeout)
        if isinstance(reply, protocol.ReplyError):  # refused before it ran (auth, limits)
            return protocol.Error(reply.code, reply.message)
        try:
            return rpc.decode(reply)
        except rpc.MalformedMessage as e:
            raise PeerUnreachable(f"{self.host}:{self.port}: {e}", sent=True) from None

    async def _call(self, args: list[bytes], timeout: float) -> Any:
        timeout = max(0.05, timeout)
        try:
            async with self.lock:
                if self.writer is None or self.writer.is_closing():
                    await asyncio.wait_for(self._connect(), timeout=min(timeout, 1.0))
                fut = asyncio.get_running_loop().create_future()
                self.waiting.append(fut)
                self.writer.write(protocol.encode_command(*args))
        except (OSError, TimeoutError) as e:
            raise PeerUnreachable(f"{self.host}:{self.port}: {e or type(e).__name__}", sent=False) from None
        try:
            return await asyncio.wait_for(fut, timeout)
        except (OSError, TimeoutError) as e:
            raise PeerUnreachable(f"{self.host}:{self.port}: {e or type(e).__name__}", sent=True) from None

    async def _connect(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        self.writer = writer
        asyncio.create_task(self._pump(reader, writer))
        challenge = asyncio.get_running_loop().create_future()
        self.waiting.append(challenge)
        writer.write(protocol.encode_command(b"RAFTKV.CHALLENGE"))
        nonce = await challenge
        if not isinstance(nonce, bytes):
            writer.close()
            raise ConnectionRefusedError(f"node handshake refused: {nonce}")
        # Pipelined ahead of the first RPC; a refusal shows as that RPC's -NOPERM.
        self.waiting.append(asyncio.get_running_loop().create_future())
        writer.write(protocol.encode_command(*self.identify(nonce)))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = protocol.reply_reader()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    fut = self.waiting.pop(0)
                    if not fut.done():
                        fut.set_result(reply)
        except (ConnectionError, OSError, hiredis.ProtocolError, IndexError):
            pass
        finally:
            waiting, self.waiting = self.waiting, []
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection to {self.host}:{self.port} lost"))
            writer.close()
            if self.writer is writer:
                self.writer = None

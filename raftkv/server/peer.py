"""Links to other nodes: one pipelined connection per peer, carrying ``RAFTKV.RPC``.

A link reconnects on demand.  A call either returns the peer's decoded reply
or raises ``PeerUnreachable``, whose ``sent`` says whether the message may
have reached the peer (then its effect is unknown) or surely did not
(connection refused or not yet open: nothing ran).

A call that times out drops the whole link (reset, unsent bytes discarded)
and the next call reconnects: otherwise a message stuck behind a stalled peer
would sit in the socket buffer and be delivered minutes later, long after its
caller gave up and resent it.  (2PC refuses such a late PREPARE anyway, see
``raftkv.txn``; this keeps the window small.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
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

    def __init__(self, host: str, port: int, ssl_ctx: Any = None, credentials: list[bytes] | None = None) -> None:
        self.host, self.port = host, port
        self.ssl = ssl_ctx
        self.credentials = credentials
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
                    reader, self.writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port, ssl=self.ssl), timeout=min(timeout, 1.0))
                    asyncio.create_task(self._pump(reader, self.writer))
                    if self.credentials:
                        # Pipelined ahead of the first command; a refusal shows as that command's error.
                        self.waiting.append(asyncio.get_running_loop().create_future())
                        self.writer.write(protocol.encode_command(*self.credentials))
                fut = asyncio.get_running_loop().create_future()
                self.waiting.append(fut)
                self.writer.write(protocol.encode_command(*args))
        except (OSError, TimeoutError) as e:
            raise PeerUnreachable(f"{self.host}:{self.port}: {e or type(e).__name__}", sent=False) from None
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError as e:
            self._drop()
            raise PeerUnreachable(f"{self.host}:{self.port}: {e or type(e).__name__}", sent=True) from None
        except OSError as e:
            raise PeerUnreachable(f"{self.host}:{self.port}: {e or type(e).__name__}", sent=True) from None

    def _drop(self) -> None:
        """Reset the connection, discarding what is still unsent; the next call reconnects."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # linger 0: close with RST, drop the send buffer
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

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

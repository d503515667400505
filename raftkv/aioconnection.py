"""One pipelined RESP connection for asyncio code: the node's links to its peers and ``raftkv.aio``.

Requests are written as they come and replies matched in order, so many
callers share one connection.  It reconnects on demand; an ``opening`` hook
runs first on every new connection (AUTH, the node-identity handshake).  A call
returns the decoded reply (an error reply as a ``protocol.ReplyError`` value) or
raises ``ConnectionLost``, whose ``sent`` says whether the request may have
reached the peer (its effect is then unknown) or surely did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from raftkv import protocol
from raftkv.heap import release_closed, transports_of


class ConnectionLost(Exception):
    """No reply; ``sent``: the request may have been delivered."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class AsyncConnection:
    """A pipelined connection to ``host:port`` (see module doc)."""

    def __init__(self, host: str, port: int, ssl_ctx: Any = None,
                 opening: Callable[[AsyncConnection], Awaitable[None]] | None = None) -> None:
        self.host, self.port = host, port
        self.ssl = ssl_ctx
        self.opening = opening
        self.writer: asyncio.StreamWriter | None = None
        self.waiting: list[asyncio.Future] = []
        self.lock = asyncio.Lock()

    async def call(self, *args: bytes | str | int, timeout: float) -> Any:
        """Send one command and wait for its reply (see module doc)."""
        timeout = max(0.05, timeout)
        try:
            async with self.lock:
                if self.writer is None or self.writer.is_closing():
                    try:
                        await asyncio.wait_for(self._connect(), timeout=min(timeout, 1.0))
                    except BaseException:
                        self.reset()  # a half-opened connection (e.g. a stalled handshake) is not reused
                        raise
                fut = self.send(*args)
        except (OSError, TimeoutError) as e:
            raise ConnectionLost(f"{self.host}:{self.port}: {e or type(e).__name__}", sent=False) from None
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError as e:
            # A request given up on must not sit in a socket buffer and arrive minutes later,
            # after its caller re-sent it: reset the connection, the next call reconnects.
            self.reset()
            raise ConnectionLost(f"{self.host}:{self.port}: {e or type(e).__name__}", sent=True) from None
        except OSError as e:
            raise ConnectionLost(f"{self.host}:{self.port}: {e or type(e).__name__}", sent=True) from None

    def send(self, *args: bytes | str | int) -> asyncio.Future:
        """Write one command now; the future of its reply.  For ``opening`` hooks (the lock is held)."""
        assert self.writer is not None
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.writer.write(protocol.encode_command(*args))
        return fut

    def close(self) -> None:
        """Close gracefully (what was written is still delivered)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def reset(self) -> None:
        """Drop the connection at once: RST, and what is still unsent is discarded."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # linger 0: close with RST, drop the send buffer
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _connect(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        # Each connection has its own queue of waiting callers: a connection dropped after a timeout
        # fails only its own callers, never those of the one that replaced it.
        self.writer, self.waiting = writer, []
        asyncio.create_task(self._pump(reader, writer, self.waiting, transports_of(writer)))
        if self.opening is not None:
            await self.opening(self)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    waiting: list[asyncio.Future], transports: list[asyncio.BaseTransport]) -> None:
        parser = protocol.reply_reader()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    fut = waiting.pop(0)
                    if not fut.done():
                        fut.set_result(reply)
        except (ConnectionError, OSError, hiredis.ProtocolError, IndexError):
            pass
        finally:
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection to {self.host}:{self.port} lost"))
            writer.close()
            if self.writer is writer:
                self.writer = None
            await release_closed(writer, transports)  # a node's links outlive its GC freezes (raftkv.heap)

"""A closed connection is freed by reference counting alone (raftkv.heap.release_closed).

raftkv.heap freezes every object alive every few seconds, so a connection open at a freeze is out of the cyclic
collector's reach for good: if its transport were still in a reference cycle once closed, it would never be freed.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import struct
import weakref

import pytest

from raftkv.aioconnection import AsyncConnection
from raftkv.heap import release_closed, transports_of

from .test_security import _self_signed


async def _closed_transport(reset: bool, tls: tuple[str, str] | None = None) -> list[weakref.ref]:
    """Serve one connection that the client closes (or resets); return weak references to its transport (with
    TLS: and to the socket's transport beneath it)."""
    refs: list[weakref.ref] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transports = transports_of(writer)
        refs.extend(weakref.ref(t) for t in transports)
        assert len(transports) == (2 if tls else 1)
        try:
            await reader.read(100)
        except ConnectionError:
            pass
        writer.close()
        await release_closed(writer, transports)
        del transports
        done.set()

    server_ctx = None
    if tls is not None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(*tls)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    sock = socket.create_connection(("127.0.0.1", port))
    if tls is not None:
        client_ctx = ssl.create_default_context()
        client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
        sock.setblocking(False)
        sock = client_ctx.wrap_socket(sock, do_handshake_on_connect=False)
        while True:  # the handshake needs the server's loop to run
            try:
                sock.do_handshake()
                break
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                await asyncio.sleep(0.01)
        sock.setblocking(True)
    if reset:  # close with an RST: the server's read fails with ConnectionResetError
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        sock.sendall(b"hello")
    await asyncio.sleep(0.05)
    sock.close()
    await asyncio.wait_for(done.wait(), 10)
    server.close()
    await server.wait_closed()
    for _ in range(3):
        await asyncio.sleep(0)  # let the loop drop its last handles
    return refs


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_closed_connection_needs_no_cyclic_collection(reset: bool, tls: bool, tmp_path) -> None:  # noqa: ANN001
    cert = _self_signed(tmp_path) if tls else None
    gc.collect()
    gc.disable()  # only reference counting from here on
    try:
        refs = asyncio.run(_closed_transport(reset, cert))
        alive = [type(r()).__name__ for r in refs if r() is not None]
        assert not alive, f"still alive after the {'reset' if reset else 'close'}: {alive}"
    finally:
        gc.enable()


def test_a_link_to_another_node_that_closes_needs_no_cyclic_collection() -> None:
    """A node's forwarding link (``AsyncConnection``) whose peer closes it: its transport goes with it."""
    async def run() -> weakref.ref:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)  # the PING
            writer.write(b"+PONG\r\n")
            await writer.drain()
            writer.close()  # then the peer goes away

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        conn = AsyncConnection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert await conn.call("PING", timeout=5) == b"PONG"
        ref = weakref.ref(conn.writer.transport)
        for _ in range(100):  # the link notices the close and lets go of it
            if conn.writer is None:
                break
            await asyncio.sleep(0.02)
        server.close()
        await server.wait_closed()
        for _ in range(20):
            await asyncio.sleep(0.01)  # its reader task finishes the release
        return ref

    gc.collect()
    gc.disable()
    try:
        ref = asyncio.run(run())
        assert ref() is None, "the closed link's transport is still alive"
    finally:
        gc.enable()

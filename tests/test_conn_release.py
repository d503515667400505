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
import types
import weakref

import pytest

from raftkv import heap
from raftkv.aioconnection import AsyncConnection
from raftkv.heap import release_closed, transports_of
from raftkv.server.api import Limits
from raftkv.server.conn import Conn, serve_connection

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


class _StubNode:
    """What ``serve_connection`` needs of a node: limits, counters, and a dispatch that answers PONG."""

    def __init__(self, clients: int = 0) -> None:
        self.clients = clients
        self.limits = Limits(clients_max=1)
        self.metrics = types.SimpleNamespace(client_gone=types.SimpleNamespace(inc=lambda: None))
        self.security = None

    def auth_required(self) -> bool:
        return False

    def dispatch_ordered(self, conn: Conn, req: list[bytes]) -> bytes:
        return b"PONG"

    def count_reply(self, reply: object, name: bytes | None, started: float) -> None:
        pass


@pytest.mark.parametrize("full", [False, True], ids=["served", "refused-at-clients-max"])
def test_a_client_connection_of_the_node_is_freed_without_cyclic_collection(full: bool) -> None:
    """The node's own connection handler frees what it served, and a connection it refused because the node
    had ``clients_max`` clients already (which used to skip the release)."""
    node = _StubNode(clients=1 if full else 0)

    async def run() -> weakref.ref:
        refs: list[weakref.ref] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            refs.append(weakref.ref(writer.transport))
            await serve_connection(node, reader, writer)  # type: ignore[arg-type]

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        if not full:
            writer.write(b"*1\r\n$4\r\nPING\r\n")
        reply = await asyncio.wait_for(reader.readline(), 5)
        assert reply.startswith(b"-BUSY" if full else b"$4"), reply
        writer.close()
        await writer.wait_closed()
        for _ in range(50):
            await asyncio.sleep(0.01)  # the handler sees the close and releases
        server.close()
        await server.wait_closed()
        for _ in range(3):
            await asyncio.sleep(0)
        return refs[0]

    gc.collect()
    gc.disable()
    try:
        ref = asyncio.run(run())
        assert ref() is None, "the closed client connection's transport is still alive"
        assert node.clients == (1 if full else 0)
    finally:
        gc.enable()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_connection_whose_peer_stops_reading_is_aborted_and_freed(tls: bool, tmp_path,  # noqa: ANN001
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing a connection waits for its unsent bytes, which a peer that stopped reading never takes: after
    ``CLOSE_WAIT_S`` it is aborted and freed rather than left open (and, once frozen, kept forever)."""
    monkeypatch.setattr(heap, "CLOSE_WAIT_S", 0.3)
    server_ctx = None
    if tls:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(*_self_signed(tmp_path))

    async def run() -> tuple[list[weakref.ref], socket.socket]:
        refs: list[weakref.ref] = []
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            transports = transports_of(writer)
            assert len(transports) == (2 if tls else 1)
            refs.extend(weakref.ref(t) for t in transports)
            writer.write(b"x" * (16 << 20))  # far more than the socket buffers hold: most stays unsent
            writer.close()
            await release_closed(writer, transports)
            del transports
            done.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        sock = socket.create_connection(("127.0.0.1", server.sockets[0].getsockname()[1]))
        if tls:  # shake hands (the server's loop must run meanwhile), then never read
            client_ctx = ssl.create_default_context()
            client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
            sock.setblocking(False)
            sock = client_ctx.wrap_socket(sock, do_handshake_on_connect=False)
            while True:
                try:
                    sock.do_handshake()
                    break
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    await asyncio.sleep(0.01)
        await asyncio.wait_for(done.wait(), 10)
        server.close()
        await server.wait_closed()
        for _ in range(3):
            await asyncio.sleep(0)
        return refs, sock

    gc.collect()
    gc.disable()
    try:
        refs, sock = asyncio.run(run())
        sock.close()
        alive = [type(r()).__name__ for r in refs if r() is not None]
        assert not alive, f"the connection that could not finish closing is still alive: {alive}"
    finally:
        gc.enable()

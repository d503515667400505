"""A closed client connection is freed by reference counting alone (raftkv.server.conn._release).

raftkv.heap freezes every object alive every few seconds, so a connection open at a freeze is out of the cyclic
collector's reach for good: if its transport were still in a reference cycle once closed, it would never be freed.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import weakref

import pytest

from raftkv.server.conn import _release


async def _closed_transport(reset: bool) -> weakref.ref:
    """Serve one connection that the client closes (or resets); return a weak reference to its transport."""
    refs: list[weakref.ref] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refs.append(weakref.ref(writer.transport))
        try:
            await reader.read(100)
        except ConnectionError:
            pass
        writer.close()
        await _release(writer)
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket.create_connection(("127.0.0.1", port))
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
    return refs[0]


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_closed_connection_needs_no_cyclic_collection(reset: bool) -> None:
    gc.collect()
    gc.disable()  # only reference counting from here on
    try:
        ref = asyncio.run(_closed_transport(reset))
        assert ref() is None, f"the transport of a {'reset' if reset else 'closed'} connection is still alive: " \
                              f"{[type(r).__name__ for r in gc.get_referrers(ref())]}"
    finally:
        gc.enable()

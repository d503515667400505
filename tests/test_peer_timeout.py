"""A link drops and reconnects after a call times out (raftkv.aioconnection, under raftkv.server.peer)."""

from __future__ import annotations

import asyncio

import pytest

from raftkv.aioconnection import AsyncConnection, ConnectionLost
from raftkv.server.peer import PeerLink, PeerUnreachable


async def _silent_peer() -> tuple[asyncio.AbstractServer, int, list, asyncio.Event]:
    conns: list[asyncio.StreamReader] = []
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(reader)  # a stalled peer: answers nothing
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:  # reset by the caller
            pass
        closed.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns, closed


def test_timed_out_call_drops_the_link_and_the_next_call_reconnects() -> None:
    async def scenario() -> tuple[int, bool]:
        server, port, conns, closed = await _silent_peer()
        conn = AsyncConnection("127.0.0.1", port)
        with pytest.raises(ConnectionLost) as e:
            await conn.call(b"PING", timeout=0.1)
        assert e.value.sent
        await asyncio.wait_for(closed.wait(), 2.0)  # the stale request no longer waits in that connection
        with pytest.raises(ConnectionLost):
            await conn.call(b"PING", timeout=0.1)
        server.close()
        return len(conns), closed.is_set()

    assert asyncio.run(scenario()) == (2, True)


def test_a_peer_that_stalls_the_handshake_gets_nothing_sent() -> None:
    async def scenario() -> int:
        server, port, conns, closed = await _silent_peer()
        link = PeerLink("127.0.0.1", port, identify=lambda nonce: [b"RAFTKV.NODEAUTH", b"n1", b"mac"])
        for _ in range(2):
            with pytest.raises(PeerUnreachable) as e:
                await link.rpc(("exec",), 0.2)
            assert not e.value.sent  # the RPC never left: the handshake did not finish
        await asyncio.wait_for(closed.wait(), 2.0)
        server.close()
        return len(conns)

    assert asyncio.run(scenario()) == 2

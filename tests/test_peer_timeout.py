"""A link drops and reconnects after a call times out or its node identity is refused (raftkv.aioconnection,
under raftkv.server.peer)."""

from __future__ import annotations

import asyncio

import hiredis
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


def test_a_refused_node_identity_drops_the_link_and_the_next_rpc_handshakes_again() -> None:
    # A node just added to the cluster may ask a peer that has not installed the new map yet: the peer
    # refuses its identity. The link must not stay open unauthenticated (every RPC on it would be
    # refused for good): no RPC is sent on it, and the next RPC opens a new link and asks again.
    async def scenario() -> tuple[int, list[bytes]]:
        seen: list[bytes] = []
        conns = 0

        async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal conns
            conns += 1
            parser = hiredis.Reader()
            while data := await reader.read(65536):
                parser.feed(data)
                while (req := parser.gets()) is not False:
                    seen.append(req[0])
                    writer.write(b"$5\r\nnonce\r\n" if req[0] == b"RAFTKV.CHALLENGE" else b"-NOPERM who?\r\n")
            writer.close()

        server = await asyncio.start_server(refusing, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = PeerLink("127.0.0.1", port, identify=lambda nonce: [b"RAFTKV.NODEAUTH", b"n4", b"mac"])
        for _ in range(2):
            with pytest.raises(PeerUnreachable) as e:
                await link.rpc(("exec",), 1.0)
            assert not e.value.sent and "handshake refused" in str(e.value)
        server.close()
        return conns, seen

    conns, seen = asyncio.run(scenario())
    assert conns == 2
    assert seen == [b"RAFTKV.CHALLENGE", b"RAFTKV.NODEAUTH"] * 2  # never a RAFTKV.RPC

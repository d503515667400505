"""A forwarding link drops and reconnects after a call times out (raftkv.server.peer)."""

from __future__ import annotations

import asyncio

import pytest

from raftkv.server.peer import PeerLink, PeerUnreachable


def test_timed_out_call_drops_the_link_and_the_next_call_reconnects() -> None:
    async def scenario() -> tuple[int, bool]:
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
        port = server.sockets[0].getsockname()[1]
        link = PeerLink("127.0.0.1", port)
        with pytest.raises(PeerUnreachable) as e:
            await link.rpc(("ping",), 0.1)
        assert e.value.sent
        await asyncio.wait_for(closed.wait(), 2.0)  # the stale request no longer waits in that connection
        with pytest.raises(PeerUnreachable):
            await link.rpc(("ping",), 0.1)
        server.close()
        return len(conns), closed.is_set()

    assert asyncio.run(scenario()) == (2, True)

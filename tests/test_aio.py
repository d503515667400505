"""raftkv.aio.AsyncClient against a live cluster: the same answers and guarantees as raftkv.Client."""

from __future__ import annotations

import asyncio

import pytest

from raftkv import Client
from raftkv.aio import AsyncClient
from raftkv.cluster import LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture
def lc(cluster: LocalCluster) -> LocalCluster:
    return cluster  # the module's shared 3-node cluster (conftest)


def test_async_client_reads_writes_and_counts_once(lc: LocalCluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster=lc.config) as c:
            await c.put("aio-k", "v1")
            assert await c.get("aio-k") == b"v1"
            assert await c.cas("aio-k", "v1", "v2") is True
            assert await c.cas("aio-k", "v1", "v3") is False
            assert await c.cas("aio-new", None, "x") is True
            # 200 concurrent increments over one pipelined connection per node: each applied exactly once.
            results = await asyncio.gather(*(c.incr("aio-cnt") for _ in range(200)))
            assert sorted(results) == list(range(1, 201))
            await c.mset({"aio-a": "1", "aio-b": "2", "aio-c": "3"})
            assert await c.mget(["aio-a", "aio-b", "aio-c", "aio-missing"]) == [b"1", b"2", b"3", None]
            assert await c.delete("aio-a") is True and await c.delete("aio-a") is False
    asyncio.run(main())
    with Client(cluster=lc.config) as sync:  # the threaded client sees the same state
        assert sync.get("aio-k") == b"v2" and sync.get("aio-cnt") == b"200"


def test_async_client_from_addresses_only(lc: LocalCluster) -> None:
    async def main() -> bytes | None:
        nodes = [f"{i.host}:{i.client_port}" for i in lc.map.nodes.values()]
        async with AsyncClient(nodes=nodes) as c:
            await c.put("aio-addr", "ok")
            return await c.get("aio-addr")
    assert asyncio.run(main()) == b"ok"

"""A real 3-node cluster with many shards: one Raft port, one driver thread per node."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from raftkv import Client
from raftkv.cluster import key_on_shard

from .conftest import start_cluster

SHARDS = 32
THREADS_MAX = 12  # asyncio, the driver, metrics, a few short-lived helpers: not one per shard


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def test_many_shards_serve_with_few_threads_and_one_raft_port(tmp_path: Path) -> None:
    lc = start_cluster(str(tmp_path / "c"), shards=SHARDS, timeout=120.0)
    try:
        keys = {s: key_on_shard(lc.map, s) for s in range(SHARDS)}
        with Client(cluster=lc.config) as c:
            for s, key in keys.items():
                c.put(key, b"v%d" % s)
            for s, key in keys.items():
                assert c.get(key) == b"v%d" % s
        for name, info in lc.map.nodes.items():
            pid = lc.pid(name)
            assert pid is not None
            assert _threads(pid) <= THREADS_MAX, f"{name} runs {_threads(pid)} threads for {SHARDS} shards"
            assert _listening(info.host, info.raft_port)
            assert not _listening(info.host, info.raft_port + 1), "a per-shard Raft port is still open"
        views = lc.shard_views()
        assert sorted(views) == sorted(lc.map.nodes)
        for name, view in views.items():
            raft = view["raft"]
            assert raft["driver_alive"] and raft["encrypted"], raft
            assert len(raft["peers_connected"]) == 2, raft  # one connection per peer node for all 32 groups
            for s in range(SHARDS):
                shard = view["shards"][str(s)]
                assert shard["ticking"], (name, s)
                assert all(p["connected"] for p in shard["peers"].values()), (name, s, shard["peers"])
    finally:
        lc.stop()

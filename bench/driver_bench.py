"""The Raft write path without RESP or client processes: 3 nodes' drivers, networks and engines in one process.

Each node is what ``raftkv.server.node`` builds around its groups: a ``RaftNetwork`` on loopback, a
``RaftDriver`` and one storage ``Engine`` shared by its ``ShardReplica`` groups (pipelined with a committer
thread when this tree's engine has one). Closed-loop callers propose one ``set`` each to their shard's leader
and wait for it to be applied, at 1 and 32 callers. Reported: puts/s, p50/p90 latency, and engine commits per
put per node (every node commits every write it holds; a node's commits are its disk's fsync pairs).

For an A/B, run this file with each tree's interpreter, alternating (the engine and driver come from the
tree whose ``raftkv`` the interpreter imports)::

    cd /work/main && .venv/bin/python /path/to/bench/driver_bench.py
    cd /work/wt-x && .venv/bin/python bench/driver_bench.py

Everything shares one GIL, so absolute figures are lower than a real cluster's; compare runs of one machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.getcwd())  # the tree being measured (see module doc), not necessarily this file's

from raftkv.driver import RaftDriver  # noqa: E402
from raftkv.engine import Engine  # noqa: E402
from raftkv.raftnet import RaftNetwork, member_id  # noqa: E402
from raftkv.replica import APPLIED, ShardReplica  # noqa: E402

KEY = b"driver-bench-key"
VALUE = b"v" * 100


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class BenchNode:
    """One node: network, driver, one engine (pipelined if the engine can be) and its replicas."""

    def __init__(self, port: int, ports: list[int], shards: int, root: str) -> None:
        self.network = RaftNetwork("127.0.0.1", port, cluster="bench", key=KEY, encrypt=True, timeout_s=1.0)
        self.driver = RaftDriver(self.network, period_s=0.01, flush_threads=0)
        self.engine = Engine(os.path.join(root, f"{port}-engine"), map_size=1 << 30)
        self.pipelined = hasattr(self.engine, "start_committer")
        if self.pipelined:
            self.engine.start_committer(self.driver.on_durable)
        self.replicas = {}
        for shard in range(shards):
            peers = [member_id(f"127.0.0.1:{p}", shard) for p in ports if p != port]
            r = ShardReplica(shard, member_id(f"127.0.0.1:{port}", shard), peers,
                             os.path.join(root, f"{port}-{shard}"), engine=self.engine, driver=self.driver)
            self.replicas[shard] = r
            self.driver.add(r)
        self.driver.start()

    def close(self) -> None:
        self.driver.stop()
        for r in self.replicas.values():
            r.destroy()
        self.engine.close()
        self.driver.close()
        self.network.close()


def _leader(nodes: list[BenchNode], shard: int) -> ShardReplica | None:
    for n in nodes:
        if n.replicas[shard].is_leader():
            return n.replicas[shard]
    return None


def _put(replica: ShardReplica, key: bytes) -> bool:
    done = threading.Event()
    out: list[str] = []

    def cb(kind: str, _result: object) -> None:
        out.append(kind)
        done.set()

    replica.propose([("set", key, VALUE)], replica.log_now_ms(), cb)
    return done.wait(10) and out == [APPLIED]


def run_point(nodes: list[BenchNode], shards: int, callers: int, duration_s: float) -> dict[str, float]:
    """Closed loop: ``callers`` threads put for ``duration_s``; puts/s, latency and commits per put per node."""
    latencies: list[float] = []
    failed = [0]
    commits_before = [n.engine.stats().count for n in nodes]
    stop = time.monotonic() + duration_s

    def caller(i: int) -> None:
        shard = i % shards
        while time.monotonic() < stop:
            leader = _leader(nodes, shard)
            t0 = time.perf_counter()
            if leader is None or not _put(leader, b"k%d" % i):
                failed[0] += 1
                time.sleep(0.01)
                continue
            latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    puts = len(latencies)
    commits = [n.engine.stats().count - c for n, c in zip(nodes, commits_before, strict=True)]
    return {
        "puts_per_s": puts / duration_s,
        "p50_ms": latencies[puts // 2] * 1e3 if puts else float("nan"),
        "p90_ms": latencies[puts * 9 // 10] * 1e3 if puts else float("nan"),
        "commits_per_put_per_node": sum(commits) / len(nodes) / puts if puts else float("nan"),
        "failed": failed[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per point")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--callers", default="1,32", help="comma list of closed-loop callers")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="driver-bench-", dir=os.getcwd())
    ports = _free_ports(3)
    nodes = [BenchNode(p, ports, args.shards, root) for p in ports]
    try:
        deadline = time.monotonic() + 30
        while any(_leader(nodes, s) is None for s in range(args.shards)):
            if time.monotonic() > deadline:
                raise SystemExit("no leader in 30 s")
            time.sleep(0.05)
        run_point(nodes, args.shards, 4, 1.0)  # warm-up
        mode = "pipelined" if nodes[0].pipelined else "synchronous"
        for callers in (int(c) for c in args.callers.split(",")):
            r = run_point(nodes, args.shards, callers, args.duration)
            print(f"{mode} callers={callers}: {r['puts_per_s']:.0f} puts/s  p50 {r['p50_ms']:.2f} ms  "
                  f"p90 {r['p90_ms']:.2f} ms  engine commits per put per node {r['commits_per_put_per_node']:.2f}"
                  f"  failed {r['failed']}", flush=True)
    finally:
        for n in nodes:
            n.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

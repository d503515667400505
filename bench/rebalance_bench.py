"""Time one online rebalance: 3 -> 4 nodes, 4 shards, N keys preloaded.

Usage: ``python bench/rebalance_bench.py [--keys N] [--value-size B] [--dir DIR]``

Creates a loopback cluster (3 nodes, 4 shards, replication 3), preloads N keys, adds a fourth node
with no replica (``raftkv node add --empty``), then runs ``raftkv rebalance`` and reports its wall
time and per-step lines (each add waits until the new replica has caught up, by log or snapshot).
Afterwards it checks that every shard's replicas report the same key count. All nodes run on this
one machine, so the copy competes with the nodes for its cores. Doubling 3 -> 6 nodes, each on its own
loopback address, with throughput before and after: bench/double_bench.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from raftkv.bench.preload import preload
from raftkv.bench.scaleout import keys_per_shard, run_cli
from raftkv.bench.systems import RaftKVSystem
from raftkv.cluster import LocalCluster, free_base_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--dir", default=None, help="cluster directory (default: a temporary one)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rebalance-bench-") as tmp:
        system = RaftKVSystem(a.dir or tmp, shards=4, nodes=3)
        lc = system.lc
        try:
            loaded = preload(system, a.keys, a.value_size)
            print(f"preloaded {a.keys} keys of {a.value_size} B in {loaded:.1f} s")
            port = free_base_port(1, 1)
            cfg = str(lc.config)
            _, out = run_cli("node", "add", f"127.0.0.1:{port}", "--empty", "--cluster", cfg)
            print(out.strip().splitlines()[-1])
            took, out = run_cli("rebalance", "--cluster", cfg)
            print(out.strip())
            print(f"raftkv rebalance: {took:.1f} s wall ({a.keys} keys, 3 -> 4 nodes, 4 shards)")
            print("keys per shard on its replicas:", json.dumps(keys_per_shard(LocalCluster(lc.dir))))
        finally:
            LocalCluster(lc.dir).stop()
            lc.stop()


if __name__ == "__main__":
    main()

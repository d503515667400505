"""Cross-shard transaction latency/throughput against single-shard writes.

    .venv/bin/python bench/txn_bench.py [--seconds 5] [--threads 1,8]

Starts a fresh local cluster (3 nodes x 3 shards, loopback) in a temporary
directory, then for each workload and thread count runs closed-loop clients
through ``raftkv.Client`` for ``--seconds`` and prints ops/s and latency
percentiles as a Markdown table:

* ``put``: single-key ``Client.put`` (one Raft entry on one shard);
* ``txn-1shard``: a 2-key conditional txn whose keys share a shard (one entry);
* ``mset-2shards`` / ``mset-3shards``: ``Client.mset`` over keys on 2 or 3 shards (2PC).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.client import Client, RaftKVError  # noqa: E402
from raftkv.cluster import LocalCluster  # noqa: E402


def keys_on(m, shard: int, n: int, prefix: str) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        k = f"{prefix}{i}"
        if m.shard_for_key(k.encode()) == shard:
            out.append(k)
        i += 1
    return out


def run(lc: LocalCluster, workload: str, threads: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(t: int) -> None:
        keys = [keys_on(lc.map, s, 2, f"b{t}_{s}_") for s in range(3)]
        mine: list[float] = []
        with Client(cluster=lc.config, timeout=10.0) as c:
            i = 0
            while time.monotonic() < stop:
                i += 1
                t0 = time.perf_counter()
                try:
                    if workload == "put":
                        c.put(keys[0][0], str(i))
                    elif workload == "txn-1shard":
                        c.txn().if_exists(keys[0][0]).then_put(keys[0][0], str(i)).then_put(
                            keys[0][1], str(i)).else_put(keys[0][0], str(i)).commit(retries=10)
                    elif workload == "mset-2shards":
                        c.mset({keys[0][0]: str(i), keys[1][0]: str(i)})
                    else:
                        c.mset({keys[0][0]: str(i), keys[1][0]: str(i), keys[2][0]: str(i)})
                except RaftKVError:
                    errors[0] += 1
                    continue
                mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [0.0] * 99
    return {"ops": len(lat) / seconds, "p50": q[49] * 1000, "p99": q[98] * 1000, "errors": errors[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", default="1,8")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        lc = LocalCluster.create(d, nodes=3, shards=3)
        lc.start()
        try:
            lc.wait_ready(60)
            print(f"cluster: 3 nodes x 3 shards on loopback, {os.cpu_count()} CPUs, {args.seconds:g} s per row\n")
            print("| workload | threads | ops/s | p50 ms | p99 ms | errors |")
            print("|---|---|---|---|---|---|")
            for threads in [int(x) for x in args.threads.split(",")]:
                for w in ("put", "txn-1shard", "mset-2shards", "mset-3shards"):
                    r = run(lc, w, threads, args.seconds)
                    print(f"| {w} | {threads} | {r['ops']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |",
                          flush=True)
        finally:
            lc.stop()


if __name__ == "__main__":
    main()

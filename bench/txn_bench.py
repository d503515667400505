"""Cross-shard transaction latency/throughput against single-shard writes.

    .venv/bin/python bench/txn_bench.py [--seconds 5] [--threads 1,8]
    .venv/bin/python bench/txn_bench.py --hot-key [--seconds 10] [--threads 8] [--retries 3]

Starts a fresh local cluster (3 nodes x 3 shards, loopback) in a temporary
directory, then for each workload and thread count runs closed-loop clients
through ``raftkv.Client`` for ``--seconds`` and prints ops/s and latency
percentiles as a Markdown table:

* ``put``: single-key ``Client.put`` (one Raft entry on one shard);
* ``txn-1shard``: a 2-key conditional txn whose keys share a shard (one entry);
* ``mset-2shards`` / ``mset-3shards``: ``Client.mset`` over keys on 2 or 3 shards (2PC).

``--hot-key`` instead measures contention on one key (issue 12): every client
runs transactions that APPEND to the same key and put a key of its own on
another shard, ``commit(retries=--retries)``, first against a cluster started
with ``--txn-no-wait-die`` and plain ids (no-wait, as before wait-die), then
against a fresh cluster with wait-die (the default).  It prints commits/s,
aborts per commit (attempts that did not commit, per commit), transactions
that ran out of retries, the worst attempts and latency of one transaction, and
checks the key's final length against the commits.
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


def run_hot(lc: LocalCluster, threads: int, seconds: float, retries: int, wait_die: bool) -> dict:
    hot = keys_on(lc.map, 0, 1, "hot")[0]
    mine = keys_on(lc.map, 1, threads, "hotside")
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    rows: list[tuple[bool, int, float]] = []  # (committed, attempts, seconds) per transaction

    def worker(t: int) -> None:
        out = []
        with Client(cluster=lc.config, timeout=30.0) as c:
            i = 0
            while time.monotonic() < stop:
                i += 1
                txn = c.txn().then_append(hot, "x").then_put(mine[t], str(i))
                calls = [0]
                send = txn._request

                def counted(shard: int, args: list, send=send, calls=calls) -> object:
                    calls[0] += 1
                    return send(shard, args)
                txn._request = counted
                t0 = time.perf_counter()
                try:
                    txn.commit(retries=retries, wait_die=wait_die)
                    ok = True
                except RaftKVError:
                    ok = False
                out.append((ok, calls[0], time.perf_counter() - t0))
        with lock:
            rows.extend(out)

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.monotonic() - t0  # the last transactions finish after 'stop'
    with Client(cluster=lc.config, timeout=30.0) as c:
        length = len(c.get(hot) or b"")
    commits = sum(1 for ok, _, _ in rows if ok)
    lat = sorted(s for ok, _, s in rows if ok) or [0.0]
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {"commits_s": commits / elapsed, "commits": commits, "length": length,
            "aborts_per_commit": (sum(n for _, n, _ in rows) - commits) / max(1, commits),
            "failed": sum(1 for ok, _, _ in rows if not ok), "txns": len(rows),
            "worst_attempts": max((n for _, n, _ in rows), default=0),
            "p50": q[49] * 1000, "p99": q[98] * 1000, "max": max(s for _, _, s in rows) * 1000 if rows else 0.0}


def main_hot(args: argparse.Namespace) -> None:
    print(f"hot key: 3 nodes x 3 shards on loopback, {os.cpu_count()} CPUs, {args.seconds:g} s per row, "
          f"commit(retries={args.retries}); each transaction APPENDs to one key and puts one of its own on "
          "another shard\n")
    print("| mode | clients | commits/s | aborts per commit | out of retries | worst attempts | "
          "p50 ms | p99 ms | worst ms | key length = commits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in [int(x) for x in args.threads.split(",")]:
        for mode in ("no-wait", "wait-die"):
            with tempfile.TemporaryDirectory() as d:
                node_args = ["--txn-no-wait-die"] if mode == "no-wait" else []
                lc = LocalCluster.create(d, nodes=3, shards=3, node_args=node_args)
                lc.start()
                try:
                    lc.wait_ready(60)
                    r = run_hot(lc, threads, args.seconds, args.retries, wait_die=mode == "wait-die")
                finally:
                    lc.stop()
            print(f"| {mode} | {threads} | {r['commits_s']:.1f} | {r['aborts_per_commit']:.2f} | "
                  f"{r['failed']} of {r['txns']} | {r['worst_attempts']} | {r['p50']:.0f} | {r['p99']:.0f} | "
                  f"{r['max']:.0f} | {r['length'] == r['commits']} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", default=None, help="client counts (default 1,8; with --hot-key 8)")
    ap.add_argument("--hot-key", action="store_true", help="contention on one key, no-wait vs wait-die")
    ap.add_argument("--retries", type=int, default=3, help="--hot-key: each transaction's conflict budget")
    args = ap.parse_args()
    if args.hot_key:
        args.threads = args.threads or "8"
        main_hot(args)
        return
    args.threads = args.threads or "1,8"
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

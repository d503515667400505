"""One hot key, many cross-shard writers: throughput and how many attempts the unluckiest needed.

    .venv/bin/python bench/hotkey_bench.py [--writers 8] [--seconds 10] [--mode txn,mset]

Starts a fresh local cluster (3 nodes x 3 shards, loopback) in a temporary
directory.  Every writer writes the same hot key plus a key of its own on
another shard, in a closed loop, for ``--seconds``:

* ``txn``: ``RAFTKV.TXN ID id ... PUT hot v PUT mine v``, retried by the writer
  on ``-TXNCONFLICT``/``-TRYAGAIN`` with a fresh id (echoing the ``PRIO`` token
  of the error when the server gives one, as ``Txn.commit`` does), up to
  ``--max-attempts``; the attempts of every transaction are counted;
* ``mset``: ``MSET hot v mine v`` (the node retries conflicts itself); the
  ``-TXNCONFLICT`` replies it gives up with are counted.

Prints one Markdown row per mode: commits/s, attempts per committed
transaction (mean, p99, max), transactions given up, errors.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.client import Client, RaftKVError  # noqa: E402
from raftkv.cluster import LocalCluster  # noqa: E402

try:  # the PRIO token of a conflict error (absent in versions without wait-die priorities)
    from raftkv.txnrun import ahead_of, prio_token_of  # noqa: E402
except ImportError:  # pragma: no cover - the "before" side of a comparison
    def prio_token_of(message: str) -> str | None:  # type: ignore[misc]
        return None

    def ahead_of(message: str) -> int | None:  # type: ignore[misc]
        return None


def keys_on(m, shard: int, n: int, prefix: str) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        k = f"{prefix}{i}"
        if m.shard_for_key(k.encode()) == shard:
            out.append(k)
        i += 1
    return out


def run(lc: LocalCluster, mode: str, writers: int, seconds: float, max_attempts: int, step: float = 0.01) -> dict:
    hot = keys_on(lc.map, 0, 1, "hot")[0]
    attempts: list[int] = []
    gave_up = [0]
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(w: int) -> None:
        mine = keys_on(lc.map, 1, 1, f"w{w}_")[0]
        local: list[int] = []
        with Client(cluster=lc.config, timeout=20.0) as c:
            i = 0
            while time.monotonic() < stop:
                i += 1
                v = f"{w}.{i}".encode()
                if mode == "mset":
                    try:
                        c._request(0, [b"MSET", hot.encode(), v, mine.encode(), v], write=True)
                        local.append(1)
                    except RaftKVError as e:
                        with lock:
                            if e.code == "TXNCONFLICT":
                                gave_up[0] += 1
                            else:
                                errors[e.code] = errors.get(e.code, 0) + 1
                    continue
                prio = None
                for a in range(1, max_attempts + 1):
                    args = [b"RAFTKV.TXN", b"ID", uuid.uuid4().hex.encode()]
                    if prio is not None:
                        args += [b"PRIO", prio.encode()]
                    args += [b"0", b"2", b"PUT", hot.encode(), v, b"PUT", mine.encode(), v, b"0"]
                    try:
                        c._request(0, args, write=True)
                    except RaftKVError as e:
                        if e.code not in ("TXNCONFLICT", "TRYAGAIN"):
                            with lock:
                                errors[e.code] = errors.get(e.code, 0) + 1
                            break
                        prio = prio or prio_token_of(e.message)
                        if a == max_attempts:
                            with lock:
                                gave_up[0] += 1
                            break
                        ahead = ahead_of(e.message)  # as Txn.commit: about when its turn comes, if told
                        delay = min(0.5, step * (ahead + 1) if ahead is not None else 0.01 * 2 ** a)
                        time.sleep(delay * random.uniform(0.5, 1.5))
                        continue
                    local.append(a)
                    break
        with lock:
            attempts.extend(local)

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(writers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    attempts.sort()
    q = statistics.quantiles(attempts, n=100) if len(attempts) > 1 else [float(attempts[0] if attempts else 0)] * 99
    return {"commits": len(attempts) / seconds, "mean": statistics.fmean(attempts) if attempts else 0.0,
            "p99": q[98], "max": attempts[-1] if attempts else 0, "gave_up": gave_up[0], "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mode", default="txn,mset")
    ap.add_argument("--max-attempts", type=int, default=30, help="txn mode: a writer gives up after this many")
    ap.add_argument("--step", type=float, default=0.02,
                    help="txn mode: retry delay per waiter ahead (QUEUE_STEP_S); the backoff starts at 0.01")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        lc = LocalCluster.create(d, nodes=3, shards=3)
        lc.start()
        try:
            lc.wait_ready(60)
            import raftkv
            print(f"code: {os.path.dirname(raftkv.__file__)}; 3 nodes x 3 shards on loopback, {os.cpu_count()} CPUs, "
                  f"{args.writers} writers, {args.seconds:g} s per row\n")
            print("| mode | commits/s | attempts mean | p99 | max | gave up | errors |")
            print("|---|---|---|---|---|---|---|")
            for mode in args.mode.split(","):
                r = run(lc, mode, args.writers, args.seconds, args.max_attempts, args.step)
                print(f"| {mode} | {r['commits']:.1f} | {r['mean']:.2f} | {r['p99']:.0f} | {r['max']} | "
                      f"{r['gave_up']} | {r['errors'] or ''} |", flush=True)
        finally:
            lc.stop()


if __name__ == "__main__":
    main()

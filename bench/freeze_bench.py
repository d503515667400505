"""Time a shard add's freeze step when the source shards' leadership moved just before it (3 nodes, 2 -> 3
shards, N keys of 100 B, one writer).

Usage: ``python bench/freeze_bench.py [--keys N] [--runs R]``

Both sources' leaders are moved to n1 first, so the writer and the command learn n1 as their leader. When the
pre-copy of a source ends, both leaderships move to n2 and the run goes on 1 s later: the writer and the command
still send to n1, which forwards to n2 over its one link to it (replies in order). Before the fix in
``raftkv.server.router`` (a forwarded write of a frozen key waits at the node it came in to), the writer's write
of a key of the first frozen source waited at n2 for its whole budget (4.5 s) and the freeze of the second source
was answered behind it: ``bench/reshard_bench.py`` showed that about 1 run in 20, after a leadership change.
Prints, per run, the freeze step's seconds and the writer's latencies during the add.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time

from raftkv import Client
from raftkv.cluster import LocalCluster
from raftkv.membership import Operator
from raftkv.resharder import Resharder


def one_run(keys: int) -> str:
    with tempfile.TemporaryDirectory(prefix="freeze-bench-") as d:
        lc = LocalCluster.create(d, nodes=3, shards=2)
        lc.start()
        try:
            lc.wait_ready(60)
            for s in (0, 1):
                lc.transfer_leader(s, "n1")
            names = [f"key-{i}" for i in range(keys)]
            with Client(cluster=lc.config, timeout=30) as c:
                for i in range(0, keys, 500):
                    c.mset({k: "x" * 100 for k in names[i:i + 500]})
            lat: list[float] = []
            stop, during = threading.Event(), threading.Event()

            def writer() -> None:
                with Client(cluster=lc.config, timeout=30) as c:
                    while not stop.is_set():
                        t = time.monotonic()
                        c.put(random.choice(names), "y" * 100)
                        if during.is_set():
                            lat.append(time.monotonic() - t)

            w = threading.Thread(target=writer, daemon=True)
            w.start()
            time.sleep(1.0)
            moved: list[int] = []

            def say(msg: str) -> None:
                if "pre-copied" in msg and not moved:
                    moved.append(1)
                    for s in (0, 1):
                        lc.transfer_leader(s, "n2")
                    time.sleep(1.0)

            during.set()
            result = Resharder(Operator(lc.config, timeout=30.0, say=lambda _m: None), step_timeout=60.0,
                               say=say).run()
            during.clear()
            stop.set()
            w.join(10)
            lat.sort()
            return (f"freeze {result.seconds['freeze']:.2f} s; writer during the add: {len(lat)} writes, "
                    f"p99 {lat[int(0.99 * (len(lat) - 1))] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")
        finally:
            lc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    for i in range(args.runs):
        print(f"run {i + 1}: {one_run(args.keys)}", flush=True)


if __name__ == "__main__":
    main()

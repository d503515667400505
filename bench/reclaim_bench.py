"""Time reclaiming a removed group's engine data, chunk by chunk (raftkv.reclaim).

Usage: ``python bench/reclaim_bench.py [--keys N] [--value-size B] [--chunk K]``

Fills a fresh engine with two groups of N keys each, marks one for reclaim and calls ``Reclaimer.step`` until
it is done, as the node's driver does once per loop. Prints the engine's usage before and after, the number
of chunks, the median and slowest chunk (each one durable engine commit: what a driver loop would wait for)
and the keys deleted per second of chunk work (a node adds a driver loop's wait, 10 ms at most, per chunk).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from raftkv.engine import Engine
from raftkv.kvstore import data_prefix, pack
from raftkv.reclaim import CHUNK_KEYS, Reclaimer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=CHUNK_KEYS)
    args = ap.parse_args()
    value = b"v" * args.value_size
    with tempfile.TemporaryDirectory() as d:
        engine = Engine(d, map_size=1 << 34)
        for group in (1, 2):
            engine.commit_now(lambda b, g=group: b.put_many(
                (data_prefix(g, 0) + b"key%09d" % i, pack((value, i))) for i in range(args.keys)))
        print("before:", engine.usage())
        rc = Reclaimer(engine, chunk_keys=args.chunk)
        rc.mark(1)
        times = []
        while True:
            t = time.perf_counter()
            more = rc.step()
            times.append(time.perf_counter() - t)
            if not more:
                break
        print("after: ", engine.usage(), rc.stats())
        print(f"chunks={len(times)} chunk_ms median={statistics.median(times) * 1000:.1f} "
              f"max={max(times) * 1000:.1f} keys_per_s_of_chunk_work={args.keys / sum(times):,.0f}")
        engine.close()


if __name__ == "__main__":
    main()

"""Time the scale-out planner (shards/plan.py) on cluster-map-shaped inputs.

Usage: ``python bench/plan_bench.py [--repeat N]``

For each size: ``plan_replicas`` after a node add (N-1 -> N nodes) and for a
drain (N -> N-1), on the placement a shard map makes by default (shard ``s`` on
``sorted(names)[(s + i) % N]``, R = 3), and ``plan_shard_add`` (shards 0..S-1 + S,
256 vnodes). Prints the median of ``--repeat`` runs and the plan's size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from shards.plan import plan_replicas, plan_shard_add
from shards.ring import Ring

T = TypeVar("T")
SIZES = ((16, 9), (100, 9), (1024, 16))  # (shards, nodes); 1024 is the shard map's limit


def median_s(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), out


def even(names: list[str], shards: int, r: int = 3) -> dict[int, tuple[str, ...]]:
    ordered = sorted(names)
    return {s: tuple(ordered[(s + i) % len(ordered)] for i in range(r)) for s in range(shards)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for shards, nodes in SIZES:
        names = [f"n{i}" for i in range(1, nodes + 1)]
        for what, old, new in (("node add", names[:-1], names), ("drain", names, names[:-1])):
            dt, plan = median_s(partial(plan_replicas, even(old, shards), new), args.repeat)
            print(f"plan_replicas  {shards:>4} shards, {what:<8} {len(old):>2} -> {len(new):>2} nodes: "
                  f"{dt * 1000:8.1f} ms, {len(plan.steps)} steps, {plan.adds} adds")
        dt, movement = median_s(partial(plan_shard_add, Ring(range(shards))), args.repeat)
        print(f"plan_shard_add {shards:>4} -> {shards + 1} shards: {dt * 1000:8.1f} ms, "
              f"{len(movement.arcs)} arcs, {100 * movement.fraction:.2f}% of the ring")


if __name__ == "__main__":
    main()

"""CPU an idle cluster burns: each node's CPU-seconds per second with no client, for a few shard counts.

    .venv/bin/python bench/idle_cpu.py --shards 6,64 [--seconds 10]

A fresh 3-node cluster per shard count; once every shard has a leader and 3 s have passed, each node's CPU
time (``/proc/PID/stat``) is read twice, ``--seconds`` apart. What an idle node spends is its groups'
heartbeats (every leader sends one to each follower every 25 ms), the followers' replies and the driver's
ticks: a cost per group that more shards multiply.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.bench.systems import RaftKVSystem, proc_cpu_s  # noqa: E402


def idle_cpu(shards: int, seconds: float) -> list[float]:
    """Each node's CPU-seconds per second while idle, on a fresh 3-node cluster of ``shards`` shards."""
    d = tempfile.mkdtemp(prefix="raftkv-idle-")
    system = RaftKVSystem(d, shards=shards)
    try:
        time.sleep(3)
        pids = system.pids()
        before = [proc_cpu_s(p) for p in pids]
        time.sleep(seconds)
        after = [proc_cpu_s(p) for p in pids]
        return [round((b - a) / seconds, 3) for a, b in zip(before, after, strict=True)]
    finally:
        system.stop()
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default="1,6,64", help="comma list of shard counts")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    for n in (int(x) for x in args.shards.split(",")):
        cpu = idle_cpu(n, args.seconds)
        print(f"{n} shards: idle CPU per node {', '.join(f'{c:.3f}' for c in cpu)} (sum {sum(cpu):.2f} of "
              f"{os.cpu_count()} CPUs)", flush=True)


if __name__ == "__main__":
    main()

"""A long load in windows: does throughput hold, or fall the longer the cluster runs?

    .venv/bin/python bench/txn_soak.py --workload mset2 --clients 32 --windows 12 --window 10

Starts a fresh local 3-node cluster (3 shards), preloads the keyspace, then runs the workload in back-to-back
windows on the same cluster and prints one line per window (ops/s, p50/p99/p99.9, errors), then what the nodes
logged over the whole run: leader elections won after start-up, driver iterations over 50 ms (and how many of
those were a slow engine commit), the last checkpoint's metadata size per shard, and each node's garbage
collections (``raftkv.heap``: how many full ones, the longest pause, objects frozen). A 10-second benchmark
point cannot show state that grows with every transaction (the ten minutes of history a shard keeps); this can.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftkv.bench.load import LoadParams, LoadRun  # noqa: E402
from raftkv.bench.preload import preload  # noqa: E402
from raftkv.bench.report import fmt_row  # noqa: E402
from raftkv.bench.systems import RaftKVSystem  # noqa: E402


def log_summary(directory: str) -> str:
    """Elections won after the first leaders, slow driver iterations, last checkpoint metadata per shard, and
    the time checkpoints took on the applying thread (``prep_ms``, and its own CPU ``cpu_ms``)."""
    won = slow = slow_sync = 0
    meta: dict[str, str] = {}
    prep: list[float] = []
    prep_cpu: list[float] = []
    for path in glob.glob(os.path.join(directory, "*.log")):
        for line in open(path, errors="replace"):
            if "event=role_change" in line and "new=leader" in line and " term=1" not in line:
                won += 1
            elif "event=driver_slow_iteration" in line:
                slow += 1
                m = re.search(r"sync_ms=(\d+)", line)
                if m and int(m.group(1)) >= 50:
                    slow_sync += 1
            elif "event=checkpoint_begin" in line:
                m = re.search(r"prep_ms=([\d.]+) cpu_ms=([\d.]+)", line)
                if m:
                    prep.append(float(m.group(1)))
                    prep_cpu.append(float(m.group(2)))
            elif "event=checkpoint " in line:
                m = re.search(r"shard=(\d+).*meta_bytes=(\d+)", line)
                if m:
                    meta[m.group(1)] = m.group(2)
    sizes = ", ".join(f"shard {s}: {int(b):,} B" for s, b in sorted(meta.items()))
    preps = (f"; checkpoints' time on the applying thread: median {statistics.median(prep):.1f} ms (its CPU "
             f"{statistics.median(prep_cpu):.1f} ms), max {max(prep):.1f} ms over {len(prep)}" if prep else "")
    return (f"leader elections after start-up: {won}; driver iterations over 50 ms: {slow} ({slow_sync} in an "
            f"engine commit); last checkpoint metadata: {sizes or 'none'}{preps}")


def heap_summary(views: dict[str, dict]) -> str:
    """Per node: full garbage collections, their longest pause, and the objects frozen (``raftkv.heap``)."""
    parts = []
    for name, st in sorted(views.items()):
        heap = st.get("heap")
        if heap:
            parts.append(f"{name}: {heap['collections'][2]} full, longest {heap['max_pause_ms'][2]:.0f} ms "
                         f"(young {max(heap['max_pause_ms'][:2]):.0f} ms), frozen {heap['frozen_objects']:,}")
    return "garbage collections: " + ("; ".join(parts) or "not reported")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mset2")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--window", type=float, default=10.0, help="seconds per window")
    ap.add_argument("--keyspace", type=int, default=10_000)
    ap.add_argument("--keep", action="store_true", help="keep the cluster directory (node logs) and print it")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="an extra `raftkv serve` argument for every node (repeat: --serve-arg=--gc-freeze-period "
                         "--serve-arg=0)")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="raftkv-soak-")
    s = RaftKVSystem(d, shards=3, node_args=a.serve_arg)
    try:
        preload(s, a.keyspace)
        t0 = time.monotonic()
        for _ in range(a.windows):
            r = LoadRun(s, LoadParams(a.workload, a.clients, a.window, warmup=0.5, keyspace=a.keyspace)).start().finish()
            print(f"{time.monotonic() - t0:6.0f} s  {fmt_row(r.row())}", flush=True)
        print(heap_summary(s.lc.shard_views()))
    finally:
        s.stop()
    print(log_summary(d))
    if a.keep:
        print(f"cluster directory: {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time one online shard add (3 nodes, 2 -> 3 shards) or removal (``--remove``: 3 -> 2 shards), N keys
preloaded, a writer running.

Usage: ``python bench/reshard_bench.py [--remove] [--keys N] [--value-size B] [--dir DIR]``

Creates a loopback cluster (3 nodes, 2 shards; 3 with ``--remove``), preloads N keys, starts one client
thread that overwrites preloaded keys one after another (session writes through ``raftkv.Client``), runs
``raftkv shard add`` (or ``raftkv shard remove``) and reports its wall time, its own summary line (keys
moved, per-step seconds) and the writer's latencies before and during the command (median, p99, max). Afterwards each shard's replicas
must report the same key count, and the counts must add up to N. All nodes run on this one machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from raftkv import Client
from raftkv.bench.preload import preload
from raftkv.bench.scaleout import keys_per_shard
from raftkv.bench.systems import RaftKVSystem
from raftkv.bench.workloads import key_name
from raftkv.cluster import LocalCluster


def _summary(lat: list[float]) -> str:
    if not lat:
        return "no writes"
    lat = sorted(lat)
    return (f"{len(lat)} writes, median {statistics.median(lat) * 1000:.1f} ms, "
            f"p99 {lat[int(0.99 * (len(lat) - 1))] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--dir", default=None, help="cluster directory (default: a temporary one)")
    ap.add_argument("--remove", action="store_true", help="remove shard 2 of 3 instead of adding shard 2")
    ap.add_argument("--chunk", type=int, default=None, help="raftkv shard add/remove --chunk (default: its own)")
    ap.add_argument("--pace", type=float, default=None, help="raftkv shard add/remove --pace (default: its own)")
    a = ap.parse_args()
    action, before, after = ("remove", 3, 2) if a.remove else ("add", 2, 3)
    with tempfile.TemporaryDirectory(prefix="reshard-bench-") as tmp:
        system = RaftKVSystem(a.dir or tmp, shards=before, nodes=3)
        lc = system.lc
        try:
            loaded = preload(system, a.keys, a.value_size)
            print(f"preloaded {a.keys} keys of {a.value_size} B in {loaded:.1f} s")
            samples: list[tuple[float, float]] = []  # (start, latency)
            stop = threading.Event()

            def write() -> None:
                rng = random.Random(1)
                with Client(cluster=lc.config, timeout=30.0) as c:
                    while not stop.is_set():
                        t = time.monotonic()
                        c.put(key_name(rng.randrange(a.keys)), b"v" * a.value_size)
                        samples.append((t, time.monotonic() - t))

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            time.sleep(2.0)
            t0 = time.monotonic()
            tuning = [*(["--chunk", str(a.chunk)] if a.chunk else []), *(["--pace", str(a.pace)] if a.pace else [])]
            done = subprocess.run([sys.executable, "-m", "raftkv", "shard", action, *tuning,
                                   "--cluster", str(lc.config)], capture_output=True, text=True, check=False)
            took = time.monotonic() - t0
            stop.set()
            writer.join(30)
            if done.returncode != 0:
                raise SystemExit(f"raftkv shard {action} failed:\n{done.stdout}{done.stderr}")
            print(done.stdout.strip())
            print(f"raftkv shard {action}: {took:.1f} s wall ({a.keys} keys, {before} -> {after} shards, 3 nodes)")
            print(f"writer before the {action}:", _summary([d for t, d in samples if t < t0]))
            print(f"writer during the {action}:", _summary([d for t, d in samples if t0 <= t <= t0 + took]))
            counts = keys_per_shard(LocalCluster(lc.dir))
            print("keys per shard on its replicas:", json.dumps(counts))
            assert sorted(counts) == list(range(after)), f"shards left: {sorted(counts)}"
            assert all(len(v) == 1 for v in counts.values()), "replicas disagree"
            assert sum(v[0] for v in counts.values()) == a.keys, "keys lost or stored twice"
        finally:
            LocalCluster(lc.dir).stop()
            lc.stop()


if __name__ == "__main__":
    main()

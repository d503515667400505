"""Time one online shard add (3 nodes, 2 -> 3 shards) or removal (``--remove``: 3 -> 2 shards), N keys
preloaded, a writer running.

Usage: ``python bench/reshard_bench.py [--remove] [--keys N] [--value-size B] [--chunk K] [--pace F] [--depth N] [--dir DIR] [--profile DIR]``

Creates a loopback cluster (3 nodes, 2 shards; 3 with ``--remove``), preloads N keys, starts one client
thread that overwrites preloaded keys one after another (session writes through ``raftkv.Client``), runs
``raftkv shard add`` (or ``raftkv shard remove``) and reports its wall time, its own summary line (keys
moved, per-step seconds) and the writer's latencies before and during the command (median, p99, max). Afterwards each shard's replicas
must report the same key count, and the counts must add up to N. All nodes run on this one machine.
When the pre-copy ends it prints, per node, the storage engine's commits and their seconds, the bytes the
process wrote to disk and its CPU seconds during the pre-copy (Linux ``/proc``).
``--profile DIR`` samples every node with py-spy during the pre-copy (``DIR/n1.txt``...: collapsed stacks,
one line per stack with its sample count; py-spy must be on PATH or next to the interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from raftkv import Client
from raftkv.bench.hist import nearest_rank
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
            f"p99 {nearest_rank(lat, 0.99) * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")


def _profile(lc: LocalCluster, out: str) -> list[subprocess.Popen]:
    """One py-spy sampler per running node, writing collapsed stacks to ``out/<node>.txt`` until ``_stop``."""
    os.makedirs(out, exist_ok=True)
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    procs = []
    for name in lc.map.nodes:
        pid = lc.pid(name)
        if pid is not None:
            procs.append(subprocess.Popen([spy if os.path.exists(spy) else "py-spy", "record", "--pid", str(pid),
                                           "--format", "raw", "--rate", "200", "--nonblocking", "--idle", "--threads",
                                           "-o", os.path.join(out, f"{name}.txt")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # let the samplers attach
    return procs


def _engine_report(lc: LocalCluster, before: dict[str, dict]) -> None:
    """Each node's storage engine commits since ``before``: how many, their seconds in all, the slowest."""
    for name, st in sorted(lc.shard_views().items()):
        e, b = st["engine"], before.get(name)
        if b is not None:
            io = _io(lc, name)
            print(f"{name} engine during the pre-copy: {e['commits'] - b['commits']} commits, "
                  f"{e['commit_s'] - b['commit_s']:.2f} s, slowest {e['commit_max_ms']:.0f} ms (since start); "
                  + ("" if io is None or b["io"] is None else
                     f"the process wrote {(io['write_bytes'] - b['io']['write_bytes']) / 1e6:.0f} MB to disk, "
                     f"used {io['cpu_s'] - b['io']['cpu_s']:.1f} CPU-s"))


def _io(lc: LocalCluster, name: str) -> dict | None:
    """A node process's bytes written to disk and CPU seconds so far (Linux /proc), or None."""
    pid = lc.pid(name)
    try:
        with open(f"/proc/{pid}/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return {"write_bytes": int(io["write_bytes"]),
            "cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}


def _stop(profilers: list[subprocess.Popen]) -> None:
    for p in profilers:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--dir", default=None, help="cluster directory (default: a temporary one)")
    ap.add_argument("--remove", action="store_true", help="remove shard 2 of 3 instead of adding shard 2")
    ap.add_argument("--chunk", type=int, default=None, help="raftkv shard add/remove --chunk (default: its own)")
    ap.add_argument("--pace", type=float, default=None, help="raftkv shard add/remove --pace (default: its own)")
    ap.add_argument("--depth", type=int, default=None, help="raftkv shard add/remove --depth (default: its own)")
    ap.add_argument("--profile", default=None, help="sample every node with py-spy during the pre-copy, into DIR")
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
            profilers = _profile(LocalCluster(lc.dir), a.profile) if a.profile else []
            engines = {n: {**v["engine"], "io": _io(LocalCluster(lc.dir), n)}
                       for n, v in LocalCluster(lc.dir).shard_views().items()}
            t0 = time.monotonic()
            tuning = [*(["--chunk", str(a.chunk)] if a.chunk else []), *(["--pace", str(a.pace)] if a.pace else []),
                      *(["--depth", str(a.depth)] if a.depth else [])]
            proc = subprocess.Popen([sys.executable, "-m", "raftkv", "shard", action, *tuning,
                                     "--cluster", str(lc.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            out = []
            for line in proc.stdout:  # type: ignore[union-attr]
                out.append(line)
                if line.startswith("frozen:"):  # the pre-copy is over: profile only it
                    _stop(profilers)
                    _engine_report(LocalCluster(lc.dir), engines)
            err = proc.stderr.read()  # type: ignore[union-attr]
            returncode = proc.wait()
            took = time.monotonic() - t0
            _stop(profilers)
            stop.set()
            writer.join(30)
            if returncode != 0:
                raise SystemExit(f"raftkv shard {action} failed:\n{''.join(out)}{err}")
            print("".join(out).strip())
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

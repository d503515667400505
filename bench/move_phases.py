"""Clients' write latency in each phase of one ``raftkv shard add`` (or ``shard remove``), against their latency
before it.

    .venv/bin/python bench/move_phases.py --keys 200000 [--shards 4] [--chunk K] [--pace F] [--runs 1] [--remove]

Creates a loopback cluster (3 nodes, ``--shards`` shards), preloads ``--keys`` keys of 100 B, starts two writer
threads (``bench/reshard_path.py``'s: each overwrites its own 500 keys, one write at a time), measures them for
3 s, then runs one shard add in this process (``raftkv.resharder.Resharder``, what the CLI runs) and splits the
writes by the phase they began in: the pre-copy (the sources still serve their moving keys), the frozen part
(replay, hand-off, open, the new map) and the cleanup (the sources delete the moved keys). Prints, per phase, its
length and the writes' p50 / p99 / max, and the p99 during the add over the p99 before it. With ``--remove`` the
move is the removal of the last shard, split into its mark (the remaining shards told what arrives, and told to
forget what an earlier run may have copied), its pre-copy (the removed shard still serves), and the frozen part
(freeze, the rest of the copy, the hand-off, the opening and the new map).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reshard_path import Writer  # noqa: E402

from raftkv import resharder  # noqa: E402
from raftkv.bench.hist import summary_ms  # noqa: E402
from raftkv.bench.preload import preload  # noqa: E402
from raftkv.bench.systems import RaftKVSystem  # noqa: E402


def _lat(samples: list[tuple[float, float]], t0: float, t1: float) -> dict:
    return summary_ms(latency for start, latency in samples if t0 <= start < t1)


def one_add(a: argparse.Namespace) -> dict:
    """One cluster, one add; per-phase seconds and writer latency."""
    with (contextlib.nullcontext(a.keep) if a.keep else tempfile.TemporaryDirectory(prefix="move-phases-")) as tmp:
        system = RaftKVSystem(tmp, shards=a.shards, nodes=3)
        try:
            preload(system, a.keys, 100)
            stop = threading.Event()
            writers = [Writer(i, str(system.lc.config), stop) for i in range(2)]
            for w in writers:
                w.start()
            time.sleep(a.before)
            marks: list[tuple[float, str]] = [(time.monotonic(), "start")]
            # The command in a process of its own, as an operator runs it: in this one its threads would take the
            # GIL from the writers' threads and count in their latency.
            cmd = [sys.executable, "-m", "raftkv", "shard", "remove" if a.remove else "add", "--cluster",
                   str(system.lc.config), "--chunk", str(a.chunk), "--pace", str(a.pace)]
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    marks.append((time.monotonic(), line.strip()))
            end = time.monotonic()
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd[2:4])} failed:\n" + "\n".join(m for _t, m in marks))
            time.sleep(0.5)
            stop.set()
            for w in writers:
                w.join(30)
            samples = [s for w in writers for s in w.samples]
            start = marks[0][0]
            frozen = next(t for t, m in marks if "frozen:" in m)
            if a.remove:
                marked = next(t for t, m in marks if "is being removed" in m)
                phases = {"mark": (start, marked), "pre-copy": (marked, frozen), "frozen": (frozen, end),
                          "whole removal": (start, end)}
                out = {"before": _lat(samples, 0.0, start)}
            else:
                placed = next(t for t, m in marks if "placed on" in m)
                on_ring = next(t for t, m in marks if "is on the ring" in m)
                phases = {"pre-copy": (placed, frozen), "frozen": (frozen, on_ring), "cleanup": (on_ring, end),
                          "whole add": (start, end)}
                out = {"before": _lat(samples, 0.0, start)}
            out["copy"] = [m[m.index("shard"):] for _t, m in marks if "pre-copied" in m]
            for name, (t0, t1) in phases.items():
                out[name] = {"seconds": round(t1 - t0, 1), **_lat(samples, t0, t1)}
            return out
        finally:
            system.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=4, help="shards before the add")
    ap.add_argument("--chunk", type=int, default=resharder.CHUNK_KEYS,
                    help="keys per entry of the pre-copy and the cleanup (raftkv shard add --chunk)")
    ap.add_argument("--pace", type=float, default=resharder.PACE, help="raftkv shard add --pace")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--remove", action="store_true", help="remove the last shard instead of adding one")
    ap.add_argument("--keep", metavar="DIR", help="run the cluster in DIR and keep it (the nodes' logs) after")
    ap.add_argument("--before", type=float, default=3.0, help="seconds of writes measured before the move")
    a = ap.parse_args()
    for run in range(a.runs):
        r = one_add(a)
        before = r["before"]
        print(f"run {run + 1}: before the {'removal' if a.remove else 'add'}: p50 {before['p50_ms']} / "
              f"p99 {before['p99_ms']} ms ({before['writes']} writes)")
        names = ("mark", "pre-copy", "frozen", "whole removal") if a.remove else (
            "pre-copy", "frozen", "cleanup", "whole add")
        for line in r["copy"]:
            print(f"  {line}")
        for name in names:
            p = r[name]
            lat = (f"p50 {p['p50_ms']} / p99 {p['p99_ms']} / max {p['max_ms']} ms ({p['writes']} writes)"
                   if p["writes"] else "no write began")
            ratio = f", p99 {p['p99_ms'] / before['p99_ms']:.1f}x before" if p["writes"] else ""
            print(f"  {name:9s} {p['seconds']:5.1f} s: {lat}{ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the linearizability checker on the shared lin-corpus.

Usage: ``python bench/checker_bench.py [CORPUS_DIR] [--repeat N]``

Prints the total time over all files, the etcd set (102 non-empty logs), the
slowest file, and the c50-ok / c50-bad times; the check time excludes parsing
(parsing is reported separately).  Each figure is the best of ``--repeat`` runs.
Verdicts are checked against the corpus README and mismatches reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jepsen_like.checker import LINEARIZABLE, NOT_LINEARIZABLE, check
from jepsen_like.history import read_history
from jepsen_like.models import default_model_for

DEFAULT = Path(os.environ.get("RAFTKV_LIN_CORPUS") or Path(__file__).resolve().parents[1].parent / "shared" / "lin-corpus")
LIN_ETCD = {2, 5, 7, 18, 25, 31, 38, 45, 48, 49, 51, 53, 56, 67, 75, 76, 80, 87, 92, 98, 100, 101, 102}


def expected(path: Path) -> str | None:
    if path.suffix == ".log":
        n = int(path.stem.split("_")[1])
        return None if n == 95 else (LINEARIZABLE if n in LIN_ETCD else NOT_LINEARIZABLE)
    return LINEARIZABLE if path.stem.endswith("-ok") else NOT_LINEARIZABLE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    files = sorted((args.corpus / "porcupine" / "jepsen").glob("etcd_*.log")) + sorted(
        (args.corpus / "porcupine" / "kv").glob("c*.txt")
    )
    if not files:
        print(f"no corpus at {args.corpus}", file=sys.stderr)
        return 2
    times: dict[Path, float] = {}
    parse_total = 0.0
    mismatches = []
    for path in files:
        t0 = time.perf_counter()
        ops, fmt = read_history(path)
        parse_total += time.perf_counter() - t0
        model = default_model_for(fmt)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            res = check(ops, model, timeout_s=120)
            best = min(best, time.perf_counter() - t0)
        times[path] = best
        exp = expected(path)
        if exp is not None and res.verdict != exp:
            mismatches.append(f"{path.name}: got {res.verdict}, expected {exp}")
    etcd = [p for p in times if p.suffix == ".log" and expected(p) is not None]
    slowest = max(times, key=times.__getitem__)
    kv = {p.stem: t for p, t in times.items() if p.suffix == ".txt"}
    print(f"files: {len(files)} (best of {args.repeat}), python {sys.version.split()[0]}")
    print(f"total check time:        {sum(times.values()) * 1000:9.1f} ms  (parsing {parse_total * 1000:.1f} ms)")
    print(f"etcd set ({len(etcd)} files):    {sum(times[p] for p in etcd) * 1000:9.1f} ms")
    print(f"slowest file:            {times[slowest] * 1000:9.1f} ms  ({slowest.name})")
    for name in ("c01-ok", "c01-bad", "c10-ok", "c10-bad", "c50-ok", "c50-bad"):
        if name in kv:
            print(f"{name + ':':25}{kv[name] * 1000:9.1f} ms")
    print(f"verdict mismatches:      {len(mismatches)}")
    for m in mismatches:
        print("  " + m)
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())

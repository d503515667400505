"""``raftkv-jepsen soak``: many short runs, rotating workloads x nemeses, one summary table.

Theory of operation
===================

:func:`rotation` is pure: from a ``random.Random`` it yields ``(workload, nemesis, seed)`` forever, every
workload x nemesis pair once per round in a shuffled order, each run with a fresh seed.  :func:`soak` runs
them one after another (each one a ``raftkv-jepsen run`` process: its own cluster, namespace and run
directory under the soak's directory) until the next run would end after the deadline, reads each run's
``results.json``, and rewrites ``soak.json`` and ``summary.md`` after every run, so an interrupted soak still
leaves its table.  :func:`summarize` and :func:`render` (pure) turn the runs' results into that table: per
nemesis and in total, the runs and their verdicts, the operations (ok / fail / info), the anomalies by class
and the availability (ok / invoked operations), overall and inside the fault windows.

Anomaly classes: a failed check's name (``linearizable``, ``mutex``, ``lost-update``, ``total-constant``,
``recovered``, ``final-reads``, ...), or for an Elle check the anomaly types it named (``G1c``, ``G-single``,
...).  A check with an unknown verdict (time limit) counts as ``unknown:<check>``, not as an anomaly.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from .nemesis import FAULT_KINDS, OPTIONAL_KINDS

__all__ = ["WORKLOADS", "DEFAULT_NEMESES", "rotation", "run_record", "summarize", "render", "soak"]

WORKLOADS = ("register", "counter", "bank", "txn", "lock", "append", "set")
DEFAULT_NEMESES = (*FAULT_KINDS, *OPTIONAL_KINDS, "all")  # reshard rotates in, though not part of ``all``
RUN_OVERHEAD_S = 15.0
"""Seconds a run takes beyond its load (cluster start, recovery, checks), for planning the last run."""


def rotation(workloads: list[str], nemeses: list[str], rng: random.Random) -> Iterator[tuple[str, str, int]]:
    """``(workload, nemesis, seed)`` forever: each pair once per round, shuffled, with fresh seeds."""
    pairs = list(itertools.product(workloads, nemeses))
    while True:
        rng.shuffle(pairs)
        for w, n in pairs:
            yield w, n, rng.randrange(1 << 31)


def run_record(workload: str, nemesis: str, seed: int, rc: int, res: dict[str, Any]) -> dict[str, Any]:
    """Pure: what the summary needs of one run's exit code and ``results.json`` (``{}`` if it wrote none)."""
    anomalies: Counter[str] = Counter()
    unknown: list[str] = []
    for name, c in (res.get("checks") or {}).items():
        if c.get("valid") is False:
            for a in c.get("anomaly_types") or [name]:
                anomalies[a] += 1
        elif c.get("valid") is None:
            unknown.append(f"unknown:{name}")
    counts = res.get("counts") or {}
    windows = res.get("availability") or []
    fault_w = [w for w in windows if w.get("window") != "quiet"]
    verdict = res.get("verdict") or {3: "unavailable"}.get(rc, "error")
    return {
        "workload": workload, "nemesis": nemesis, "seed": seed, "exit": rc, "verdict": verdict,
        "dir": res.get("dir", ""), "ops": counts.get("total", 0), "ok": counts.get("ok", 0),
        "fail": counts.get("fail", 0), "info": counts.get("info", 0), "anomalies": dict(anomalies),
        "unknown": unknown, "faults": len(res.get("faults") or []),
        "fault_errors": sum(1 for f in res.get("faults") or [] if f.get("error")),
        "window_ops": sum(w.get("ops", 0) for w in fault_w), "window_ok": sum(w.get("ok", 0) for w in fault_w),
        "harness_error": res.get("harness_error", ""),
    }


def _add(acc: dict[str, Any], r: dict[str, Any]) -> None:
    acc["runs"] += 1
    acc["verdicts"][r["verdict"]] += 1
    for k in ("ops", "ok", "fail", "info", "faults", "fault_errors", "window_ops", "window_ok"):
        acc[k] += r[k]
    acc["anomalies"].update(r["anomalies"])
    acc["unknown"].update(r["unknown"])


def _empty() -> dict[str, Any]:
    return {"runs": 0, "verdicts": Counter(), "ops": 0, "ok": 0, "fail": 0, "info": 0, "faults": 0,
            "fault_errors": 0, "window_ops": 0, "window_ok": 0, "anomalies": Counter(), "unknown": Counter()}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Pure: totals per nemesis and overall (``by_nemesis``, ``total``), plus the runs that did not pass."""
    by: dict[str, dict[str, Any]] = {}
    total = _empty()
    for r in records:
        _add(by.setdefault(r["nemesis"], _empty()), r)
        _add(total, r)
    return {"by_nemesis": by, "total": total,
            "not_passed": [r for r in records if r["verdict"] not in ("pass", "unavailable")]}


def _pct(num: int, den: int) -> str:
    return f"{100 * num / den:.1f} %" if den else "-"


def _row(name: str, a: dict[str, Any]) -> str:
    verdicts = ", ".join(f"{n} {v}" for v, n in sorted(a["verdicts"].items()))
    anomalies = ", ".join(f"{k} {n}" for k, n in sorted(a["anomalies"].items())) or "0"
    return (f"| {name} | {a['runs']} | {verdicts} | {a['ops']:,} | {a['ok']:,} / {a['fail']:,} / {a['info']:,} | "
            f"{anomalies} | {_pct(a['ok'], a['ops'])} | {_pct(a['window_ok'], a['window_ops'])} | "
            f"{a['faults']} ({a['fault_errors']} not injected) |")


def render(summary: dict[str, Any], header: str) -> str:
    """Pure: the summary as a Markdown table (per nemesis, then the total), and the runs that did not pass."""
    lines = [header, "",
             "| nemesis | runs | verdicts | operations | ok / fail / info | anomalies by class | availability | "
             "availability in fault windows | faults |",
             "|---|---:|---|---:|---|---|---:|---:|---:|"]
    for name, a in sorted(summary["by_nemesis"].items()):
        lines.append(_row(name, a))
    lines.append(_row("**total**", summary["total"]))
    unknown = summary["total"]["unknown"]
    if unknown:
        lines += ["", "Checks with an unknown verdict: " + ", ".join(f"{k} {n}" for k, n in sorted(unknown.items()))]
    if summary["not_passed"]:
        lines += ["", "Runs that did not pass:"]
        for r in summary["not_passed"]:
            what = ", ".join(sorted(r["anomalies"])) or r["harness_error"] or ", ".join(r["unknown"]) or r["verdict"]
            lines.append(f"- {r['workload']} / {r['nemesis']} seed {r['seed']}: {r['verdict']} ({what}) {r['dir']}")
    return "\n".join(lines) + "\n"


def _new_results(store: Path, seen: set[Path]) -> dict[str, Any]:
    found = sorted(p for p in store.glob("*/results.json") if p not in seen)
    seen.update(found)
    if not found:
        return {}
    try:
        return json.loads(found[-1].read_text())
    except (OSError, ValueError):
        return {}


def soak(minutes: float, run_time: float, store: str, workloads: list[str], nemeses: list[str],
         seed: int | None, extra: list[str], say: Any = print) -> int:
    """Run until ``minutes`` are up; returns 0 if every run passed, 1 if a check failed, 2 otherwise."""
    seed = random.SystemRandom().randrange(1 << 31) if seed is None else seed
    rng = random.Random(seed)
    soak_dir = Path(store).resolve() / f"soak-{datetime.now().strftime('%Y%m%dT%H%M%S')}"
    soak_dir.mkdir(parents=True)
    t0 = time.monotonic()
    deadline = t0 + minutes * 60
    records: list[dict[str, Any]] = []
    seen: set[Path] = set()
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    signal.signal(signal.SIGTERM, _interrupt)
    say(f"raftkv-jepsen soak: {minutes:g} min of {run_time:g} s runs, workloads {','.join(workloads)}, nemeses "
        f"{','.join(nemeses)}, seed {seed}; writing {soak_dir}")
    for workload, nemesis, run_seed in rotation(workloads, nemeses, rng):
        if time.monotonic() + run_time + RUN_OVERHEAD_S > deadline and records:
            break
        cmd = [sys.executable, "-m", "jepsen_like.cli", "run", "--store", str(soak_dir), "--workload", workload,
               "--nemesis", nemesis, "--time", str(run_time), "--seed", str(run_seed), *extra]
        with open(soak_dir / "runs.log", "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (below): the run stops its cluster, the soak ends
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                say("raftkv-jepsen soak: interrupted")
                break
        rec = run_record(workload, nemesis, run_seed, rc, _new_results(soak_dir, seen))
        records.append(rec)
        say(f"  run {len(records)}: {workload} / {nemesis} seed {run_seed}: {rec['verdict']}, {rec['ops']} ops"
            + (f", anomalies {rec['anomalies']}" if rec["anomalies"] else ""))
        _write(soak_dir, records, seed, minutes, t0, run_time)
    text = _write(soak_dir, records, seed, minutes, t0, run_time)
    say(text)
    verdicts = {r["verdict"] for r in records} - {"unavailable"}
    return 0 if verdicts <= {"pass"} and verdicts else 1 if "fail" in verdicts else 2


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _write(soak_dir: Path, records: list[dict[str, Any]], seed: int, minutes: float, t0: float,
           run_time: float) -> str:
    elapsed = (time.monotonic() - t0) / 60
    summary = summarize(records)
    header = (f"Soak of {elapsed:.1f} min (asked: {minutes:g}), {len(records)} runs of {run_time:g} s load, "
              f"soak seed {seed}; availability = ok / invoked operations.")
    text = render(summary, header)
    (soak_dir / "summary.md").write_text(text)
    (soak_dir / "soak.json").write_text(json.dumps({"seed": seed, "minutes": minutes, "elapsed_min": elapsed,
                                                    "runs": records, "summary": summary}, indent=1, default=str))
    return text

"""What a benchmark run reports: the machine it ran on, one line per measured point, the Markdown table
with raftkv's ratios against the peers, and the chart (matplotlib, optional: ``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from raftkv.bench.systems import ALL_PEERS, PEER_GROUPS
from raftkv.bench.workloads import WORKLOADS


def machine() -> dict:
    """CPU count and model, Python, kernel and memory of this machine (figures mean little without them)."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "mem_gb": round(int(mem) / 1024 / 1024, 1) if mem else None}


T = TypeVar("T")

#: What each round of a point keeps in the merged row (``merge_rounds``).
ROUND_FIELDS = ("ops_s", "p50_ms", "p99_ms", "p999_ms", "server_cpu")


def rotated(items: Sequence[T], k: int) -> list[T]:
    """``items`` starting at position ``k`` (modulo its length): round ``k``'s order, so that no system or shard
    count is always measured first."""
    k = k % len(items) if items else 0
    return [*items[k:], *items[:k]]


def merge_rounds(rows: list[dict]) -> dict:
    """One system's rows of one point, measured in several rounds, as one row: the median of each figure in
    ``ROUND_FIELDS`` (a machine shared with other work makes single runs swing by tens of percent), errors and
    operations summed, and every round's figures kept under ``rounds``. One row is returned as it is."""
    if len(rows) == 1:
        return rows[0]
    merged = dict(rows[0])
    for k in ROUND_FIELDS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        merged[k] = round(statistics.median(vals), 2) if vals else None
    for k in ("ops", "errors", "indeterminate", "acked", "maybe_applied", "txn_retries"):
        if k in rows[0]:
            merged[k] = sum(r.get(k, 0) for r in rows)
    merged["rounds"] = [{k: r.get(k) for k in ROUND_FIELDS} for r in rows]
    return merged


def add_ratios(doc: dict) -> None:
    """Add ``x_<peer>`` (raftkv ops/s ÷ the peer's at the same point) to raftkv's result rows.

    A peer measured through several APIs (etcd: JSON gateway and gRPC) counts with the faster at that
    point, named in ``x_<peer>_via``. Points measured in rounds (``merge_rounds``) take the median of the
    rounds' ratios, each round's raftkv figure against the same round's peer (the systems of one round ran
    back to back, so what else loaded the machine then weighs on both).
    """
    idx = {(r["system"], r["workload"], r["clients"]): r for r in doc["results"]}
    for r in doc["results"]:
        if r["system"] != "raftkv":
            continue
        for peer, apis in PEER_GROUPS.items():
            rows = [q for a in apis if (q := idx.get((a, r["workload"], r["clients"]))) and q["ops_s"]]
            if not rows:
                continue
            q = max(rows, key=lambda q: q["ops_s"])
            rounds = r.get("rounds")
            if rounds and all(len(p.get("rounds", ())) == len(rounds) for p in rows):
                best = [max(p["rounds"][i]["ops_s"] or 0.0 for p in rows) for i in range(len(rounds))]
                per_round = [mine["ops_s"] / peer for mine, peer in zip(rounds, best, strict=True) if peer]
                r[f"x_{peer}"] = round(statistics.median(per_round), 2)
                r[f"x_{peer}_rounds"] = [round(x, 2) for x in per_round]
            else:
                r[f"x_{peer}"] = round(r["ops_s"] / q["ops_s"], 2)
            if len(apis) > 1:
                r[f"x_{peer}_via"] = q["system"]


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def fmt_row(r: dict) -> str:
    """One result row as one line of progress output."""
    return (f"{r['system']:<9} {r['workload']:<9} c={r['clients']:<3} {r['ops_s']:>9.0f} ops/s  p50 "
            f"{_fmt_ms(r['p50_ms'])} p99 {_fmt_ms(r['p99_ms'])} p99.9 {_fmt_ms(r['p999_ms'])} ms  errors "
            f"{r['errors']} (indeterminate {r['indeterminate']})  server cpu {r['server_cpu']}  "
            f"generator cpu {r['generator'].get('cpu_s_per_s')}" + (f"  load avg {r['loadavg_1m']}" if "loadavg_1m" in r else ""))


def _ratio_note(r: dict, k: str) -> str:
    """`` (etcd-grpc; rounds 0.98/1.05/1.12)``: the peer's faster API and each round's ratio, when there are."""
    notes = [r[k + "_via"]] if k + "_via" in r else []
    if k + "_rounds" in r:
        notes.append("rounds " + "/".join(f"{x:.2f}" for x in r[k + "_rounds"]))
    return f" ({'; '.join(notes)})" if notes else ""


def render_table(doc: dict) -> str:
    """Markdown table: one row per (workload, clients, system), with ratios against the peers."""
    head = ("| workload | clients | system | ops/s | p50 ms | p99 ms | p99.9 ms | errors (indet.) | "
            "raftkv ÷ etcd (faster API) | raftkv ÷ redis |")
    lines = [head, "|" + "---|" * 10]
    order = {s: i for i, s in enumerate(["raftkv", *ALL_PEERS])}
    rows = sorted(doc["results"], key=lambda r: (WORKLOADS.index(r["workload"]), r["clients"],
                                                 order.get(r["system"], 9)))
    skipped = doc.get("not_applicable", {})
    for r in rows:
        ratios = [f"{r[k]:.2f}×" + _ratio_note(r, k) if k in r
                  else "-" if r["system"] == "raftkv" and set(PEER_GROUPS[k[2:]]) & set(skipped.get(r["workload"], {}))
                  else "" for k in ("x_etcd", "x_redis")]
        lines.append(f"| {r['workload']} | {r['clients']} | {r['system']} | {r['ops_s']:.0f} | "
                     f"{_fmt_ms(r['p50_ms'])} | {_fmt_ms(r['p99_ms'])} | {_fmt_ms(r['p999_ms'])} | "
                     f"{r['errors']} ({r['indeterminate']}) | {ratios[0]} | {ratios[1]} |")
    for w, why in doc.get("not_available", {}).items():
        lines.append(f"| {w} | - | raftkv | {why} | | | | | | |")
    for w, by_system in skipped.items():
        for system, why in by_system.items():
            lines.append(f"| {w} | - | {system} | - (not applicable: {why}) | | | | | | |")
    rb = doc.get("redis_benchmark") or {}
    if rb:
        lines += ["", "redis-benchmark -t set,get (one node's port; raftkv forwards keys whose shard it does not lead):",
                  "", "| target | clients | test | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for target, by_c in rb.items():
            for c, tests in by_c.items():
                for t, v in tests.items():
                    if t != "command":
                        lines.append(f"| {target} | {c} | {t} | {v['rps']:.0f} | {v['p50_ms']} | {v['p99_ms']} |")
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    """Throughput and p99 bars per workload at the highest concurrency; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    cmax = max((r["clients"] for r in res), default=1)
    pts = [r for r in res if r["clients"] == cmax]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in pts)]
    systems = [s for s in ["raftkv", *ALL_PEERS] if any(r["system"] == s for r in pts)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(systems))
    for si, s in enumerate(systems):
        by_w = {r["workload"]: r for r in pts if r["system"] == s}
        xs = [i + si * width for i in range(len(workloads))]
        axes[0].bar(xs, [by_w[w]["ops_s"] if w in by_w else 0 for w in workloads], width, label=s)
        axes[1].bar(xs, [(by_w[w]["p99_ms"] or 0) if w in by_w else 0 for w in workloads], width, label=s)
    axes[0].set_yscale("log")
    for ax, title in ((axes[0], f"throughput (ops/s, log scale), {cmax} clients"), (axes[1], f"p99 latency (ms), {cmax} clients")):
        ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(workloads))])
        ax.set_xticklabels(workloads)
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    m = doc.get("machine", {})
    fig.suptitle(f"raftkv vs peers — {m.get('nproc')} CPUs {m.get('cpu')}, Python {m.get('python')}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

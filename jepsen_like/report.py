"""The run's report: results.json, plots, the HTML timeline on failure, a one-screen summary.

Pure helpers (:func:`op_counts`, :func:`availability_windows`,
:func:`throughput_series`, :func:`summary_text`) turn the history's ops and the
nemesis's fault records into numbers; :func:`write_plots` draws them with
matplotlib's Agg backend (no display needed) and :func:`write_report` writes
everything into the run directory.

Availability of a window = ops invoked in it that completed ``ok`` / all ops
invoked in it (``fail`` and ``info`` count as unavailable).  Windows are the
fault windows plus the quiet stretches between them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jepsen_like.checker import LINEARIZABLE, NOT_LINEARIZABLE, CheckResult
from jepsen_like.history import Op

__all__ = ["op_counts", "availability_windows", "throughput_series", "latencies", "write_plots",
           "summary_text", "write_report", "check_to_dict", "verdict_of"]

_KIND_COLORS = {"kill": "#d62728", "pause": "#9467bd", "partition": "#ff7f0e"}
_TYPE_COLORS = {"ok": "#2ca02c", "fail": "#d62728", "info": "#ff7f0e"}


def op_counts(ops: Sequence[Op]) -> dict[str, Any]:
    """Counts by completion type, overall and per operation kind."""
    total = {"ok": 0, "fail": 0, "info": 0}
    by_f: dict[str, dict[str, int]] = {}
    for op in ops:
        total[op.status] = total.get(op.status, 0) + 1
        d = by_f.setdefault(op.f, {"ok": 0, "fail": 0, "info": 0})
        d[op.status] = d.get(op.status, 0) + 1
    return {"total": len(ops), **total, "by_f": by_f}


def _window_stats(ops: Sequence[Op], start: float, end: float) -> dict[str, Any]:
    inside = [op for op in ops if start <= op.call < end]
    c = {"ok": 0, "fail": 0, "info": 0}
    for op in inside:
        c[op.status] += 1
    n = len(inside)
    return {"ops": n, **c, "availability": round(c["ok"] / n, 4) if n else None}


def availability_windows(ops: Sequence[Op], faults: Sequence[dict[str, Any]], t_end: float) -> list[dict[str, Any]]:
    """Fault windows and the quiet windows between them, each with its op counts and availability."""
    out = []
    t = 0.0
    for f in sorted(faults, key=lambda f: f["start"]):
        s, e = f["start"], f["end"] if f.get("end") is not None else t_end
        if s > t:
            out.append({"window": "quiet", "start": round(t, 3), "end": round(s, 3), **_window_stats(ops, t, s)})
        out.append({"window": f["kind"], "detail": f.get("detail", ""), "start": round(s, 3), "end": round(e, 3),
                    **_window_stats(ops, s, e)})
        t = max(t, e)
    if t_end > t:
        out.append({"window": "quiet", "start": round(t, 3), "end": round(t_end, 3),
                    **_window_stats(ops, t, t_end)})
    return out


def latencies(ops: Sequence[Op], info_done: dict[int, float] | None = None) -> list[tuple[float, float, str, str]]:
    """``(invoke time, latency s, type, f)``; an info op uses ``info_done[op.index]`` (when the client
    gave up) and is left out without one."""
    out = []
    for op in ops:
        ret = (info_done or {}).get(op.index) if op.ret == math.inf else op.ret
        if ret is None or ret == math.inf:
            continue
        out.append((op.call, ret - op.call, op.status, op.f))
    return out


def throughput_series(ops: Sequence[Op], t_end: float, bin_s: float = 1.0,
                      info_done: dict[int, float] | None = None) -> dict[str, list[float]]:
    """Completions per second per type, in ``bin_s`` bins: ``{"t": [...], "ok": [...], ...}``."""
    nb = max(1, int(math.ceil(t_end / bin_s)))
    series: dict[str, list[float]] = {"t": [i * bin_s for i in range(nb)], "ok": [0.0] * nb,
                                      "fail": [0.0] * nb, "info": [0.0] * nb}
    for t, lat, typ, _f in latencies(ops, info_done):
        i = min(nb - 1, max(0, int((t + lat) // bin_s)))
        series[typ][i] += 1.0 / bin_s
    return series


def _shade(ax: Any, faults: Sequence[dict[str, Any]], t_end: float) -> None:
    seen = set()
    for f in faults:
        end = f["end"] if f.get("end") is not None else t_end
        label = f["kind"] if f["kind"] not in seen else None
        seen.add(f["kind"])
        ax.axvspan(f["start"], end, color=_KIND_COLORS.get(f["kind"], "#999999"), alpha=0.15, label=label)


def write_plots(directory: Path, ops: Sequence[Op], faults: Sequence[dict[str, Any]], t_end: float,
                title: str, info_done: dict[int, float] | None = None) -> dict[str, str]:
    """``latency.png`` and ``throughput.png``; returns ``{name: file}`` (empty if matplotlib is missing)."""
    try:
        # A Figure of its own on the Agg canvas: no pyplot (its global figure registry and backend
        # switching are of no use to a batch job).
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return {}
    files = {}
    pts = latencies(ops, info_done)
    fig = Figure(figsize=(11, 4.5))
    ax = fig.add_subplot()
    _shade(ax, faults, t_end)
    markers = {"get": "o", "put": "s", "cas": "^"}
    for typ in ("ok", "fail", "info"):
        for f in sorted({p[3] for p in pts}):
            xs = [p[0] for p in pts if p[2] == typ and p[3] == f]
            ys = [max(p[1] * 1000, 0.01) for p in pts if p[2] == typ and p[3] == f]
            if xs:
                ax.scatter(xs, ys, s=6, alpha=0.6, color=_TYPE_COLORS[typ], marker=markers.get(f, "."),
                           label=f"{f} {typ}", linewidths=0)
    ax.set_yscale("log")
    # Plain numbers (1, 10, 100 ms): the default 10^n labels are mathtext, whose parser is built in every run.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(0, t_end)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(f"{title}: latency of every operation (shaded: faults)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=7, ncol=4, markerscale=2)
    _fixed_margins(fig)
    p = directory / "latency.png"
    fig.savefig(p, dpi=110)
    files["latency"] = p.name

    ser = throughput_series(ops, t_end, info_done=info_done)
    fig = Figure(figsize=(11, 3.5))
    ax = fig.add_subplot()
    _shade(ax, faults, t_end)
    for typ in ("ok", "fail", "info"):
        if any(ser[typ]):
            ax.step(ser["t"], ser[typ], where="post", color=_TYPE_COLORS[typ], label=typ)
    ax.set_xlim(0, t_end)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("completions / s")
    ax.set_title(f"{title}: throughput (shaded: faults)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8, ncol=6)
    _fixed_margins(fig)
    p = directory / "throughput.png"
    fig.savefig(p, dpi=110)
    files["throughput"] = p.name
    return files


def _fixed_margins(fig: Any) -> None:
    """Margins that fit the plots' labels, set in inches rather than found by ``tight_layout`` (which draws
    the whole figure once more just to measure it: a good share of every run's report time)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.15 / w, bottom=0.55 / h, top=1 - 0.35 / h)


def check_to_dict(res: Any) -> dict[str, Any]:
    """A check's outcome for results.json: a linearizability :class:`CheckResult`, or an invariant
    with ``ok``, ``verdict``, ``summary()``, ``bad`` (what violates it) and ``describe_bad(n)``, or
    anything with its own ``to_dict()`` (an :class:`jepsen_like.elle.ElleResult`)."""
    if hasattr(res, "to_dict"):
        return res.to_dict()
    if not isinstance(res, CheckResult):
        return {"verdict": res.verdict, "valid": res.ok, "summary": res.summary(),
                "violations": len(res.bad), "failing_ops": res.describe_bad(10)}
    d: dict[str, Any] = {
        "verdict": res.verdict,
        "valid": res.ok,
        "summary": res.summary(),
        "partitions": res.partitions,
        "states": res.states,
        "elapsed_s": round(res.elapsed, 3),
    }
    if res.verdict == NOT_LINEARIZABLE:
        d["failing_ops"] = [op.describe() for op in res.failing_ops]
        d["longest_prefix_len"] = len(res.longest_prefix)
        d["failed_partition_ops"] = len(res.failed_partition)
        if res.failing_ops:
            d["key"] = res.failing_ops[0].key
    return d


def verdict_of(checks: dict[str, dict[str, Any]]) -> str:
    """``pass`` if every check is valid, ``fail`` if any is invalid, else ``unknown``."""
    vals = [c.get("valid") for c in checks.values()]
    if vals and all(v is True for v in vals):
        return "pass"
    if any(v is False and c.get("verdict") != "unknown" for v, c in zip(vals, checks.values(), strict=True)):
        return "fail"
    return "unknown"


def summary_text(results: dict[str, Any]) -> str:
    """One screen: verdict, config, counts, checks, availability per window, files."""
    cfg = results["config"]
    c = results["counts"]
    lines = [
        f"raftkv-jepsen: {results['workload']} / nemesis {cfg['nemesis']}"
        f"{' / UNSAFE LOCAL READS' if cfg.get('unsafe_local_reads') else ''}"
        f"{' / UNSAFE SKIP LOCKS' if cfg.get('unsafe_skip_locks') else ''}"
        f"{' / UNSAFE WATCH MISS' if cfg.get('unsafe_watch_miss') else ''}"
        f"{' / read-any-node' if cfg.get('read_any_node') else ''}: {results['verdict'].upper()}",
        f"  run {results['duration_s']:.1f} s ({cfg['time']} s of load), {cfg['clients']} clients, "
        f"{cfg['nodes']} nodes x {cfg['shards']} shards, seed {cfg['seed']}, "
        f"network: {results['network']['mode']}",
        f"  ops {c['total']}: ok {c['ok']}, fail {c['fail']}, info {c['info']}"
        + "".join(f"; {f} {d['ok']}/{d['fail']}/{d['info']}" for f, d in sorted(c['by_f'].items())),
    ]
    if results["network"].get("note"):
        lines.append(f"  note: {results['network']['note']}")
    lines.append("  checks:")
    for name, chk in results["checks"].items():
        mark = {True: "PASS", False: "FAIL"}.get(chk.get("valid"), "UNKNOWN")
        if chk.get("verdict") == "unknown":
            mark = "UNKNOWN"
        lines.append(f"    {mark:7} {name}: {chk.get('summary', '')}")
        for op in chk.get("failing_ops", [])[:4]:
            lines.append(f"             {op}")
    faults = [w for w in results["availability"] if w["window"] != "quiet"]
    if faults:
        lines.append(f"  faults ({len(faults)}), availability = ok / invoked in the window:")
        for w in faults[:8]:
            av = "-" if w["availability"] is None else f"{w['availability'] * 100:5.1f}%"
            lines.append(f"    {w['start']:6.1f}-{w['end']:6.1f} s {av}  {w['detail'][:70]}")
        if len(faults) > 8:
            lines.append(f"    ... {len(faults) - 8} more in results.json")
    lines.append(f"  files: {results['dir']}/ " + ", ".join(results.get("files", {}).values()))
    return "\n".join(lines)


def write_report(directory: Path, results: dict[str, Any], ops: Sequence[Op],
                 checks_raw: dict[str, Any], info_done: dict[int, float] | None = None) -> str:
    """Plots, the timeline on failure, results.json and summary.txt; returns the summary."""
    from jepsen_like.timeline import write_timeline

    files = {"history": "history.jsonl", "results": "results.json", "summary": "summary.txt"}
    files.update(write_plots(directory, ops, results["faults"], results["duration_s"],
                             f"{results['workload']}/{results['config']['nemesis']}", info_done))
    for name, res in checks_raw.items():
        if isinstance(res, CheckResult) and res.verdict != LINEARIZABLE:
            p = directory / f"timeline-{name}.html"
            shown = res.failed_partition or list(ops)
            write_timeline(p, shown, failing_ops=res.failing_ops, longest_prefix=res.longest_prefix,
                           title=f"{results['workload']}: {name} {res.verdict}", verdict=res.summary())
            files[f"timeline-{name}"] = p.name
    results["files"] = files
    (directory / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    text = summary_text(results)
    (directory / "summary.txt").write_text(text + "\n", encoding="utf-8")
    return text

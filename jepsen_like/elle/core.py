"""The Elle check: build the dependency graph, find and name cycles, map anomalies to models.

Theory of operation
===================

1. ``to_txns``: ok and info transactions become graph nodes (in history
   order); failed ones only feed G1a.
2. The workload's analyzer (:mod:`.rw_register`, :mod:`.list_append`) infers
   version orders, adds ww/wr/rw edges and returns the anomalies that need no
   cycle (internal, G1a, G1b, lost-update, ...).
3. Process edges (each process's ops in order) and real-time edges (``a``
   returned before ``b`` was invoked) are added: cycles that need them rule
   out only session / strict models (``G2-item-realtime``: not strict
   serializable, but possibly serializable).
4. Tarjan's SCCs over all edges.  A valid history is acyclic: nothing more to
   do, which is why a long valid history costs little.  For each non-trivial
   SCC and each anomaly shape (``SPECS``), the SCC is split again into the
   SCCs of the edge types that shape may use, and a BFS from the sources of
   its required edge type finds a shortest cycle of that shape
   (:func:`.graph.find_cycle`).  Found cycles are named by their edges
   (:func:`classify`): no rw edge -> G0 (ww only) or G1c; one -> G-single;
   more -> G2-item; plus ``-process`` / ``-realtime`` when the cycle needs
   such an edge.  At most ``cycles_max`` cycles are kept per name.
5. Verdict: ``invalid`` if an anomaly found rules out one of the target
   models (default strict serializable); otherwise ``unknown`` if the search
   budget ran out or there was no ok transaction; otherwise ``valid``.  Never
   a pass on unknown.

The inference is sound but incomplete (Elle's trade-off): every anomaly
reported is real, but with missing version-order information some are not
seen.  Pure: no I/O, no clock except ``clock`` (for ``elapsed`` only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..history import Op
from .consistency import MODEL_NAMES, boundary, prohibits
from .graph import (
    ALL,
    DATA,
    EDGE_NAMES,
    PROCESS,
    REALTIME,
    RW,
    WR,
    WW,
    Budget,
    Graph,
    find_cycle,
    process_edges,
    realtime_edges,
    sccs,
)
from .list_append import ListAppend
from .rw_register import RWRegister
from .txn import ElleError, Txn, to_txns

__all__ = ["ElleResult", "check", "WORKLOADS", "VALID", "INVALID", "UNKNOWN_VERDICT", "ElleError", "classify"]

VALID, INVALID, UNKNOWN_VERDICT = "valid", "invalid", "unknown"
WORKLOADS = ("rw-register", "list-append")

# (allowed edge types, required edge type, rw edges wanted: 0, 1 or 2 = two or more), in search order
_BASE = ((WW, WW, 0), (WW | WR, WR, 0), (DATA, RW, 1), (DATA, RW, 2))
SPECS = (_BASE + tuple((a | PROCESS, PROCESS, n) for a, _, n in _BASE)
         + tuple((a | PROCESS | REALTIME, REALTIME, n) for a, _, n in _BASE))

SEARCH_STEPS_MAX = 2_000_000
CYCLES_MAX = 8
EXAMPLES_MAX = 8


@dataclass
class ElleResult:
    """Outcome of :func:`check`: ``verdict`` valid / invalid / unknown, the anomalies by name
    (each a list of dicts; cycles carry ``cycle`` steps and the ``ops`` in them), and the
    consistency models they rule out (``not``: the weakest, ``also_not``: the others)."""

    verdict: str
    workload: str
    models: tuple[str, ...]
    anomalies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    not_models: list[str] = field(default_factory=list)
    also_not: list[str] = field(default_factory=list)
    txns: int = 0
    edges: int = 0
    sccs: int = 0
    elapsed: float = 0.0
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True only for a history in which no anomaly rules out the target models."""
        return self.verdict == VALID

    @property
    def bad(self) -> list[str]:
        return sorted(self.anomalies)

    def summary(self) -> str:
        """One line for humans."""
        s = f"{self.verdict}: {self.workload}, {self.txns} txns, {self.edges} edges, {self.sccs} cyclic components"
        if self.anomalies:
            s += "; anomalies " + ", ".join(f"{k} ({self.counts.get(k, len(v))})" for k, v in
                                            sorted(self.anomalies.items()))
            s += "; not " + ", ".join(self.not_models)
        s += f"; {self.elapsed * 1000:.0f} ms"
        return s + (f" ({self.reason})" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        """For results.json."""
        return {"verdict": self.verdict, "valid": self.ok if self.verdict != UNKNOWN_VERDICT else None,
                "summary": self.summary(), "workload": self.workload, "models": list(self.models),
                "anomaly_types": sorted(self.anomalies), "anomalies": self.anomalies, "counts": self.counts,
                "not": self.not_models, "also_not": self.also_not, "txns": self.txns,
                "failing_ops": [f"{name}: {o}" for name, cases in sorted(self.anomalies.items())
                                for o in (cases[0].get("ops") or [cases[0].get("op")])][:10],
                "elapsed_s": round(self.elapsed, 3), "reason": self.reason}

    def lines(self) -> list[str]:
        """A readable report: every anomaly with its cycle or its operations."""
        out = []
        for name, cases in sorted(self.anomalies.items()):
            out.append(f"{name}: {self.counts.get(name, len(cases))} found")
            for case in cases:
                if "cycle" in case:
                    out.append("  cycle:")
                    out.extend(f"    {s}" for s in case["steps"])
                else:
                    out.append("  " + ", ".join(f"{k}={v!r}" for k, v in case.items()))
        if self.anomalies:
            out.append("not " + ", ".join(self.not_models)
                       + (f"; also not {', '.join(self.also_not)}" if self.also_not else ""))
        return out


def classify(kinds: Sequence[int]) -> str:
    """The anomaly a cycle with these edge types is: G0, G1c, G-single or G2-item (+ -process/-realtime)."""
    rw = sum(1 for k in kinds if k == RW)
    base = ("G1c" if WR in kinds else "G0") if rw == 0 else "G-single" if rw == 1 else "G2-item"
    if REALTIME in kinds:
        return base + "-realtime"
    if PROCESS in kinds:
        return base + "-process"
    return base


def check(ops: Sequence[Op], workload: str = "rw-register", models: Sequence[str] = ("strict-serializable",),
          search_steps_max: int = SEARCH_STEPS_MAX, cycles_max: int = CYCLES_MAX, wfr_keys: bool = False,
          clock: Callable[[], float] = time.monotonic) -> ElleResult:
    """Check a history of transactions (see the module docstring); raises :class:`ElleError` if it
    cannot be checked as ``workload`` (wrong micro-ops, a value written twice)."""
    t0 = clock()
    for m in models:
        if m not in MODEL_NAMES:
            raise ValueError(f"unknown consistency model {m!r} (expected one of {', '.join(MODEL_NAMES)})")
    if workload == "rw-register":
        analyzer: RWRegister | ListAppend = RWRegister(wfr_keys=wfr_keys)
    elif workload == "list-append":
        analyzer = ListAppend()
    else:
        raise ValueError(f"unknown Elle workload {workload!r} (expected one of {', '.join(WORKLOADS)})")
    txns, failed = to_txns(ops, analyzer.kinds)
    g = Graph(len(txns))
    found = analyzer.analyze(txns, failed, g)
    process_edges(g, [t.op.client for t in txns], [t.op.call for t in txns],
                  [t.status != "ok" for t in txns])
    realtime_edges(g, [t.op.call for t in txns], [t.op.ret for t in txns])
    budget = Budget(search_steps_max)
    comps = sccs(g, range(g.n), ALL)
    cycles: dict[str, list[dict[str, Any]]] = {}
    for comp in comps:
        _search(g, comp, budget, cycles, cycles_max, txns, analyzer)
    found.update(cycles)
    res = ElleResult(verdict=VALID, workload=workload, models=tuple(models), txns=len(txns),
                     edges=g.edge_count(), sccs=len(comps))
    res.counts = {k: len(v) for k, v in found.items()}
    res.anomalies = {k: v[:EXAMPLES_MAX] for k, v in found.items()}
    res.not_models, res.also_not = boundary(found)
    if any(prohibits(m, a) for m in models for a in found):
        res.verdict = INVALID
    elif budget.exhausted:
        res.verdict, res.reason = UNKNOWN_VERDICT, f"cycle search stopped after {search_steps_max} steps"
    elif not any(t.status == "ok" for t in txns):
        res.verdict, res.reason = UNKNOWN_VERDICT, "no ok transaction"
    res.elapsed = clock() - t0
    return res


def _search(g: Graph, comp: list[int], budget: Budget, cycles: dict[str, list[dict[str, Any]]],
            cycles_max: int, txns: list[Txn], analyzer: RWRegister | ListAppend) -> None:
    """Find a shortest cycle of every anomaly shape in one SCC (at most one per shape and sub-SCC)."""
    within = set(comp)
    seen: set[frozenset[int]] = set()
    got_any = False
    for allowed, required, rw_want in SPECS:
        for sub in sccs(g, comp, allowed, within):
            subset = set(sub)
            adj = g.adj
            starts = [u for u in sub if any(v in subset and m & required for v, m in adj[u].items())]
            for u in starts:
                cyc = find_cycle(g, u, subset, allowed, required, rw_want, budget)
                if cyc is not None:
                    got_any = True
                    _record(cyc, seen, cycles, cycles_max, txns, analyzer)
                    break
                if budget.exhausted:
                    break
    if not got_any:  # the budget ran out: still name one cycle of this component
        big = Budget(10 * (len(comp) + sum(len(g.adj[u]) for u in comp)) + 10)
        for rw_want in (0, 1, 2):
            cyc = find_cycle(g, comp[0], within, ALL, ALL, rw_want, big)
            if cyc is not None:
                _record(cyc, seen, cycles, cycles_max, txns, analyzer)
                return


def _record(cyc: list[tuple[int, int, int]], seen: set[frozenset[int]], cycles: dict[str, list[dict[str, Any]]],
            cycles_max: int, txns: list[Txn], analyzer: RWRegister | ListAppend) -> None:
    name = classify([t for _, _, t in cyc])
    key = frozenset((a, b, t) for a, b, t in cyc)
    if key in seen or len(cycles.get(name, ())) >= cycles_max:
        return
    seen.add(key)
    steps, text = [], []
    for a, b, t in cyc:
        why = analyzer.explain(a, b, t) if t & DATA else {}
        steps.append({"from": txns[a].op.index, "to": txns[b].op.index, "type": EDGE_NAMES[t], **why})
        text.append(_explain(txns[a].op.index, txns[b].op.index, t, why))
    cycles.setdefault(name, []).append({
        "cycle": steps, "steps": text,
        "ops": [txns[a].op.describe() for a, _, _ in cyc]})


def _explain(a: int, b: int, t: int, why: dict[str, Any]) -> str:
    k, v = why.get("key"), why.get("value")
    if t == WR:
        return f"T{a} wrote {k!r} = {v!r}, which T{b} read (wr)"
    if t == WW:
        return f"T{a} wrote {k!r} ({v[0]!r}) before T{b} wrote it ({v[1]!r}) (ww)" if v else f"T{a} -> T{b} (ww)"
    if t == RW:
        return f"T{a} read {k!r} = {v[0]!r} before T{b} wrote {v[1]!r} (rw)" if v else f"T{a} -> T{b} (rw)"
    if t == PROCESS:
        return f"T{a} preceded T{b} on the same process (process)"
    return f"T{a} completed before T{b} was invoked (realtime)"

"""The set checker: unique adds and whole-set reads, judged per element (Jepsen's ``set`` and ``set-full``).

Theory of operation
===================

A *set history* has two kinds of operations: ``add`` (input: one element, unique in the history) and
``read`` (``ok`` output: every element present, as a list; an element listed twice was applied twice).
The set never removes anything, so each element's story is one flag that goes from absent to present
once, when its add takes effect.  Everything here is judged per element; no read needs to be an atomic
snapshot of the whole set (the harness reads a set spread over several shards key by key): an element
lives in one place, and that place was read somewhere inside the read's interval.

For an element ``e`` the history says:

* its add, invoked at ``call`` and ``ok`` at ``ret``, ``info`` (maybe applied: ``ret = inf``) or ``fail``
  (definitely not applied);
* the ``ok`` reads that show it (*present*) and those that do not (*absent*).

``e`` is **known** from the earlier of its add's ``ok`` and the completion of the first read that showed
it.  Linearizability of ``e`` alone (one point for the add inside its interval, every present read's
point after it, every absent read's point before it) fails in exactly these ways:

* a read that **began after** ``e`` **was known** does not show it: the element is **lost** if no read
  began after that one and showed it again (Jepsen: the last absent read was invoked after the last
  present one), else **stale** (it came back: a stale read);
* a read shows an element that nobody tried to add, whose add **failed**, or that completed **before its
  add was invoked**: **unexpected**;
* a read shows an element more than once: **duplicated** (an add applied twice).

Elements neither lost nor stable (no read began after they were known, or never known: an ``info`` add
nobody saw) are **never read**.  ``info`` adds that the final reads show are **recovered**: fine.

Verdict: ``invalid`` if anything is lost, unexpected or duplicated, and with ``linearizable=True`` (the
default: raftkv promises linearizable reads) also if anything is stale; else ``unknown`` if nothing was
read or no element is stable (the history checked nothing), else ``valid``.

Jepsen's plain ``set`` checker compares the final read with the adds: every acknowledged add missing
from a final read that began after every add returned is lost here too (that read is the last absent
one), and an element read that was never attempted is unexpected.  The *final* reads are those of
process ``"final"`` (the harness reads after the heal), or the last read to complete when there is none.

Ties: intervals are closed, as in :mod:`jepsen_like.history`: a read invoked at the instant another
operation returns is concurrent with it.  Cost: O(total size of the reads + elements).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import Op

__all__ = ["SetHistoryError", "SetResult", "check_set", "VALID", "INVALID", "UNKNOWN_VERDICT"]

VALID, INVALID, UNKNOWN_VERDICT = "valid", "invalid", "unknown"
FINAL_PROCESS = "final"


class SetHistoryError(ValueError):
    """The history is not a set history (an element added twice, an op that is neither add nor read)."""


@dataclass
class SetResult:
    """What :func:`check_set` found; ``ok`` is None when the verdict is unknown."""

    verdict: str
    linearizable: bool
    attempts: int = 0
    acknowledged: int = 0
    reads: int = 0
    final_reads: int = 0
    stable: int = 0
    lost: dict[Any, str] = field(default_factory=dict)
    stale: dict[Any, str] = field(default_factory=dict)
    unexpected: dict[Any, str] = field(default_factory=dict)
    duplicated: dict[Any, int] = field(default_factory=dict)
    recovered: list[Any] = field(default_factory=list)
    never_read: list[Any] = field(default_factory=list)
    stale_latency_s_max: float = 0.0
    reason: str = ""

    @property
    def ok(self) -> bool | None:
        return None if self.verdict == UNKNOWN_VERDICT else self.verdict == VALID

    @property
    def anomalies(self) -> dict[str, int]:
        """Counts of the anomaly classes that make the verdict invalid (stale only when linearizable)."""
        found = {"lost": len(self.lost), "unexpected": len(self.unexpected), "duplicated": len(self.duplicated)}
        if self.linearizable:
            found["stale"] = len(self.stale)
        return {k: n for k, n in found.items() if n}

    def summary(self) -> str:
        if self.reason:
            return self.reason
        s = (f"{self.attempts} adds attempted, {self.acknowledged} acknowledged, {self.reads} reads "
             f"({self.final_reads} final): {self.stable} stable, {len(self.lost)} lost, "
             f"{len(self.unexpected)} unexpected, {len(self.duplicated)} duplicated, {len(self.stale)} stale"
             f"{' (allowed)' if self.stale and not self.linearizable else ''}, {len(self.recovered)} of the "
             f"indeterminate adds recovered, {len(self.never_read)} never read")
        if self.stale:
            s += f"; worst stale read {self.stale_latency_s_max:.3g} s after the element was known"
        return s

    def lines(self) -> list[str]:
        """One line per violation (at most 10 per class), for people."""
        out = []
        for name, cases in (("lost", self.lost), ("unexpected", self.unexpected), ("stale", self.stale)):
            out += [f"{name} {e!r}: {why}" for e, why in list(cases.items())[:10]]
        out += [f"duplicated {e!r}: read {n} times in one read" for e, n in list(self.duplicated.items())[:10]]
        return out

    def to_dict(self) -> dict[str, Any]:
        """For results.json (the report's and the soak's check shape)."""
        return {"verdict": self.verdict, "valid": self.ok, "summary": self.summary(),
                "anomaly_types": sorted(self.anomalies), "anomalies": self.anomalies,
                "attempts": self.attempts, "acknowledged": self.acknowledged, "reads": self.reads,
                "stable": self.stable, "lost": _some(self.lost), "stale": _some(self.stale),
                "unexpected": _some(self.unexpected), "duplicated": _some(self.duplicated),
                "recovered": len(self.recovered), "never_read": len(self.never_read),
                "stale_latency_s_max": round(self.stale_latency_s_max, 6),
                "failing_ops": self.lines()[:10]}


def _some(d: dict[Any, Any], n: int = 50) -> dict[str, Any]:
    return {str(k): v for k, v in list(d.items())[:n]}


@dataclass
class _Element:
    add: Op | None = None
    first_present_ret: float = math.inf  # the earliest completion of a read that showed it
    present: list[int] = field(default_factory=list)  # positions (in the sorted reads) of the reads showing it


def _reads_and_adds(ops: Sequence[Op]) -> tuple[list[Op], dict[Hashable, Op]]:
    reads: list[Op] = []
    adds: dict[Hashable, Op] = {}
    for op in ops:
        if op.f == "add":
            if op.input in adds:
                raise SetHistoryError(f"element {op.input!r} added twice: {adds[op.input].describe()} and "
                                      f"{op.describe()} (a set history needs unique elements)")
            adds[op.input] = op
        elif op.f == "read":
            if op.status == "ok":
                if not isinstance(op.output, list | tuple):
                    raise SetHistoryError(f"a read must return a list of elements: {op.describe()}")
                reads.append(op)
        else:
            raise SetHistoryError(f"a set history has add and read operations only, not {op.describe()}")
    reads.sort(key=lambda r: (r.call, r.index))
    return reads, adds


def check_set(ops: Sequence[Op], linearizable: bool = True) -> SetResult:
    """Check a set history (module doc); raises :class:`SetHistoryError` if it is not one."""
    reads, adds = _reads_and_adds(ops)
    res = SetResult(verdict=VALID, linearizable=linearizable, attempts=len(adds), reads=len(reads),
                    acknowledged=sum(1 for a in adds.values() if a.status == "ok"))
    finals = [r for r in reads if r.client == FINAL_PROCESS] or \
        ([max(reads, key=lambda r: (r.ret, r.index))] if reads else [])
    res.final_reads = len(finals)
    elements: dict[Hashable, _Element] = {e: _Element(add=a) for e, a in adds.items()}
    for i, r in enumerate(reads):  # the inner loop runs once per element of every read: keep it lean
        shown = set(r.output)
        if len(shown) != len(r.output):
            for e, n in Counter(r.output).items():
                if n > 1:
                    res.duplicated[e] = max(n, res.duplicated.get(e, 0))
        ret = r.ret
        for e in shown:
            st = elements.get(e)
            if st is None:
                st = elements[e] = _Element()
            st.present.append(i)  # in increasing order: reads go by invocation
            if ret < st.first_present_ret:
                st.first_present_ret = ret
    final_sets = [set(r.output) for r in finals]
    for e, st in elements.items():
        _judge(e, st, reads, res)
        if st.add is not None and st.add.status == "info" and any(e in s for s in final_sets):
            res.recovered.append(e)
    if res.lost or res.unexpected or res.duplicated or (linearizable and res.stale):
        res.verdict = INVALID
    elif not reads:
        res.verdict, res.reason = UNKNOWN_VERDICT, f"the set was never read ({len(adds)} adds attempted)"
    elif not res.stable:
        res.verdict = UNKNOWN_VERDICT
        res.reason = f"no element was ever stable: {len(adds)} adds attempted, {len(reads)} reads; nothing to check"
    return res


def _judge(e: Hashable, st: _Element, reads: list[Op], res: SetResult) -> None:
    add = st.add
    if st.present:
        first = reads[st.present[0]]
        if add is None:
            res.unexpected[e] = f"read by {_read(first)}, but nobody tried to add it"
            return
        if add.status == "fail":
            res.unexpected[e] = f"read by {_read(first)}, but its add failed: {add.describe()}"
            return
        if st.first_present_ret < add.call:
            early = min((reads[i] for i in st.present), key=lambda r: r.ret)
            res.unexpected[e] = f"read by {_read(early)}, before its add was invoked: {add.describe()}"
            return
    assert add is not None
    known = min(add.ret if add.status == "ok" else math.inf, st.first_present_ret)
    i_absent = _last_absent(st, len(reads))
    last_absent = reads[i_absent] if i_absent >= 0 else None
    if known == math.inf or last_absent is None or last_absent.call <= known:
        if st.present:
            res.stable += 1
        else:
            res.never_read.append(e)
        return
    why = (f"{'acknowledged' if add.status == 'ok' and add.ret == known else 'seen by a read'} at {known:.6g}, "
           f"missing from {_read(last_absent)}")
    last_present = reads[st.present[-1]] if st.present else None
    if last_present is not None and st.present[-1] > i_absent:  # shown again later: it came back
        res.stable += 1
        res.stale[e] = why + f"; read again by {_read(last_present)}"
        res.stale_latency_s_max = max(res.stale_latency_s_max, last_absent.call - known)
    else:
        res.lost[e] = why + ("" if last_present is None else f" (last seen by {_read(last_present)})")


def _read(r: Op) -> str:
    """A read in one line: which, through which node (its ``key``, if any), how many elements, when."""
    via = "" if r.key is None else f" via {r.key}"
    return f"#{r.index} p{r.client} read{via} of {len(r.output)} elements [{r.call:.6g}, {r.ret:.6g}]"


def _last_absent(st: _Element, n_reads: int) -> int:
    """Position of the latest-invoked read that did not show the element (-1: none); reads are sorted by
    invocation, so this walks back at most ``len(present) + 1`` steps."""
    i, j = n_reads - 1, len(st.present) - 1
    while j >= 0 and st.present[j] == i:
        i, j = i - 1, j - 1
    return i

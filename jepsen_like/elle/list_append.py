"""list-append: transactions of ``["append", k, x]`` / ``["r", k, [x1, x2, ...]]`` with unique elements.

Theory of operation (Elle's ``list-append``)
============================================

A read returns the whole list, so it reveals a prefix of the key's version
order directly.  Per key, every ok read must be a prefix of the longest one:
otherwise ``incompatible-order`` (and a read listing an element twice is
``duplicate-elements``); such a key gets no ww/rw edges (the order is not
known), only wr edges.  Otherwise the longest read *is* the version order of
the observed elements, and every appended element that no read shows (of an
ok or info transaction) comes after all of them (Elle's rule: it was not
there when the longest read ran, and the order only grows).

Per transaction: *external reads* (the first read of a key, before the
transaction appends to it) and its appends.  Edges, per key, with the order
``e0 < e1 < ...``:

* ``wr``: appender(last element of a read) -> the external reader;
* ``ww``: appender(e_i) -> appender(e_i+1), and appender(last) -> every
  unobserved appender;
* ``rw``: external readers whose read ends at e_i -> appender(e_i+1) (readers
  of the empty list -> appender(e0)), and readers of the last -> every
  unobserved appender.

An info transaction is a node like an ok one: whether it committed is only
known if one of its elements is read, and until then it has no outgoing data
edge, so it cannot close a cycle.

Non-cycle anomalies: ``internal`` (a read disagrees with the transaction's own
earlier read plus its appends since), ``G1a`` (an element appended by a failed
transaction is read), ``G1b`` (a read ends at an element that is not its
appender's last append to that key), ``garbage-read`` (an element nobody
appended), ``duplicate-elements``, ``incompatible-order`` (two reads disagree on
an order, or a read shows one transaction's appends out of the order it made
them), ``lost-update``,
``future-read`` (a read shows an element its own transaction appends later).
"""

from __future__ import annotations

from typing import Any

from .graph import RW, WR, WW, Graph
from .txn import ElleError, Txn

__all__ = ["ListAppend"]

_EMPTY: tuple = ()


class ListAppend:
    name = "list-append"
    kinds = ("r", "append")

    def __init__(self) -> None:
        self.ext_reads: list[dict[Any, tuple]] = []
        self.appends: list[dict[Any, list[Any]]] = []
        self.order: dict[Any, tuple] = {}  # key -> inferred order of observed elements (ordered keys only)
        self.pos: dict[Any, dict[Any, int]] = {}

    def analyze(self, txns: list[Txn], failed: list[Txn], g: Graph) -> dict[str, list[dict[str, Any]]]:
        """Add ww/wr/rw edges to ``g``; return the non-cycle anomalies."""
        found: dict[str, list[dict[str, Any]]] = {}
        writer: dict[Any, dict[Any, int]] = {}
        reads: dict[Any, list[tuple[int, tuple, bool]]] = {}
        for i, t in enumerate(txns):
            ext, apps = self._txn(i, t, reads, found)
            self.ext_reads.append(ext)
            self.appends.append(apps)
            for k, xs in apps.items():
                w = writer.setdefault(k, {})
                for x in xs:
                    if x in w:
                        raise ElleError(f"key {k!r}: element {x!r} appended twice: {txns[w[x]].op.describe()} "
                                        f"and {t.op.describe()} (list-append needs unique appends)")
                    w[x] = i
        failed_a: dict[Any, dict[Any, Txn]] = {}
        for t in failed:
            for f, k, x in t.mops:
                if f == "append":
                    failed_a.setdefault(k, {})[x] = t
        for k in set(writer) | set(reads):
            self._key(k, writer.get(k, {}), reads.get(k, []), failed_a.get(k, {}), txns, g, found)
        self._lost_updates(txns, found)
        return found

    def _txn(self, i: int, t: Txn, reads: dict[Any, list[tuple[int, tuple, bool]]],
             found: dict[str, list[dict[str, Any]]]) -> tuple[dict[Any, tuple], dict[Any, list[Any]]]:
        ext: dict[Any, tuple] = {}
        apps: dict[Any, list[Any]] = {}
        ok = t.status == "ok"
        state: dict[Any, tuple[tuple | None, list[Any]]] = {}  # key -> (last read, own appends since)
        future = {(k, v) for f, k, v in t.mops if f == "append"}
        for f, k, v in t.mops:
            if f == "append":
                future.discard((k, v))
                apps.setdefault(k, []).append(v)
                state.setdefault(k, (None, []))[1].append(v)
                continue
            if not ok:
                continue
            v = _EMPTY if v is None else v
            if not isinstance(v, tuple):
                raise ElleError(f"read of {k!r} is not a list: {t.op.describe()}")
            is_ext = k not in apps and k not in ext
            if is_ext:
                ext[k] = v
            reads.setdefault(k, []).append((i, v, is_ext))
            if any((k, x) in future for x in v):
                found.setdefault("future-read", []).append({"op": t.op.describe(), "key": k, "read": list(v)})
            if k in state:
                base, since = state[k]
                if base is not None:
                    bad, expected = v != base + tuple(since), [*base, *since]
                else:
                    bad, expected = tuple(v[len(v) - len(since):]) != tuple(since), ["...", *since]
                if bad:
                    found.setdefault("internal", []).append(
                        {"op": t.op.describe(), "key": k, "read": list(v), "expected": expected})
            state[k] = (v, [])
        return ext, apps

    def _key(self, k: Any, w: dict[Any, int], rs: list[tuple[int, tuple, bool]], failed_a: dict[Any, Txn],
             txns: list[Txn], g: Graph, found: dict[str, list[dict[str, Any]]]) -> None:
        longest = max((v for _, v, _ in rs), key=len, default=_EMPTY)
        ordered = True
        seen_values = set()
        for i, v, _ in rs:
            if v in seen_values:
                continue
            seen_values.add(v)
            if len(set(v)) != len(v):
                found.setdefault("duplicate-elements", []).append(
                    {"op": txns[i].op.describe(), "key": k, "value": list(v)})
                ordered = False
            elif longest[:len(v)] != v:
                found.setdefault("incompatible-order", []).append(
                    {"key": k, "values": [list(v), list(longest)], "ops": [txns[i].op.describe()]})
                ordered = False
        if ordered:
            # The version order must also keep each transaction's own appends in the order it made them.
            at = {x: n for n, x in enumerate(longest)}
            for a in sorted({w[x] for x in longest if x in w}):
                mine = [at[x] for x in self.appends[a][k] if x in at]
                if mine != sorted(mine):
                    found.setdefault("incompatible-order", []).append(
                        {"key": k, "values": [list(longest), list(self.appends[a][k])],
                         "ops": [txns[a].op.describe()]})
                    ordered = False
        elements = set(longest) if ordered else {x for v in seen_values for x in v}
        for x in elements - w.keys():
            kind = "G1a" if x in failed_a else "garbage-read"
            who = next(i for i, v, _ in rs if x in v)
            found.setdefault(kind, []).append(
                {"op": txns[who].op.describe(), "key": k, "element": x,
                 "writer": failed_a[x].op.describe() if x in failed_a else None})
        by_last: dict[Any, list[int]] = {}
        for i, v, is_ext in rs:
            if is_ext:
                last = v[-1] if v else None
                by_last.setdefault(last, []).append(i)
                a = w.get(last)
                if a is not None and a != i:
                    g.link(a, i, WR)
                    if self.appends[a][k][-1] != last:
                        found.setdefault("G1b", []).append(
                            {"op": txns[i].op.describe(), "key": k, "element": last,
                             "writer": txns[a].op.describe()})
        if not ordered:
            return
        self.order[k] = longest
        self.pos[k] = {x: n for n, x in enumerate(longest)}
        prev: Any = None
        for x in longest:
            b = w.get(x)
            if b is None:
                return  # an element without a committed appender: G1a / garbage, the chain is broken
            if prev is not None:
                g.link(w[prev], b, WW)
            g.link_all(by_last.get(prev, ()), (b,), RW)
            prev = x
        pos = set(longest)
        unseen = {w[x] for x in w if x not in pos}
        if unseen:
            tos = sorted(unseen)
            if prev is not None:
                g.link_all((w[prev],), tos, WW)
            g.link_all(by_last.get(prev, ()), tos, RW)

    def _lost_updates(self, txns: list[Txn], found: dict[str, list[dict[str, Any]]]) -> None:
        groups: dict[tuple[Any, tuple], list[int]] = {}
        for i, t in enumerate(txns):
            if t.status == "ok":
                for k, v in self.ext_reads[i].items():
                    if k in self.appends[i]:
                        groups.setdefault((k, v), []).append(i)
        for (k, v), ids in groups.items():
            if len(ids) > 1:
                found.setdefault("lost-update", []).append(
                    {"key": k, "value": list(v), "ops": [txns[i].op.describe() for i in ids]})

    def _prev(self, k: Any, x: Any) -> Any:
        """The element just before ``x`` in ``k``'s order (the last observed one if ``x`` was not
        observed; ``None`` for the first)."""
        order = self.order.get(k, _EMPTY)
        p = self.pos.get(k, {}).get(x, len(order))
        return order[p - 1] if p else None

    def explain(self, a: int, b: int, kind: int) -> dict[str, Any]:
        """Why the edge ``a -> b`` of type ``kind`` exists: the key (and elements) it stands for."""
        if kind == WR:
            for k, v in self.ext_reads[b].items():
                if v and v[-1] in self.appends[a].get(k, ()):
                    return {"key": k, "value": v[-1]}
            return {}
        for k, xs in self.appends[b].items():
            for x in xs:
                prev = self._prev(k, x)
                if kind == WW and prev in self.appends[a].get(k, ()):
                    return {"key": k, "value": [prev, x]}
                read = self.ext_reads[a].get(k)
                if kind == RW and read is not None and (read[-1] if read else None) == prev:
                    return {"key": k, "value": [list(read), x]}
        return {}

"""rw-register: transactions of ``["r", k, v]`` / ``["w", k, v]`` over registers with unique writes.

Theory of operation (Elle's ``rw-register``)
============================================

Every non-``None`` value of a key is written by at most one transaction (the
history is rejected otherwise), so a read names its writer.  Per transaction:
its *external reads* (the first read of a key, before the transaction writes
it: what it saw of others), its *external writes* (its last write of a key:
what others can see) and its *intermediate writes* (earlier writes of a key).

Version order, as far as it can be inferred soundly:

* every key starts absent (``None``), and every written version follows it;
* with ``wfr_keys`` (off by default, as in Elle): an ok transaction that read
  ``v1`` and then wrote ``v2`` puts ``v1`` before ``v2`` (sound for
  serializability; a cycle of such claims is reported as ``cyclic-versions``
  and that key's claims are dropped).

Nothing else is inferred: two writes of a key that nobody's reads relate stay
unordered, so ww/rw edges between them are missing and some anomalies go
unseen (sound but incomplete; see tests/test_elle_properties.py).

Edges: ``wr`` writer(v) -> every external reader of v; for every version edge
``a -> b``: ``ww`` writer(a) -> writer(b) and ``rw`` readers(a) -> writer(b).
Writers are ok *and* info transactions: an info transaction that nobody read
has no outgoing data edge, so it can never close a cycle.

Non-cycle anomalies: ``internal`` (a read disagrees with the transaction's own
earlier read or write of the key), ``G1a`` (a read of a failed transaction's
write), ``G1b`` (a read of another transaction's intermediate write),
``garbage-read`` (a value nobody wrote), ``lost-update`` (two committed
transactions read the same version of a key and both wrote it), ``future-read``
(a read of a value its own transaction writes later).
"""

from __future__ import annotations

from typing import Any

from .graph import RW, WR, WW, Graph, sccs
from .txn import ElleError, Txn

__all__ = ["RWRegister"]


class RWRegister:
    name = "rw-register"
    kinds = ("r", "w")

    def __init__(self, wfr_keys: bool = False) -> None:
        self.wfr_keys = wfr_keys
        self.ext_reads: list[dict[Any, Any]] = []
        self.ext_writes: list[dict[Any, Any]] = []

    def analyze(self, txns: list[Txn], failed: list[Txn], g: Graph) -> dict[str, list[dict[str, Any]]]:
        """Add ww/wr/rw edges to ``g``; return the non-cycle anomalies."""
        found: dict[str, list[dict[str, Any]]] = {}
        writer: dict[Any, dict[Any, int]] = {}
        intermediate: dict[Any, dict[Any, int]] = {}
        readers: dict[Any, dict[Any, list[int]]] = {}
        for i, t in enumerate(txns):
            reads, writes, inter = self._external(t, found)
            self.ext_reads.append(reads)
            self.ext_writes.append(writes)
            for k, v in writes.items():
                if v is not None:
                    w = writer.setdefault(k, {})
                    if v in w:
                        raise ElleError(f"key {k!r}: value {v!r} written twice: {txns[w[v]].op.describe()} "
                                        f"and {t.op.describe()} (rw-register needs unique writes)")
                    w[v] = i
            for k, v in inter:
                intermediate.setdefault(k, {})[v] = i
            for k, v in reads.items():
                readers.setdefault(k, {}).setdefault(v, []).append(i)
        failed_w = {}
        for t in failed:
            for f, k, v in t.mops:
                if f == "w":
                    failed_w.setdefault(k, {})[v] = t
        for k, by_value in readers.items():
            self._reads(k, by_value, writer.get(k, {}), intermediate.get(k, {}), failed_w.get(k, {}),
                        txns, g, found)
        for k, w in writer.items():
            for a, b in self._version_edges(k, w, txns, found):
                g.link_all(readers.get(k, {}).get(a, ()), (w[b],), RW)
                if a is not None and a in w:
                    g.link(w[a], w[b], WW)
        self._lost_updates(txns, found)
        return found

    def _external(self, t: Txn, found: dict[str, list[dict[str, Any]]]) -> tuple[dict, dict, list]:
        reads: dict[Any, Any] = {}
        writes: dict[Any, Any] = {}
        inter = []
        seen: dict[Any, Any] = {}
        ok = t.status == "ok"
        future = {(k, v) for f, k, v in t.mops if f == "w" and v is not None}
        for f, k, v in t.mops:
            if f == "w":
                future.discard((k, v))
                if k in writes:
                    inter.append((k, writes[k]))
                writes[k] = v
                seen[k] = v
            elif ok:
                if (k, v) in future:
                    found.setdefault("future-read", []).append({"op": t.op.describe(), "key": k, "read": v})
                if k in seen and seen[k] != v:
                    found.setdefault("internal", []).append(
                        {"op": t.op.describe(), "key": k, "read": v, "expected": seen[k]})
                if k not in writes and k not in reads:
                    reads[k] = v
                seen[k] = v
        return reads, writes, inter

    @staticmethod
    def _reads(k: Any, by_value: dict[Any, list[int]], w: dict[Any, int], inter: dict[Any, int],
               failed_w: dict[Any, Txn], txns: list[Txn], g: Graph,
               found: dict[str, list[dict[str, Any]]]) -> None:
        for v, rs in by_value.items():
            if v is None:
                continue
            if v in w:
                g.link_all((w[v],), rs, WR)
                continue
            if v in failed_w:
                kind, writer = "G1a", failed_w[v].op.describe()
            elif v in inter:
                kind, writer = "G1b", txns[inter[v]].op.describe()
            else:
                kind, writer = "garbage-read", None
            for r in rs:
                found.setdefault(kind, []).append(
                    {"op": txns[r].op.describe(), "key": k, "value": v, "writer": writer})

    def _version_edges(self, k: Any, w: dict[Any, int], txns: list[Txn],
                       found: dict[str, list[dict[str, Any]]]) -> list[tuple[Any, Any]]:
        edges = [(None, v) for v in w]
        if not self.wfr_keys:
            return edges
        extra = []
        for v2, i in w.items():
            if txns[i].status == "ok" and k in self.ext_reads[i]:
                v1 = self.ext_reads[i][k]
                if v1 is not None and v1 in w:
                    extra.append((v1, v2))
        if extra:
            ids = {v: n for n, v in enumerate(w)}
            vg = Graph(len(ids))
            for a, b in extra:
                vg.link(ids[a], ids[b], WW)
            cyc = sccs(vg, range(vg.n), WW)
            if cyc:
                names = list(w)
                found.setdefault("cyclic-versions", []).append(
                    {"key": k, "versions": [names[n] for n in cyc[0]], "source": "wfr-keys"})
                return edges
        return edges + extra

    def _lost_updates(self, txns: list[Txn], found: dict[str, list[dict[str, Any]]]) -> None:
        groups: dict[tuple[Any, Any], list[int]] = {}
        for i, t in enumerate(txns):
            if t.status == "ok":
                for k, v in self.ext_reads[i].items():
                    if k in self.ext_writes[i]:
                        groups.setdefault((k, v), []).append(i)
        for (k, v), ids in groups.items():
            if len(ids) > 1:
                found.setdefault("lost-update", []).append(
                    {"key": k, "value": v, "ops": [txns[i].op.describe() for i in ids]})

    def explain(self, a: int, b: int, kind: int) -> dict[str, Any]:
        """Why the edge ``a -> b`` of type ``kind`` exists: the key (and values) it stands for."""
        ra, wa, rb, wb = self.ext_reads[a], self.ext_writes[a], self.ext_reads[b], self.ext_writes[b]
        if kind == WR:
            for k, v in wa.items():
                if k in rb and rb[k] == v:
                    return {"key": k, "value": v}
        elif kind == WW:
            for k, v in wa.items():
                if k in wb:
                    return {"key": k, "value": [v, wb[k]]}
        elif kind == RW:
            for k, v in ra.items():
                if k in wb:
                    return {"key": k, "value": [v, wb[k]]}
        return {}

"""The ``txn`` (Elle rw-register) and ``append`` (Elle list-append) workloads (see the package doc)."""

from __future__ import annotations

import random
from typing import Any

from jepsen_like import elle
from jepsen_like.checker import check
from jepsen_like.models import get_model
from jepsen_like.workloads.base import (
    Worker,
    _commit,
    _RotatingGroups,
    _s,
    _TxnWorkerBase,
    classify,
    parse_list,
)


class TxnWorkload(_RotatingGroups):
    """Random multi-key transactions (1-4 reads/writes, each key once) within a key group.

    A group is ``keys_per_shard`` keys on every shard; groups rotate every
    ``key_period`` seconds so that the transaction model's partitions (connected
    components of keys) stay small.  Written values are unique.  Checked with
    the transaction model (strict serializability), by the Elle checker
    (``elle``: the same history as rw-register transactions, anomalies named:
    G0, G1a/b/c, G-single, G2-item, lost update, ... with the models they rule
    out), plus ``recovered`` and ``final-reads`` (a plain read of every key used).
    """

    name = "txn"
    prefix = "t"

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _TxnWorker(self, process, rng)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        return [("get", k, None) for k in self.used_keys()]

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        return {"linearizable": check(ops, get_model("txn"), timeout_s=timeout_s), "elle": _elle(ops)}


def _elle(ops: list, workload: str = "rw-register") -> Any:
    """The Elle check; a history it cannot read is an unknown verdict, not a crash."""
    try:
        return elle.check(ops, workload)
    except elle.ElleError as e:
        return elle.ElleResult(verdict=elle.UNKNOWN_VERDICT, workload=workload,
                               models=("strict-serializable",), reason=f"cannot check: {e}")


class _TxnWorker(_TxnWorkerBase):
    n = 0
    write = "w"  # the micro-op kind of a write

    def keys(self, group: list[str]) -> list[str]:
        """The keys of the next transaction: 1-4 of the group, each at most once."""
        return self.rng.sample(group, self.rng.randint(1, min(4, len(group))))

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        micro = []
        for k in self.keys(self.wl.group_at(t)):
            if self.rng.random() < 0.5:
                micro.append(["r", k, None])
            else:
                self.n += 1
                micro.append([self.write, k, f"{self.process}.{self.n}"])
        return "txn", None, micro

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        try:
            if f == "get":
                return "ok", _s(self.client.get(key))
            _, done = _commit(self.client, value)
            return "ok", done
        except Exception as e:  # noqa: BLE001
            return classify(e, write=f != "get" and any(m[0] == "w" for m in value)), str(e)[:200]


class AppendWorkload(_RotatingGroups):
    """Elle list-append transactions within a rotating key group (module doc)."""

    name = "append"
    prefix = "ap"

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _AppendWorker(self, process, rng)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        return [("txn", None, [["r", k, None] for k in self._groups[g]]) for g in sorted(self._groups)]

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        return {"elle": _elle(ops, "list-append")}


class _AppendWorker(_TxnWorker):
    write = "append"

    def keys(self, group: list[str]) -> list[str]:
        """1-4 keys of the group, a key possibly more than once (Elle checks reads after own appends)."""
        return [self.rng.choice(group) for _ in range(self.rng.randint(1, 4))]

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        t = self.client.txn()
        for kind, k, x in value:
            if kind == "r":
                t.then_get(k)
            else:
                t.then_append(k, f"{x},")
        try:
            r = t.commit(retries=5)
        except Exception as e:  # noqa: BLE001 - every outcome goes into the history
            return classify(e, write=any(m[0] == "append" for m in value)), str(e)[:200]
        return "ok", [[kind, k, parse_list(res) if kind == "r" else x]
                      for (kind, k, x), res in zip(value, r.results, strict=True)]

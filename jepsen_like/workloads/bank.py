"""The ``bank`` workload (see the package doc)."""

from __future__ import annotations

import random
from typing import Any

from jepsen_like.checker import check
from jepsen_like.models import get_model
from jepsen_like.workloads.base import (
    CLIENT_AUTH,
    Worker,
    _commit,
    _Invariant,
    _keys_per_shard,
    _TxnWorkerBase,
    classify,
)
from raftkv.client import Client


class BankWorkload:
    """Transfers between accounts on different shards, by conditional transactions.

    Set-up (recorded in the history as an ``ok`` txn of process ``setup``): every
    account gets ``balance``.  Each client op is one of

    * a *full read*: one transaction reading every account (an atomic snapshot);
    * a *transfer*: a transaction reading two accounts on different shards,
      then a conditional transaction ``if a == va and b == vb then a := va - x,
      b := vb + x`` (two ops in the history; an amount above ``va`` is not tried).

    Checks: ``total-constant`` (every full read sums to the initial total),
    ``no-negative`` (no read returns a negative balance), ``linearizable`` (the
    whole history under the transaction model: strict serializability).
    """

    name = "bank"

    def __init__(self, shardmap: Any, seed: int, accounts_per_shard: int = 2, balance: int = 100,
                 op_timeout: float = 4.0, **_: Any) -> None:
        self.map = shardmap
        self.op_timeout = op_timeout
        self.balance = balance
        self.accounts = _keys_per_shard(shardmap, "acct", accounts_per_shard)
        self.total = balance * len(self.accounts)

    def setup(self, rec: Any) -> None:
        micro = [["w", a, str(self.balance)] for a in self.accounts]
        rec.add("setup", "invoke", "txn", None, micro)
        with Client(cluster=self.map, timeout=30.0, **CLIENT_AUTH) as c:
            c.mset({a: str(self.balance) for a in self.accounts}, retries=20)
        rec.add("setup", "ok", "txn", None, micro)

    def worker(self, process: Any, rng: random.Random, final: bool = False) -> Worker:
        return _BankWorker(self, process, rng)

    def final_ops(self) -> list[tuple[str, Any, Any]]:
        return [("txn", None, [["r", a, None] for a in self.accounts])]

    def check(self, ops: list, timeout_s: float | None) -> dict[str, Any]:
        reads = [op for op in ops if op.status == "ok" and op.f == "txn" and isinstance(op.output, list)
                 and all(m[0] == "r" for m in op.output)]
        full = [op for op in reads if len(op.output) == len(self.accounts)]
        bad_total = [op for op in full if sum(int(m[2]) for m in op.output if m[2] is not None) != self.total
                     or any(m[2] is None for m in op.output)]
        negative = [op for op in reads if any(m[2] is not None and int(m[2]) < 0 for m in op.output)]
        return {
            "total-constant": _Invariant(f"{len(full)} full reads, total {self.total}", bad_total),
            "no-negative": _Invariant(f"{len(reads)} reads", negative),
            "linearizable": check(ops, get_model("txn"), timeout_s=timeout_s),
        }


class _BankWorker(_TxnWorkerBase):
    def __init__(self, wl: BankWorkload, process: Any, rng: random.Random) -> None:
        super().__init__(wl, process, rng)
        self.pending: tuple[str, str, int] | None = None
        self.seen: dict[str, str] = {}

    def next_op(self, t: float) -> tuple[str, Any, Any]:
        wl = self.wl
        if self.pending is not None:
            a, b, amount = self.pending
            self.pending = None
            va, vb = self.seen.get(a), self.seen.get(b)
            if va is not None and vb is not None and int(va) >= amount:
                return "txn", None, {"if": [[a, va], [b, vb]],
                                     "then": [["w", a, str(int(va) - amount)], ["w", b, str(int(vb) + amount)]],
                                     "else": []}
        if self.rng.random() < 0.3:
            return "txn", None, [["r", a, None] for a in wl.accounts]
        while True:
            a, b = self.rng.sample(wl.accounts, 2)
            if wl.map.shard_for_key(a.encode()) != wl.map.shard_for_key(b.encode()):
                break
        self.pending = (a, b, self.rng.randint(1, 5))
        return "txn", None, [["r", a, None], ["r", b, None]]

    def invoke(self, f: str, key: Any, value: Any) -> tuple[str, Any]:
        try:
            if isinstance(value, dict):
                ok, done = _commit(self.client, value["then"], value["if"])
                return "ok", {"branch": "then" if ok else "else", "ops": done}
            ok, done = _commit(self.client, value)
            for _, k, v in done:
                self.seen[k] = v
            return "ok", done
        except Exception as e:  # noqa: BLE001
            self.pending = None
            return classify(e, write=isinstance(value, dict)), str(e)[:200]

"""Transactions inside one shard's state machine: pure, deterministic, no I/O.

Theory of operation
-------------------
A transaction is etcd-style: a list of *compares*, then the *then* ops when
every compare holds, else the *else* ops.

* compare: ``(key, kind, arg)`` with kind ``"value"`` (value equals ``arg``;
  ``None`` means absent), ``"rev"`` (modification revision equals ``arg``; 0
  means absent), ``"exists"`` or ``"missing"``.
* op: ``("put", key, value)``, ``("del", key)`` or ``("get", key)``.

When all keys live on one shard the whole transaction is one Raft entry
(``("txn", compares, then_ops, else_ops)`` in ``raftkv.state``).

``TxnTable`` holds the cross-shard (2PC) state of a shard: the locks and staged
writes of prepared transactions (participant side) and the transaction records
(coordinator side).  Until a transaction prepares here, the table is empty and
every key is unlocked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raftkv.state import KVState, Locked

COMPARE_KINDS = ("value", "rev", "exists", "missing")
OP_KINDS = ("put", "del", "get")


@dataclass(frozen=True)
class TxnResult:
    """Outcome of a transaction: which branch ran and the result of each op."""

    succeeded: bool
    results: tuple


def validate(compares: list, then_ops: list, else_ops: list) -> str | None:
    """Why the transaction is malformed, or None.  Run at the edge, before the log."""
    for c in compares:
        if len(c) != 3 or c[1] not in COMPARE_KINDS or not isinstance(c[0], bytes):
            return f"bad compare {c!r}: want (key, one of {'/'.join(COMPARE_KINDS)}, arg)"
    for op in list(then_ops) + list(else_ops):
        if not op or op[0] not in OP_KINDS or not isinstance(op[1], bytes):
            return f"bad op {op!r}: want (put key value) / (del key) / (get key)"
        if op[0] == "put" and (len(op) != 3 or not isinstance(op[2], bytes)):
            return f"bad put {op!r}: want (put key value)"
    return None


def keys_of(compares: list, then_ops: list, else_ops: list) -> list[bytes]:
    """Every key the transaction touches, in first-seen order."""
    seen: dict[bytes, None] = {}
    for c in compares:
        seen.setdefault(c[0], None)
    for op in list(then_ops) + list(else_ops):
        seen.setdefault(op[1], None)
    return list(seen)


def compare_holds(entry: tuple[bytes, int] | None, kind: str, arg: Any) -> bool:
    """Does one compare hold for a key whose ``(value, revision)`` is ``entry``?"""
    if kind == "value":
        return (None if entry is None else entry[0]) == arg
    if kind == "rev":
        return (0 if entry is None else entry[1]) == arg
    if kind == "exists":
        return entry is not None
    if kind == "missing":
        return entry is None
    raise ValueError(f"unknown compare kind {kind!r}")


def apply_local_txn(s: KVState, compares: list, then_ops: list, else_ops: list) -> TxnResult | Locked:
    """Run a single-shard transaction atomically against ``s``."""
    for key in keys_of(compares, then_ops, else_ops):
        lock = s.txns.lock_of(key)
        if lock is not None:
            return lock
    ok = all(compare_holds(s.data.get(k), kind, arg) for k, kind, arg in compares)
    results = []
    for op in then_ops if ok else else_ops:
        kind, key = op[0], op[1]
        if kind == "get":
            entry = s.data.get(key)
            results.append(None if entry is None else entry[0])
        elif kind == "put":
            results.append(s.write(key, op[2]))
        else:  # del
            existed = key in s.data
            if existed:
                s.write(key, None)
            results.append(1 if existed else 0)
    return TxnResult(ok, tuple(results))


class TxnTable:
    """Cross-shard transaction state of one shard (locks, staged writes, records)."""

    def __init__(self) -> None:
        self.locks: dict[bytes, Any] = {}

    def lock_of(self, key: bytes) -> Locked | None:
        """The lock held on ``key`` by a prepared transaction, if any."""
        if not self.locks:
            return None
        return self.locks.get(key)

    def apply(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        """Apply one 2PC message (``tx_*`` command)."""
        from raftkv.state import CmdError

        return CmdError("ERR", f"{cmd[0]}: cross-shard transactions are not enabled in this build")

    def dump(self) -> Any:
        """Picklable form for snapshots."""
        return {"locks": self.locks}

    @classmethod
    def load(cls, blob: Any) -> TxnTable:
        """Inverse of ``dump``."""
        t = cls()
        t.locks = dict(blob.get("locks", {}))
        return t

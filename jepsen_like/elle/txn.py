"""Transactions as the Elle checkers see them: an op and its micro-ops.

An op of the history becomes a :class:`Txn` whose ``mops`` are ``(f, key,
value)`` triples: ``("r", k, v)``, ``("w", k, v)`` (rw-register) or
``("append", k, x)`` (list-append).  For an ``ok`` transaction they come from
the completion (reads filled in); for ``info`` and ``fail`` from the
invocation (reads unknown, ``None``).  Single-key ops are one-op transactions:
``get``/``read`` -> ``r``, ``put``/``set``/``write`` -> ``w``, ``append`` ->
``append``.  Values are frozen (lists become tuples) so they can be indexed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..history import Op
from ..models import freeze

__all__ = ["Txn", "ElleError", "to_txns"]

_SINGLE = {"get": "r", "read": "r", "put": "w", "set": "w", "write": "w", "append": "append"}


class ElleError(ValueError):
    """The history cannot be checked this way (wrong micro-op kinds, non-unique writes...)."""


class Txn:
    """One transaction: ``op`` (the history's), ``status`` ok/info/fail, ``mops``."""

    __slots__ = ("op", "status", "mops")

    def __init__(self, op: Op, mops: tuple[tuple[str, Any, Any], ...]) -> None:
        self.op = op
        self.status = op.status
        self.mops = mops

    def __repr__(self) -> str:
        return f"Txn({self.op.describe()})"


def _mops(op: Op, kinds: Sequence[str]) -> tuple[tuple[str, Any, Any], ...]:
    if op.f == "txn":
        src = op.output if op.status == "ok" and isinstance(op.output, list) else op.input
        if not isinstance(src, list) or (op.status == "ok" and len(src) != len(op.input or ())):
            raise ElleError(f"transaction without a list of micro-ops: {op.describe()}")
        out = []
        for m in src:
            if not isinstance(m, list | tuple) or len(m) != 3 or m[0] not in kinds:
                raise ElleError(f"micro-op {m!r} is not one of {'/'.join(kinds)} in {op.describe()}")
            v = m[2] if op.status == "ok" or m[0] != "r" else None
            out.append((m[0], freeze(m[1]), freeze(v)))
        return tuple(out)
    f = _SINGLE.get(op.f)
    if f is None or f not in kinds:
        raise ElleError(f"operation {op.f!r} cannot be checked as {'/'.join(kinds)}: {op.describe()}")
    if f == "r":
        return (("r", freeze(op.key), freeze(op.output) if op.status == "ok" else None),)
    return ((f, freeze(op.key), freeze(op.input)),)


def to_txns(ops: Sequence[Op], kinds: Sequence[str]) -> tuple[list[Txn], list[Txn]]:
    """``(txns, failed)``: ok and info transactions (the graph's nodes, in history order), failed ones."""
    txns: list[Txn] = []
    failed: list[Txn] = []
    for op in ops:
        t = Txn(op, _mops(op, kinds))
        (failed if op.status == "fail" else txns).append(t)
    return txns, failed

"""Our histories in Knossos's EDN format, so the Jepsen tools can re-check them as they are.

Theory of operation
===================

A Knossos history is one object (a register, a mutex, a map of registers)
and a vector of op maps in real-time order::

    [{:process 0, :type :invoke, :f :read, :value nil, :time 1200}
     {:process 0, :type :ok, :f :read, :value "3.1", :time 1500}]

:func:`to_knossos_edn` turns our ops into that, for one of Knossos's models:

* ``cas-register`` (one key of the register workload): ``get`` -> ``:read``,
  ``put`` -> ``:write``, ``delete`` -> ``:write nil`` (Knossos's absent),
  ``cas [old new]`` -> ``:cas``; a cas whose compare
  failed (ours: ``ok`` with output ``false``) is ``:fail`` (it had no effect);
* ``mutex`` (one lock of the lock workload): ``:acquire`` / ``:release``;
* ``multi-register`` (the txn workload): each transaction -> ``:txn`` with
  ``[:read k v]`` / ``[:write k v]`` micro-ops; a plain ``get`` (the final
  reads) is a one-read transaction.

``info`` ops keep their invocation's value and complete with ``:info`` at the
end of the history (as Jepsen writes them); ``fail`` ops stay ``:fail``.  Our
process ids that are not integers (``final``) get fresh integers, because
Knossos drops ops of non-integer processes (the nemesis).  ``:time`` is
nanoseconds on the run's clock.

What is lost: our registers start absent (``nil``), and Knossos reads ``nil``
as "unknown", so a read of an absent key constrains nothing there; our mutex
has owners, Knossos's has none.  Both only weaken the check (a history we pass
passes Knossos); re-check with ``--initial nil`` (Knossos's CLI builds
``(cas-register)``, which starts at ``nil``), as the header comment says.

:func:`export_history` writes one file per object of a run.  Pure except for
that function's writes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .edn import Keyword, dumps
from .history import UNKNOWN, Op

__all__ = ["KINDS", "WORKLOAD_KINDS", "to_knossos_edn", "export_history"]

KINDS = ("cas-register", "mutex", "multi-register")
WORKLOAD_KINDS = {"register": "cas-register", "lock": "mutex", "txn": "multi-register"}
"""Which of our workloads can be written for which Knossos model."""

_K = Keyword


def _value(kind: str, op: Op, v: Any) -> Any:
    if kind == "multi-register":
        if op.f == "get":
            return [[_K("read"), op.key, v]]
        return [[_K("read") if m[0] in ("r", "read") else _K("write"), m[1], m[2]] for m in v or ()]
    return v


def _f_and_status(kind: str, op: Op) -> tuple[str, str]:
    if kind == "cas-register":
        f = {"get": "read", "read": "read", "put": "write", "write": "write", "cas": "cas",
             "delete": "write"}.get(op.f)
        if f is None:
            raise ValueError(f"{op.describe()}: a Knossos cas-register has no {op.f!r} "
                             "(only get/put/cas/delete histories can be written)")
        if f == "cas" and op.status == "ok" and op.output is False:
            return f, "fail"  # the compare failed: no effect, which is what Knossos's :fail means
        return f, op.status
    if kind == "mutex":
        if op.f not in ("acquire", "release"):
            raise ValueError(f"{op.describe()}: a Knossos mutex has only acquire and release")
        return op.f, op.status
    if kind == "multi-register":
        if op.f not in ("txn", "get") or (op.f == "txn" and not isinstance(op.input, list)):
            raise ValueError(f"{op.describe()}: a Knossos multi-register has only transactions of reads and "
                             "writes")
        return "txn", op.status
    raise ValueError(f"unknown Knossos model {kind!r} (expected one of {', '.join(KINDS)})")


def to_knossos_edn(ops: Sequence[Op], kind: str, note: str = "") -> str:
    """The ops as one Knossos history for model ``kind`` (see the module doc); ``note`` heads it."""
    procs: dict[Any, int] = {}
    taken = {op.client for op in ops if isinstance(op.client, int) and not isinstance(op.client, bool)}
    spare = max(taken, default=-1) + 1
    for op in sorted(ops, key=lambda o: o.index):
        if op.client not in procs:
            if op.client in taken:
                procs[op.client] = op.client
            else:
                procs[op.client], spare = spare, spare + 1
    evs: list[tuple[float, int, int, dict[Any, Any]]] = []
    for op in ops:
        f, status = _f_and_status(kind, op)
        p = procs[op.client]
        inp = _value(kind, op, op.input if op.f not in ("get", "delete") else None)
        evs.append((op.call, 0, op.index, _event(p, "invoke", f, inp, op.call)))
        if status == "info" or op.output is UNKNOWN:
            evs.append((math.inf, 1, op.index, _event(p, "info", f, inp, None)))
            continue
        if status != "ok" or kind == "mutex":
            out = inp
        elif kind == "cas-register":
            out = op.output if f == "read" else op.input
        else:
            out = _value(kind, op, op.output)
        evs.append((op.ret, 1, op.index, _event(p, status, f, out, op.ret)))
    evs.sort(key=lambda t: t[:3])
    head = "".join(f"; {line}\n" for line in note.splitlines())
    body = "\n ".join(dumps(e[3]) for e in evs)
    return f"{head}[{body}]\n"


def _event(process: int, typ: str, f: str, value: Any, t: float | None) -> dict[Any, Any]:
    e: dict[Any, Any] = {_K("process"): process, _K("type"): _K(typ), _K("f"): _K(f), _K("value"): value}
    if t is not None and math.isfinite(t):
        e[_K("time")] = int(round(t * 1e9))
    return e


def export_history(ops: Sequence[Op], workload: str, out_dir: str | Path) -> list[Path]:
    """Write a run's history as Knossos histories into ``out_dir``: one file per register or lock of the
    register and lock workloads, one file for the txn workload.  Returns the files written.

    Raises ``ValueError`` for a workload (or an op) Knossos has no model for.
    """
    kind = WORKLOAD_KINDS.get(workload)
    if kind is None:
        raise ValueError(f"the {workload} workload has no Knossos model (EDN export: "
                         f"{', '.join(f'{w} -> {k}' for w, k in WORKLOAD_KINDS.items())})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "multi-register":
        groups = {"txn": list(ops)}
    else:
        groups = {}
        for op in ops:
            groups.setdefault(str(op.key), []).append(op)
    files = []
    for name, part in sorted(groups.items()):
        path = out / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".edn")
        initial = " --initial nil" if kind != "mutex" else ""
        note = (f"raftkv {workload} history ({name}) for Knossos's {kind} model; registers start at nil.\n"
                f"re-check: raftkv-jepsen check {path.name} --format knossos-edn --model {kind}{initial}")
        path.write_text(to_knossos_edn(part, kind, note), encoding="utf-8")
        files.append(path)
    return files

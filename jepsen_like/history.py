"""Histories: events, operations, parsers and a jsonl writer.

A *history* is a sequence of events ``invoke`` / ``ok`` / ``fail`` / ``info``
recorded by clients.  An invocation is matched with the next non-invoke event
of the same process and the pair becomes one :class:`Op`.

Positions (``Op.call`` / ``Op.ret``) are the event's ``time`` when every event
carries one, otherwise its line number.  Intervals are closed: an operation
returning at ``t`` and another one invoked at ``t`` are concurrent (the checker
orders calls before returns on ties).  An indeterminate operation (``info``, or
an invocation that never completes) has ``ret = math.inf`` and
``output = UNKNOWN``: it may take effect at any point after its invocation, or
never.  ``fail`` operations are kept here with ``status == "fail"``; the
checker drops them (they had no effect, and a failed read constrains nothing).

Supported formats:

* ``jsonl``: our own, one JSON object per line::

    {"process": 1, "type": "invoke", "f": "put", "key": "a", "value": "1", "time": 0.5}

* ``jepsen-log``: Jepsen 0.0.x text logs (``porcupine/jepsen/etcd_NNN.log``).
* ``porcupine-kv``: one EDN map per line (``porcupine/kv/cNN-*.txt``).
* ``knossos-edn``: Knossos's / Jepsen's EDN history, a vector of op maps or a
  sequence of them (``{:process 0, :type :invoke, :f :read, :value nil}``);
  ops of non-integer processes (``:nemesis``) are left out, as Knossos does;
  line order is the clock.

Parsers are pure (text in, ops out); :func:`read_history` is the one helper
that touches the file system.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .edn import EdnError, loads_all

__all__ = [
    "UNKNOWN",
    "Event",
    "Op",
    "FORMATS",
    "HistoryError",
    "detect_format",
    "ops_from_events",
    "parse_jsonl",
    "parse_jepsen_log",
    "parse_porcupine_kv",
    "parse_knossos_edn",
    "parse_history",
    "read_history",
    "to_jsonl",
]

FORMATS = ("jsonl", "jepsen-log", "porcupine-kv", "knossos-edn")


class _Unknown:
    """Singleton: the output of an indeterminate operation (any output is fine)."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


class HistoryError(ValueError):
    """A history line could not be parsed or is inconsistent."""


@dataclass(frozen=True, slots=True)
class Event:
    """One recorded event: ``type`` is invoke, ok, fail or info."""

    process: Any
    type: str
    f: str
    key: Any = None
    value: Any = None
    time: float | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Op:
    """One operation: an invocation paired with its completion.

    ``client`` is the process id, ``input`` the invocation's value, ``output``
    the completion's value (``UNKNOWN`` for indeterminate ops), ``call`` /
    ``ret`` the positions of the two events (``ret = inf`` when indeterminate),
    ``status`` one of ``"ok"``, ``"fail"``, ``"info"``; ``index`` is the op's
    rank by invocation in the history.
    """

    index: int
    client: Any
    f: str
    key: Any
    input: Any
    output: Any
    call: float
    ret: float
    status: str

    def describe(self) -> str:
        """Human-readable one-liner, e.g. ``p3 put a '1' -> ok [12, 15]``."""
        key = "" if self.key is None else f" {self.key!r}"
        out = "?" if self.output is UNKNOWN else repr(self.output)
        ret = "inf" if self.ret == math.inf else _num(self.ret)
        inp = "" if self.input is None else f" {self.input!r}"
        return f"#{self.index} p{self.client} {self.f}{key}{inp} -> {out} ({self.status}) [{_num(self.call)}, {ret}]"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


def ops_from_events(events: Iterable[Event]) -> list[Op]:
    """Pair each invoke with the next non-invoke event of the same process.

    Positions are the events' times if all events have one, else line order.
    A process invoking twice without completing, or completing without an
    invocation, raises :class:`HistoryError`.  Invocations left open at the end
    become indeterminate (``info``) operations.
    """
    evs = list(events)
    use_time = bool(evs) and all(e.time is not None for e in evs)
    pending: dict[Any, tuple[int, Event, float]] = {}
    ops: list[tuple[int, Any, str, Any, Any, Any, float, float, str]] = []
    for line, ev in enumerate(evs):
        pos = float(ev.time) if use_time else line  # type: ignore[arg-type]
        if ev.type == "invoke":
            if ev.process in pending:
                raise HistoryError(f"event {line}: process {ev.process!r} invoked twice without completing")
            pending[ev.process] = (line, ev, pos)
            continue
        if ev.type not in ("ok", "fail", "info"):
            raise HistoryError(f"event {line}: unknown type {ev.type!r}")
        if ev.process not in pending:
            raise HistoryError(f"event {line}: {ev.type} of process {ev.process!r} without an invocation")
        start, inv, call = pending.pop(ev.process)
        if ev.type == "info":
            ops.append((start, inv.process, inv.f, inv.key, inv.value, UNKNOWN, call, math.inf, "info"))
        else:
            ops.append((start, inv.process, inv.f, inv.key, inv.value, ev.value, call, pos, ev.type))
    for start, inv, call in pending.values():
        ops.append((start, inv.process, inv.f, inv.key, inv.value, UNKNOWN, call, math.inf, "info"))
    ops.sort(key=lambda t: t[0])
    return [Op(i, *t[1:]) for i, t in enumerate(ops)]


# ---------------------------------------------------------------- jsonl


def parse_jsonl(text: str) -> list[Op]:
    """Parse our jsonl format (blank lines and ``#`` comments are skipped)."""
    events = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            d = json.loads(line)
            events.append(
                Event(d["process"], d["type"], d.get("f", ""), d.get("key"), d.get("value"), d.get("time"))
            )
        except (ValueError, KeyError, TypeError) as e:
            raise HistoryError(f"line {n}: {e}") from e
    return ops_from_events(events)


def to_jsonl(ops: Sequence[Op]) -> str:
    """Serialise ops as jsonl events in real-time order (line order is the clock).

    Calls come before returns at equal positions, so concurrency is preserved;
    indeterminate ops get their ``info`` event at the end.  Fail ops are kept.
    """
    evs: list[tuple[float, int, int, dict[str, Any]]] = []
    for op in ops:
        evs.append((op.call, 0, op.index, {"process": op.client, "type": "invoke", "f": op.f,
                                           "key": op.key, "value": op.input}))
        if op.status == "info":
            evs.append((math.inf, 1, op.index, {"process": op.client, "type": "info", "f": op.f,
                                                "key": op.key, "value": None}))
        else:
            evs.append((op.ret, 1, op.index, {"process": op.client, "type": op.status, "f": op.f,
                                              "key": op.key, "value": op.output}))
    evs.sort(key=lambda t: t[:3])
    return "".join(json.dumps(e[3]) + "\n" for e in evs)


# ---------------------------------------------------------------- jepsen log

_JEPSEN_RE = re.compile(r"^INFO\s+jepsen\.util\s+-\s+(\d+)\s+:(\w+)\s+:([\w-]+)\s+(.*?)\s*$")


def _jepsen_value(s: str) -> Any:
    if s == "nil":
        return None
    if s.startswith(":"):
        return s[1:]
    if s.startswith("["):
        return [_jepsen_value(x) for x in s[1:-1].split()]
    try:
        return int(s)
    except ValueError:
        return s


def parse_jepsen_log(text: str) -> list[Op]:
    """Parse a Jepsen 0.0.x text log of a single register (etcd_NNN.log).

    ``:fail :read :timed-out`` becomes a failed read (constrains nothing);
    ``:info`` completions become indeterminate operations.  The key is ``None``.
    """
    events = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        m = _JEPSEN_RE.match(raw)
        if not m:
            raise HistoryError(f"line {n}: not a jepsen log line: {raw!r}")
        proc, typ, f, val = m.groups()
        events.append(Event(int(proc), typ, f, None, _jepsen_value(val)))
    return ops_from_events(events)


# ---------------------------------------------------------------- porcupine kv (EDN)

_EDN_FIELD = re.compile(r':([\w-]+)\s+(nil|"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|:[\w-]+)')


def _edn_value(s: str) -> Any:
    if s == "nil":
        return None
    if s.startswith('"'):
        return json.loads(s)
    if s.startswith(":"):
        return s[1:]
    return float(s) if "." in s else int(s)


def parse_porcupine_kv(text: str) -> list[Op]:
    """Parse Porcupine's kv test data: one flat EDN map per line."""
    events = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if not (line.startswith("{") and line.endswith("}")):
            raise HistoryError(f"line {n}: not an EDN map: {raw!r}")
        d = {k: _edn_value(v) for k, v in _EDN_FIELD.findall(line)}
        try:
            events.append(Event(d["process"], d["type"], d["f"], d.get("key"), d.get("value"), d.get("time")))
        except KeyError as e:
            raise HistoryError(f"line {n}: missing field {e}") from e
    return ops_from_events(events)


# ---------------------------------------------------------------- knossos / jepsen EDN

_KNOSSOS_TYPES = ("invoke", "ok", "fail", "info")


def parse_knossos_edn(text: str) -> list[Op]:
    """Parse a Knossos EDN history as Knossos reads it (``knossos.cli/read-history``).

    The text is one vector (or list) of op maps, or op maps one after another.  Each map needs
    ``:process``, ``:type`` (``:invoke`` / ``:ok`` / ``:fail`` / ``:info``) and ``:f``; ``:value`` is
    optional; other keys (``:time``, ``:index``, ``:error``) are ignored.  Ops of processes that are
    not integers (the ``:nemesis``) are not client operations and are left out.  Keywords become
    strings equal to their names; vectors become lists.  Positions are line order (Knossos ignores
    ``:time``).
    """
    try:
        forms = list(loads_all(text))
    except EdnError as e:
        raise HistoryError(str(e)) from e
    if len(forms) == 1 and isinstance(forms[0], list | tuple):
        forms = list(forms[0])
    events = []
    for n, m in enumerate(forms):
        if not isinstance(m, dict):
            raise HistoryError(f"op {n}: expected an op map {{:process .., :type .., :f ..}}, got {m!r}")
        missing = [k for k in ("process", "type", "f") if k not in m]
        if missing:
            raise HistoryError(f"op {n}: missing {', '.join(':' + k for k in missing)} in {m!r}")
        process, typ = m["process"], m["type"]
        if not isinstance(process, int) or isinstance(process, bool):
            continue
        if typ not in _KNOSSOS_TYPES:
            raise HistoryError(f"op {n}: :type must be one of {', '.join(':' + t for t in _KNOSSOS_TYPES)}, "
                               f"not {typ!r}")
        events.append(Event(process, str(typ), str(m["f"]), None, m.get("value")))
    return ops_from_events(events)


# ---------------------------------------------------------------- detection / files

_PARSERS = {"jsonl": parse_jsonl, "jepsen-log": parse_jepsen_log, "porcupine-kv": parse_porcupine_kv,
            "knossos-edn": parse_knossos_edn}


def detect_format(text: str, name: str = "") -> str:
    """Guess the format from the first non-blank line (then the file extension)."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("INFO"):
            return "jepsen-log"
        if line.startswith("{:"):
            return "porcupine-kv"
        if line.startswith("{"):
            return "jsonl"
        if line.startswith(("[", "(")):
            return "knossos-edn"
        break
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".log"):
        return "jepsen-log"
    if name.endswith((".txt", ".edn")):
        return "porcupine-kv"
    return "jsonl"


def parse_history(text: str, fmt: str = "auto", name: str = "") -> tuple[list[Op], str]:
    """Parse ``text`` in format ``fmt`` (or detected); return ``(ops, format)``."""
    if fmt == "auto":
        fmt = detect_format(text, name)
    if fmt not in _PARSERS:
        raise HistoryError(f"unknown history format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return _PARSERS[fmt](text), fmt


def read_history(path: str | Path, fmt: str = "auto") -> tuple[list[Op], str]:
    """Read and parse a history file; return ``(ops, format)``."""
    p = Path(path)
    return parse_history(p.read_text(encoding="utf-8"), fmt, p.name)

"""Redis string commands beyond get/set, as state-machine commands: counters, append, conditional set.

Pure and deterministic like ``raftkv.state`` (whose handler table includes
``HANDLERS``): every replica reaches the same result from the same entry.

========================================  ======================================
command                                   result
========================================  ======================================
``("incrby", key, delta)``                the new integer value
``("append", key, suffix, len_max)``      the new length
``("getdel", key)``                       the value it had, or ``None``
``("setopt", key, value, cond[, ttl])``   ``(set?, value before)``; ``cond``
                                          is ``None``, ``"nx"`` or ``"xx"``;
                                          ``ttl``: ``("in", ms)``, ``("at", ms)``
                                          (log time) or ``"keep"``
``("incrbyfloat", key, increment)``       the new value (bytes, as Redis prints
                                          it); the deadline stays
``("getex", key, ttl)``                   the value, or ``None``; ``ttl``:
                                          ``None`` (unchanged), ``("in", ms)``
                                          or ``"persist"``
========================================  ======================================

A key locked by a prepared transaction answers ``Locked`` (the node waits).
Errors follow Redis: a value that is not a base-10 64-bit integer, or an
increment that overflows, is ``ERR``.

INCRBYFLOAT computes in decimal with 19 significant digits (what Redis's
``long double`` holds) and prints the result as Redis does (``%.17Lf`` with
trailing zeros cut: ``10.5 + 0.1`` is ``10.6``, ``5.0e3 + 200`` is ``5200``),
deterministically on every replica, which C floats on different machines are
not guaranteed to be.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal
from typing import Any

from raftkv.expiry import on_live_key
from raftkv.results import CmdError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(rb"-?(0|[1-9][0-9]{0,19})")  # what Redis accepts: no sign '+', no spaces or zeros


@on_live_key
def _incrby(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    _, key, delta = cmd
    current = 0
    if entry is not None:
        if not _INTEGER.fullmatch(entry[0]) or not INT64_MIN <= int(entry[0]) <= INT64_MAX:
            return CmdError("ERR", "value is not an integer or out of range")
        current = int(entry[0])
    new = current + delta
    if not INT64_MIN <= new <= INT64_MAX:
        return CmdError("ERR", "increment or decrement would overflow")
    s.write(key, str(new).encode())
    return new


@on_live_key
def _append(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    _, key, suffix, len_max = cmd
    value = (b"" if entry is None else entry[0]) + suffix
    if len(value) > len_max:
        return CmdError("TOOBIG", f"the value would be {len(value)} bytes, over value_bytes_max={len_max}")
    s.write(key, value)
    return len(value)


@on_live_key
def _getdel(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    if entry is None:
        return None
    s.write(cmd[1], None)
    return entry[0]


@on_live_key
def _setopt(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    key, value, cond = cmd[1:4]
    ttl = cmd[4] if len(cmd) > 4 else None
    before = None if entry is None else entry[0]
    if (cond == "nx" and entry is not None) or (cond == "xx" and entry is None):
        return (False, before)
    if isinstance(ttl, tuple):
        deadline = now_ms + ttl[1] if ttl[0] == "in" else ttl[1]
        if deadline <= now_ms:  # already past: the write happens and the key is gone at once
            s.write(key, None)
            return (True, before)
        s.write(key, value)
        s.expiries.set(key, deadline)
        return (True, before)
    s.write(key, value, keep_ttl=ttl == "keep")
    return (True, before)


_FLOAT = re.compile(rb"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_INFINITIES = {b"inf", b"+inf", b"-inf", b"infinity", b"+infinity", b"-infinity"}
_LONG_DOUBLE = Context(prec=19)  # significant digits of the x87 long double Redis computes in
_LONG_DOUBLE_MAX = Decimal("1.18973149535723176502e4932")
_PRINT = Context(prec=6000)  # room for every digit of the largest long double and 17 decimals
FLOAT_BYTES_MAX = 5000  # Redis refuses longer numbers (MAX_LONG_DOUBLE_CHARS)


def parse_float(raw: bytes) -> Decimal | str:
    """A float as Redis reads one (``strtold``, no spaces, no NaN), or the Redis error text."""
    if raw.lower() in _INFINITIES:
        return "increment would produce NaN or Infinity"
    if len(raw) > FLOAT_BYTES_MAX or not _FLOAT.fullmatch(raw):
        return "value is not a valid float"
    return Decimal(raw.decode())


def format_float(value: Decimal) -> bytes:
    """As Redis prints a long double for humans: 17 decimals, then trailing zeros and the point cut."""
    text = format(value.quantize(Decimal(1).scaleb(-17), context=_PRINT), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return b"0" if text in ("-0", "") else text.encode()


@on_live_key
def _incrbyfloat(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    _, key, raw_increment = cmd
    current = Decimal(0) if entry is None else parse_float(entry[0])
    increment = parse_float(raw_increment)
    for parsed in (current, increment):
        if isinstance(parsed, str):
            return CmdError("ERR", parsed)
    new = _LONG_DOUBLE.add(current, increment)
    if abs(new) > _LONG_DOUBLE_MAX:
        return CmdError("ERR", "increment would produce NaN or Infinity")
    value = format_float(new)
    s.write(key, value, keep_ttl=True)  # Redis keeps the deadline of a key it increments
    return value


@on_live_key
def _getex(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    _, key, ttl = cmd
    if entry is None:
        return None
    if ttl == "persist":
        s.expiries.clear(key)
    elif ttl is not None:
        if ttl[1] <= 0:  # an absolute time already past: Redis deletes the key, and answers its value
            s.write(key, None)
        else:
            s.expiries.set(key, now_ms + ttl[1])
    return entry[0]


HANDLERS = {"incrby": _incrby, "append": _append, "getdel": _getdel, "setopt": _setopt,
            "incrbyfloat": _incrbyfloat, "getex": _getex}

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
========================================  ======================================

A key locked by a prepared transaction answers ``Locked`` (the node waits).
Errors follow Redis: a value that is not a base-10 64-bit integer, or an
increment that overflows, is ``ERR``.
"""

from __future__ import annotations

import re
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


HANDLERS = {"incrby": _incrby, "append": _append, "getdel": _getdel, "setopt": _setopt}

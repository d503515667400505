"""Redis string commands beyond get/set, as state-machine commands: counters, append, conditional set.

Pure and deterministic like ``raftkv.state`` (whose handler table includes
``HANDLERS``): every replica reaches the same result from the same entry.

========================================  ======================================
command                                   result
========================================  ======================================
``("incrby", key, delta)``                the new integer value
``("append", key, suffix, len_max)``      the new length
``("getdel", key)``                       the value it had, or ``None``
``("setopt", key, value, cond)``          ``(set?, value before)``; ``cond``
                                          is ``None``, ``"nx"`` or ``"xx"``
========================================  ======================================

A key locked by a prepared transaction answers ``Locked`` (the node waits).
Errors follow Redis: a value that is not a base-10 64-bit integer, or an
increment that overflows, is ``ERR``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from raftkv.results import CmdError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(rb"-?(0|[1-9][0-9]{0,19})")  # what Redis accepts: no sign '+', no spaces or zeros


def _unlocked(op: Callable[[Any, tuple, Any], Any]) -> Callable[[Any, tuple, int], Any]:
    """A handler of one key (``cmd[1]``): answers the lock if a prepared transaction holds the key,
    else runs ``op(state, cmd, entry)`` with the key's ``(value, revision)`` or None."""

    def handler(s: Any, cmd: tuple, now_ms: int) -> Any:
        lock = s.txns.lock_of(cmd[1])
        return lock if lock is not None else op(s, cmd, s.data.get(cmd[1]))
    return handler


@_unlocked
def _incrby(s: Any, cmd: tuple, entry: Any) -> Any:
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


@_unlocked
def _append(s: Any, cmd: tuple, entry: Any) -> Any:
    _, key, suffix, len_max = cmd
    value = (b"" if entry is None else entry[0]) + suffix
    if len(value) > len_max:
        return CmdError("TOOBIG", f"the value would be {len(value)} bytes, over value_bytes_max={len_max}")
    s.write(key, value)
    return len(value)


@_unlocked
def _getdel(s: Any, cmd: tuple, entry: Any) -> Any:
    if entry is None:
        return None
    s.write(cmd[1], None)
    return entry[0]


@_unlocked
def _setopt(s: Any, cmd: tuple, entry: Any) -> Any:
    _, key, value, cond = cmd
    before = None if entry is None else entry[0]
    if (cond == "nx" and entry is not None) or (cond == "xx" and entry is None):
        return (False, before)
    s.write(key, value)
    return (True, before)


HANDLERS = {"incrby": _incrby, "append": _append, "getdel": _getdel, "setopt": _setopt}

"""Key expiry in replicated log time: deadlines, and the EXPIRE / TTL / PERSIST commands. Pure.

Theory of operation
-------------------
A key's deadline is a point in the shard's *log time* (``raftkv.logclock``):
replicated, never going backwards, never a replica's own clock.  Every entry
applied at log time ``t`` first deletes the keys whose deadline is ``<= t``
(``KVState.apply`` calls ``Expiries.due``), so every replica deletes the same
keys at the same log position, and each deletion advances the revision as a
DEL does (WATCH sees it).  Between entries, reads compare deadlines with the
leader's current log time, so an expired key is gone at once; the node's
reaper proposes an empty entry when a deadline has passed and nothing else
is written, so memory is reclaimed through the log too.  A key held by a
prepared transaction's lock expires once the lock is gone.

Any write of a key clears its deadline (as in Redis), except ``SET ... KEEPTTL``.

========================================  ======================================
command                                   result
========================================  ======================================
``("expire", key, ms, absolute, cond)``   1 if the deadline was set, else 0;
                                          ``cond`` None/"nx"/"xx"/"gt"/"lt";
                                          a deadline not in the future deletes
``("pttl", key)``                         ms left; -1 no deadline; -2 missing
``("persist", key)``                      1 if a deadline was removed, else 0
``("getttl", key)``                       ``(value, revision, ms left or None)``
                                          or ``None`` if missing (a read)
========================================  ======================================
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

NEVER = 1 << 62


class Expiries:
    """Per-key deadlines (log-time ms) with a heap for the next one due (stale heap items skipped)."""

    def __init__(self, deadlines: dict[bytes, int] | None = None) -> None:
        self.deadlines: dict[bytes, int] = dict(deadlines or {})
        self._heap = [(t, k) for k, t in self.deadlines.items()]
        heapq.heapify(self._heap)

    def __bool__(self) -> bool:
        return bool(self.deadlines)

    def __len__(self) -> int:
        return len(self.deadlines)

    def get(self, key: bytes) -> int | None:
        return self.deadlines.get(key)

    def set(self, key: bytes, deadline_ms: int) -> None:
        self.deadlines[key] = deadline_ms
        heapq.heappush(self._heap, (deadline_ms, key))

    def clear(self, key: bytes) -> bool:
        """Remove ``key``'s deadline; True if it had one."""
        return self.deadlines.pop(key, None) is not None

    def expired(self, key: bytes, now_ms: int) -> bool:
        return self.deadlines.get(key, NEVER) <= now_ms

    def next_deadline(self) -> int | None:
        while self._heap and self.deadlines.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # superseded or cleared
        return self._heap[0][0] if self._heap else None

    def earliest(self) -> int | None:
        """A lower bound of the next deadline, without changing anything (safe from another thread:
        a stale answer only makes the reaper propose an empty entry)."""
        heap = self._heap
        try:
            return heap[0][0] if heap else None
        except IndexError:
            return None

    def due(self, now_ms: int) -> list[bytes]:
        """Keys whose deadline is ``<= now_ms``, in deadline order (their deadlines stay set)."""
        out: list[bytes] = []
        while (t := self.next_deadline()) is not None and t <= now_ms:
            _, key = heapq.heappop(self._heap)
            out.append(key)
        return out

    def dump(self) -> dict[bytes, int]:
        return dict(self.deadlines)


def on_live_key(op: Callable[[Any, tuple, Any, int], Any]) -> Callable[[Any, tuple, int], Any]:
    """A handler of one key (``cmd[1]``): answers the lock if a prepared transaction holds the key,
    else runs ``op(state, cmd, entry, now_ms)`` with the key's live ``(value, revision)`` or None."""

    def handler(s: Any, cmd: tuple, now_ms: int) -> Any:
        lock = s.txns.lock_of(cmd[1])
        return lock if lock is not None else op(s, cmd, s.lookup(cmd[1], now_ms), now_ms)
    return handler


@on_live_key
def _expire(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    _, key, ms, absolute, cond = cmd
    if entry is None:
        return 0
    deadline = ms if absolute else now_ms + ms
    current = s.expiries.get(key)
    if ((cond == "nx" and current is not None) or (cond == "xx" and current is None)
            or (cond == "gt" and (current is None or deadline <= current))
            or (cond == "lt" and current is not None and deadline >= current)):
        return 0
    if deadline <= now_ms:
        s.write(key, None)  # Redis: a deadline in the past deletes the key now
    else:
        s.expiries.set(key, deadline)
    return 1


@on_live_key
def _pttl(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    if entry is None:
        return -2
    deadline = s.expiries.get(cmd[1])
    return -1 if deadline is None else deadline - now_ms


@on_live_key
def _persist(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    return 1 if entry is not None and s.expiries.clear(cmd[1]) else 0


@on_live_key
def _getttl(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    if entry is None:
        return None
    deadline = s.expiries.get(cmd[1])
    return (entry[0], entry[1], None if deadline is None else deadline - now_ms)


HANDLERS = {"expire": _expire, "pttl": _pttl, "persist": _persist}
READ_HANDLERS = {"pttl": _pttl, "getttl": _getttl}

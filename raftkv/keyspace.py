"""Walking the key space: ``("scan", after, count, pattern)`` and ``("keys", pattern)``. Pure reads.

A scan cursor is a position in key order (the last key returned), not an index,
so keys inserted or deleted meanwhile never make a scan skip a key that was
present the whole time (Redis' guarantee).  Shards keep keys in a hash table,
so each step picks the ``count`` smallest keys above the cursor in one pass over
the shard: O(keys in shard) per step, fine for operators' tools, not a query path.
Expired keys are skipped; patterns are Redis globs (``*``, ``?``, ``[...]``).
"""

from __future__ import annotations

import fnmatch
import heapq
from typing import Any


def glob_matches(pattern: bytes | None, key: bytes) -> bool:
    """Redis-style glob match (``[^...]`` is accepted for ``[!...]``)."""
    if pattern is None:
        return True
    return fnmatch.fnmatchcase(key, pattern.replace(b"[^", b"[!"))


def _scan(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, after, count, pattern = cmd
    batch = heapq.nsmallest(count, (k for k in s.data if after is None or k > after))
    last = batch[-1] if len(batch) == count else None  # None: nothing above this batch
    keys = [k for k in batch if s.lookup(k, now_ms) is not None and glob_matches(pattern, k)]
    return (keys, last)


def _keys(s: Any, cmd: tuple, now_ms: int) -> Any:
    pattern = cmd[1]
    return sorted(k for k in s.data if glob_matches(pattern, k) and s.lookup(k, now_ms) is not None)


READ_HANDLERS = {"scan": _scan, "keys": _keys}

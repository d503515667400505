"""Walking the key space: ``("scan", after, count, pattern)``, ``("keys", pattern)``,
``("range", start, end, limit, hidden)`` and ``("dbsize", hidden)``.  Pure reads.

A scan cursor is a position in key order (the last key returned), not an index,
so keys inserted or deleted meanwhile never make a scan skip a key that was
present the whole time (Redis' guarantee).  Shards keep keys in a hash table,
so each step picks the ``count`` smallest keys above the cursor in one pass over
the shard: O(keys in shard) per step, fine for operators' tools, not a query path.
Expired keys, and keys moved to another shard but not deleted here yet (``raftkv.reshard``), are skipped;
patterns are Redis globs (``*``, ``?``, ``[...]``).

A range is ``[start, end)`` in byte order (``end`` None: no upper bound) and
answers the ``limit`` smallest live keys in it with their values.  Keys are
hashed to shards, so a range is a question to every shard (each answers from
one pass over its keys) and the node merges the answers: the cost of hash
sharding, which spreads load evenly but scatters neighbouring keys.  Keys
starting with ``hidden`` (the cluster's own) are never part of a range: left
out by the shard, they cannot crowd a key of the range out of its ``limit``.
``dbsize`` counts the live keys, less the ``hidden`` ones.
"""

from __future__ import annotations

import fnmatch
import itertools
from typing import Any


def glob_matches(pattern: bytes | None, key: bytes) -> bool:
    """Redis-style glob match (``[^...]`` is accepted for ``[!...]``)."""
    if pattern is None:
        return True
    return fnmatch.fnmatchcase(key, pattern.replace(b"[^", b"[!"))


def _scan(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, after, count, pattern = cmd
    batch = list(itertools.islice(s.data.keys_between(b"" if after is None else after + b"\0"), count))
    last = batch[-1] if len(batch) == count else None  # None: nothing above this batch
    keys = [k for k in batch if s.lookup(k, now_ms) is not None and glob_matches(pattern, k) and s.serves(k)]
    return (keys, last)


def _keys(s: Any, cmd: tuple, now_ms: int) -> Any:
    pattern = cmd[1]
    return [k for k in s.data.keys_between()
            if glob_matches(pattern, k) and s.lookup(k, now_ms) is not None and s.serves(k)]


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key above every key starting with ``prefix`` (None: there is none, no upper bound)."""
    trimmed = prefix.rstrip(b"\xff")
    return None if not trimmed else trimmed[:-1] + bytes([trimmed[-1] + 1])


def _range(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, start, end, limit, hidden = cmd
    live = (k for k in s.data.keys_between(start, end)
            if not k.startswith(hidden) and s.lookup(k, now_ms) is not None and s.serves(k))
    return [(k, s.data[k][0]) for k in itertools.islice(live, limit)]


def _dbsize(s: Any, cmd: tuple, now_ms: int) -> Any:
    expired = sum(1 for k, t in s.expiries.deadlines.items() if t <= now_ms and k in s.data) if s.expiries else 0
    # keys this shard holds but does not serve (moved to another shard, not yet deleted here): one pass
    elsewhere = 0 if s.owner is None and s.move is None else sum(1 for k in s.data.keys_between() if not s.serves(k))
    return len(s.data) - expired - elsewhere - sum(1 for k in cmd[1] if s.lookup(k, now_ms) is not None)


READ_HANDLERS = {"scan": _scan, "keys": _keys, "range": _range, "dbsize": _dbsize}

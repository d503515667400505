"""State-machine commands for online backups and restores: pure, deterministic, no I/O.

Theory of operation
-------------------
A backup must never contain half of a cross-shard transaction.  It gets that
from a *backup fence*, a replicated flag on every shard:

``("bk_fence", backup_id, ttl_ms)``
    raise (or extend) fence ``backup_id`` until log time ``now_ms + ttl_ms``.
``("bk_check", backup_id)``
    ``(fence_active, prepared_count, key_count, revision)``.  A fence found
    expired is deleted, so "present" at a later check means "no PREPARE was
    accepted here since the fence went up" even if log time went backwards.
``("bk_lift", backup_id)``
    drop the fence (idempotent).
``("bk_load", rows, revision)``
    restore: store ``rows`` = ``[(key, value, mod_revision), ...]`` verbatim
    and raise the shard revision to at least ``revision`` (idempotent).

While a fence is up, ``tx_prepare`` of a transaction this shard has not seen
yet votes NO (it records the abort as a tombstone, exactly like a lock
conflict, so a late duplicate cannot lock afterwards); a duplicate PREPARE of
a transaction prepared before the fence still gets its first vote back, so
votes never change.  Transactions already prepared finish normally, so the
set of prepared transactions on a fenced shard only shrinks (see
``raftkv.backup`` for the whole consistency argument).
"""

from __future__ import annotations

from typing import Any

from raftkv.results import CmdError
from raftkv.txn import ABORTED, REASON_CONFLICT

FENCE_TTL_MAX_MS = 10 * 60 * 1000
FENCE_ID_MAX = 64
LOAD_ROWS_MAX = 100_000


def fence_active(s: Any, now_ms: int) -> bool:
    """Is any backup fence up at log time ``now_ms``?  Expired fences are dropped (deterministically)."""
    if not s.fences:
        return False
    for bid, until in list(s.fences.items()):
        if until <= now_ms:
            del s.fences[bid]
    return bool(s.fences)


def bk_fence(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, bid, ttl_ms = cmd
    if not isinstance(bid, str) or not 0 < len(bid) <= FENCE_ID_MAX:
        return CmdError("ERR", "backup id must be 1-64 characters")
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or not 0 < ttl_ms <= FENCE_TTL_MAX_MS:
        return CmdError("ERR", f"fence ttl must be 1..{FENCE_TTL_MAX_MS} ms")
    s.fences[bid] = now_ms + ttl_ms
    return True


def bk_check(s: Any, cmd: tuple, now_ms: int) -> Any:
    bid = cmd[1]
    until = s.fences.get(bid)
    if until is not None and until <= now_ms:
        del s.fences[bid]
        until = None
    return (until is not None, len(s.txns.prepared), len(s.data), s.revision)


def bk_lift(s: Any, cmd: tuple, now_ms: int) -> Any:
    return s.fences.pop(cmd[1], None) is not None


def bk_load(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, rows, revision = cmd
    if len(rows) > LOAD_ROWS_MAX:
        return CmdError("ERR", f"at most {LOAD_ROWS_MAX} rows per load")
    for row in rows:
        if len(row) != 3 or not isinstance(row[0], bytes) or not isinstance(row[1], bytes) \
                or isinstance(row[2], bool) or not isinstance(row[2], int):
            return CmdError("ERR", "load rows must be (key bytes, value bytes, revision int)")
    for key, _v, _r in rows:
        if s.txns.lock_of(key) is not None:
            return s.txns.lock_of(key)
    top = revision
    for key, value, rev in rows:
        s.data[key] = (value, rev)
        top = max(top, rev)
    s.revision = max(s.revision, top)
    s.changes.compact_to(s.revision)  # loaded keys are not changes a watcher saw: history restarts here
    return len(rows)


def tx_prepare_fenced(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``tx_prepare``, refused with a NO vote for new transactions while a backup fence is up."""
    try:
        txid = cmd[1]
        known = txid in s.txns.prepared or txid in s.txns.done
    except (IndexError, TypeError):  # malformed: let the transaction layer refuse it
        return s.txns.apply(s, cmd, now_ms)
    if not known and fence_active(s, now_ms):
        s.txns.done[txid] = (ABORTED, now_ms, cmd[2], cmd[6] if len(cmd) > 6 else None)
        return ("no", REASON_CONFLICT, None)
    return s.txns.apply(s, cmd, now_ms)


HANDLERS = {
    "bk_fence": bk_fence,
    "bk_check": bk_check,
    "bk_lift": bk_lift,
    "bk_load": bk_load,
    "tx_prepare": tx_prepare_fenced,
}

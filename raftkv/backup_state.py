"""State-machine commands for online backups and restores: pure, deterministic, no I/O.

Theory of operation
-------------------
A backup must never contain half of a cross-shard transaction.  It gets that
from a *backup fence*, a replicated flag on every shard:

``("bk_fence", backup_id, ttl_ms)``
    raise (or extend) fence ``backup_id`` until log time ``now_ms + ttl_ms``,
    and remember (its *mark*) the shard's ``(owner, move)`` as of then.
    Refused with ``-SHARDMOVE`` while a shard move is under way here
    (``move`` set, ``raftkv.reshard``): nothing is changed, run the backup
    after the move.
``("bk_check", backup_id)``
    ``(fence_active, prepared_count, key_count, revision, unchanged, ring)``.
    A fence found expired is deleted, so "present" at a later check means "no
    PREPARE was accepted here since the fence went up" even if log time went
    backwards.  ``unchanged``: the fence is up and the shard's ``(owner,
    move)`` is what it was when the fence went up (no move started or ended
    here since; False for a fence from a snapshot written before marks
    existed: it cannot be proved).  ``ring``: ``(shards, vnodes)`` of the ring
    the shard serves under since its last move, None if it never took part in
    one.
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

Shard moves.  A dump holds only the keys the shard serves (``owned_rows``:
keys a finished move's cleanup has not deleted yet, or a source handed off,
are not its own any more).  A move cannot *start* a backup (the fence is
refused), and one that starts or ends on a fenced shard makes ``unchanged``
False, so the backup is discarded.  A move step is never refused because of a
fence: the operator's move wins, and the backup is simply taken again (a
fence may stay up for its whole TTL after a backup client died, and a move
held up meanwhile would keep its keys frozen).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from raftkv import reshard
from raftkv.results import CmdError
from raftkv.txn import ABORTED, REASON_CONFLICT

FENCE_TTL_MAX_MS = 10 * 60 * 1000
FENCE_ID_MAX = 64
LOAD_ROWS_MAX = 100_000


def _drop(s: Any, bid: str) -> bool:
    """Delete fence ``bid`` and its mark; was it there?"""
    s.fence_marks.pop(bid, None)
    return s.fences.pop(bid, None) is not None


def fence_active(s: Any, now_ms: int) -> bool:
    """Is any backup fence up at log time ``now_ms``?  Expired fences are dropped (deterministically)."""
    if not s.fences:
        return False
    for bid, until in list(s.fences.items()):
        if until <= now_ms:
            _drop(s, bid)
    return bool(s.fences)


def mark(s: Any) -> tuple:
    """What a fence remembers of the shard: its ``(owner, move)`` as plain tuples (or None)."""
    return (None if s.owner is None else s.owner.dump(), None if s.move is None else s.move.dump())


def load_marks(raw: dict | None) -> dict[str, tuple]:
    """Fence marks from a snapshot's extra state (absent before marks existed: none), as tuples again."""
    return {str(bid): tuple(None if part is None else tuple(part) for part in m) for bid, m in (raw or {}).items()}


def move_under_way(move: reshard.Move) -> CmdError:
    side = "receives keys" if move.phase == reshard.INCOMING else "gives keys away"
    return CmdError("SHARDMOVE", f"a shard move is under way: this shard {side} (map epoch {move.epoch}, "
                                 f"{move.phase}); no backup fence raised: run the backup after the move "
                                 "(retry later, or finish it with 'raftkv shard add|remove')")


def bk_fence(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, bid, ttl_ms = cmd
    if not isinstance(bid, str) or not 0 < len(bid) <= FENCE_ID_MAX:
        return CmdError("ERR", "backup id must be 1-64 characters")
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or not 0 < ttl_ms <= FENCE_TTL_MAX_MS:
        return CmdError("ERR", f"fence ttl must be 1..{FENCE_TTL_MAX_MS} ms")
    if s.move is not None:
        return move_under_way(s.move)
    if s.fences.get(bid, now_ms) <= now_ms:  # a new fence (or a lapsed one raised again): what it sees now
        s.fence_marks[bid] = mark(s)
    s.fences[bid] = now_ms + ttl_ms  # extending one keeps the mark it went up with
    return True


def bk_check(s: Any, cmd: tuple, now_ms: int) -> Any:
    bid = cmd[1]
    until = s.fences.get(bid)
    if until is not None and until <= now_ms:
        _drop(s, bid)
        until = None
    unchanged = until is not None and s.fence_marks.get(bid) == mark(s)
    ring = None if s.owner is None else (s.owner.nshards, s.owner.vnodes)
    return (until is not None, len(s.txns.prepared), len(s.data), s.revision, unchanged, ring)


def bk_lift(s: Any, cmd: tuple, now_ms: int) -> Any:
    return _drop(s, cmd[1])


def owned_rows(items: Iterable[tuple[bytes, tuple[bytes, int]]], owner: reshard.Owner | None,
               move: reshard.Move | None) -> Iterator[tuple[bytes, bytes, int]]:
    """The rows ``(key, value, revision)`` of a shard dump: of ``items`` (its ``(key, (value, revision))``),
    only the keys the shard serves under ``owner`` and ``move``.  A key a finished move's cleanup has not
    deleted yet, or one a source handed off, belongs to another shard's dump; keeping it here would put it
    in the backup twice (once stale)."""
    if owner is None and move is None:
        return ((k, v, r) for k, (v, r) in items)
    return ((k, v, r) for k, (v, r) in items if reshard.serves(owner, move, k))


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

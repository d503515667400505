"""raftkv.readindex: linearizable reads without a log entry, for ``raftkv.raftfix.SafeSyncObj``.

ReadIndex (Raft thesis §6.4, etcd's ``ReadOnlySafe``): ``readIndex(callback)`` gives linearizable reads without
a log append. Any thread enqueues the callback (a deque, plus pysyncobj's pipe notifier to wake the poller);
the tick thread serves it in ``_rf_service_reads`` (start of tick, right after log entries are applied, end of
tick). Only a leader that has committed an entry of its current term (its election no-op) fixes
``readIndex = commitIndex``; reads registered before that wait for it (bounded by ``readIndexTimeout``). Each
read is bound to the next heartbeat *round*: while reads await confirmation, every ``__sendAppendEntries``
call is a new round and the ``_AnnotatingTransport`` tags its AppendEntries with ``raftfix_round``; all reads
registered between two sends share one round, and a new read forces a send in the same tick. A follower
echoes the round in its ``next_node_idx`` reply (success or rejection: either way it accepted this leader for
that term), and only for an AppendEntries it accepted (term >= its own; stale ones get no reply at all). The
leader keeps, per follower, the highest round acked *in its current term* (``raftfix_term`` already tags each
reply; rounds are process-wide monotonic and reset per term), so a late or duplicated ack of an earlier round
or term cannot confirm a later read. A read is confirmed once a majority (the leader included) acked a round
>= its own, and answered ``callback(readIndex, SUCCESS)`` on the tick thread as soon as ``lastApplied >=
readIndex``: the caller reads the state machine inside the callback. Leadership lost or term changed first:
``LEADER_CHANGED`` (not leader at registration: ``NOT_LEADER``); not confirmed within ``readIndexTimeout``:
``MISSING_LEADER``. Every failure means the read did not happen and may be retried anywhere.

``ReadIndex`` is a mixin of ``SafeSyncObj`` (it reads pysyncobj's state through its name-mangled attributes,
which ``SafeSyncObj.__init__`` and pysyncobj create); its methods run on the tick thread, but ``readIndex``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from pysyncobj import syncobj as _so
from pysyncobj.config import FAIL_REASON

__all__ = ["ReadIndex"]

logger = logging.getLogger("raftkv.raftfix")

_RAFT_STATE = _so._RAFT_STATE


@dataclasses.dataclass(eq=False)
class PendingRead:
    """One ``readIndex`` call being served by a leader (tick thread only)."""

    callback: Callable[[int | None, int], None]
    term: int  # the leader's term when the read was registered; it must still lead in it to answer
    deadline: float  # monotonicTime() after which the read fails with MISSING_LEADER
    index: int | None = None  # commitIndex once an entry of ``term`` is committed
    round: int | None = None  # heartbeat round that must be acked by a majority (sent after ``index`` is set)
    confirmed: bool = False


class ReadIndex:
    """The ReadIndex read barrier (module doc); mixed into ``SafeSyncObj``."""

    _rf_read_queue: Any
    _rf_reads: list[PendingRead]
    _rf_wake: Callable[[], None] | None
    _rf_round: int
    _rf_round_acks: dict[Any, int]
    _rf_read_stats: dict[str, int]

    def readIndex(self, callback: Callable[[int | None, int], None]) -> None:  # noqa: N802 - pysyncobj style
        """Linearizable read barrier (Raft ReadIndex); callable from any thread, never blocks.

        ``callback(readIndex, FAIL_REASON.SUCCESS)`` runs on the tick thread once a majority has confirmed this
        node's leadership by acking a heartbeat sent after the call, and ``lastApplied >= readIndex``: the state
        machine, read *inside* the callback, reflects every write acknowledged before the call. Otherwise
        ``callback(None, reason)``, also on the tick thread: ``NOT_LEADER`` (not leader when served),
        ``LEADER_CHANGED`` (stepped down or term changed before confirmation) or ``MISSING_LEADER`` (not
        confirmed within ``readIndexTimeout``). A failed read did not happen; it is safe to retry anywhere.
        """
        self._rf_read_queue.append(callback)
        if self._rf_wake is not None:
            self._rf_wake()
            return
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if notifier is not None:  # wake the poller (absent with appendEntriesUseBatch: autoTickPeriod latency)
            try:
                notifier.notify()
            except OSError:
                pass  # pipe full: a wake-up is already pending

    def readIndexStats(self) -> dict[str, int]:  # noqa: N802
        """Counters (best effort from other threads): heartbeat rounds sent for reads, reads served, failed."""
        return dict(self._rf_read_stats)

    def _rf_confirmed_round(self) -> int:
        """Highest round acked by a majority (the leader included) in the current term."""
        others = self._SyncObj__otherNodes
        need = (len(others) + 1) // 2  # followers needed besides the leader for a majority of the voters
        if need == 0:
            return self._rf_round + 1  # single-node group: the leader alone is the majority
        acks = sorted((self._rf_round_acks.get(node, 0) for node in others), reverse=True)
        return acks[need - 1]

    def _rf_service_reads(self) -> None:
        """Register queued reads, fix their readIndex, confirm, answer or fail them (tick thread)."""
        queue, reads = self._rf_read_queue, self._rf_reads
        if not queue and not reads:
            return
        term = self._SyncObj__raftCurrentTerm
        leader = self._SyncObj__raftState == _RAFT_STATE.LEADER
        now = _so.monotonicTime()
        answers: list[tuple[Callable[[int | None, int], None], int | None, int]] = []
        while queue:
            callback = queue.popleft()
            if leader:
                reads.append(PendingRead(callback, term, now + self._rf_read_timeout))
            else:
                answers.append((callback, None, FAIL_REASON.NOT_LEADER))
        if reads:
            if not leader or any(r.term != term for r in reads):
                # Leadership of the reads' term ended before they were confirmed (a node leaves a term's
                # leadership only by stepping down or by a term change; it never regains the same term).
                keep = [r for r in reads if leader and r.term == term]
                answers.extend((r.callback, None, FAIL_REASON.LEADER_CHANGED) for r in reads if r not in keep)
                reads = keep
            if reads:
                answers.extend(self._rf_progress_reads(reads, term, now))
        self._rf_reads = reads
        stats = self._rf_read_stats
        for callback, index, err in answers:
            stats["served" if err == FAIL_REASON.SUCCESS else "failed"] += 1
            try:
                callback(index, err)
            except Exception:
                logger.exception("readIndex callback failed")

    def _rf_progress_reads(
        self, reads: list[PendingRead], term: int, now: float,
    ) -> list[tuple[Callable[[int | None, int], None], int | None, int]]:
        """Advance still-valid reads of the current term; removes answered ones from ``reads``."""
        commit = self._SyncObj__raftCommitIndex
        if self._rf_term_at(commit) == term:
            # Thesis §6.4 step 1: once an entry of this term is committed, commitIndex covers every entry
            # committed in earlier terms (Leader Completeness) and every write this leader acknowledged.
            fresh = False
            for r in reads:
                if r.index is None:
                    r.index, r.round = commit, self._rf_round + 1  # the next round goes out after this
                    fresh = True
            if fresh:
                self._SyncObj__newAppendEntriesTime = 0.0  # heartbeat in this tick, not after the period
        confirmed = self._rf_confirmed_round()
        applied = self._SyncObj__raftLastApplied
        answers = []
        keep = []
        for r in reads:
            if r.round is not None and r.round <= confirmed:
                r.confirmed = True
            if r.confirmed and applied >= r.index:
                answers.append((r.callback, r.index, FAIL_REASON.SUCCESS))
            elif now > r.deadline:
                answers.append((r.callback, None, FAIL_REASON.MISSING_LEADER))
            else:
                keep.append(r)
        reads[:] = keep
        return answers

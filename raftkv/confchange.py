"""raftkv.confchange: membership changes for ``raftkv.raftfix.SafeSyncObj``.

Membership (single-server changes, Raft thesis §4.1): pysyncobj applies a configuration entry when it is
appended, as Raft requires, but (a) its one-change-at-a-time check is dead code (``__changeClusterIDx`` is never
set), so a second change is appended while the first is uncommitted and {A,B,OLD} and {A,B,NEW} get disjoint
majorities; (b) a restarted node re-applies changes only as their entries commit, so it ignores newer
configurations already in its log; (c) a follower re-applies each change again on commit and undoes a truncated
change by reversing it, both wrong when a later or no-op change is involved. ``SafeSyncObj`` keeps the
configuration a function of the log: ``_rf_conf_changes`` lists the configuration entries above lastApplied with
the members each replaced; an entry takes effect when appended (leader or follower) or replayed from the journal
on load (above the dump); truncation restores the members in effect before the first deleted entry; applying an
entry changes nothing; a dump stores the members in effect at its own index. A leader admits a change only when
its election no-op is applied and no other change is pending (above lastApplied); otherwise ``REQUEST_DENIED``
(not applied: retry), except that a retry identical to the pending change (same kind and node) is answered by
that entry, when it commits.

``ConfChanges`` is a mixin of ``SafeSyncObj`` (it reads pysyncobj's state through its name-mangled attributes);
every method runs on the tick thread.
"""

from __future__ import annotations

import dataclasses
import logging
from queue import Empty as QueueEmpty
from typing import Any

from pysyncobj import syncobj as _so
from pysyncobj.config import FAIL_REASON
from pysyncobj.node import Node

__all__ = ["ConfChange", "ConfChanges"]

logger = logging.getLogger("raftkv.raftfix")  # the same log name as before the split: alerts match on it

_RAFT_STATE = _so._RAFT_STATE


@dataclasses.dataclass(frozen=True)
class ConfChange:
    """A configuration (membership) entry in this node's log, with the configuration it replaced."""

    idx: int
    term: int
    kind: str  # 'add' | 'rem' (pysyncobj's request[0])
    node_id: Any  # pysyncobj's request[1]
    before: frozenset[Node]  # the other members in effect just before this entry (restored on truncation)


class ConfChanges:
    """Membership changes, one at a time (module doc); mixed into ``SafeSyncObj``."""

    _rf_conf_changes: list[ConfChange]
    _rf_conf_loaded: bool

    def _checkCommandsToApply(self) -> None:  # noqa: N802 - pysyncobj's name
        """Stock 0.3.17's submission loop, except that a leader admits membership changes one at a time
        (``_rf_admit_change``) and answers a retried identical change with the pending entry."""
        start = _so.monotonicTime()
        queue = self._SyncObj__commandsQueue
        while _so.monotonicTime() - start < self.conf.appendEntriesPeriod:
            if self._SyncObj__raftLeader is None and self.conf.commandsWaitLeader:
                break
            try:
                command, callback = queue.get_nowait()
            except QueueEmpty:
                break
            if self._SyncObj__raftState == _RAFT_STATE.LEADER:
                self._rf_leader_submit(command, callback)
            elif self._SyncObj__raftLeader is None:
                self._SyncObj__callErrCallback(FAIL_REASON.MISSING_LEADER, callback)
            elif isinstance(callback, tuple):  # forwarded to us, but we are not the leader: no second hop
                self._SyncObj__callErrCallback(FAIL_REASON.NOT_LEADER, callback)
            else:
                message: dict[str, Any] = {"type": "apply_command", "command": command}
                if callback is not None:
                    self._SyncObj__commandsLocalCounter += 1
                    self._SyncObj__commandsWaitingReply[self._SyncObj__commandsLocalCounter] = callback
                    message["request_id"] = self._SyncObj__commandsLocalCounter
                self._SyncObj__transport.send(self._SyncObj__raftLeader, message)

    def _rf_leader_submit(self, command: bytes, callback: Any) -> None:
        """Append ``command`` (or join a pending identical membership change) and arrange the answer.

        ``callback`` is a local callable, None, or ``(node, request_id)`` for a command a follower forwarded.
        """
        idx, term = self._SyncObj__getCurrentLogIndex() + 1, self._SyncObj__raftCurrentTerm
        request = (self._SyncObj__parseChangeClusterRequest(command)
                   if self.conf.dynamicMembershipChange else None)
        answer_at: tuple[int, int] | None = (idx, term)
        if request is not None:
            answer_at = self._rf_admit_change(request, idx, term)
        if answer_at is None:
            self._SyncObj__callErrCallback(FAIL_REASON.REQUEST_DENIED, callback)
            return
        if answer_at == (idx, term):
            self._SyncObj__raftLog.add(command, idx, term)
        if isinstance(callback, tuple):
            self._SyncObj__transport.send(callback[0], {
                "type": "apply_command_response", "request_id": callback[1],
                "log_idx": answer_at[0], "log_term": answer_at[1],
            })
        elif callback is not None:
            self._SyncObj__commandsWaitingCommit[answer_at[0]].append((answer_at[1], callback))
        if answer_at == (idx, term) and not self.conf.appendEntriesUseBatch:
            self._SyncObj__sendAppendEntries()

    def _rf_admit_change(self, request: Any, idx: int, term: int) -> tuple[int, int] | None:
        """Leader: admit membership change ``request`` as entry ``(idx, term)``, or answer it with the pending
        identical change's ``(idx, term)``, or refuse it (None).

        Raft's single-server changes are safe only one at a time: a change may be appended only once the
        previous one is committed, so that old and new configurations always share a majority. Stock 0.3.17
        has this check but never records the pending index (``__changeClusterIDx`` stays None), so a second
        change was appended at once. The pending change is read from the log itself, so it survives a
        restart and covers changes appended by an earlier leader (committed with this leader's no-op).
        """
        applied = self._SyncObj__raftLastApplied
        noop = self._SyncObj__noopIDx
        if noop is None or applied < noop:
            return None  # earlier terms' entries (maybe a change) not known committed yet (stock's rule)
        pending = self._rf_conf_changes[-1] if self._rf_conf_changes else None
        if pending is not None and pending.idx > applied:
            if (pending.kind, pending.node_id) == (request[0], request[1]):
                return pending.idx, pending.term  # a retry: answered when the first one commits
            return None
        before = frozenset(self._SyncObj__otherNodes)
        if not self._SyncObj__doChangeCluster(request):
            return None  # a no-op (adding a member, removing a non-member or ourselves): refused, as stock
        self._rf_conf_changes.append(ConfChange(idx, term, request[0], request[1], before))
        return idx, term

    def _rf_conf_on_append(self, entries: list[Any]) -> None:
        """Follower: a configuration entry takes effect as soon as it is in the log (Raft §6, thesis §4.1)."""
        if not self.conf.dynamicMembershipChange:
            return
        for entry in entries:
            request = self._SyncObj__parseChangeClusterRequest(entry[0])
            if request is not None:
                before = frozenset(self._SyncObj__otherNodes)
                self._SyncObj__doChangeCluster(request)  # a no-op change is recorded too: it may be truncated
                self._rf_conf_changes.append(ConfChange(entry[1], entry[2], request[0], request[1], before))

    def _rf_conf_truncate(self, idx: int) -> None:
        """Entries >= idx are being deleted: restore the configuration in effect before the first of them.

        Stock reverses each deleted change (``reverse=True``), which is wrong for a change that was a no-op
        when appended (reversing 'rem X' for a non-member X adds X).
        """
        changes = self._rf_conf_changes
        k = next((i for i, c in enumerate(changes) if c.idx >= idx), None)
        if k is None:
            return
        restore = changes[k].before
        del changes[k:]
        logger.info("configuration entries from %d undone; members back to %s", idx,
                    sorted(n.id for n in restore))
        self._SyncObj__updateClusterConfiguration(list(restore))

    def _rf_conf_prune(self) -> None:
        """Forget applied configuration entries: they can no longer be truncated."""
        applied = self._SyncObj__raftLastApplied
        changes = self._rf_conf_changes
        while changes and changes[0].idx <= applied:
            changes.pop(0)

    def _rf_conf_rebuild(self) -> None:
        """Replay the configuration entries in the log above lastApplied (the snapshot, if one was loaded).

        A server uses the latest configuration in its log, committed or not (Raft thesis §4.1). Stock only
        re-applies a change when its entry is applied, so a restarted node ignored newer configurations it
        had persisted (and acknowledged) until it learned they were committed.
        """
        self._rf_conf_loaded = True
        first = self._SyncObj__raftLastApplied + 1
        self._rf_conf_prune()
        self._rf_conf_truncate(first)  # idempotent: undo what was already replayed or appended, then replay
        if not self.conf.dynamicMembershipChange:
            return
        self._rf_conf_on_append(self._SyncObj__getEntries(first))
        if self._rf_conf_changes:
            logger.info("replayed %d configuration entries from the log; members %s",
                        len(self._rf_conf_changes), sorted(n.id for n in self._SyncObj__otherNodes))

    def _rf_conf_at(self, idx: int) -> frozenset[Node]:
        """The other members in effect at log index ``idx`` (>= lastApplied)."""
        for change in self._rf_conf_changes:
            if change.idx > idx:
                return change.before
        return frozenset(self._SyncObj__otherNodes)

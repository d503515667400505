"""raftkv.replication: Raft log replication (§5.3) for ``raftkv.raftfix.SafeSyncObj``.

pysyncobj 0.3.17's AppendEntries receiver and its leader's handling of the replies are the doors through
which acknowledged entries were lost (docs/pysyncobj-patches.md); ``Replication`` replaces both:

* **Follower** (``_rf_on_append_entries``): an entry is compared with the local one at its index (same term:
  skip; other term: truncate from there, never at or below the commit index), the rest appended; the ack and
  the commit index cover only the prefix verified against this leader. A rejection hints where to resend
  from (the first entry of the conflicting term above the commit index) and names the ``prevLogIdx`` it
  refused. Chunked entries are reassembled by sequence number; a snapshot is installed only if it is newer
  than what the follower knows is committed and not already held.
* **Leader** (``_rf_on_next_node_idx``): replies of another term are ignored; a success only ever raises
  ``matchIndex``/``nextIndex``; a rejection of a ``prevLogIdx`` at or below ``matchIndex`` is stale; a current
  one only ever lowers ``nextIndex``, never to ``matchIndex`` or below (the leader pipelines: later messages in
  flight are rejected too, and their higher hints must not undo the first).

A mixin of ``SafeSyncObj`` (it reads pysyncobj's state through name-mangled attributes that ``SafeSyncObj`` and
pysyncobj create); every method runs on the tick thread. The keys it adds to stock messages are defined here.
"""

from __future__ import annotations

import logging
from typing import Any

from pysyncobj import syncobj as _so
from pysyncobj.node import Node
from pysyncobj.syncobj import SyncObj

__all__ = ["CHUNK_SEQ_KEY", "REJECTED_KEY", "ROUND_KEY", "SNAP_IDX_KEY", "SNAP_TERM_KEY", "TERM_KEY", "Replication"]

logger = logging.getLogger("raftkv.raftfix")  # the same log name as before the split: alerts match on it

_RAFT_STATE = _so._RAFT_STATE

#: Extra keys added to stock messages. Stock peers ignore unknown keys.
TERM_KEY = "raftfix_term"  # on next_node_idx: the follower's term when it answered
CHUNK_SEQ_KEY = "raftfix_seq"  # on chunked entries / snapshot chunks: 0 for the first chunk, then +1
SNAP_IDX_KEY = "raftfix_snap_idx"  # on snapshot chunks: index of the snapshot's last entry
SNAP_TERM_KEY = "raftfix_snap_term"  # on snapshot chunks: term of the snapshot's last entry
ROUND_KEY = "raftfix_round"  # on append_entries: the ReadIndex heartbeat round; echoed on next_node_idx
REJECTED_KEY = "raftfix_rejected"  # on a rejecting next_node_idx: the prevLogIdx of the refused AppendEntries


class Replication:
    """The AppendEntries receiver and the leader's reply handling of ``SafeSyncObj`` (module doc)."""

    def _rf_dispatch_append_entries(self, node: Node, message: dict[str, Any]) -> None:
        if "prevLogIdx" in message:
            self._rf_on_append_entries(node, message)
        elif message.get(SNAP_IDX_KEY) is not None:
            self._rf_on_snapshot_chunk(node, message)
        elif message.get("serialized") is None:
            # The leader's snapshot is not ready yet: only a heartbeat. Stock would also set
            # commitIndex = min(leaderCommit, lastLogIndex), trusting an unverified tail. No reply (as stock):
            # such a heartbeat confirms no read round.
            self._rf_accept_leader(node, message)
        else:
            # Untagged snapshot chunk (a stock leader): cannot judge staleness, fall back to stock.
            SyncObj._SyncObj__onMessageReceived(self, node, message)

    def _rf_accept_leader(self, node: Node, message: dict[str, Any]) -> None:
        """The bookkeeping stock does for any AppendEntries with term >= ours (verbatim semantics)."""
        term = message["term"]
        if term > self._SyncObj__raftCurrentTerm:
            self._SyncObj__transferInProgress = False  # a newer leader supersedes a pending transfer
        if not self._SyncObj__transferInProgress:
            self._SyncObj__raftElectionDeadline = _so.monotonicTime() + self._SyncObj__generateRaftTimeout()
        if self._SyncObj__raftLeader != node:
            self._SyncObj__onLeaderChanged()
        self._SyncObj__raftLeader = node
        self._rf_leader_seen = _so.monotonicTime()
        if term > self._SyncObj__raftCurrentTerm:
            self._SyncObj__setCurrentTerm(term, None)
        self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
        # The leader's commit index only grows; a reordered older message must not move it back.
        self._SyncObj__leaderCommitIndex = max(self._SyncObj__leaderCommitIndex or 0, message["commit_index"])

    def _rf_known_committed(self) -> int:
        # Applied entries were committed even if .meta's lazily saved commit index lags after a restart.
        return max(self._SyncObj__raftCommitIndex, self._SyncObj__raftLastApplied)

    def _rf_set_commit(self, index: int) -> None:
        if index > self._SyncObj__raftCommitIndex:
            self._SyncObj__raftCommitIndex = index
            self._SyncObj__raftLog.setRaftCommitIndex(index)

    def _rf_on_append_entries(self, node: Node, message: dict[str, Any]) -> None:
        """Raft §5.3 AppendEntries receiver, replacing pysyncobj's delete-everything-after-prevLogIdx."""
        self._rf_accept_leader(node, message)
        if "transmission" in message:
            entries = self._rf_reassemble_chunk(node, message)
            if entries is None:
                return
        else:
            entries = list(message.get("entries", ()))
        prev_idx: int = message["prevLogIdx"]
        prev_term: int = message["prevLogTerm"]
        for k, entry in enumerate(entries):
            if entry[1] != prev_idx + 1 + k:
                logger.error("dropping AppendEntries with non-contiguous entries after %d", prev_idx)
                return

        log = self._SyncObj__raftLog
        first_idx, last_idx = log[0][1], log[-1][1]
        committed = self._rf_known_committed()

        # 1. Consistency check on prevLogIdx. Indexes below our first (compacted) entry are committed, and
        #    committed entries are in every later leader's log (Leader Completeness), so they match.
        if prev_idx >= first_idx:
            if prev_idx > last_idx:
                self._rf_reject(node, last_idx + 1, prev_idx)
                return
            held = log[prev_idx - first_idx][2]
            if held != prev_term:
                if prev_idx <= committed:
                    logger.critical(
                        "leader %r disagrees with committed entry %d (term %d, leader says %d)",
                        node.id, prev_idx, held, prev_term)
                # Hint: the first entry of the conflicting term (etcd's findConflictByTerm), never at or below
                # our commit index (those match every later leader). A deposed leader's whole uncommitted tail
                # is then skipped in one round trip instead of one entry per round trip.
                hint = prev_idx
                while hint - 1 > max(committed, first_idx) and log[hint - 1 - first_idx][2] == held:
                    hint -= 1
                self._rf_reject(node, hint, prev_idx)
                return

        # 2. Find the first entry that is new or conflicts; entries already held with the same term are kept.
        start = len(entries)
        for k, entry in enumerate(entries):
            idx = entry[1]
            if idx < first_idx:
                continue  # compacted here, committed, hence identical
            if idx > last_idx:
                start = k
                break
            held_term = log[idx - first_idx][2]
            if held_term == entry[2]:
                continue
            if idx <= committed:
                # Never truncate committed (possibly applied) entries. Under Raft this cannot happen; if it
                # does, refusing (no ack) keeps this replica's committed prefix intact.
                logger.critical(
                    "refusing to truncate committed entry %d (held term %d, leader %r sends term %d; "
                    "commit index %d); dropping AppendEntries", idx, held_term, node.id, entry[2], committed)
                return
            self._rf_truncate_from(idx)
            start = k
            break

        # 3. Append what is new.
        new_entries = entries[start:]
        for entry in new_entries:
            log.add(*entry)
        self._rf_conf_on_append(new_entries)

        # 4. Ack and commit only the prefix verified to match the leader: a heartbeat with no conflict leaves a
        #    possibly stale tail after prev_idx + len(entries) in place, which must not count as acknowledged
        #    or committed.
        matched = prev_idx + len(entries)
        self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=matched + 1, success=True)
        self._rf_set_commit(min(message["commit_index"], matched))

    def _rf_reject(self, node: Node, hint: int, prev_idx: int) -> None:
        """Refuse an AppendEntries: resend from ``hint``; the leader judges staleness by ``prev_idx``."""
        self._rf_rejected = prev_idx
        try:
            self._SyncObj__sendNextNodeIdx(node, reset=True, nextNodeIdx=hint)
        finally:
            self._rf_rejected = None

    def _rf_truncate_from(self, idx: int) -> None:
        """Delete entries >= idx (all uncommitted), restoring the configuration in effect before them."""
        self._rf_conf_truncate(idx)
        self._SyncObj__deleteEntriesFrom(idx)

    def _rf_reassemble_chunk(self, node: Node, message: dict[str, Any]) -> list[Any] | None:
        """Reassemble an entry sent in chunks; return ``[entry]`` when complete, else None."""
        key = (message["term"], message["prevLogIdx"], message["prevLogTerm"])
        seq = message.get(CHUNK_SEQ_KEY)
        kind = message["transmission"]
        if kind == "start":
            self._rf_chunk_rx = [key, 0, [message["data"]]]
        else:
            rx = self._rf_chunk_rx
            if rx is None or rx[0] != key or (seq is not None and seq != rx[1] + 1):
                self._rf_chunk_rx = None  # duplicated, reordered or foreign chunk: drop the transfer
                return None
            rx[1] += 1
            rx[2].append(message["data"])  # joined once at the end: appending to bytes copied it all each time
            if kind == "finish":
                # Stock flags 'finish' by the command length, not the pickled length, so a final short chunk
                # can follow it; a truncated pickle fails to load and we keep collecting.
                try:
                    entry = _so.pickle.loads(b"".join(rx[2]))
                except Exception:
                    return None
                self._rf_chunk_rx = None
                return [entry]
            if kind != "process":
                logger.error("unknown transmission type %r", kind)
                self._rf_chunk_rx = None
                return None
        # Stock answers each partial chunk with a no-op reply (keeps the leader's lastResponseTime fresh).
        self._SyncObj__sendNextNodeIdx(node, success=False, reset=False)
        return None

    def _rf_on_snapshot_chunk(self, node: Node, message: dict[str, Any]) -> None:
        """Snapshot install (InstallSnapshot, Raft §7) that never goes back in time."""
        self._rf_accept_leader(node, message)
        chunk = message["serialized"]
        snap_idx: int = message[SNAP_IDX_KEY]
        snap_term: int = message[SNAP_TERM_KEY]
        seq: int = message[CHUNK_SEQ_KEY]
        _data, is_first, is_last = chunk
        log = self._SyncObj__raftLog
        first_idx, last_idx = log[0][1], log[-1][1]
        held = first_idx <= snap_idx <= last_idx and log[snap_idx - first_idx][2] == snap_term
        if snap_idx <= self._rf_known_committed() or held:
            # Stale (we already know more is committed) or redundant (we hold its last entry, so by Log
            # Matching the whole prefix). Installing it would throw away entries after it that we may have
            # acknowledged. Do not even hand it to the serializer: that would overwrite our own dump file.
            self._rf_snap_rx = None
            if is_last:
                self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=snap_idx + 1, success=True)
                if held:
                    self._rf_set_commit(min(message["commit_index"], snap_idx))
            return
        key = (message["term"], snap_idx, snap_term)
        if is_first:
            self._rf_snap_rx = (key, 0)
        else:
            rx = self._rf_snap_rx
            if rx is None or rx[0] != key or seq != rx[1] + 1:
                self._rf_snap_rx = None  # gap, duplicate or foreign chunk: the leader will restart the transfer
                return
            self._rf_snap_rx = (key, seq)
        serializer = self._SyncObj__serializer
        if is_last:
            self.snapshotInstalling()
        if not serializer.setTransmissionData(chunk):
            return
        self._rf_snap_rx = None
        self._rf_storage.point("install.dump_renamed")
        self._rf_sync_dump()
        self._rf_dump_failed = False
        self._SyncObj__loadDumpFile(clearJournal=True)
        if self._rf_dump_failed:
            return  # not installed: acknowledging it would let the leader skip what we lack
        # The snapshot is applied state, hence committed; the journal now holds its last two entries.
        self._rf_set_commit(self._SyncObj__raftLastApplied)
        self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=snap_idx + 1, success=True)

    def snapshotInstalling(self) -> None:  # noqa: N802 - pysyncobj style
        """Called on the tick thread just before a snapshot received from the leader is renamed over the dump.

        A subclass whose serializer finishes dumps in the background (raftkv.replica) must make sure such a
        dump, older than the one being installed, is never renamed over it afterwards. Nothing to do here.
        """

    def _rf_on_next_node_idx(self, node: Node, message: dict[str, Any]) -> None:
        """Leader side of AppendEntries replies: only fresh replies move progress, and only forward."""
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            return
        term = message.get(TERM_KEY)
        if term is None:
            if not self._rf_warned_legacy:
                logger.warning("peer %r runs unpatched pysyncobj: its replies carry no term", node.id)
                self._rf_warned_legacy = True
        elif term > self._SyncObj__raftCurrentTerm:
            # A member is in a later term (it started an election we did not hear of): step down (Raft §5.1),
            # so that the group elects a leader it can follow.
            self._SyncObj__setCurrentTerm(term, None)
            self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
            self._SyncObj__raftLeader = None
            return
        elif term != self._SyncObj__raftCurrentTerm:
            return  # a reply to an earlier leader (ours or someone else's): says nothing about this term
        match_index = self._SyncObj__raftMatchIndex
        next_index = self._SyncObj__raftNextIndex
        if node not in match_index:
            return  # removed from the group meanwhile
        rnd = message.get(ROUND_KEY)
        if term is not None and rnd is not None and self._rf_round_acks.get(node, 0) < rnd <= self._rf_round:
            # A reply in our term to a round we sent in it (rounds are never reused): the follower held our
            # term when it answered an AppendEntries sent after every read bound to that round.
            self._rf_round_acks[node] = rnd
        reply_next: int = message["next_node_idx"]
        last_idx = self._SyncObj__getCurrentLogIndex()
        if message["success"]:
            acked = reply_next - 1
            if acked > last_idx:
                logger.error("peer %r acked %d beyond our last index %d; ignored", node.id, acked, last_idx)
                return
            # Stock assigned nextIndex from every matchIndex raise, so a late ack rewound it and the leader
            # re-sent entries the follower already had. Both only move forward here.
            if acked > match_index[node]:
                match_index[node] = acked
            next_index[node] = max(next_index[node], reply_next)
        elif message["reset"]:
            # A rejection of an AppendEntries whose prevLogIdx is at or below matchIndex is stale (that prefix
            # was acked in this term). Requires durable storage on the follower, as in etcd's maybeDecrTo.
            # (A peer that does not name the refused prevLogIdx: its hint at or below matchIndex counts as stale.)
            rejected = message.get(REJECTED_KEY)
            if (reply_next if rejected is None else rejected) > match_index[node]:
                self._rf_lower_next_index(node, reply_next, last_idx)
        self._SyncObj__lastResponseTime[node] = _so.monotonicTime()

    def _rf_lower_next_index(self, node: Node, hint: int, last_idx: int) -> None:
        """A current rejection: resend from the follower's hint, which only ever lowers nextIndex.

        The leader pipelines (each send moves nextIndex past what it sent), so after a conflict the follower
        also rejects every later message in flight, as beyond its log (hint: its last index + 1). Taken in turn,
        those hints put nextIndex back above the conflict and the leader re-sent the same messages forever
        (found by the harness: a deposed leader's replica never caught up). A current rejection's hint is
        always below nextIndex. Never at or below matchIndex either: a term-skip hint may reach below what the
        follower already acknowledged in this term (its entries there are ours).
        """
        next_index = self._SyncObj__raftNextIndex
        next_index[node] = max(self._SyncObj__raftMatchIndex[node] + 1, min(hint, next_index[node], last_idx + 1))

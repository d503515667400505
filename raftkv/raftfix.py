"""raftkv.raftfix: the one module that knows pysyncobj internals.

Theory of operation
-------------------
pysyncobj 0.3.17 has three problems that break the guarantees raftkv makes (see docs/pysyncobj-patches.md and
../shared/notes/pysyncobj.md §9):

1. **Follower truncation.** A follower that receives AppendEntries deletes *every* entry after ``prevLogIdx``
   whenever it holds more, without checking for a conflict (Raft §5.3 says: delete only from the first entry
   whose term differs). A duplicated, delayed or merely re-sent AppendEntries therefore erases entries the
   follower has already acknowledged, and a committed write can vanish from the replica that made it a
   majority. Its commit rule ``commitIndex = min(leaderCommit, lastLogIndex)`` also trusts a stale log tail.
2. **Leader progress tracking.** ``next_node_idx`` replies carry no term, and a success reply *overwrites*
   ``nextIndex`` with an older value. So a late ack from an earlier term can raise ``matchIndex`` wrongly,
   and a late ack from this term rewinds ``nextIndex`` so that the leader re-sends entries (which door 1 then
   turns into a truncation, even over FIFO TCP). Duplicated ``response_vote`` messages are counted twice.
3. **No durability.** The journal is an mmap that is never flushed on the commit path: followers ack and
   leaders count themselves toward a majority with data only in the page cache.

``SafeSyncObj`` is a ``SyncObj`` subclass that closes these doors by overriding the name-mangled internals it
needs (``_SyncObj__onMessageReceived`` and a few others). Every override runs on the tick thread, like the code
it replaces. Doors closed:

* AppendEntries (``_rf_on_append_entries``): stale terms are ignored; each incoming entry is compared with the
  local one at the same index: same term -> skip, different term -> truncate from there (refused, with a
  CRITICAL log and no ack, if that is at or below the commit index), then append the rest. The ack and the
  new commit index cover only ``prevLogIdx + len(entries)``: the prefix verified to match the leader.
* Chunked entries (``transmission``): reassembled per (term, prevLogIdx, prevLogTerm) with a sequence number
  the leader adds, so reordered or duplicated chunks cannot splice.
* Snapshot install (``serialized``): the leader tags each chunk with the snapshot's last index/term; a
  follower ignores a snapshot that is not newer than what it knows is committed, or that it already holds
  as a matching log entry (installing it would wipe acknowledged entries after it).
* ``next_node_idx`` on the leader: replies carry the follower's term and stale ones are ignored; success only
  ever raises ``matchIndex``/``nextIndex``; a rejection at or below ``matchIndex`` is stale and ignored
  (etcd's ``maybeDecrTo`` rule).
* ``response_vote``: votes are counted as a set of voters per term.
* Elections: pre-vote first (``raftkv.prevote``), and an AppendEntries of an earlier term is answered with our
  term, so its leader steps down (docs/pysyncobj-patches.md §12).

Durability (group commit): the journal records whether it holds unflushed writes. With ``durable=True`` a
follower's ``next_node_idx`` replies are queued, and released after one flush (msync + fsync) at the end of
the tick that processed them, so one flush covers every AppendEntries received in one poll. The leader flushes
before its commit computation (start of tick), after appending a batch (end of tick) and right after an
election's no-op, so it never counts an unflushed entry of its own toward a majority. Term/vote metadata is
fsynced before the vote is sent. This relies on storage being durable: with ``durable=False`` an OS crash can
forget acknowledged entries, exactly as stock pysyncobj does.

Pipelined durability (``deferFlush`` with a sequenced journal, ``raftkv.raftlog.EngineJournal``): the flush is
only *requested* at the end of a driver loop (``_rf_sync``); with a pipelined engine it completes on another
thread while the driver goes on. Everything the group sends, except a leader's AppendEntries, passes a gate
(``_DurableGate``): a message sent while the group has writes that are not durable yet (entries, truncations,
term/vote, commit index) is held, with the engine sequence number that covers them, and released in send
order by ``_rf_release`` once a completed commit covers it. So acks, votes and vote requests never leave
before what they vouch for is durable. The leader counts itself toward a majority only up to the journal's
``durable_index()`` (its commit computation sees the log clamped there, ``_rf_counting``) and asks the
driver for a tick once a commit may have made more of its entries countable (``_rf_sync`` returns True).

Crash windows (docs/pysyncobj-patches.md §11): a restart keeps the journal entries above the dump instead of
discarding the journal when a crash fell between the dump rename and the journal compaction; the journal is
rewritten by writing a new file and renaming it (never cleared and refilled in place); the commit index reaches
``.meta`` only after a flush made the log it covers durable. Every fsync and rename goes through a ``Storage``
passed in, whose named crash points let tests kill a node between any two persistence steps.

Keepalive: followers never talk to each other, so their TCP connection idles past ``connectionTimeout`` and the
first ``request_vote`` sent on it kills it (notes §5). Every node sends a tiny ``raftfix_keepalive`` message on
every connection every ``connectionTimeout / 4``; pysyncobj (stock or patched) ignores unknown message types.

All members of a group must run ``SafeSyncObj``: a stock follower's untagged replies are still accepted, but
then a very late ack from an earlier term cannot be told apart (door 2 stays open for that peer).

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
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from queue import Empty as QueueEmpty
from typing import Any

import pysyncobj.version
from pysyncobj import syncobj as _so
from pysyncobj.config import FAIL_REASON, SyncObjConf
from pysyncobj.journal import FileJournal, Journal, MemoryJournal, MetaStorer, ResizableFile
from pysyncobj.node import Node, TCPNode
from pysyncobj.pickle import to_bytes
from pysyncobj.syncobj import SyncObj
from pysyncobj.transport import TCPTransport

from raftkv import prevote

SUPPORTED_PYSYNCOBJ_VERSION = "0.3.17"

# Refuse to patch internals we have not read: every override below mirrors 0.3.17's private code.
if pysyncobj.version.VERSION != SUPPORTED_PYSYNCOBJ_VERSION:
    raise RuntimeError(
        f"raftkv.raftfix supports only pysyncobj {SUPPORTED_PYSYNCOBJ_VERSION} "
        f"(found {pysyncobj.version.VERSION}); review the patched internals before changing the pin"
    )

__all__ = [
    "SUPPORTED_PYSYNCOBJ_VERSION",
    "DEFAULT_STORAGE",
    "DurableFileJournal",
    "FlushStats",
    "SafeSyncObj",
    "Storage",
    "TrackedMemoryJournal",
    "tuned_conf",
]

logger = logging.getLogger(__name__)

_RAFT_STATE = _so._RAFT_STATE

#: Message type of the connection keepalive. pysyncobj dispatches on ``message['type']`` and ignores types it
#: does not know, so stock peers drop it silently.
KEEPALIVE_TYPE = "raftfix_keepalive"
#: Extra keys added to stock messages. Stock peers ignore unknown keys.
TERM_KEY = "raftfix_term"  # on next_node_idx: the follower's term when it answered
CHUNK_SEQ_KEY = "raftfix_seq"  # on chunked entries / snapshot chunks: 0 for the first chunk, then +1
SNAP_IDX_KEY = "raftfix_snap_idx"  # on snapshot chunks: index of the snapshot's last entry
SNAP_TERM_KEY = "raftfix_snap_term"  # on snapshot chunks: term of the snapshot's last entry
ROUND_KEY = "raftfix_round"  # on append_entries: the ReadIndex heartbeat round; echoed on next_node_idx


# --------------------------------------------------------------------------------------------------------------
# Journals
# --------------------------------------------------------------------------------------------------------------


class Storage:
    """The durability primitives raftfix uses, and named crash points between them.

    One object per node, passed in (``SafeSyncObj(storage=...)``); the default is the real thing. Tests substitute
    a subclass that records which bytes a completed fsync made durable (to model power loss) and whose
    ``point(name)`` kills the node at a chosen step (tests/test_crash_points.py). Points are named
    ``area.step``; each marks a state the files can be left in by a process crash.
    """

    def fsync(self, fd: int) -> None:
        """Make the file (or directory) open as ``fd`` durable."""
        os.fsync(fd)

    def msync(self, mapped: Any, fd: int) -> None:
        """Make the writes through the mapping ``mapped`` (a pysyncobj ``ResizableFile`` on ``fd``) durable."""
        mapped.flush()  # mmap.flush() == msync(MS_SYNC)

    def point(self, name: str) -> None:
        """A crash point: the files are in a state a process crash can leave them in. Does nothing here."""

    def fsync_path(self, path: str) -> None:
        """fsync an existing file or directory by name."""
        fd = os.open(path, os.O_RDONLY)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: str) -> None:
        """fsync the directory holding ``path`` so a create/rename in it survives power loss."""
        self.fsync_path(os.path.dirname(os.path.abspath(path)) or ".")

    def replace(self, tmp: str, path: str) -> None:
        """Atomically and durably put ``tmp`` (already fsynced) in place of ``path``."""
        os.replace(tmp, path)
        self.point("replace.renamed")  # renamed in the page cache, the directory entry not yet durable
        self.fsync_dir(path)


DEFAULT_STORAGE = Storage()


class DurableMetaStorer(MetaStorer):
    """``MetaStorer`` whose write is durable: fsync the temp file, rename, fsync the directory.

    Stock only ``f.flush()``es Python's buffer, so after power loss a node could forget its vote and vote twice
    in one term.
    """

    def __init__(self, path: str, storage: Storage = DEFAULT_STORAGE, deferred: bool = False) -> None:
        super().__init__(path)
        self._storage = storage
        self._deferred = deferred
        self.pending: dict[str, Any] | None = None  # deferred: the newest meta, written by the next sync()

    def storeMeta(self, meta: dict[str, Any]) -> None:  # noqa: N802 - pysyncobj's name
        if self._deferred:
            # Group commit (SafeSyncObj(deferFlush=True)): the driver sends nothing of this tick before the
            # journal's flush, which writes this first; one fsync per group per loop, however many term changes.
            self.pending = dict(meta)
            return
        self._write(meta)

    def sync(self) -> None:
        """Deferred mode: make the newest stored meta durable (nothing to do if none is pending)."""
        meta, self.pending = self.pending, None
        if meta is not None:
            self._write(meta)

    def _write(self, meta: dict[str, Any]) -> None:
        path = self.getPath()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_so.pickle.dumps(meta))
            f.flush()
            self._storage.fsync(f.fileno())
        self._storage.point("meta.written")
        self._storage.replace(tmp, path)


class DurableFileJournal(FileJournal):
    """pysyncobj's mmap ``FileJournal`` plus a dirty flag, a real ``flush()`` and crash-safe rewrites.

    ``flush()`` msyncs the mapping (MS_SYNC: data and the size needed to read it back on Linux) and, when the
    file size changed since the last flush (the mapping was resized/extended), also ``os.fsync``s the file.
    The directory is fsynced once, on the first flush, so the file's creation is durable.

    Two stock hazards closed here (docs/pysyncobj-patches.md §7):

    * ``deleteEntriesTo`` (log compaction) clears the file and re-adds the kept entries in place, so a crash in
      the middle leaves only some of them. Here the kept entries are written to a new file, fsynced, and
      renamed over the journal (then the directory is fsynced): a crash leaves the old or the new journal.
    * The commit index is kept in ``.meta``, which is written (and fsynced) whenever the term changes, possibly
      before the entries the commit index covers are flushed. After power loss the journal can then hold an
      older, never-committed entry at a "committed" index. Here ``setRaftCommitIndex`` only records the value;
      it reaches ``.meta`` once a flush has made the whole log it refers to durable.
    """

    def __init__(self, journalFile: str, storage: Storage = DEFAULT_STORAGE,  # noqa: N803
                 defer_meta: bool = False) -> None:
        super().__init__(journalFile)
        self._path = journalFile
        self._storage = storage
        self._needs_flush = False
        self._synced_size = -1  # forces one fsync + directory fsync on the first flush
        self._commit_pending: int | None = None  # set in memory, not yet covered by a flush
        # Term/vote must be durable before a vote is sent: swap in the fsyncing storer. With ``defer_meta`` it
        # is written by the next flush() instead, for a caller that sends nothing before that flush.
        self._meta = DurableMetaStorer(journalFile + ".meta", storage, deferred=defer_meta)
        self._FileJournal__metaStorer = self._meta

    @property
    def needs_flush(self) -> bool:
        """Entries, or deferred term/vote metadata, not yet durable."""
        return self._needs_flush or self._meta.pending is not None

    @needs_flush.setter
    def needs_flush(self, value: bool) -> None:
        self._needs_flush = value

    def add(self, command: bytes, idx: int, term: int) -> None:
        super().add(command, idx, term)
        self.needs_flush = True
        self._storage.point("journal.append")

    def clear(self) -> None:
        super().clear()
        self.needs_flush = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802,N803
        super().deleteEntriesFrom(entryFrom)
        self.needs_flush = True

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802,N803
        self.replace_entries(self[entryTo:])

    def replace_entries(self, entries: list[tuple[bytes, int, int]]) -> None:
        """Atomically make ``entries`` the whole journal (durable on return): new file, fsync, rename, fsync dir.

        Everything in the old journal that is not in ``entries`` is dropped, so callers pass a suffix of the
        log (compaction) or a snapshot's entries (install). Unflushed writes of the old journal are moot: the
        new file holds every entry we keep, and is flushed.
        """
        storage = self._storage
        tmp = self._path + ".rewrite"
        header = self._FileJournal__getDefaultHeader()
        body = bytearray()
        for command, idx, term in entries:
            record = struct.pack("<QQ", idx, term) + to_bytes(command)
            size = struct.pack("<I", len(record))
            body += size + record + size
        offset = len(header) + len(body)
        # LAST_RECORD_OFFSET is the header's last 4 bytes; stock writes FIRST_RECORD_OFFSET there.
        data = header[:-4] + struct.pack("<I", offset) + bytes(body)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            storage.fsync(f.fileno())
        storage.point("rewrite.written")
        old = self._FileJournal__journalFile
        storage.replace(tmp, self._path)
        old._destroy()  # the old inode: its mapping is no longer the journal
        self._FileJournal__journalFile = ResizableFile(self._path)
        self._FileJournal__journal = list(entries)
        self._FileJournal__currentOffset = offset
        self._synced_size = os.path.getsize(self._path)
        self.needs_flush = False
        self._promote_commit()

    def flush(self) -> None:
        """Make every write so far durable (one call covers any number of appended entries)."""
        storage = self._storage
        storage.point("flush.before")
        self._meta.sync()
        rfile = self._FileJournal__journalFile
        fd = rfile._ResizableFile__f.fileno()
        storage.msync(rfile, fd)
        size = os.fstat(fd).st_size
        if size != self._synced_size:
            storage.fsync(fd)  # belt and braces for the resize/extend paths (ftruncate / append + remap)
            if self._synced_size < 0:
                storage.fsync_dir(self._path)
            self._synced_size = size
        self.needs_flush = False
        self._promote_commit()
        storage.point("flush.after")

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802,N803
        self._commit_pending = raftCommitIndex
        if not self.needs_flush:
            self._promote_commit()  # the whole log is durable already (a leader flushes before committing)

    def _promote_commit(self) -> None:
        if self._commit_pending is not None:
            super().setRaftCommitIndex(self._commit_pending)  # saved with the next .meta write
            self._commit_pending = None

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        # A defence in depth for .meta files written by older builds: a commit index past the log would make
        # the follower refuse legitimate truncations.
        stored = super().getRaftCommitIndex()
        return min(stored, self[-1][1]) if len(self) else stored


def replace_journal(journal: Journal, entries: list[tuple[bytes, int, int]]) -> None:
    """Make ``entries`` the whole of ``journal``: atomically where the journal supports it."""
    replace = getattr(journal, "replace_entries", None)
    if replace is not None:
        replace(entries)
        return
    journal.clear()
    for entry in entries:
        journal.add(*entry)


class TrackedMemoryJournal(MemoryJournal):
    """In-memory journal with the same ``needs_flush``/``flush()`` interface (flush is a no-op)."""

    def __init__(self) -> None:
        super().__init__()
        self.needs_flush = False

    def flush(self) -> None:
        """Nothing to make durable; kept so ``SafeSyncObj`` treats every journal the same way."""
        self.needs_flush = False


# pysyncobj builds its journal with ``createJournal(conf.journalFile)`` inside ``SyncObj.__init__``. We replace
# the module-level name once, with a dispatcher that uses the factory a ``SafeSyncObj`` constructor registered
# on *this thread* and falls back to stock otherwise, so stock ``SyncObj`` instances are unaffected and
# concurrent constructions in other threads cannot pick up our factory.
_stock_create_journal = _so.createJournal
_pending_factory = threading.local()


def _dispatch_create_journal(journalFile: str | None = None) -> Journal:  # noqa: N803
    factory = getattr(_pending_factory, "factory", None)
    if factory is None:
        return _stock_create_journal(journalFile)
    _pending_factory.factory = None
    return factory(journalFile)


_so.createJournal = _dispatch_create_journal


# --------------------------------------------------------------------------------------------------------------
# Conf
# --------------------------------------------------------------------------------------------------------------


def election_timeouts(text: str) -> tuple[float, float]:
    """``"MIN-MAX"`` in milliseconds (``raftkv serve --election-timeout``) as seconds; ValueError says why not.

    A follower starts an election after a random silence in [MIN, MAX]. MIN must leave room for several
    heartbeats (every 25 ms) and MAX must exceed MIN, or split votes repeat.
    """
    lo_s, sep, hi_s = text.partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        raise ValueError(f"election timeout {text!r}: want MIN-MAX in milliseconds, e.g. 120-300") from None
    if not sep or lo < 100 or hi < lo + 50 or hi > 60_000:
        raise ValueError(f"election timeout {text!r}: want 100 <= MIN, MIN + 50 <= MAX <= 60000 (ms), e.g. "
                         "120-300 (the default) or 500-1000 on a loaded machine")
    return lo / 1000, hi / 1000


def tuned_conf(**overrides: Any) -> SyncObjConf:
    """A per-group ``SyncObjConf`` tuned for fast failover and low write latency (notes §5).

    Elections start after 0.12-0.30 s of silence; heartbeats every 25 ms; a deposed or partitioned leader steps
    down after 1 s without a majority (stock: 30 s, during which it serves stale reads); reconnects are retried
    every 0.3 s. ``appendEntriesUseBatch=False`` ships each command at once (the latency win); it is safe only
    with ``SafeSyncObj``. Pass any ``SyncObjConf`` keyword to override. Returns a fresh conf (callbacks such as
    ``onStateChanged`` carry no group id, so never share one conf between groups).
    """
    params: dict[str, Any] = {
        "raftMinTimeout": 0.12,
        "raftMaxTimeout": 0.30,
        "appendEntriesPeriod": 0.025,
        "autoTickPeriod": 0.01,
        "connectionTimeout": 1.0,
        "connectionRetryTime": 0.3,
        "leaderFallbackTimeout": 1.0,
        "commandsWaitLeader": False,
        "appendEntriesUseBatch": False,
        "dynamicMembershipChange": True,
    }
    params.update(overrides)
    conf = SyncObjConf(**params)
    try:
        conf.validate()
    except AssertionError as exc:  # validate() uses bare asserts; say what was rejected
        raise ValueError(f"invalid SyncObjConf overrides {overrides!r}") from exc
    return conf


# --------------------------------------------------------------------------------------------------------------
# SafeSyncObj
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FlushStats:
    """Journal flush counters (for metrics): how many flushes and how long they took, in seconds."""

    count: int = 0
    total_s: float = 0.0
    last_s: float = 0.0
    max_s: float = 0.0


@dataclasses.dataclass(eq=False)
class _PendingRead:
    """One ``readIndex`` call being served by a leader (tick thread only)."""

    callback: Callable[[int | None, int], None]
    term: int  # the leader's term when the read was registered; it must still lead in it to answer
    deadline: float  # monotonicTime() after which the read fails with MISSING_LEADER
    index: int | None = None  # commitIndex once an entry of ``term`` is committed
    round: int | None = None  # heartbeat round that must be acked by a majority (sent after ``index`` is set)
    confirmed: bool = False


@dataclasses.dataclass(frozen=True)
class _ConfChange:
    """A configuration (membership) entry in this node's log, with the configuration it replaced."""

    idx: int
    term: int
    kind: str  # 'add' | 'rem' (pysyncobj's request[0])
    node_id: Any  # pysyncobj's request[1]
    before: frozenset[Node]  # the other members in effect just before this entry (restored on truncation)


class _AnnotatingTransport:
    """Wraps the transport while the leader sends AppendEntries, to tag chunks with a sequence number and
    snapshot chunks with the snapshot's last index/term (stock messages carry neither, so a follower cannot
    tell a stale or spliced transfer from a fresh one), and every message with the ReadIndex round, if any."""

    def __init__(self, inner: Any, owner: SafeSyncObj) -> None:
        self._inner = inner
        self._owner = owner

    def send(self, node: Node, message: dict[str, Any]) -> bool:
        owner = self._owner
        if "transmission" in message:
            seqs = owner._rf_chunk_seq
            seqs[node] = 0 if message["transmission"] == "start" else seqs.get(node, 0) + 1
            message[CHUNK_SEQ_KEY] = seqs[node]
        elif message.get("serialized") is not None and len(owner._SyncObj__raftLog) >= 2:
            log = owner._SyncObj__raftLog
            # After compaction (or a snapshot load) the log is [entry S-1, entry S, ...] and the dump on disk
            # covers entry S; pysyncobj's sender itself assumes this (nextIndex = log[1].idx + 1 when done).
            # A serializer that streams its own consistent view says which entry that view covers.
            tag_of = getattr(owner._SyncObj__serializer, "transmission_tag", None)
            tag = tag_of(node) if tag_of is not None else None
            message[SNAP_IDX_KEY], message[SNAP_TERM_KEY] = tag if tag is not None else (log[1][1], log[1][2])
            seqs = owner._rf_snap_seq
            seqs[node] = 0 if message["serialized"][1] else seqs.get(node, 0) + 1
            message[CHUNK_SEQ_KEY] = seqs[node]
        if owner._rf_tx_round is not None:
            message[ROUND_KEY] = owner._rf_tx_round
        return self._inner.send(node, message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _DurableGate:
    """A pipelined group's transport (module doc): holds back what must not leave before a commit covers it.

    A leader's AppendEntries pass at once (Raft lets the leader replicate entries before its own copy is
    durable: it only may not count itself, ``_rf_counting``; its term was durable before it could be elected).
    Anything else is held while the group has writes that are not durable, or while earlier messages are held
    (so messages leave in the order they were sent); ``SafeSyncObj._rf_release`` lets them out.
    """

    def __init__(self, inner: Any, owner: SafeSyncObj) -> None:
        self.inner = inner
        self._owner = owner

    def send(self, node: Node, message: dict[str, Any]) -> bool:
        owner = self._owner
        if message.get("type") == "append_entries":
            return self.inner.send(node, message)
        seq = owner._rf_journal.unsynced_seq()
        if seq or owner._rf_held:
            owner._rf_held.append((node, message, seq))
            return True
        return self.inner.send(node, message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _WakeNotifier:
    """Stands in for pysyncobj's ``PipeNotifier`` when an external driver ticks the group."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.notify = wake


class _NullPoller:
    """Stands in for a group's own poller when an external driver waits on every socket for it."""

    def subscribe(self, descr: Any, callback: Any, eventMask: int) -> None:  # noqa: N803
        raise RuntimeError("a driven group has no poller of its own (use raftkv.raftnet)")

    def unsubscribe(self, descr: Any) -> None:
        pass

    def poll(self, timeout: float) -> None:
        pass


class SafeSyncObj(SyncObj):
    """``SyncObj`` with Raft §5.3-safe AppendEntries handling and durable, group-committed acknowledgements.

    Same constructor as ``SyncObj`` plus keyword-only options:

    * ``durable`` (default True): flush the journal before acking / before the leader counts itself.
    * ``journalFactory``: ``f(journalFile or None) -> Journal`` with ``needs_flush`` and ``flush()`` (tests use
      it to record flushes or simulate a disk); default ``DurableFileJournal`` / ``TrackedMemoryJournal``.
    * ``keepalive`` (default True): send ``raftfix_keepalive`` on idle connections (see module doc).
    * ``readIndexTimeout`` (default ``4 * raftMaxTimeout``): a ``readIndex`` not answered by then fails with
      ``MISSING_LEADER`` (no majority confirmed this leader, or its election no-op did not commit).
    * ``deferFlush`` (default False): the tick does not end with ``_rf_sync()``; whoever drives the ticks
      (``raftkv.driver``, with ``autoTick=False``) calls ``_rf_sync()`` after ticking every group, so one
      durable flush can cover many groups. Safe because an ack is released only by ``_rf_sync`` after the flush,
      and a leader still flushes before its commit computation if anything of its own is unflushed.
    * ``wake``: called (from any thread) when a command or a read barrier is queued, instead of writing to
      pysyncobj's per-group pipe: an external driver's loop waits on its own wake-up (``raftkv.driver``).

    Concurrency contract: as for ``SyncObj``, internal state is touched only on the tick thread (or the thread
    driving ``doTick`` when ``autoTick=False``); ``flushStats()`` and ``getStatus()`` are best-effort reads.
    """

    def __init__(
        self,
        selfNode: Any,  # noqa: N803 - pysyncobj's signature
        otherNodes: Any,  # noqa: N803
        conf: SyncObjConf | None = None,
        consumers: list[Any] | None = None,
        nodeClass: type[Node] = TCPNode,  # noqa: N803
        transport: Any = None,
        transportClass: type = TCPTransport,  # noqa: N803
        *,
        durable: bool = True,
        journalFactory: Callable[[str | None], Journal] | None = None,  # noqa: N803
        keepalive: bool = True,
        readIndexTimeout: float | None = None,  # noqa: N803
        storage: Storage = DEFAULT_STORAGE,
        deferFlush: bool = False,  # noqa: N803
        wake: Callable[[], None] | None = None,
        preVote: bool = True,  # noqa: N803
    ) -> None:
        effective = conf if conf is not None else SyncObjConf()
        if effective.journalFile is not None and effective.fullDumpFile is None:
            # Stock compaction then keeps the snapshot in memory only and truncates the journal: a restarted
            # node comes back empty and the group stops accepting writes (notes §3).
            raise ValueError("journalFile requires fullDumpFile (pysyncobj loses data on restart otherwise)")
        # Every attribute must exist before SyncObj.__init__ runs: it records the attribute names present at
        # its end as "internal" and pickles every *other* attribute into snapshots.
        self._rf_durable = durable
        self._rf_defer_flush = deferFlush
        self._rf_keepalive = keepalive
        # Pre-vote (raftkv.prevote): the round asked for, the term it won, when a leader was last heard.
        self._rf_prevote_on = preVote
        self._rf_prevote: prevote.Round | None = None
        self._rf_prevote_won = -1
        self._rf_leader_seen: float | None = None
        self._rf_storage = storage
        self._rf_journal_factory = journalFactory
        self._rf_journal: Any = None
        self._rf_pending_acks: list[tuple[Node, dict[str, Any]]] = []
        self._rf_gated = False  # pipelined durability (module doc): set by _rf_make_journal
        self._rf_held: list[tuple[Node, dict[str, Any], int]] = []  # (to, message, seq to be covered first)
        self._rf_counting = False  # the leader's commit computation is running: count the durable log only
        self._rf_counted = 0  # log index up to which the last commit computation could count this leader
        self._rf_gate: _DurableGate | None = None
        self._rf_flush = FlushStats()
        self._rf_flush_lock = threading.Lock()  # guards _rf_flush copies for readers on other threads
        self._rf_last_keepalive = 0.0
        self._rf_wake: Callable[[], None] | None = None  # set only when pysyncobj has no notifier to reroute
        self._rf_votes: tuple[int, set[Node]] = (-1, set())
        self._rf_chunk_rx: list[Any] | None = None  # [key, seq, data] of the entry being reassembled
        self._rf_snap_rx: tuple[Any, int] | None = None  # (key, seq) of the snapshot being received
        self._rf_chunk_seq: dict[Node, int] = {}
        self._rf_snap_seq: dict[Node, int] = {}
        self._rf_warned_legacy = False
        self._rf_dump_failed = False  # the last snapshot install failed (set by _SyncObj__loadDumpFile)
        # ReadIndex (see module doc). The deque is the only state touched outside the tick thread.
        self._rf_read_queue: collections.deque[Callable[[int | None, int], None]] = collections.deque()
        self._rf_reads: list[_PendingRead] = []  # registered, unanswered; tick thread only
        self._rf_read_timeout = (readIndexTimeout if readIndexTimeout is not None
                                 else 4 * effective.raftMaxTimeout)
        self._rf_round = 0  # last heartbeat round sent (monotonic for the life of this object)
        self._rf_tx_round: int | None = None  # round tagged on the AppendEntries being sent right now
        self._rf_round_acks: dict[Node, int] = {}  # follower -> highest round it acked in the current term
        self._rf_echo_round: int | None = None  # follower: round of the AppendEntries being handled
        self._rf_read_stats = {"rounds": 0, "served": 0, "failed": 0}
        # Membership (see module doc): the configuration entries in the log above lastApplied, oldest first.
        self._rf_conf_changes: list[_ConfChange] = []
        self._rf_conf_loaded = False  # journal's configuration entries replayed (first tick)
        _pending_factory.factory = self._rf_make_journal
        try:
            super().__init__(selfNode, otherNodes, conf, consumers, nodeClass, transport, transportClass)
        finally:
            _pending_factory.factory = None
        if wake is not None:
            self._rf_use_wake(wake)
        if self._rf_gated:
            self._rf_gate = _DurableGate(self._SyncObj__transport, self)
            self._SyncObj__transport = self._rf_gate

    def _rf_use_wake(self, wake: Callable[[], None]) -> None:
        """Route pysyncobj's "command queued" notification to ``wake``; drop the group's own poller and pipe.

        With an external driver nothing polls this group's poller (``_onTick(0)`` only checks it), so its pipe
        would fill up unread; the attribute names already exist, so snapshots do not pick them up.
        """
        if self._SyncObj__conf.autoTick:
            raise ValueError("wake= needs autoTick=False: the group's own tick thread polls its own pipe")
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            for fd in (notifier._PipeNotifier__pipeR, notifier._PipeNotifier__pipeW):
                os.close(fd)
            self._SyncObj__pipeNotifier = _WakeNotifier(wake)
        else:  # appendEntriesUseBatch: pysyncobj never notifies; readIndex still wakes the driver
            self._rf_wake = wake
        self._poller = _NullPoller()  # select/poll pollers hold no descriptor of their own

    def raftTransport(self) -> Any:  # noqa: N802 - pysyncobj style
        """The transport this group sends through (a driver attaches a ``raftkv.raftnet.MuxTransport``)."""
        transport = self._SyncObj__transport
        return transport.inner if isinstance(transport, _DurableGate) else transport

    # ---- journal / durability --------------------------------------------------------------------------------

    def _rf_make_journal(self, journalFile: str | None) -> Journal:  # noqa: N803
        if self._rf_journal_factory is not None:
            journal = self._rf_journal_factory(journalFile)
        elif journalFile is None:
            journal = TrackedMemoryJournal()
        else:
            journal = DurableFileJournal(journalFile, self._rf_storage, defer_meta=self._rf_defer_flush)
        self._rf_journal = journal
        self._rf_gated = self._rf_defer_flush and self._rf_durable and hasattr(journal, "request_flush")
        return journal

    def _rf_flush_if_needed(self) -> None:
        """One flush covers every entry appended since the previous one (group commit)."""
        journal = self._rf_journal
        if not self._rf_durable or journal is None or not journal.needs_flush:
            return
        t0 = time.perf_counter()
        journal.flush()
        dt = time.perf_counter() - t0
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            # The election timer measures leader silence. While we sat in fsync, the leader's heartbeats
            # queued up unread in our socket; without this, a slow disk (measured: up to 180 ms under load)
            # makes a healthy follower start an election before it reads them, deposing the leader.
            self._SyncObj__raftElectionDeadline += dt
        with self._rf_flush_lock:
            stats = self._rf_flush
            stats.count += 1
            stats.total_s += dt
            stats.last_s = dt
            stats.max_s = max(stats.max_s, dt)

    def needs_flush(self) -> bool:
        """Something appended or stored is not durable yet (driver thread: ``raftkv.driver``)."""
        journal = self._rf_journal
        return self._rf_durable and journal is not None and journal.needs_flush

    def _rf_sync(self) -> bool:
        """Flush, then release the acks that were waiting for it (in the order they were produced).

        Pipelined (module doc): request the flush, release what earlier commits cover, and return True if this
        group wants a tick after the next commit completes (a leader with entries it could not count yet).
        """
        if self._rf_gated:
            journal = self._rf_journal
            journal.request_flush()
            self._rf_release()
            return (self._SyncObj__raftState == _RAFT_STATE.LEADER
                    and self._rf_counted < self._SyncObj__raftLog[-1][1])
        self._rf_flush_if_needed()
        if self._rf_pending_acks:
            acks, self._rf_pending_acks = self._rf_pending_acks, []
            transport = self._SyncObj__transport
            for node, message in acks:
                transport.send(node, message)
        return False

    def _rf_release(self) -> None:
        """Send the held messages (in order) up to the first one whose writes are not durable yet."""
        held = self._rf_held
        if not held:
            return
        journal = self._rf_journal
        n = 0
        for _node, _message, seq in held:
            if seq and not journal.covers(seq):
                break
            n += 1
        if n:
            release, self._rf_held = held[:n], held[n:]
            gate = self._rf_gate  # not the transport attribute: an AppendEntries send may wrap it
            assert gate is not None, "messages are held only behind the gate"
            inner = gate.inner
            for node, message, _seq in release:
                inner.send(node, message)

    def flushStats(self) -> FlushStats:  # noqa: N802 - pysyncobj naming style
        """A copy of the flush counters (count, total/last/max seconds)."""
        with self._rf_flush_lock:
            return dataclasses.replace(self._rf_flush)

    def getStatus(self) -> dict[str, Any]:  # noqa: N802
        status = super().getStatus()
        stats = self.flushStats()
        status["raftfix_durable"] = self._rf_durable
        status["raftfix_flush_count"] = stats.count
        status["raftfix_flush_total_s"] = stats.total_s
        status["raftfix_flush_last_s"] = stats.last_s
        return status

    # ---- tick ------------------------------------------------------------------------------------------------

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802,N803
        # Before: the leader's commit computation (first thing in SyncObj._onTick) counts the leader itself,
        # so its own entries must be durable first. After: entries appended this tick (leader) or received
        # in this poll (follower) are flushed once, and the follower's queued acks go out.
        if not self._rf_conf_loaded:
            self._rf_conf_rebuild()  # no dump: base is the constructor's members (a dump load rebuilds again)
        if not self._rf_defer_flush:
            self._rf_sync()
        elif self._SyncObj__raftState == _RAFT_STATE.LEADER and not self._rf_gated:
            # The driver synced every group at the end of its last loop, so this is normally a no-op; it keeps
            # "never count an unflushed entry of our own" local to this class.
            self._rf_flush_if_needed()
        self._rf_service_reads()
        if self._rf_prevote_on:
            self._rf_maybe_prevote()
        # Gated: the leader counts only its durable log (cleared once the commit computation is done).
        self._rf_counting = self._rf_gated and self._SyncObj__raftState == _RAFT_STATE.LEADER
        try:
            super()._onTick(timeToWait)
        finally:
            self._rf_counting = False
        if not self._rf_defer_flush:
            self._rf_sync()
        self._rf_service_reads()
        if self._rf_keepalive:
            self._rf_send_keepalives()

    # ---- pre-vote (raftkv.prevote) -----------------------------------------------------------------------------

    def _rf_maybe_prevote(self) -> None:
        """Where stock would start an election this tick, ask for pre-votes instead, unless a round for the
        next term was already won (then stock's election goes ahead) or a transfer asked for it."""
        if self._SyncObj__raftState == _RAFT_STATE.LEADER or self._SyncObj__selfNode is None:
            return
        now = _so.monotonicTime()
        if self._SyncObj__raftElectionDeadline >= now or not self._SyncObj__connectedToAnyone():
            return
        term = self._SyncObj__raftCurrentTerm + 1
        if self._SyncObj__transferInProgress or self._rf_prevote_won == term:
            return
        others = self._SyncObj__otherNodes
        self._rf_prevote = prevote.Round(term, len(others) + 1)
        if self._rf_prevote.won():  # a single-member group: its own grant is a majority
            self._rf_prevote_won = term
            return
        self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()
        self._SyncObj__raftLeader = None  # presumed gone; followers of a live one refuse (prevote.grants)
        message = {"type": prevote.REQUEST, "term": term, "last_log_index": self._SyncObj__getCurrentLogIndex(),
                   "last_log_term": self._SyncObj__getCurrentLogTerm()}
        transport = self.raftTransport()  # changes nothing durable: no need to wait in the gate
        for node in others:
            transport.send(node, message)

    def _rf_on_prevote(self, node: Node, message: dict[str, Any]) -> None:
        if node not in self._SyncObj__otherNodes:
            return
        seen = self._rf_leader_seen
        leader_alive = self._SyncObj__raftLeader is not None and seen is not None
        granted = prevote.grants(
            prevote.Request(message["term"], message["last_log_index"], message["last_log_term"]),
            term=self._SyncObj__raftCurrentTerm, last_log_index=self._SyncObj__getCurrentLogIndex(),
            last_log_term=self._SyncObj__getCurrentLogTerm(),
            is_leader=self._SyncObj__raftState == _RAFT_STATE.LEADER,
            leader_silent_s=(_so.monotonicTime() - seen) if leader_alive else None,
            min_timeout_s=self.conf.raftMinTimeout)
        self.raftTransport().send(node, {"type": prevote.REPLY, "term": message["term"], "granted": granted,
                                         "voter_term": self._SyncObj__raftCurrentTerm})

    def _rf_on_prevote_reply(self, node: Node, message: dict[str, Any]) -> None:
        if node not in self._SyncObj__otherNodes or self._SyncObj__raftState == _RAFT_STATE.LEADER:
            return
        if message["voter_term"] > self._SyncObj__raftCurrentTerm:
            # Behind in terms (as on any message of a higher term): catch up, so the next round asks for a
            # term the others can grant.  No vote is cast.
            self._SyncObj__setCurrentTerm(message["voter_term"], None)
            self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
            self._rf_prevote = None
            return
        rnd = self._rf_prevote
        if rnd is None or not message["granted"] or rnd.term != self._SyncObj__raftCurrentTerm + 1:
            return
        if rnd.add(node, message["term"]):
            self._rf_prevote, self._rf_prevote_won = None, rnd.term
            self._SyncObj__raftElectionDeadline = 0.0  # campaign in the next tick

    def _rf_send_keepalives(self) -> None:
        transport = self._SyncObj__transport
        now = _so.monotonicTime()
        if not transport.ready or now - self._rf_last_keepalive < self.conf.connectionTimeout / 4:
            return
        self._rf_last_keepalive = now
        for node in self._SyncObj__otherNodes:
            transport.send(node, {"type": KEEPALIVE_TYPE})

    def _SyncObj__onBecomeLeader(self) -> None:  # noqa: N802
        self._rf_round_acks = {}  # acks count per term; a new term starts from nothing
        SyncObj._SyncObj__onBecomeLeader(self)
        # The election's no-op may be counted in this very tick (single-member group).
        if not self._rf_gated:
            self._rf_flush_if_needed()  # make it durable now
        elif not self._SyncObj__otherNodes:
            # Elected by our own vote inside _onTick, whose commit computation comes next: count only the
            # durable log (cleared by the apply step right after it). Never set outside that window: the
            # clamped index would also number new entries.
            self._rf_counting = True

    def _SyncObj__deleteEntriesTo(self, toIDx: int) -> None:  # noqa: N802,N803
        # Only log compaction calls this, a tick after the new dump was renamed into place (without fsync).
        # A crash here leaves the new dump and the whole journal: __loadDumpFile keeps the journal's entries
        # above the dump. Make the dump durable before the journal entries it replaces are dropped.
        self._rf_storage.point("compact.dump_renamed")
        self._rf_sync_dump()
        SyncObj._SyncObj__deleteEntriesTo(self, toIDx)

    def _rf_sync_dump(self) -> None:
        dump = self.conf.fullDumpFile
        if self._rf_durable and dump is not None and os.path.exists(dump):
            self._rf_storage.fsync_path(dump)
            self._rf_storage.fsync_dir(dump)

    def _SyncObj__sendNextNodeIdx(  # noqa: N802
        self,
        node: Node,
        reset: bool = False,
        nextNodeIdx: int | None = None,  # noqa: N803
        success: bool = False,
    ) -> None:
        if nextNodeIdx is None:
            nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
        message = {
            "type": "next_node_idx",
            "next_node_idx": nextNodeIdx,
            "reset": reset,
            "success": success,
            TERM_KEY: self._SyncObj__raftCurrentTerm,
        }
        if self._rf_echo_round is not None:
            # Set only while handling an AppendEntries whose term we accepted (now our term, in TERM_KEY).
            message[ROUND_KEY] = self._rf_echo_round
        if self._rf_durable and not self._rf_gated:
            # Queued until the end-of-tick flush: an ack must never leave before the entries it covers are on
            # disk. Failure replies are queued too, so replies leave in the order they were produced.
            self._rf_pending_acks.append((node, message))
        else:
            self._SyncObj__transport.send(node, message)

    def _SyncObj__sendAppendEntries(self) -> None:  # noqa: N802
        real = self._SyncObj__transport
        self._SyncObj__transport = _AnnotatingTransport(real, self)
        if any(r.round is not None and not r.confirmed for r in self._rf_reads):
            # Reads await confirmation: this send is a new round (sent after every read bound to it).
            self._rf_round += 1
            self._rf_tx_round = self._rf_round
            self._rf_read_stats["rounds"] += 1
        try:
            SyncObj._SyncObj__sendAppendEntries(self)
        finally:
            self._SyncObj__transport = real
            self._rf_tx_round = None

    def _SyncObj__getCurrentLogIndex(self) -> int:  # noqa: N802
        last = self._SyncObj__raftLog[-1][1]
        if self._rf_counting:
            # The leader's commit computation (pysyncobj's _onTick counts the leader for every index up to
            # this): never count an entry of our own that is not durable yet.
            last = self._rf_counted = min(last, self._rf_journal.durable_index())
        return last

    def _SyncObj__applyLogEntries(self) -> bool:  # noqa: N802
        # pysyncobj applies right after the leader's commit computation: that is where counting ends.
        self._rf_counting = False
        # Reads waiting only for lastApplied >= readIndex are answered in the tick that applies it.
        result = SyncObj._SyncObj__applyLogEntries(self)
        self._rf_conf_prune()
        self._rf_service_reads()
        return result

    # ---- ReadIndex -------------------------------------------------------------------------------------------

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

    def postponeElection(self, seconds: float) -> None:  # noqa: N802 - pysyncobj style
        """A follower or candidate waits ``seconds`` longer before it starts an election (tick thread only).

        For a driver that could not read the sockets for ``seconds`` before this tick: the leader's heartbeats
        may be sitting unread, exactly as during our own fsync (``_rf_flush_if_needed``).
        """
        if seconds > 0 and self._SyncObj__raftState != _RAFT_STATE.LEADER:
            self._SyncObj__raftElectionDeadline += seconds

    def appliedMembers(self) -> set[str]:  # noqa: N802 - pysyncobj style
        """Member ids of the configuration in effect at lastApplied (no uncommitted change); tick thread only."""
        others = self._rf_conf_changes[0].before if self._rf_conf_changes else self.otherNodes
        return {n.id for n in others} | {self.selfNode.id}

    def readIndexStats(self) -> dict[str, int]:  # noqa: N802
        """Counters (best effort from other threads): heartbeat rounds sent for reads, reads served, failed."""
        return dict(self._rf_read_stats)

    def _rf_term_at(self, idx: int) -> int | None:
        log = self._SyncObj__raftLog
        first = log[0][1]
        if first <= idx <= log[-1][1]:
            return log[idx - first][2]
        return None

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
                reads.append(_PendingRead(callback, term, now + self._rf_read_timeout))
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
        self, reads: list[_PendingRead], term: int, now: float,
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

    # ---- membership ------------------------------------------------------------------------------------------

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
        self._rf_conf_changes.append(_ConfChange(idx, term, request[0], request[1], before))
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
                self._rf_conf_changes.append(_ConfChange(entry[1], entry[2], request[0], request[1], before))

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

    def _SyncObj__doApplyCommand(self, command: bytes) -> Any:  # noqa: N802
        # Configuration entries took effect when appended (or replayed at load). Stock applies them again on
        # commit, which resurrects a member removed by a later entry already in the log.
        if self.conf.dynamicMembershipChange and self._SyncObj__parseChangeClusterRequest(command) is not None:
            return None
        return SyncObj._SyncObj__doApplyCommand(self, command)

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:  # noqa: N802,N803
        """Stock 0.3.17's dump load, except for what happens to the journal (``_rf_journal_after_dump``)."""
        self._rf_conf_changes = []  # the dump's members replace the current ones
        try:
            data = self._SyncObj__serializer.deserialize()
        except Exception:
            if not clearJournal:
                # Restart: running on without the state the log was compacted against would serve and
                # acknowledge from a wrong state. Stop instead (the error says what is damaged).
                raise
            logger.exception("failed to install the snapshot received; the leader will send it again")
            self._rf_dump_failed = True
            return
        if data[0] is not None:
            if self._SyncObj__consumers:
                self_data, consumers_data = data[0][0], data[0][1:]
            else:
                self_data, consumers_data = data[0], []
            self.__dict__.update(self_data)
            for consumer, consumer_data in zip(self._SyncObj__consumers, consumers_data, strict=True):
                consumer._deserialize(consumer_data)
        self._rf_journal_after_dump(data[2], data[1], clearJournal)
        self._SyncObj__raftLastApplied = data[1][1]
        log_end = self._SyncObj__getCurrentLogIndex()
        if self._SyncObj__raftCommitIndex > log_end:
            logger.warning("raftCommitIndex (%d) exceeds journal end (%d) after loading dump; clamped",
                           self._SyncObj__raftCommitIndex, log_end)
            self._SyncObj__raftCommitIndex = log_end
            self._SyncObj__raftLog.setRaftCommitIndex(log_end)
        if self.conf.dynamicMembershipChange:
            self._SyncObj__updateClusterConfiguration([n for n in data[3] if n != self._SyncObj__selfNode])
        self._SyncObj__onSetCodeVersion(0)
        self._rf_conf_rebuild()  # the dump's members, then the configuration entries after it

    def _rf_journal_after_dump(self, before: tuple[bytes, int, int], last: tuple[bytes, int, int],
                               install: bool) -> None:
        """Make the journal start with the dump's last two entries ``before``, ``last`` (index S-1, S).

        Stock replaces the whole journal by those two entries unless its first two already equal them. On
        restart that is wrong whenever the journal was not compacted after the dump was written: compaction
        renames the dump first and drops the journal's prefix a tick later, so a crash in between loses every
        entry after S that this node flushed and acknowledged. Here (restart, ``install=False``), if the journal
        holds entry S (same index and term), only the entries before S-1 are dropped; entries after S stay.
        Otherwise (a snapshot install, or a journal that does not hold S: it belongs to an older or divergent
        history, or ends before S) the journal becomes the two entries, atomically.
        """
        log = self._SyncObj__raftLog
        first, last_idx = log[0][1], log[-1][1]
        holds = first <= last[1] - 1 and last[1] <= last_idx and log[last[1] - first][2] == last[2]
        if not install and holds:
            if first < before[1]:
                replace_journal(log, list(log[before[1] - first:]))
            return
        if not install and first > last[1]:
            logger.critical("dump ends at %d, before the journal's first entry %d: entries in between are "
                            "missing; falling back to the dump", last[1], first)
        replace_journal(log, [before, last])

    def _SyncObj__tryLogCompaction(self) -> None:  # noqa: N802
        # The dump covers entries up to lastApplied, but stock stores the *current* members in it, which may
        # include configuration entries after lastApplied that are later truncated. Store the members in
        # effect at lastApplied instead (the tick thread owns __otherNodes; nothing else runs meanwhile).
        if not self._rf_conf_changes:
            SyncObj._SyncObj__tryLogCompaction(self)
            return
        current = self._SyncObj__otherNodes
        self._SyncObj__otherNodes = set(self._rf_conf_at(self._SyncObj__raftLastApplied))
        try:
            SyncObj._SyncObj__tryLogCompaction(self)
        finally:
            self._SyncObj__otherNodes = current

    # ---- message dispatch ------------------------------------------------------------------------------------

    def _SyncObj__onMessageReceived(self, node: Node, message: Any) -> None:  # noqa: N802
        mtype = message.get("type") if isinstance(message, dict) else None
        if mtype == KEEPALIVE_TYPE:
            return
        if mtype == "append_entries":
            if message["term"] < self._SyncObj__raftCurrentTerm:
                # From a leader of an earlier term (Raft §5.1: reply with our term, it steps down). Stock sends
                # nothing, so a member that moved to a later term (an election it could not win) would never
                # rejoin a leader that goes on in the old one: with pre-vote nothing else raises terms.
                self._SyncObj__sendNextNodeIdx(node, success=False)
                return
            self._rf_echo_round = message.get(ROUND_KEY)
            try:
                self._rf_dispatch_append_entries(node, message)
            finally:
                self._rf_echo_round = None
            return
        if mtype == "next_node_idx":
            self._rf_on_next_node_idx(node, message)
            return
        if mtype == "response_vote":
            self._rf_on_response_vote(node, message)
            return
        if mtype == prevote.REQUEST:
            self._rf_on_prevote(node, message)
            return
        if mtype == prevote.REPLY:
            self._rf_on_prevote_reply(node, message)
            return
        SyncObj._SyncObj__onMessageReceived(self, node, message)

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
                self._SyncObj__sendNextNodeIdx(node, reset=True, nextNodeIdx=last_idx + 1)
                return
            if log[prev_idx - first_idx][2] != prev_term:
                if prev_idx <= committed:
                    logger.critical(
                        "leader %r disagrees with committed entry %d (term %d, leader says %d)",
                        node.id, prev_idx, log[prev_idx - first_idx][2], prev_term)
                self._SyncObj__sendNextNodeIdx(node, reset=True, nextNodeIdx=prev_idx)
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
            self._rf_chunk_rx = [key, 0, message["data"]]
        else:
            rx = self._rf_chunk_rx
            if rx is None or rx[0] != key or (seq is not None and seq != rx[1] + 1):
                self._rf_chunk_rx = None  # duplicated, reordered or foreign chunk: drop the transfer
                return None
            rx[1] += 1
            rx[2] += message["data"]
            if kind == "finish":
                # Stock flags 'finish' by the command length, not the pickled length, so a final short chunk
                # can follow it; a truncated pickle fails to load and we keep collecting.
                try:
                    entry = _so.pickle.loads(rx[2])
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
            # A rejection at or below matchIndex is stale (that prefix was acked in this term). Requires
            # durable storage on the follower, as in etcd's maybeDecrTo.
            if reply_next > match_index[node]:
                next_index[node] = min(reply_next, last_idx + 1)
        self._SyncObj__lastResponseTime[node] = _so.monotonicTime()

    def _rf_on_response_vote(self, node: Node, message: dict[str, Any]) -> None:
        """Count each voter once per term (stock counts messages, so a duplicate is a second vote)."""
        term = self._SyncObj__raftCurrentTerm
        if self._SyncObj__raftState != _RAFT_STATE.CANDIDATE or message["term"] != term:
            return
        if node not in self._SyncObj__otherNodes:
            return
        if self._rf_votes[0] != term:
            self._rf_votes = (term, set())
        voters = self._rf_votes[1]
        voters.add(node)
        self._SyncObj__votesCount = 1 + len(voters)
        if self._SyncObj__votesCount > (len(self._SyncObj__otherNodes) + 1) / 2:
            self._SyncObj__onBecomeLeader()

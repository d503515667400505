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
  ever raises ``matchIndex``/``nextIndex``; a rejection of a ``prevLogIdx`` at or below ``matchIndex`` is stale
  and ignored (etcd's ``maybeDecrTo`` rule); a current one only lowers ``nextIndex``, never to ``matchIndex``.
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

The file journal, its ``.meta`` and the ``Storage`` primitives live in ``raftkv.filejournal`` (a node's groups
use the engine journal, ``raftkv.raftlog``); this module wires whichever journal it is given into pysyncobj.

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

The AppendEntries receiver and the leader's reply handling (doors 1 and 2) are ``raftkv.replication.Replication``;
ReadIndex (linearizable reads without a log entry) is ``raftkv.readindex.ReadIndex``; membership changes, one at a
time with the configuration a function of the log, are ``raftkv.confchange.ConfChanges``: all three are mixed
into ``SafeSyncObj`` and documented in their modules.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pysyncobj.version
from pysyncobj import syncobj as _so
from pysyncobj.config import SyncObjConf
from pysyncobj.journal import Journal
from pysyncobj.node import Node, TCPNode
from pysyncobj.serializer import Serializer as _StockSerializer
from pysyncobj.syncobj import SyncObj
from pysyncobj.transport import TCPTransport

from raftkv import prevote
from raftkv.confchange import ConfChange, ConfChanges
from raftkv.filejournal import (
    DEFAULT_STORAGE,
    DurableDumpSerializer,
    DurableFileJournal,
    Storage,
    TrackedMemoryJournal,
    pending_factory,
    replace_journal,
)
from raftkv.readindex import PendingRead, ReadIndex
from raftkv.replication import (  # noqa: F401 - the message keys are re-exported (tests, tools)
    CHUNK_SEQ_KEY,
    REJECTED_KEY,
    ROUND_KEY,
    SNAP_IDX_KEY,
    SNAP_TERM_KEY,
    TERM_KEY,
    Replication,
)

SUPPORTED_PYSYNCOBJ_VERSION = "0.3.17"
APPLY_BUDGET_S = 0.01  # applying committed entries in one tick stops after this (at least one entry is applied)

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
#: While a leader streams a snapshot, each AppendEntries send of a group stops sending chunks after this long
#: (stock: ``appendEntriesPeriod``) and the group sends again at the driver's next loop (``_SyncObj__sendAppendEntries``).
SNAPSHOT_SEND_BUDGET_S = 0.008


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
            owner._rf_chunks_sent += 1
        elif "serialized" in message and owner._rf_streaming:
            # No chunk (the serializer holds it back while the connection has a backlog): stock would go on
            # asking, and sending one such heartbeat after another, until its time budget ran out. This
            # makes that budget spent, so it moves on to the next follower after this one message.
            owner._SyncObj__conf.appendEntriesPeriod = -1.0
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


def _until(entries: list, deadline: float) -> Any:
    """``entries`` one by one, stopping once ``deadline`` (monotonic) has passed; the first always comes."""
    for i, entry in enumerate(entries):
        if i and time.monotonic() >= deadline:
            return
        yield entry


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


class SafeSyncObj(Replication, ReadIndex, ConfChanges, SyncObj):
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
        self._rf_wake_driver = wake  # an external driver: asked for another tick when applying is cut short
        self._rf_apply_deadline: float | None = None  # set while the apply loop takes its entries
        self._rf_votes: tuple[int, set[Node]] = (-1, set())
        self._rf_chunk_rx: list[Any] | None = None  # [key, seq, chunks] of the entry being reassembled
        self._rf_snap_rx: tuple[Any, int] | None = None  # (key, seq) of the snapshot being received
        self._rf_chunk_seq: dict[Node, int] = {}
        self._rf_chunks_sent = 0  # snapshot chunks sent by the current _SyncObj__sendAppendEntries call
        self._rf_streaming = False  # that call sends a snapshot to some follower (its time budget is short)
        self._rf_snap_seq: dict[Node, int] = {}
        self._rf_warned_legacy = False
        self._rf_dump_failed = False  # the last snapshot install failed (set by _SyncObj__loadDumpFile)
        # ReadIndex (see module doc). The deque is the only state touched outside the tick thread.
        self._rf_read_queue: collections.deque[Callable[[int | None, int], None]] = collections.deque()
        self._rf_reads: list[PendingRead] = []  # registered, unanswered; tick thread only
        self._rf_read_timeout = (readIndexTimeout if readIndexTimeout is not None
                                 else 4 * effective.raftMaxTimeout)
        self._rf_round = 0  # last heartbeat round sent (monotonic for the life of this object)
        self._rf_tx_round: int | None = None  # round tagged on the AppendEntries being sent right now
        self._rf_round_acks: dict[Node, int] = {}  # follower -> highest round it acked in the current term
        self._rf_echo_round: int | None = None  # follower: round of the AppendEntries being handled
        self._rf_rejected: int | None = None  # follower: prevLogIdx of the AppendEntries being refused
        self._rf_read_stats = {"rounds": 0, "served": 0, "failed": 0}
        # Membership (see module doc): the configuration entries in the log above lastApplied, oldest first.
        self._rf_conf_changes: list[ConfChange] = []
        self._rf_conf_loaded = False  # journal's configuration entries replayed (first tick)
        self._rf_dump_checked = False  # the stock dump serializer swapped for the durable one (first tick)
        pending_factory.factory = self._rf_make_journal
        try:
            super().__init__(selfNode, otherNodes, conf, consumers, nodeClass, transport, transportClass)
        finally:
            pending_factory.factory = None
        if wake is not None:
            self._rf_use_wake(wake)
        if self._rf_gated:
            self._rf_gate = _DurableGate(self._SyncObj__transport, self)
            self._SyncObj__transport = self._rf_gate

    def _rf_use_durable_dumps(self) -> None:
        """On the first tick (before any compaction, on the tick thread): dumps in pysyncobj's own format are
        written by ``DurableDumpSerializer``, which fsyncs them before the rename. A serializer the application
        set (or one replaced after construction, as ``raftkv.replica`` does) is left alone."""
        self._rf_dump_checked = True
        conf = self._SyncObj__conf
        if (self._rf_durable and conf.fullDumpFile is not None and conf.serializer is None
                and type(self._SyncObj__serializer) is _StockSerializer):
            self._SyncObj__serializer = DurableDumpSerializer(
                self._rf_storage, conf.fullDumpFile, conf.logCompactionBatchSize, conf.useFork,
                conf.serializeChecker)

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
        if not self._rf_dump_checked:
            self._rf_use_durable_dumps()
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

    def _SyncObj__setState(self, newState: int) -> None:  # noqa: N802,N803
        if newState == _RAFT_STATE.FOLLOWER and self._SyncObj__raftState == _RAFT_STATE.LEADER:
            # A deposed leader starts a fresh election timer (etcd's becomeFollower does the same). Stock keeps
            # the deadline it last had as a follower, long past, so it would ask for an election at once against
            # the leader that just replaced it: after every leadership transfer, for one.
            self._SyncObj__raftElectionDeadline = _so.monotonicTime() + self._SyncObj__generateRaftTimeout()
        SyncObj._SyncObj__setState(self, newState)

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
        if self._rf_rejected is not None:
            message[REJECTED_KEY] = self._rf_rejected
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
        conf = self._SyncObj__conf
        period = conf.appendEntriesPeriod
        streaming = self._rf_sending_snapshot()
        if streaming:
            # Stock goes on sending snapshot chunks to a follower for a whole appendEntriesPeriod per call, and
            # calls once per period: a driver hosting several leaders then spent tens of ms per group per loop
            # (heartbeats to the other followers late enough for elections) and idled in between. Instead: a
            # short budget per call, and the next call at the next loop (below), while chunks go out.
            conf.appendEntriesPeriod = min(period, SNAPSHOT_SEND_BUDGET_S)
        self._rf_chunks_sent = 0
        self._rf_streaming = streaming
        try:
            SyncObj._SyncObj__sendAppendEntries(self)
        finally:
            self._SyncObj__transport = real
            self._rf_tx_round = None
            self._rf_streaming = False
            conf.appendEntriesPeriod = period
        if streaming and self._rf_chunks_sent:
            self._SyncObj__newAppendEntriesTime = 0.0  # due again at this group's next tick
            if self._rf_wake_driver is not None:
                self._rf_wake_driver()  # ... which is the driver's next loop

    def _rf_sending_snapshot(self) -> bool:
        """A connected follower is sent a snapshot (its next index is at or below the log's first entry)."""
        first = self._SyncObj__raftLog[0][1]
        nxt = self._SyncObj__raftNextIndex
        return any(nxt.get(node, first + 1) <= first for node in self._SyncObj__connectedNodes)

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
        # Stock applies everything committed in one go: behind a bulk load that is hundreds of milliseconds in
        # which this node's driver sends no heartbeat for any group. Its loop takes the entries from
        # __getEntries; handed a generator that stops at the deadline (``_SyncObj__getEntries``), it applies
        # what it got and leaves lastApplied there. The rest is applied next tick, which is asked for at once.
        self._rf_apply_deadline = time.monotonic() + APPLY_BUDGET_S
        try:
            result = SyncObj._SyncObj__applyLogEntries(self)
        finally:
            self._rf_apply_deadline = None
        if self._SyncObj__raftLastApplied < self._SyncObj__raftCommitIndex and self._rf_wake_driver is not None:
            self._rf_wake_driver()
        # Reads waiting only for lastApplied >= readIndex are answered in the tick that applies it.
        self._rf_conf_prune()
        self._rf_service_reads()
        return result

    def _SyncObj__getEntries(self, fromIDx: int, count: int | None = None,  # noqa: N802,N803
                             maxSizeBytes: int | None = None) -> Any:  # noqa: N803
        entries = SyncObj._SyncObj__getEntries(self, fromIDx, count, maxSizeBytes)
        deadline, self._rf_apply_deadline = self._rf_apply_deadline, None  # only the apply loop's own call
        if deadline is None or len(entries) <= 1:
            return entries
        return _until(entries, deadline)

    # ---- ReadIndex -------------------------------------------------------------------------------------------

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

    def _rf_term_at(self, idx: int) -> int | None:
        log = self._SyncObj__raftLog
        first = log[0][1]
        if first <= idx <= log[-1][1]:
            return log[idx - first][2]
        return None

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

"""Tests for raftkv.raftfix: pysyncobj's follower truncation bug, its fix, and durable group commit.

Everything here runs real pysyncobj replicas in one process on a simulated network (``SimNet``): an
in-process ``Transport`` whose messages the test delivers, delays, reorders, duplicates or drops, with
``autoTick=False`` and pysyncobj's clock and RNG replaced by a fake clock and a seeded ``random.Random``. A run
is therefore a pure function of its seed and script, and a failing seed replays exactly
(``RAFTFIX_SEED=<seed> pytest tests/test_raftfix.py -k replay``; ``RAFTFIX_EXAMPLES`` sets how many seeds
hypothesis tries, default 150).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import pickle
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj import syncobj as _so
from pysyncobj.config import FAIL_REASON
from pysyncobj.journal import Journal
from pysyncobj.node import Node
from pysyncobj.transport import Transport

from raftkv import filejournal, raftfix
from raftkv.raftfix import SafeSyncObj

from .conftest import examples

# Raft protocol messages may be duplicated by the simulated network. Client forwarding (apply_command and its
# response) is only dropped/delayed: pysyncobj has no client sessions, so a duplicated apply_command is a
# second submission, whose dedup is the application's job (notes §4), not a Raft safety property.
DUPLICABLE = {"append_entries", "next_node_idx", "request_vote", "response_vote"}


# --------------------------------------------------------------------------------------------------------------
# Simulated disk
# --------------------------------------------------------------------------------------------------------------


class SimDisk:
    """What survives a crash of one replica: flushed entries and metadata."""

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, int, int]] = []
        self.term = 0
        self.voted: Any = None
        self.commit = 1


class SimDiskJournal(Journal):
    """A journal over a ``SimDisk``: writes go to memory, ``flush()`` copies them to the disk, and a
    restart (a new journal on the same disk) forgets everything unflushed, like an OS crash would.

    ``on_ack_check`` hooks let tests verify ordering: ``durable_prefix_ok(i)`` is true when entries 1..i as
    held in memory are exactly the ones on disk. ``write_through=True`` models stock pysyncobj under a
    process crash (kill -9: the page cache keeps every mmap write), so stock runs lose nothing to restarts.
    """

    def __init__(self, disk: SimDisk, write_through: bool = False) -> None:
        self.disk = disk
        self.write_through = write_through  # stock pysyncobj: mmap writes survive a process crash
        self.mem: list[tuple[bytes, int, int]] = list(disk.entries)
        self.commit = disk.commit
        self.needs_flush = False
        self.flushes = 0
        self.owner: Any = None
        self.violations: list[str] = []

    # Journal interface (pysyncobj's names)
    def add(self, command: bytes, idx: int, term: int) -> None:
        self.mem.append((command, idx, term))
        self.needs_flush = True
        if self.write_through:
            self.flush()

    def clear(self) -> None:
        self.mem = []
        self.needs_flush = True
        if self.write_through:
            self.flush()

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802,N803
        del self.mem[entryFrom:]
        self.needs_flush = True
        if self.write_through:
            self.flush()

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802,N803
        self.mem = self.mem[entryTo:]
        self.needs_flush = True
        if self.write_through:
            self.flush()

    def __getitem__(self, item: Any) -> Any:
        return self.mem[item]

    def __len__(self) -> int:
        return len(self.mem)

    def _destroy(self) -> None:
        pass  # a crash: nothing more reaches the disk

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802,N803
        if self.owner is not None and self.owner._isLeader() and not self.durable_prefix_ok(raftCommitIndex):
            self.violations.append(f"leader committed {raftCommitIndex} before flushing it")
        self.commit = raftCommitIndex
        if self.write_through:
            self.disk.commit = raftCommitIndex

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return min(self.disk.commit, self.mem[-1][1]) if self.mem else self.disk.commit

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:  # noqa: N802,N803
        self.disk.term, self.disk.voted = term, votedForNodeId  # synchronous, like DurableMetaStorer

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self.disk.term

    def getVotedForNodeId(self) -> Any:  # noqa: N802
        return self.disk.voted

    def onOneSecondTimer(self) -> None:  # noqa: N802
        self.disk.commit = self.commit

    def flush(self) -> None:
        self.disk.entries = list(self.mem)
        self.disk.commit = self.commit
        self.needs_flush = False
        self.flushes += 1

    def durable_prefix_ok(self, upto: int) -> bool:
        """True if every entry with index <= upto that memory holds is on disk unchanged."""
        on_disk = {e[1]: e[2] for e in self.disk.entries}
        return all(on_disk.get(e[1]) == e[2] for e in self.mem if e[1] <= upto)


# --------------------------------------------------------------------------------------------------------------
# Simulated network
# --------------------------------------------------------------------------------------------------------------


class Faults:
    """Per-message fault probabilities; delays are uniform in [0, delay_max_s] (random delays reorder)."""

    def __init__(self, drop: float = 0.0, dup: float = 0.0, delay_max_s: float = 0.0) -> None:
        self.drop, self.dup, self.delay_max_s = drop, dup, delay_max_s


class SimTransport(Transport):
    """In-process transport: ``send`` hands a pickled copy to the ``SimNet``."""

    def __init__(self, net: SimNet, node_id: int) -> None:
        super().__init__(None, None, None)
        self.net, self.node_id = net, node_id

    def tryGetReady(self) -> None:  # noqa: N802
        pass

    @property
    def ready(self) -> bool:
        return True

    def send(self, node: Node, message: Any) -> bool:
        self.net.send(self.node_id, node.id, message)
        return True


class SimNet:
    """Seeded network + fake clock for replicas driven by ``doTick``; see the module docstring."""

    def __init__(self, rng: random.Random, faults: Faults | None = None) -> None:
        self.rng = rng
        self.faults = faults or Faults()
        self.now = 1000.0
        self.seq = 0
        self.queue: list[tuple[float, int, int, int, bytes]] = []  # heap of (deliver_at, seq, src, dst, msg)
        self.transports: dict[int, SimTransport] = {}
        self.blocked: set[int] = set()  # nodes cut off from everyone
        self.hold = False  # when True, nothing is delivered automatically (scripted scenarios)

    def send(self, src: int, dst: int, message: Any) -> None:
        if src in self.blocked or dst in self.blocked:
            return
        data = pickle.dumps(message)
        f = self.faults
        copies = 1
        if f.drop and self.rng.random() < f.drop:
            copies = 0
        elif f.dup and message.get("type") in DUPLICABLE and self.rng.random() < f.dup:
            copies = 2
        for _ in range(copies):
            delay = self.rng.uniform(0.0, f.delay_max_s) if f.delay_max_s else 0.0
            self.seq += 1
            heapq.heappush(self.queue, (self.now + delay, self.seq, src, dst, data))

    def deliver(self, item: tuple[float, int, int, int, bytes]) -> None:
        _, _, src, dst, data = item
        transport = self.transports.get(dst)
        if transport is None or src in self.blocked or dst in self.blocked:
            return  # destination down or cut off: lost
        transport._onMessageReceived(Node(src), pickle.loads(data))

    def deliver_due(self) -> None:
        while self.queue and self.queue[0][0] <= self.now:
            self.deliver(heapq.heappop(self.queue))

    def take(self, src: int, dst: int, mtype: str) -> list[tuple[float, int, int, int, bytes]]:
        """Remove and return queued messages matching (src, dst, type), oldest first (for scripts)."""
        found = [m for m in self.queue if m[2] == src and m[3] == dst and pickle.loads(m[4])["type"] == mtype]
        self.queue = [m for m in self.queue if m not in found]
        heapq.heapify(self.queue)
        return sorted(found)

    def drop_all(self) -> None:
        self.queue = []


@contextlib.contextmanager
def sim_clock(net: SimNet, seed: int) -> Iterator[None]:
    """Replace pysyncobj's clock and RNG (election timeouts) with the simulation's."""
    saved = (_so.monotonicTime, _so.random)
    _so.monotonicTime = lambda: net.now
    _so.random = random.Random(seed ^ 0x5EED)  # type: ignore[assignment]
    try:
        yield
    finally:
        _so.monotonicTime, _so.random = saved


# --------------------------------------------------------------------------------------------------------------
# Replicas
# --------------------------------------------------------------------------------------------------------------


class _AppliedLog:
    """State machine: the sequence of applied command ids."""

    applied: list[str]

    @replicated
    def put(self, cid: str) -> int:
        self.applied.append(cid)
        return len(self.applied)


class StockReplica(_AppliedLog, SyncObj):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.applied = []
        super().__init__(*args, **kwargs)


class SafeReplica(_AppliedLog, SafeSyncObj):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.applied = []
        super().__init__(*args, **kwargs)


# Integer ids: pysyncobj iterates sets of Nodes, and str hashes vary per process (PYTHONHASHSEED), which
# would reorder sends and make a seed replay differently. int hashes are fixed.
NODE_IDS = (1, 2, 3)


def sim_conf(batch: bool = False) -> SyncObjConf:
    return SyncObjConf(
        autoTick=False,
        appendEntriesUseBatch=batch,
        raftMinTimeout=0.1,
        raftMaxTimeout=0.3,
        appendEntriesPeriod=0.02,
        leaderFallbackTimeout=1.0,
        commandsWaitLeader=False,
        logCompactionMinEntries=10**6,
        logCompactionMinTime=10**6,
        dynamicMembershipChange=True,
    )


class Cluster:
    """Replicas on a SimNet (by default the three ``NODE_IDS``, all members). ``safe`` picks SafeSyncObj (on
    SimDisk journals) or stock SyncObj. ``spares`` get a disk and a connection to everyone but are not started:
    ``start(n, others)`` boots one with the members it is told about (membership tests)."""

    def __init__(self, net: SimNet, safe: bool, durable: bool = True, batch: bool = False,
                 safe_cls: type[SafeSyncObj] | None = None, spares: tuple[int, ...] = (),
                 pre_vote: bool = True) -> None:
        self.net, self.safe, self.durable, self.batch = net, safe, durable, batch
        self.pre_vote = pre_vote
        self.safe_cls = safe_cls or SafeReplica
        self.all_ids = NODE_IDS + spares
        self.disks = {n: SimDisk() for n in self.all_ids}
        self.nodes: dict[int, Any] = {}
        self.acked: dict[str, Any] = {}  # cid -> result, for SUCCESS callbacks
        self.ack_violations: list[str] = []
        for n in NODE_IDS:
            self.start(n)

    def start(self, n: int, others: list[int] | None = None) -> None:
        transport = SimTransport(self.net, n)
        if others is None:
            others = [o for o in NODE_IDS if o != n]
        node = self.make_node(n, others, transport)
        self._watch_acks(transport)
        self.nodes[n] = node
        self.net.transports[n] = transport
        for o in self.all_ids:
            if o != n:
                transport._onNodeConnected(Node(o))

    def make_node(self, n: int, others: list[int], transport: SimTransport) -> Any:
        """Build replica ``n`` on its disk (a restart if the disk holds anything)."""
        disk = self.disks[n]
        if self.safe:
            journal_box: list[SimDiskJournal] = []

            def factory(_path: str | None) -> SimDiskJournal:
                journal_box.append(SimDiskJournal(disk))
                return journal_box[0]

            node = self.safe_cls(n, others, sim_conf(self.batch), nodeClass=Node, transport=transport,
                                 durable=self.durable, journalFactory=factory, keepalive=False,
                                 preVote=self.pre_vote)
            journal_box[0].owner = node
            transport.journal = journal_box[0]  # type: ignore[attr-defined]
            return node
        # Stock SyncObj takes no journal argument; raftfix's createJournal dispatcher (thread-local, one
        # shot) lets the test hand it a write-through SimDiskJournal so that restarts keep its log.
        filejournal.pending_factory.factory = lambda _path: SimDiskJournal(disk, write_through=True)
        return StockReplica(n, others, sim_conf(self.batch), nodeClass=Node, transport=transport)

    def _watch_acks(self, transport: SimTransport) -> None:
        """Record every success ack that leaves a node before the entries it covers are flushed."""
        inner_send = transport.send

        def send(node: Node, message: Any) -> bool:
            journal = getattr(transport, "journal", None)
            if journal is not None and message.get("type") == "next_node_idx" and message["success"]:
                acked = message["next_node_idx"] - 1
                if not journal.durable_prefix_ok(acked):
                    self.ack_violations.append(f"{transport.node_id} acked {acked} before flushing it")
            return inner_send(node, message)

        transport.send = send  # type: ignore[method-assign]

    def crash(self, n: int) -> None:
        self.nodes.pop(n)
        self.net.transports.pop(n)

    def tick(self, dt: float = 0.005) -> None:
        self.net.now += dt
        for node in list(self.nodes.values()):
            node.doTick(0.0)
        if not self.net.hold:
            self.net.deliver_due()

    def run(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        for _ in range(int(seconds / 0.005)):
            self.tick()
            if until is not None and until():
                return True
        return until() if until is not None else True

    def leader(self) -> int | None:
        leaders = [n for n, node in self.nodes.items() if node._isLeader()]
        return leaders[0] if len(leaders) == 1 else None

    def submit(self, n: int, cid: str) -> None:
        def done(result: Any, err: int) -> None:
            if err == FAIL_REASON.SUCCESS:
                self.acked[cid] = result

        self.nodes[n].put(cid, callback=done)

    def log_of(self, n: int) -> list[tuple[int, int]]:
        return [(e[1], e[2]) for e in self.nodes[n]._SyncObj__raftLog[:]]


# --------------------------------------------------------------------------------------------------------------
# 1. Deterministic reproduction
# --------------------------------------------------------------------------------------------------------------


def run_truncation_scenario(safe: bool, stale: str) -> dict[str, Any]:
    """The failing scenario, step by step (docs/pysyncobj-patches.md walks through it).

    Leader L, follower F, follower G cut off. L replicates w1 then w2 to F one AppendEntries at a time; F acks
    both, so L commits w2 with {L, F} and tells the client SUCCESS. Then a stale AppendEntries reaches F:
    ``stale="duplicate"`` re-delivers a copy of w1's AppendEntries; ``stale="heartbeat"`` delivers an
    older empty heartbeat (prevLogIdx = w1) that was delayed. Stock F deletes everything after prevLogIdx,
    so w2 vanishes from the replica that made it a majority. L then crashes and G reconnects: F and G elect a
    leader without w2.
    """
    net = SimNet(random.Random(7))
    with sim_clock(net, 7):
        c = Cluster(net, safe=safe)
        assert c.run(3.0, until=lambda: c.leader() is not None)
        c.run(0.2)  # let the election's no-op commit everywhere
        lead = c.leader()
        assert lead is not None
        f, g = [n for n in NODE_IDS if n != lead]
        net.blocked.add(g)
        net.hold = True
        net.drop_all()

        Msg = tuple[float, int, int, int, bytes]

        def replicate(cid: str) -> tuple[list[Msg], list[Msg]]:
            """Submit cid at L, deliver its AppendEntries to F and F's ack back. Returns the AppendEntries
            delivered, and those L sent afterwards (its commit-index heartbeat), which are held back."""
            c.submit(lead, cid)
            c.tick()  # L appends cid and sends AppendEntries to F
            sent = net.take(lead, f, "append_entries")
            assert sent, "setup: L must send AppendEntries"
            for m in sent:
                net.deliver(m)
            c.tick()  # F flushes (SafeSyncObj) and releases its ack
            for ack in net.take(f, lead, "next_node_idx"):
                net.deliver(ack)
            c.tick()  # L counts F, commits, applies, answers the client, sends a commit-index heartbeat
            return sent, net.take(lead, f, "append_entries")

        ae_w1, heartbeat_w1 = replicate("w1")
        replicate("w2")
        assert "w1" in c.acked and "w2" in c.acked, "setup: the client must see w1 and w2 committed"
        assert heartbeat_w1 and not pickle.loads(heartbeat_w1[0][4])["entries"], "setup: expected a heartbeat"
        f_log_before = c.log_of(f)
        for m in ae_w1 if stale == "duplicate" else heartbeat_w1:
            net.deliver(m)  # the stale message finally reaches F
        c.tick()
        f_log_after = c.log_of(f)

        # L crashes; G comes back; F and G must elect a leader and carry on.
        c.crash(lead)
        net.blocked.discard(g)
        net.hold = False
        net.drop_all()
        assert c.run(5.0, until=lambda: c.leader() is not None)
        c.submit(c.leader(), "after")
        c.run(1.0, until=lambda: all("after" in c.nodes[n].applied for n in (f, g)))
        return {
            "acked": dict(c.acked),
            "f_log_before": f_log_before,
            "f_log_after": f_log_after,
            "applied": {n: list(c.nodes[n].applied) for n in (f, g)},
        }


@pytest.mark.parametrize("stale", ["duplicate", "heartbeat"])
def test_stock_pysyncobj_loses_acknowledged_write(stale: str) -> None:
    """The bug exists: on stock pysyncobj an acknowledged, committed write disappears."""
    r = run_truncation_scenario(safe=False, stale=stale)
    assert "w2" in r["acked"]
    assert len(r["f_log_after"]) < len(r["f_log_before"]), "stock F should have truncated its log"
    for n, applied in r["applied"].items():
        assert "w2" not in applied, f"stock replica {n} unexpectedly kept w2"
        assert "w1" in applied


@pytest.mark.parametrize("stale", ["duplicate", "heartbeat"])
def test_safe_sync_obj_keeps_acknowledged_write(stale: str) -> None:
    """Same script on SafeSyncObj: the stale message is harmless and w2 survives the leader's crash."""
    r = run_truncation_scenario(safe=True, stale=stale)
    assert "w2" in r["acked"]
    assert r["f_log_after"] == r["f_log_before"]
    for applied in r["applied"].values():
        assert applied.count("w2") == 1 and applied.index("w1") < applied.index("w2")


def test_conflicting_suffix_is_truncated_but_never_committed_entries() -> None:
    """Raft §5.3 positive and negative space on one follower: a real conflict above the commit index is
    replaced; a 'conflict' at or below the commit index is refused (no ack, log unchanged)."""
    net = SimNet(random.Random(3))
    with sim_clock(net, 3):
        c = Cluster(net, safe=True)
        net.hold = True
        f = c.nodes[1]
        log = f._SyncObj__raftLog
        term = 5

        def ae(prev_idx: int, prev_term: int, entries: list[tuple[bytes, int, int]], commit: int) -> None:
            msg = {"type": "append_entries", "term": term, "commit_index": commit, "entries": entries,
                   "prevLogIdx": prev_idx, "prevLogTerm": prev_term}
            net.deliver((net.now, 0, 2, 1, pickle.dumps(msg)))
            f.doTick(0.0)

        noop = b"\x01"
        ae(1, 0, [(noop, 2, 4), (noop, 3, 4), (noop, 4, 4)], commit=2)
        assert [(e[1], e[2]) for e in log[:]] == [(1, 0), (2, 4), (3, 4), (4, 4)]
        assert f.raftCommitIndex == 2
        acks = [pickle.loads(m[4]) for m in net.take(1, 2, "next_node_idx")]
        assert acks[-1]["success"] and acks[-1]["next_node_idx"] == 5

        # Entry 3 conflicts (term 5 vs 4) above commit index 2: truncate from 3, append.
        ae(2, 4, [(noop, 3, 5)], commit=2)
        assert [(e[1], e[2]) for e in log[:]] == [(1, 0), (2, 4), (3, 5)]
        acks = [pickle.loads(m[4]) for m in net.take(1, 2, "next_node_idx")]
        assert acks[-1]["success"] and acks[-1]["next_node_idx"] == 4

        # A message that would replace committed entry 2: refused, nothing changes, no ack.
        ae(1, 0, [(noop, 2, 5)], commit=2)
        assert [(e[1], e[2]) for e in log[:]] == [(1, 0), (2, 4), (3, 5)]
        assert net.take(1, 2, "next_node_idx") == []

        # Heartbeat whose prefix matches up to 2 only: commit may not pass 2 even if the leader says 3,
        # because our entry 3 has not been verified against this leader.
        ae(2, 4, [], commit=3)
        assert f.raftCommitIndex == 2


def test_a_deposed_leaders_uncommitted_tail_is_replaced_when_the_new_leader_is_far_ahead() -> None:
    """Found by the harness (txn / partition): a leader cut off with entries it could not commit came back to
    a new leader that had written more than one AppendEntries' worth since. The new leader pipelines: each
    send moves nextIndex past what it sent. The returning follower rejects the first message on the
    conflicting term (hint: the entry before) and every later one as beyond its log (hint: its last index +
    1); taken in turn, the later hints put nextIndex back above the conflict, the leader sent the same
    messages again, and the follower never caught up (its commit index stayed where it was cut off)."""
    net = SimNet(random.Random(5))
    with sim_clock(net, 5):
        c = Cluster(net, safe=True)
        assert c.run(3.0, until=lambda: c.leader() is not None)
        old = c.leader()
        assert old is not None
        c.submit(old, "committed")
        assert c.run(1.0, until=lambda: all("committed" in c.nodes[n].applied for n in NODE_IDS))
        net.blocked.add(old)
        for i in range(5):
            c.submit(old, f"lost{i}")  # appended by the cut-off leader only: never committed
        c.tick()
        assert c.run(5.0, until=lambda: c.leader() not in (None, old))
        new = c.leader()
        big = "x" * 2000  # ~70 entries per AppendEntries (64 KiB batches): 300 need several
        for i in range(300):
            c.submit(new, f"new{i}-{big}")
            if i % 20 == 19:
                c.tick()
        other = next(n for n in NODE_IDS if n not in (old, new))
        assert c.run(5.0, until=lambda: sum(a.startswith("new") for a in c.nodes[other].applied) == 300)
        net.blocked.discard(old)
        assert c.run(10.0, until=lambda: c.log_of(old) == c.log_of(new)), (
            f"the returning replica is stuck at {c.log_of(old)[-1]}, the leader is at {c.log_of(new)[-1]}")
        assert c.run(2.0, until=lambda: c.nodes[old].applied == c.nodes[new].applied)
        assert not any(a.startswith("lost") for a in c.nodes[old].applied)


def test_a_rejection_never_leaves_next_index_above_a_conflict_nor_at_or_below_match_index() -> None:
    """The leader's rule for rejections (``reset``), on crafted replies in its term:

    - a rejection of an AppendEntries whose prevLogIdx is at or below matchIndex is stale: ignored;
    - otherwise nextIndex becomes the hint, if lower, but never at or below matchIndex: a follower's hint skips
      its whole conflicting term, which may reach below what it already acknowledged in this term (its entries
      there are the leader's own), and a hint at or below matchIndex would otherwise be taken for a stale
      reply and ignored, leaving nextIndex above the conflict forever;
    - a later rejection with a higher hint (a message the leader pipelined before the first was refused)
      does not raise it again."""
    net = SimNet(random.Random(9))
    with sim_clock(net, 9):
        c = Cluster(net, safe=True)
        assert c.run(3.0, until=lambda: c.leader() is not None)
        lead = c.leader()
        for i in range(8):
            c.submit(lead, f"w{i}")
        assert c.run(2.0, until=lambda: len(c.acked) == 8)
        node = c.nodes[lead]
        f = next(n for n in NODE_IDS if n != lead)
        fnode = next(n for n in node.otherNodes if n.id == f)
        last = node._SyncObj__raftLog[-1][1]
        match, nxt = node._SyncObj__raftMatchIndex, node._SyncObj__raftNextIndex
        net.hold = True

        def reject(hint: int, prev: int) -> None:
            node._SyncObj__onMessageReceived(fnode, {
                "type": "next_node_idx", "next_node_idx": hint, "reset": True, "success": False,
                raftfix.TERM_KEY: node.raftCurrentTerm, raftfix.REJECTED_KEY: prev})

        match[fnode], nxt[fnode] = 5, last + 1
        reject(hint=4, prev=5)  # prevLogIdx 5 <= matchIndex: stale
        assert nxt[fnode] == last + 1
        reject(hint=3, prev=7)  # a term-skip hint below matchIndex: resend from matchIndex + 1
        assert nxt[fnode] == 6
        reject(hint=last + 1, prev=last)  # pipelined before: refused as beyond the follower's log
        assert nxt[fnode] == 6
        reject(hint=7, prev=8)
        assert nxt[fnode] == 6


def test_a_follower_hints_the_first_entry_of_its_conflicting_term_above_its_commit_index() -> None:
    net = SimNet(random.Random(3))
    with sim_clock(net, 3):
        c = Cluster(net, safe=True)
        net.hold = True
        f = c.nodes[1]
        noop = b"\x01"

        def ae(prev_idx: int, prev_term: int, entries: list[tuple[bytes, int, int]], commit: int) -> dict:
            msg = {"type": "append_entries", "term": 5, "commit_index": commit, "entries": entries,
                   "prevLogIdx": prev_idx, "prevLogTerm": prev_term}
            net.deliver((net.now, 0, 2, 1, pickle.dumps(msg)))
            f.doTick(0.0)
            return pickle.loads(net.take(1, 2, "next_node_idx")[-1][4])

        # entries 2..3 of term 2, 4..8 of term 3; commit index 2
        ae(1, 0, [(noop, 2, 2), (noop, 3, 2)] + [(noop, i, 3) for i in range(4, 9)], commit=2)
        reply = ae(7, 4, [], commit=2)  # the leader has term 4 at 7: skip back over term 3, to 4
        assert reply["reset"] and reply["next_node_idx"] == 4 and reply[raftfix.REJECTED_KEY] == 7
        reply = ae(3, 4, [], commit=2)  # term 2 at 3, committed up to 2: the hint stops at 3
        assert reply["reset"] and reply["next_node_idx"] == 3
        reply = ae(12, 4, [], commit=2)  # beyond our log: our last index + 1
        assert reply["reset"] and reply["next_node_idx"] == 9 and reply[raftfix.REJECTED_KEY] == 12


class SnapshotReplica(_AppliedLog, SafeSyncObj):
    """State set *after* SyncObj.__init__ is what pysyncobj puts in snapshots."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.applied = []


def _compacted_while_away(c: Cluster) -> tuple[int, int]:
    """Elect a leader, cut a follower off, write 30 entries and compact the leader's log past them:
    the follower can only catch up by snapshot (still cut off on return). Returns (leader, follower)."""
    assert c.run(3.0, until=lambda: c.leader() is not None)
    c.run(0.2)
    lead = c.leader()
    assert lead is not None
    f = next(n for n in NODE_IDS if n != lead)
    c.net.blocked.add(f)
    for i in range(30):
        c.submit(lead, f"s{i}")
    assert c.run(2.0, until=lambda: len(c.acked) == 30)
    c.nodes[lead].forceLogCompaction()
    c.run(0.2)
    return lead, f


def test_snapshot_install_and_stale_snapshot_ignored() -> None:
    """A follower that missed compacted entries catches up by snapshot (chunked path kept working); replaying
    that snapshot later, when the follower knows more is committed, changes nothing."""
    net = SimNet(random.Random(5))
    with sim_clock(net, 5):
        c = Cluster(net, safe=True, safe_cls=SnapshotReplica)
        lead, f = _compacted_while_away(c)
        assert c.nodes[lead]._SyncObj__raftLog[0][1] > 2, "setup: leader must have compacted"

        snapshots: list[tuple[float, int, int, int, bytes]] = []
        inner_send = net.send

        def tap(src: int, dst: int, message: Any) -> None:
            if dst == f and message.get("serialized") is not None:
                snapshots.append((0.0, 0, src, dst, pickle.dumps(message)))
            inner_send(src, dst, message)

        net.send = tap  # type: ignore[method-assign]
        net.blocked.discard(f)
        assert c.run(3.0, until=lambda: c.nodes[f].applied == c.nodes[lead].applied)
        assert snapshots, "setup: the follower must have been sent a snapshot"
        for i in range(5):
            c.submit(lead, f"t{i}")
        assert c.run(2.0, until=lambda: len(c.acked) == 35 and c.nodes[f].applied == c.nodes[lead].applied)
        before = (list(c.nodes[f].applied), c.log_of(f))
        for m in snapshots:
            net.deliver(m)
        c.tick()
        assert (c.nodes[f].applied, c.log_of(f)) == before


class _HeldSerializer:
    """The leader's serializer, holding every chunk back while ``held`` (as ``ShardSnapshots`` does while the
    follower's connection has a backlog); counts how often it was asked."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.held, self.asked = inner, True, 0

    def getTransmissionData(self, node: Any) -> Any:  # noqa: N802 - pysyncobj's name
        self.asked += 1
        assert self.asked < 1_000, "asked again and again for a chunk it holds back"
        return None if self.held else self.inner.getTransmissionData(node)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_held_back_snapshot_chunk_ends_the_send_and_the_transfer_resumes() -> None:
    """While the serializer holds chunks back, one send to the lagging follower is one heartbeat (stock asked
    again and sent a heartbeat per answer until its time budget ran out, which a frozen clock never does); then
    the transfer goes on and the follower catches up."""
    net = SimNet(random.Random(5))
    with sim_clock(net, 5):
        c = Cluster(net, safe=True, safe_cls=SnapshotReplica)
        lead, f = _compacted_while_away(c)
        leader = c.nodes[lead]
        serializer = _HeldSerializer(leader._SyncObj__serializer)
        leader._SyncObj__serializer = serializer
        net.blocked.discard(f)
        # f rejects what it is sent next (it lacks the prefix); the leader then finds f below its log: a snapshot
        assert c.run(1.0, until=lambda: leader._SyncObj__raftNextIndex[Node(f)] <= leader._SyncObj__raftLog[0][1])
        serializer.asked = 0
        sent: list[Any] = []
        inner_send = net.send

        def tap(src: int, dst: int, message: Any) -> None:
            if src == lead and dst == f:
                sent.append(message)
            inner_send(src, dst, message)

        net.send = tap  # type: ignore[method-assign]
        leader._SyncObj__sendAppendEntries()
        assert serializer.asked == 1 and [m.get("serialized", "?") for m in sent] == [None]
        serializer.held = False
        assert c.run(3.0, until=lambda: c.nodes[f].applied == leader.applied)


# --------------------------------------------------------------------------------------------------------------
# 2. Durability: flush ordering and group commit
# --------------------------------------------------------------------------------------------------------------


def run_flush_ordering(durable: bool, commands: int = 60) -> Cluster:
    net = SimNet(random.Random(11), Faults(delay_max_s=0.004))
    with sim_clock(net, 11):
        c = Cluster(net, safe=True, durable=durable)
        assert c.run(3.0, until=lambda: c.leader() is not None)
        c.run(0.2)  # followers learn the leader (commandsWaitLeader=False would fail their commands)
        lead = c.leader()
        for i in range(commands):
            c.submit(lead if i % 3 else NODE_IDS[(i // 3) % 3], f"cmd{i}")  # some via followers
            if i % 10 == 9:
                c.tick()  # bursts of several commands per tick exercise group commit
        c.run(2.0, until=lambda: len(c.acked) == commands)
        return c


def test_acks_and_leader_commit_follow_flush() -> None:
    """Every success ack for index i leaves after a flush covering i; the leader commits i only after its own
    flush covered i; and flushes are grouped (fewer flushes than entries)."""
    c = run_flush_ordering(durable=True)
    assert len(c.acked) == 60
    assert c.ack_violations == []
    journals = [c.net.transports[n].journal for n in NODE_IDS]  # type: ignore[attr-defined]
    assert all(j.violations == [] for j in journals)
    entries = len(journals[0].mem)
    assert all(0 < j.flushes < entries for j in journals), [(j.flushes, entries) for j in journals]
    assert all(c.nodes[n].flushStats().count == j.flushes for n, j in zip(NODE_IDS, journals, strict=True))


def test_flush_ordering_check_detects_non_durable_acks() -> None:
    """Negative control: with durable=False the same checks fire, so the test above has teeth."""
    c = run_flush_ordering(durable=False)
    journals = [c.net.transports[n].journal for n in NODE_IDS]  # type: ignore[attr-defined]
    assert c.ack_violations and any(j.violations for j in journals)


def test_durable_file_journal_flush(tmp_path: Any) -> None:
    """DurableFileJournal tracks unflushed writes and survives reopen; the commit index is clamped."""
    path = str(tmp_path / "j.log")
    j = raftfix.DurableFileJournal(path)
    assert not j.needs_flush
    for i in range(1, 2000):  # enough to force mmap resizes
        j.add(b"x" * 50, i, 1)
    assert j.needs_flush
    j.flush()
    assert not j.needs_flush
    j.setRaftCommitIndex(5000)
    j.setCurrentTerm(3, "b")
    j.onOneSecondTimer()
    j._destroy()
    k = raftfix.DurableFileJournal(path)
    assert len(k) == 1999 and k[-1][1] == 1999
    assert k.getRaftCommitIndex() == 1999 and k.getCurrentTerm() == 3 and k.getVotedForNodeId() == "b"
    k._destroy()


def test_version_guard_and_tuned_conf() -> None:
    assert raftfix.SUPPORTED_PYSYNCOBJ_VERSION == "0.3.17"
    conf = raftfix.tuned_conf()
    conf.validate()
    assert conf.appendEntriesUseBatch is False and conf.leaderFallbackTimeout <= 1.0
    with pytest.raises(ValueError):
        raftfix.tuned_conf(raftMinTimeout=0.01)
    with pytest.raises(ValueError):
        SafeSyncObj("127.0.0.1:1", [], SyncObjConf(journalFile="/nonexistent/j", autoTick=False))


# --------------------------------------------------------------------------------------------------------------
# 3. Randomized stress (hypothesis): delays, drops, duplicates, reorders, restarts
# --------------------------------------------------------------------------------------------------------------


class FaultSchedule:
    """Seeded crash-restarts and partitions for the stress tests: at most one node down and one cut off at a
    time, each for a random number of steps."""

    def __init__(self, rng: random.Random, p_crash: float, p_cut: float, down_steps_max: int = 120,
                 cut_steps_max: int = 200) -> None:
        self.rng, self.p_crash, self.p_cut = rng, p_crash, p_cut
        self.down_steps_max, self.cut_steps_max = down_steps_max, cut_steps_max
        self.down: dict[int, int] = {}  # node -> steps until restart
        self.cut: dict[int, int] = {}  # node -> steps until it reconnects

    def step(self, c: Cluster, crash_pool: tuple[int, ...] | list[int], cut_pool: tuple[int, ...],
             restart: Callable[[int], None]) -> None:
        rng = self.rng
        if not self.down and crash_pool and rng.random() < self.p_crash:
            victim = rng.choice(crash_pool)
            c.crash(victim)
            self.down[victim] = rng.randint(5, self.down_steps_max)
        if not self.cut and rng.random() < self.p_cut:
            victim = rng.choice(cut_pool)
            c.net.blocked.add(victim)
            self.cut[victim] = rng.randint(5, self.cut_steps_max)
        for n in list(self.down):
            self.down[n] -= 1
            if self.down[n] <= 0:
                del self.down[n]
                restart(n)
        for n in list(self.cut):
            self.cut[n] -= 1
            if self.cut[n] <= 0:
                del self.cut[n]
                c.net.blocked.discard(n)


@contextlib.contextmanager
def replay_hint(what: str, env: str, seed: int, path: str) -> Iterator[None]:
    """Print how to replay ``seed`` if the block fails."""
    try:
        yield
    except AssertionError:
        print(f"\n{what} stress failure; replay with: {env}={seed} pytest {path} -k replay")
        raise


def run_stress(seed: int, safe: bool = True, fault_s: float = 4.0) -> None:
    """One seeded run; raises AssertionError naming the seed if a safety property fails.

    Properties: every pair of replicas' applied sequences are prefixes of one another (no divergence), and
    every command a client saw succeed is applied exactly once (no loss, no double apply).
    """
    rng = random.Random(seed)
    faults = Faults(drop=rng.uniform(0, 0.15), dup=rng.uniform(0, 0.3), delay_max_s=rng.uniform(0, 0.06))
    net = SimNet(random.Random(seed + 1), faults)
    with sim_clock(net, seed):
        c = Cluster(net, safe=safe, batch=rng.random() < 0.25)
        faults_sched = FaultSchedule(rng, rng.uniform(0, 0.02), rng.uniform(0, 0.02))
        cid = 0
        for _step in range(int(fault_s / 0.005)):
            if rng.random() < 0.3 and c.nodes:
                cid += 1
                c.submit(rng.choice(sorted(c.nodes)), f"c{cid}")
            faults_sched.step(c, NODE_IDS, NODE_IDS, c.start)
            c.tick()
            check_prefixes(c, seed)
        # Heal and converge: everyone up, no faults, then one more command to commit the final term.
        for n in list(faults_sched.down):
            c.start(n)
        net.blocked.clear()
        net.faults = Faults()
        converged = False
        for attempt in range(10):  # a leader found now may be deposed before "final" commits: retry
            if not c.run(2.0, until=lambda: c.leader() is not None):
                continue
            c.submit(c.leader(), f"final{attempt}")
            converged = c.run(1.0, until=lambda a=attempt: all(f"final{a}" in node.applied
                                                               for node in c.nodes.values()))
            if converged:
                break
        check_prefixes(c, seed)
        longest = max((node.applied for node in c.nodes.values()), key=len)
        for cmd in c.acked:
            assert longest.count(cmd) == 1, f"seed {seed}: acknowledged {cmd} applied {longest.count(cmd)} times"
        assert converged, f"seed {seed}: replicas did not converge after healing"


def check_prefixes(c: Cluster, seed: int) -> None:
    seqs = [node.applied for node in c.nodes.values()]
    for a in seqs:
        for b in seqs:
            short, long_ = (a, b) if len(a) <= len(b) else (b, a)
            assert long_[: len(short)] == short, f"seed {seed}: applied sequences diverged"


@settings(max_examples=int(os.environ.get("RAFTFIX_EXAMPLES", examples(150))), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_stress_random_faults(seed: int) -> None:
    with replay_hint("raftfix", "RAFTFIX_SEED", seed, "tests/test_raftfix.py"):
        run_stress(seed)


def test_replay_seed() -> None:
    """Replay one run: ``RAFTFIX_SEED=<seed>`` (add ``RAFTFIX_STOCK=1`` for stock); default: a fixed seed."""
    run_stress(int(os.environ.get("RAFTFIX_SEED", "5")), safe=os.environ.get("RAFTFIX_STOCK") is None)


def test_stress_finds_divergence_on_stock() -> None:
    """The stress harness has teeth: the same fault schedules break stock pysyncobj (run with the stock
    journal made crash-safe, so that every failure is the protocol's, not a lost page cache).
    One failing seed is the proof, so the search stops there (seed 5 today: 6 runs, not 40)."""
    for seed in range(40):
        try:
            run_stress(seed, safe=False)
        except AssertionError:
            return
    pytest.fail("expected stock pysyncobj to diverge or lose acknowledged commands on some seed of 0-39")

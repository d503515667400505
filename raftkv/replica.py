"""One replica of one shard: a pysyncobj Raft group member wrapping ``KVState``.

This is the only module (with ``raftkv.raftfix``) that knows pysyncobj.  It
turns pysyncobj's callback outcomes into three kinds the rest of raftkv uses:
``applied`` (the entry committed and this is its result), ``not applied``
(definitely never took effect: safe to retry anywhere) and ``unknown`` (may or
may not take effect: only a de-duplicated retry is safe).

Concurrency contract: ``propose`` may be called from any thread; the callback
it takes runs on the replica's tick thread and must not block.  ``state`` is
mutated only on the tick thread, so reading it from elsewhere is a stale read
by definition (used only for explicitly stale GETs and for status).  Built with
a ``driver`` (``raftkv.driver``), the tick thread is the node's one driver thread,
shared by every replica of the node.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from pysyncobj import FAIL_REASON, replicated

from raftkv.driver import RaftDriver
from raftkv.engine import ENGINE_DIR, Engine
from raftkv.logclock import LogClock
from raftkv.raftfix import SafeSyncObj, tuned_conf
from raftkv.raftlog import EngineJournal
from raftkv.raftnet import MuxTransport
from raftkv.snapshot import ShardSnapshots
from raftkv.state import KVState

log = logging.getLogger("raftkv.replica")

#: An entry whose commands (or a batch of reads) take longer than this to run is logged (``log_if_slow``).
SLOW_APPLY_S = 0.05


def log_if_slow(event: str, shard: int, seconds: float, cmds: list, cpu_s: float | None = None) -> None:
    """Log ``event`` (``slow_apply``, ``slow_read``) if running ``cmds`` on the driver thread took longer than
    ``SLOW_APPLY_S``: for that long, no group of the node sent heartbeats. Names the commands and their counts,
    and (``cpu_s``, the thread's CPU time meanwhile) how much of it was spent computing rather than waiting for
    the GIL or the disk."""
    if seconds > SLOW_APPLY_S:
        names = collections.Counter(c[0] if isinstance(c, tuple) and c else "?" for c in cmds)
        log.warning("event=%s shard=%s ms=%.0f%s cmds=%s", event, shard, seconds * 1000,
                    "" if cpu_s is None else f" cpu_ms={cpu_s * 1000:.0f}",
                    ",".join(f"{n}x{k}" for n, k in names.most_common(4)))


APPLIED = "applied"
NOT_APPLIED = "not_applied"
UNKNOWN = "unknown"

# Definitely-not-applied failures: the entry never entered a log that could commit it.
_NOT_APPLIED = {
    FAIL_REASON.QUEUE_FULL,
    FAIL_REASON.MISSING_LEADER,
    FAIL_REASON.NOT_LEADER,
    FAIL_REASON.DISCARDED,
    FAIL_REASON.REQUEST_DENIED,
}

SNAPSHOT_CHUNK_BYTES = 1 << 20  # a snapshot streams to a follower in chunks of this size
COMPACT_EVERY_CMDS = 10_000  # default; 'raftkv serve --compact-every' sets it per node (a checkpoint writes the keys changed since the last: smaller is a shorter stall)

Outcome = Callable[[str, Any], None]


class ShardReplica(SafeSyncObj):
    """A member of shard ``shard``'s Raft group hosting a ``KVState``."""

    def __init__(
        self,
        shard: int,
        self_addr: str,
        peer_addrs: list[str],
        data_dir: str,
        on_role_change: Callable[[int, int, int], None] | None = None,
        conf_overrides: dict | None = None,
        compact_every_cmds: int | None = None,
        engine: Engine | None = None,
        on_applied: Callable[[int], None] | None = None,
        driver: RaftDriver | None = None,
        unsafe_skip_locks: bool = False,
        incarnation: int = 0,
    ) -> None:
        os.makedirs(data_dir, exist_ok=True)
        # The log and hard state live in the node's engine (one commit per flush for all its groups); a replica
        # made on its own (tests, tools) opens a private one in its data dir and closes it in destroy().
        self._own_engine = engine is None
        self.engine = engine if engine is not None else Engine(os.path.join(data_dir, ENGINE_DIR))
        self.shard = shard
        self.incarnation = incarnation  # ShardMap.born: which group of this shard id (frames tagged with it)
        self.compact_every_cmds = compact_every_cmds or COMPACT_EVERY_CMDS
        # The replicas of a group apply the same entries: with one interval they all began a checkpoint at the
        # same entry. A checkpoint holds its node's one engine writer (0.8 s for 10,000 keys of 4 KiB), and
        # meanwhile none of them could make an entry durable: the group could not commit, its leader lost its
        # majority, and every other group on those nodes waited too. So the i-th of n members (by id) takes its
        # first checkpoint after (i + 1) / n of the interval, then one every interval: a third of an interval
        # apart in a group of 3, one replica checkpoints while the other two still form a majority.
        self._compact_at = first_checkpoint(self.compact_every_cmds, self_addr, peer_addrs)
        self.log_clock = LogClock()
        self._cmds_since_compaction = 0
        self._on_role_change = on_role_change
        self._on_applied = on_applied
        base = os.path.join(data_dir, f"shard-{shard}")
        conf = tuned_conf(
            journalFile=base + ".journal",
            fullDumpFile=base + ".snapshot",
            serializer=_replaced,  # non-None: pysyncobj then leaves the state to us (ShardSnapshots below)
            deserializer=_replaced,
            onStateChanged=self._state_changed,
            **(conf_overrides or {}),
        )
        # Checkpoints, restarts and snapshot transfers go through the engine (raftkv.snapshot); the data is
        # read from the engine, with the writes since the last checkpoint in memory (raftkv.kvstore).
        self.snapshots = ShardSnapshots(self.engine, shard, base + ".snapshot",
                                        max(conf.logCompactionBatchSize, SNAPSHOT_CHUNK_BYTES),
                                        lambda: self.state, self._set_state, background=driver is not None)
        # DANGEROUS, testing only (raftkv.state's module doc): one-shard writes ignore transactions' locks
        self.unsafe_skip_locks = unsafe_skip_locks
        self.state = self.snapshots.open_state()
        self.state.unsafe_skip_locks = unsafe_skip_locks
        self._driver = driver
        self._tick_actions: collections.deque[Callable[[], None]] = collections.deque()
        def journal(path: str) -> EngineJournal:
            return EngineJournal.open(self.engine, shard, legacy_journal=path, defer_term=driver is not None)

        if driver is None:  # stand-alone: pysyncobj's own tick thread, port and TCP connections
            super().__init__(self_addr, peer_addrs, conf, journalFactory=journal)
        else:
            # One of many groups on the node's driver: no thread, port or flush of its own (raftkv.driver).
            conf.autoTick = False
            conf.password = None  # the network authenticates and encrypts every group's frames
            transport = driver.network.transport_class(shard, incarnation)
            super().__init__(self_addr, peer_addrs, conf, transportClass=transport, keepalive=False,
                             deferFlush=True, wake=lambda: driver.wake(shard), journalFactory=journal)
            self.snapshots.unsent = self.mux_transport().unsent  # paces a snapshot to what the socket takes
        self._SyncObj__serializer = self.snapshots  # before the first tick, which loads the checkpoint
        self.addOnTickCallback(self._run_tick_actions)

    def _set_state(self, state: KVState) -> None:
        state.unsafe_skip_locks = self.unsafe_skip_locks  # a node setting: a snapshot does not carry it
        self.state = state

    def _doDestroy(self) -> None:  # noqa: N802 - pysyncobj's name; runs last, on the tick thread
        super()._doDestroy()
        self.snapshots.close()
        if self._own_engine:
            self.engine.close()

    # -- replicated: runs on every replica, in log order -----------------------
    @replicated
    def apply_entry(self, cmds: list, now_ms: int) -> list:
        """One Raft entry = a batch of state-machine commands (see raftkv.state)."""
        # pysyncobj compacts every 5,000 entries, but an entry can carry thousands of
        # commands (batching): also compact by commands, so the log kept in memory
        # and in the journal stays bounded.  A local decision, not replicated state.
        # A one-shard transaction (a bulk load's batch) is one command writing hundreds of keys, which wait in
        # memory until the next checkpoint: count the keys written as well, so memory stays bounded.
        self._cmds_since_compaction += len(cmds)
        written = getattr(self.state.data, "written", None)
        work = max(self._cmds_since_compaction, written() if written is not None else 0)
        due = work >= self._compact_at
        # A follower that is down or far behind would hold the log (and the writes since the last checkpoint,
        # in memory) back forever: past 4 thresholds, checkpoint anyway; it catches up from the snapshot.
        if due and (self._followers_caught_up() or work >= 4 * self.compact_every_cmds):
            self._cmds_since_compaction = 0
            self._compact_at = self.compact_every_cmds
            self.forceLogCompaction()
        t0, c0 = time.perf_counter(), time.thread_time()
        results = self.state.apply_batch(cmds, now_ms)
        log_if_slow("slow_apply", self.shard, time.perf_counter() - t0, cmds, time.thread_time() - c0)
        if self._on_applied is not None:
            self._on_applied(self.shard)  # wakes long-polling watchers (raftkv.server.feed); must not block
        return results

    def _followers_caught_up(self) -> bool:
        """On a leader: every follower holds the log up to what this replica applied.

        A compaction cuts the log at the applied index; a follower behind it then
        needs the whole snapshot sent, so a leader waits for its followers first.
        """
        if not self.is_leader():
            return True
        st = self.getStatus()
        applied = st["last_applied"]
        return all((st.get(f"match_idx_server_{n.id}") or 0) >= applied for n in self.otherNodes)

    def log_now_ms(self) -> int:
        """Log time now, as this replica would stamp an entry (``raftkv.logclock``); any thread."""
        return self.log_clock.now_ms(self.raftCurrentTerm, int(time.monotonic() * 1000), self.state.log_ms)

    def propose(self, cmds: list, now_ms: int, done: Outcome) -> None:
        """Append ``cmds`` as one entry; ``done(kind, results_or_reason)`` on the tick thread."""

        def callback(result: Any, err: int) -> None:
            if err == FAIL_REASON.SUCCESS:
                done(APPLIED, result)
            elif err in _NOT_APPLIED:
                done(NOT_APPLIED, _reason(err))
            else:  # LEADER_CHANGED, UNKNOWN_OUTCOME: the entry may still commit
                done(UNKNOWN, _reason(err))

        self.apply_entry(cmds, now_ms, callback=callback)

    # -- ReadIndex read barrier (raftfix.SafeSyncObj.readIndex) -----------------
    def read_barrier(self, done: Callable[[bool, str], None]) -> None:
        """Linearizable read without a log entry: ``done(ok, reason)`` runs on the tick thread.

        ``ok=True``: a majority confirmed this replica's leadership after the call and every entry up to the
        read index is applied, so ``self.state``, read *inside* ``done``, reflects every write acknowledged
        before the call.  ``ok=False`` (NOT_LEADER, LEADER_CHANGED, MISSING_LEADER): the read did not happen;
        retry here or at the leader.  May be called from any thread; ``done`` must not block.
        """

        def callback(_index: Any, err: int) -> None:
            done(err == FAIL_REASON.SUCCESS, _reason(err))

        self.readIndex(callback)

    # -- leadership, as this replica believes it (never proof of leadership) ----
    def is_leader(self) -> bool:
        return self._isLeader()

    def leader_addr(self) -> str | None:
        leader = self._getLeader()
        return None if leader is None else leader.id

    def term(self) -> int:
        return self.raftCurrentTerm

    def self_addr(self) -> str:
        return self.selfNode.id

    def member_addrs(self) -> list[str]:
        """Every member's Raft address, this replica's included (racy read; for status and planning)."""
        return sorted({n.id for n in self.otherNodes} | {self.selfNode.id})

    def applied_member_addrs(self) -> set[str]:
        """The members as of the last applied entry: a change still uncommitted is not in it (tick thread)."""
        return self.appliedMembers()

    def peer_connected(self, addr: str) -> bool:
        """Whether the Raft link to member ``addr`` is up (racy read)."""
        return any(n.id == addr and self.isNodeConnected(n) for n in self.otherNodes)

    def leader_reachable(self) -> bool:
        """This replica is the leader, or its Raft link to the leader is up."""
        leader = self._getLeader()
        return leader is not None and (leader.id == self.selfNode.id or self.isNodeConnected(leader))

    @property
    def snapshot_file(self) -> str:
        return self.conf.fullDumpFile

    def change_members(self, action: str, addr: str, done: Callable[[bool, str], None]) -> None:
        """``add`` or ``remove`` member ``addr`` (one at a time); call from the tick thread.

        ``done(ok, reason)`` runs once the change committed (ok) or was refused.
        """

        def cb(_res: Any, err: int) -> None:
            done(err == FAIL_REASON.SUCCESS, _reason(err))

        if action == "add":
            self.addNodeToCluster(addr, callback=cb)
        else:
            self.removeNodeFromCluster(addr, callback=cb)

    def transfer_leadership(self, target_addr: str | None, done: Callable[[bool, str], None]) -> None:
        """Ask this leader to hand over to ``target_addr`` (best effort; None = most caught-up peer).

        pysyncobj's ``transferLeadership`` touches Raft state, so it runs on the tick thread.
        """

        def cb(_res: Any, err: int) -> None:
            done(err == FAIL_REASON.SUCCESS, _reason(err))

        self.on_tick_thread(lambda: self.transferLeadership(target_addr, callback=cb))

    def on_tick_thread(self, action: Callable[[], None]) -> None:
        """Run ``action`` once on the tick thread (where Raft state may be touched)."""
        self._tick_actions.append(action)
        if self._driver is not None:
            self._driver.wake(self.shard)

    # -- a group of the node's driver (raftkv.driver.Group) ----------------------
    @property
    def group_id(self) -> int:
        return self.shard

    def mux_transport(self) -> MuxTransport:
        transport = self.raftTransport()
        assert isinstance(transport, MuxTransport), "built without a driver"
        return transport

    def destroy(self) -> None:
        """Stop this replica: on its driver's thread when it has one (its state is touched only there)."""
        if self._driver is not None:
            self._driver.remove(self)
        else:
            super().destroy()

    def destroy_now(self) -> None:
        """Destroy on the calling thread: the driver's, or any once the driver has stopped."""
        SafeSyncObj.destroy(self)

    def tick_thread_alive(self) -> bool:
        """Whatever ticks this replica is running: its own thread, or the node's driver."""
        return self._driver.alive() if self._driver is not None else super().tick_thread_alive()

    def _run_tick_actions(self) -> None:
        # Registered once: pysyncobj holds a non-reentrant lock while it calls tick
        # callbacks, so a callback must never add or remove callbacks itself.
        while self._tick_actions:
            self._tick_actions.popleft()()
        self.snapshots.tidy()  # a slice of an old generation's keys, if an install left one

    def status(self) -> dict:
        """pysyncobj's status plus ours; safe to call from any thread (racy reads)."""
        st = self.getStatus()
        st["shard"] = self.shard
        st["keys"] = len(self.state)
        st["revision"] = self.state.revision
        return st

    def _state_changed(self, old: int, new: int) -> None:
        log.info("event=role_change shard=%d old=%s new=%s term=%s", self.shard, _ROLE[old], _ROLE[new],
                 self.raftCurrentTerm)
        if self._on_role_change is not None:
            self._on_role_change(self.shard, old, new)


_ROLE = {0: "follower", 1: "candidate", 2: "leader"}


def first_checkpoint(interval: int, self_addr: str, peer_addrs: list[str]) -> int:
    """Work (commands or keys written) after which a replica takes its first checkpoint: the i-th of the group's n
    members, by id, after (i + 1) / n of ``interval``, so that the members' checkpoints fall apart."""
    members = sorted({self_addr, *peer_addrs})
    return max(1, interval * (members.index(self_addr) + 1) // len(members))


def _replaced(*_args: Any) -> None:
    raise AssertionError("ShardSnapshots replaces pysyncobj's serializer")


def _reason(err: Any) -> str:
    names = {v: k for k, v in vars(FAIL_REASON).items() if k.isupper()}
    return names.get(err, str(err))

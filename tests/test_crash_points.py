"""Crash points: a replica killed at each persistence step, or losing power, keeps every entry it acknowledged.

Same simulation as tests/test_raftfix.py (``SimNet``, fake clock, ``doTick``), but each replica runs on real files
in its own directory, through a ``CrashDisk``: the ``raftfix.Storage`` whose ``point(name)`` kills the replica at
a chosen persistence step, and whose fsyncs record what they made durable. Two journals:

* ``engine`` (what raftkv's groups use): the log and hard state in the node's LMDB ``Engine``
  (``raftkv.raftlog.EngineJournal``), plus pysyncobj's dump file for snapshots;
* ``file``: raftfix's ``DurableFileJournal`` and ``.meta`` (stand-alone ``SafeSyncObj``).

The engine journal also runs in *driver mode*, the way a node runs its groups (``raftkv.driver``): the group
is built with ``deferFlush`` and its journal with ``defer_term`` (a term/vote write waits for the loop's
commit), and whatever it sends goes to an outbox; each loop ticks, lets the leaders' AppendEntries out, runs
``_rf_sync()`` (the engine commit, then the acks) and only then lets the rest out. A kill drops the outbox.
Driver mode is *pipelined* as a node runs it (``Engine.start_committer``): ``_rf_sync()`` only requests the
commit, which completes at the start of the node's next loop (``LaggingEngine``), so acks, votes and the
leader's own count wait a loop for it (raftfix's gate) while messages keep arriving.

Two crash modes:

* ``kill`` (kill -9): the process is gone, the page cache is kept. The files stay exactly as they are.
* ``power`` (power loss): every write not covered by a completed fsync is lost. The directory is rebuilt from
  the names a directory fsync made durable, each holding the bytes its file's last fsync (or msync) covered.
  LMDB fsyncs inside its own commit, out of our ``Storage``'s sight: the engine's files come back as they were
  when its last commit completed (the disk image is taken at ``engine.commit.after``), which is what LMDB's
  copy-on-write commit promises on a disk that honours fsync. With ``metasync=False`` a commit's meta page is
  only flushed by the next commit: a commit that reached ``engine.commit.written`` only survives a power loss
  once the next one does (or a meta flush, ``engine.commit.after``), so the image then goes back one commit.

The scenario (``run_crash_scenario``): L leads, F and G follow. F is cut off while L and G commit and compact, so
F later catches up by snapshot install; then G is cut off and L commits with F alone. F is killed at the chosen
point (every n-th time it is reached) and restarted at once; each restart checks that F's log (or dump) still
holds the last entry F acknowledged. At the end L is lost for good and G comes back: F and G must elect a leader
that has every write a client saw acknowledged, and every replica's applied sequence must be a prefix of the
others'. Old behaviours are rebuilt as test subclasses and shown to fail (strict xfail).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import os
import pickle
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj import syncobj as _so
from pysyncobj.journal import FileJournal
from pysyncobj.node import Node
from pysyncobj.serializer import Serializer

from raftkv.engine import Engine
from raftkv.filejournal import DurableDumpSerializer
from raftkv.raftfix import DurableFileJournal, SafeSyncObj, Storage
from raftkv.raftlog import EngineJournal
from raftkv.replica import ShardReplica

from .test_raftfix import (
    NODE_IDS,
    Cluster,
    SimNet,
    SimTransport,
    SnapshotReplica,
    check_prefixes,
    sim_clock,
    sim_conf,
)

COMPACT_ENTRIES = 8  # pysyncobj compacts when the log holds more entries than this
ENGINE = "engine"  # the engine's directory inside a replica's directory


class Killed(BaseException):
    """The replica's process died at a crash point. A BaseException: pysyncobj's ``except Exception`` blocks
    must not swallow it (the process would not have carried on either)."""


class CrashDisk(Storage):
    """One replica's directory, with a kill switch and a model of what is durable."""

    def __init__(self, root: str) -> None:
        os.makedirs(root)
        self.root = root
        self.kill_point: str | None = None
        self.kill_every = 1  # kill at the 1st, (1+n)th, (1+2n)th... time kill_point is reached
        self.armed = False
        self.reached: collections.Counter[str] = collections.Counter()
        self.kills = 0
        self.durable_names: dict[str, int] = {}  # name -> inode, as of the last directory fsync
        self.durable_data: dict[int, bytes] = {}  # inode -> bytes, as of its last fsync/msync
        self.engine_image: dict[str, bytes] = {}  # the engine's files as a power loss would leave them
        self.written_image: dict[str, bytes] = {}  # ... as of the last commit, once its meta page is durable
        # Each inode in durable_data is held open: a deleted file's inode number is otherwise reused by a new
        # file, which a power loss would then fill with the deleted file's bytes (a file that was never
        # fsynced must come back empty). Seen: a dump restored as an old journal's pickles (1 run in 6).
        self._pinned: dict[int, int] = {}

    def fsync(self, fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            assert os.path.samefile(os.readlink(f"/proc/self/fd/{fd}"), self.root)
            self.durable_names = {name: os.stat(os.path.join(self.root, name)).st_ino
                                  for name in os.listdir(self.root) if name != ENGINE}
            return
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(" (deleted)"):
            return
        with open(path, "rb") as f:
            self.durable_data[st.st_ino] = f.read()
        if st.st_ino not in self._pinned:
            self._pinned[st.st_ino] = os.dup(fd)

    def msync(self, mapped: Any, fd: int) -> None:
        mapped.flush()
        self.fsync(fd)

    def point(self, name: str) -> None:
        if name == "engine.commit.after":
            # Every commit so far is durable: this is what a power loss leaves from now on.
            self.engine_image = self.written_image = self._image_engine()
        elif name == "engine.commit.written":
            # metasync=False: this commit's fsync made the previous commit durable, not this one.
            self.engine_image, self.written_image = self.written_image, self._image_engine()
        self.reached[name] += 1
        if self.armed and name == self.kill_point and (self.reached[name] - 1) % self.kill_every == 0:
            self.kills += 1
            raise Killed(name)

    def _image_engine(self) -> dict[str, bytes]:
        """The engine's files as of now. RocksDB's background flushes and compactions add and delete files
        while we read: copy until a copy saw no file change name, size or time, as a power loss takes the
        directory at one instant."""
        path = os.path.join(self.root, ENGINE)

        def listing() -> dict[str, tuple[int, int]]:
            out = {}
            for name in os.listdir(path):
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(os.path.join(path, name))
                    out[name] = (st.st_size, st.st_mtime_ns)
            return out

        while True:
            before = listing()
            try:
                image = {name: open(os.path.join(path, name), "rb").read() for name in before
                         if name not in ("lock.mdb", "LOCK")}
            except FileNotFoundError:
                continue
            if listing() == before:
                return image

    def power_loss(self) -> None:
        """Throw away everything no completed fsync covered."""
        engine = os.path.join(self.root, ENGINE)
        if os.path.isdir(engine):
            for name in os.listdir(engine):
                os.unlink(os.path.join(engine, name))
            for name, data in self.engine_image.items():
                with open(os.path.join(engine, name), "wb") as f:
                    f.write(data)
        for name in os.listdir(self.root):
            if name != ENGINE:
                os.unlink(os.path.join(self.root, name))
        names, data = self.durable_names, self.durable_data
        for name, ino in names.items():
            with open(os.path.join(self.root, name), "wb") as f:
                f.write(data.get(ino, b""))
        # New files get new inodes: re-key the image by them (and hold those open instead).
        self.close()
        self.durable_names = {name: os.stat(os.path.join(self.root, name)).st_ino for name in names}
        self.durable_data = {self.durable_names[name]: data.get(ino, b"") for name, ino in names.items()}
        for name, ino in self.durable_names.items():
            self._pinned[ino] = os.open(os.path.join(self.root, name), os.O_RDONLY)

    def close(self) -> None:
        """Release the inodes held open (see ``__init__``)."""
        for fd in self._pinned.values():
            os.close(fd)
        self._pinned.clear()


class LaggingEngine(Engine):
    """A pipelined engine, deterministically: a requested commit completes when the test says (``complete``),
    one driver loop later, instead of on a committer thread."""

    requested = False

    def request_commit(self) -> None:
        self.requested = True

    def complete(self) -> None:
        if self.requested:
            self.requested = False
            self.sync()


class FileCluster(Cluster):
    """``Cluster`` whose replicas run on real files through ``CrashDisk``s; a ``Killed`` replica is dropped,
    its files left as the crash mode leaves them."""

    def __init__(self, net: SimNet, root: str, mode: str, safe_cls: type[SafeSyncObj] = SnapshotReplica,
                 journal_cls: type[DurableFileJournal] | None = DurableFileJournal, driver: bool = False,
                 metasync: bool = True) -> None:
        """``journal_cls`` None: the engine journal; ``driver``: in pipelined driver mode (module doc)."""
        self.mode, self.journal_cls, self.driver, self.metasync = mode, journal_cls, driver, metasync
        self.engines: dict[int, Engine] = {}
        self.outbox: dict[int, list[tuple[Any, Any]]] = {}
        self.real_send: dict[int, Any] = {}
        self.crash_disks = {n: CrashDisk(os.path.join(root, str(n))) for n in NODE_IDS}
        self.acked_by: dict[int, tuple[int, int]] = {}  # node -> (index, term) of the newest entry it acked
        self.killed: list[int] = []
        # Pre-vote off: a replica back from a cut-off then starts real elections, so every scenario drives its
        # term/vote writes (meta.written, replace.renamed) through the crash points; pre-vote has its own tests.
        super().__init__(net, safe=True, safe_cls=safe_cls, pre_vote=False)

    def make_node(self, n: int, others: list[int], transport: SimTransport) -> Any:
        disk = self.crash_disks[n]
        conf = sim_conf_files(disk.root)
        journal_cls = self.journal_cls
        if journal_cls is None:
            engine_cls = LaggingEngine if self.driver else Engine
            engine = self.engines[n] = engine_cls(os.path.join(disk.root, ENGINE), map_size=1 << 26,
                                                  point=disk.point, metasync=self.metasync)

            def factory(path: str) -> Any:
                return EngineJournal.open(engine, 0, legacy_journal=path, defer_term=self.driver)
        else:
            def factory(path: str) -> Any:
                return journal_cls(path, disk)
        node = self.safe_cls(n, others, conf, nodeClass=Node, transport=transport, keepalive=False,
                             storage=disk, journalFactory=factory, deferFlush=self.driver, preVote=self.pre_vote)
        if self.driver:
            box = self.outbox[n] = []
            self.real_send[n] = transport.send

            def queue(dst: Node, message: Any) -> bool:
                box.append((dst, message))
                return True

            transport.send = queue  # type: ignore[method-assign]
        self._ledger(n, node, transport)
        return node

    def close_engines(self) -> None:
        """The run is over: release every engine still open (each holds descriptors and a mapping)."""
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()
        for disk in self.crash_disks.values():
            disk.close()

    def _release(self, n: int, early: bool) -> None:
        """Let ``n``'s queued messages out: only leaders' AppendEntries if ``early``, else all of them."""
        box, send = self.outbox.get(n), self.real_send.get(n)
        if box is None or send is None:
            return
        keep = []
        for dst, message in box:
            if early and message.get("type") != "append_entries":
                keep.append((dst, message))
            else:
                send(dst, message)
        box[:] = keep

    def _loop(self, n: int, node: Any) -> None:
        """One driver loop of node ``n`` (its received messages were delivered before): tick, AppendEntries out,
        the engine commit and the acks (``_rf_sync``), then everything else out."""
        engine = self.engines.get(n)
        if isinstance(engine, LaggingEngine):
            engine.complete()  # the commit requested in the last loop completed while this one waited
        node.doTick(0.0)
        if self.driver:
            self._release(n, early=True)
            node._rf_sync()
            self._release(n, early=False)

    def _ledger(self, n: int, node: Any, transport: SimTransport) -> None:
        """Record the last entry ``n`` acknowledged (success replies, when they leave after the flush)."""
        inner_send = transport.send

        def send(dst: Node, message: Any) -> bool:
            if message.get("type") == "next_node_idx" and message["success"]:
                idx = message["next_node_idx"] - 1
                term = node._rf_term_at(idx)
                prev = self.acked_by.get(n, (0, 0))
                if term is not None and (term, idx) > (prev[1], prev[0]):
                    # Ordered by the entry's term first: a later leader may replace an acknowledged but
                    # uncommitted entry (same index or lower, newer term), and the node's log then holds that.
                    self.acked_by[n] = (idx, term)
            return inner_send(dst, message)

        transport.send = send  # type: ignore[method-assign]

    def crash(self, n: int) -> None:
        super().crash(n)
        self.outbox.pop(n, None)  # unsent: the process is gone
        self.real_send.pop(n, None)
        engine = self.engines.pop(n, None)
        if engine is not None:
            engine.close()  # the process is gone: whatever it buffered and did not commit is lost

    def kill(self, n: int) -> None:
        self.crash(n)
        self.killed.append(n)
        if self.mode == "power":
            self.crash_disks[n].power_loss()

    def restart(self, n: int) -> None:
        """Start ``n`` from its files and check that it still holds the last entry it acknowledged."""
        disk = self.crash_disks[n]
        armed = disk.armed
        for attempt in range(3):  # recovery itself may be killed (twice, then it is left alone)
            disk.armed = armed and attempt < 2
            self.start(n)
            try:
                self._loop(n, self.nodes[n])  # loads the dump
                break
            except Killed:
                self.crash(n)
                if self.mode == "power":
                    disk.power_loss()
        disk.armed = armed
        node = self.nodes[n]
        if n in self.acked_by:
            idx, term = self.acked_by[n]
            held = node._rf_term_at(idx)
            assert idx <= node.raftLastApplied or held == term, (
                f"node {n} acknowledged entry {idx} (term {term}) but restarted without it "
                f"(log {node._SyncObj__raftLog[0][1]}..{node._SyncObj__raftLog[-1][1]}, "
                f"dump at {node.raftLastApplied})")

    def tick(self, dt: float = 0.005) -> None:
        net = self.net
        net.now += dt
        for n, node in list(self.nodes.items()):
            try:
                self._loop(n, node)
            except Killed:
                self.kill(n)
        if net.hold:
            return
        while net.queue and net.queue[0][0] <= net.now:
            item = heapq.heappop(net.queue)
            try:
                net.deliver(item)
            except Killed:
                self.kill(item[3])
        for n in list(self.killed):
            self.killed.remove(n)
            self.restart(n)


def sim_conf_files(root: str) -> SyncObjConf:
    conf = sim_conf()
    conf.journalFile = os.path.join(root, "journal")
    conf.fullDumpFile = os.path.join(root, "dump")
    conf.useFork = False  # dump written synchronously on the tick thread; renamed, then compaction next tick
    conf.logCompactionMinEntries = COMPACT_ENTRIES
    return conf


# --------------------------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------------------------


def run_crash_scenario(root: str, mode: str, point: str | None, every: int = 1,
                       safe_cls: type[SafeSyncObj] = SnapshotReplica,
                       journal_cls: type[DurableFileJournal] | None = DurableFileJournal,
                       seed: int = 1, driver: bool = False, metasync: bool = True) -> FileCluster:
    """See the module docstring. ``point``/``every``: where F is killed (None: never)."""
    net = SimNet(random.Random(seed))
    with sim_clock(net, seed):
        c = FileCluster(net, root, mode, safe_cls=safe_cls, journal_cls=journal_cls, driver=driver,
                        metasync=metasync)
        assert c.run(3.0, until=lambda: c.leader() is not None)
        c.run(0.2)
        lead = c.leader()
        assert lead is not None
        f, g = sorted(n for n in NODE_IDS if n != lead)
        disk = c.crash_disks[f]
        disk.kill_point, disk.kill_every = point, every

        def write(prefix: str, count: int) -> None:
            for i in range(count):
                c.submit(lead, f"{prefix}{i}")
                c.run(0.05, until=lambda i=i: f"{prefix}{i}" in c.acked)

        # F misses a few compactions, then catches up from L's snapshot while G is cut off.
        net.blocked.add(f)
        write("a", 3 * COMPACT_ENTRIES)
        net.blocked.discard(f)
        net.blocked.add(g)
        disk.armed = True  # from here on F holds writes no one else but L has
        assert c.run(3.0, until=lambda: f in c.nodes and c.nodes[f].raftLastApplied >= c.nodes[lead].raftLastApplied)
        # L commits with F alone: F is the only other copy of these writes.
        write("b", 5 * COMPACT_ENTRIES)
        disk.armed = False

        # L is lost for good; F and G must carry on with every acknowledged write.
        c.crash(lead)
        net.blocked.discard(g)
        converged = False
        for attempt in range(10):
            if not c.run(3.0, until=lambda: c.leader() is not None):
                continue
            c.submit(c.leader(), f"after{attempt}")
            converged = c.run(1.0, until=lambda a=attempt: all(f"after{a}" in c.nodes[n].applied for n in (f, g)))
            if converged:
                break
        assert converged, "F and G did not converge without L"
        check_prefixes(c, seed)
        for n in (f, g):
            applied = c.nodes[n].applied
            lost = [cid for cid in c.acked if applied.count(cid) != 1]
            assert not lost, f"acked writes lost or doubled on {n}: {lost[:5]} (of {len(c.acked)} acked)"
        c.close_engines()
        return c


# Where F is killed, and how often (kill at the 1st, 1+n-th, 1+2n-th... time the point is reached). Killing at
# every term/vote write livelocks elections (each restart forgets the new term), hence 3 for those points; under
# power loss a point that must be passed to make progress (the install) is killed every other time.
CRASH_POINTS = {
    "journal.append": 1,  # an entry appended (page cache), not flushed, not acked
    "flush.before": 1,  # entries appended, acks queued behind the flush
    "flush.after": 1,  # flushed, acks not yet sent
    "meta.written": 3,  # .meta.tmp written and fsynced, not renamed
    "replace.renamed": 3,  # .meta or the rewritten journal renamed, the directory not fsynced
    "compact.dump_renamed": 1,  # compaction: new dump in place, journal not yet compacted
    "rewrite.written": 1,  # journal rewrite: new file written and fsynced, not renamed
    "install.dump_renamed": 1,  # snapshot install: leader's dump renamed in, journal not yet replaced
}


# The same for the engine journal: every engine commit (log entries, hard state, truncations, compaction) and
# the dump steps that remain files.
ENGINE_CRASH_POINTS = {
    "engine.commit.before": 3,  # a batch taken from the buffer, not committed (term/vote writes commit too)
    "engine.commit.after": 3,  # committed and durable, acks not yet sent
    "compact.dump_renamed": 1,
    "install.dump_renamed": 1,
}


@pytest.mark.parametrize("mode", ["kill", "power"])
@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_killed_follower_keeps_every_acknowledged_entry(tmp_path: Any, mode: str, point: str) -> None:
    every = CRASH_POINTS[point] if mode == "kill" else max(CRASH_POINTS[point], 2)
    c = run_crash_scenario(str(tmp_path), mode, point, every)
    f = sorted(n for n in NODE_IDS if n in c.nodes)[0]
    assert c.crash_disks[f].kills or c.crash_disks[min(c.crash_disks)].kills, f"{point} was never reached"


@pytest.mark.parametrize("driver", [False, True], ids=["own-tick", "pipelined"])
@pytest.mark.parametrize("mode", ["kill", "power"])
@pytest.mark.parametrize("point", sorted(ENGINE_CRASH_POINTS))
def test_engine_journal_killed_follower_keeps_every_acknowledged_entry(tmp_path: Any, mode: str,
                                                                      point: str, driver: bool) -> None:
    every = ENGINE_CRASH_POINTS[point] if mode == "kill" else max(ENGINE_CRASH_POINTS[point], 2)
    c = run_crash_scenario(str(tmp_path), mode, point, every, journal_cls=None, driver=driver)
    assert sum(d.kills for d in c.crash_disks.values()), f"{point} was never reached"


@pytest.mark.parametrize("point", ["engine.commit.before", "engine.commit.written", "engine.commit.after"])
def test_without_metasync_power_loss_undoes_at_most_what_no_ack_depends_on(tmp_path: Any, point: str) -> None:
    """``metasync=False`` (one fsync per commit): a power loss may undo the last commit. Pipelined, the
    engine counts a commit durable only once the next one (or a meta flush) completed, so nothing the lost
    commit held was acknowledged, voted or counted: the scenario keeps every acknowledged write."""
    c = run_crash_scenario(str(tmp_path), "power", point, 2, journal_cls=None, driver=True, metasync=False)
    assert sum(d.kills for d in c.crash_disks.values()), f"{point} was never reached"


# --------------------------------------------------------------------------------------------------------------
# The old behaviours, rebuilt, fail the same scenario
# --------------------------------------------------------------------------------------------------------------

OLD = pytest.mark.xfail(strict=True, raises=AssertionError, reason="crash window of pysyncobj 0.3.17, closed by raftfix")


class StockDumpLoadReplica(SnapshotReplica):
    """pysyncobj 0.3.17's dump load: the journal is replaced by the dump's two entries unless it starts with them."""

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:  # noqa: N802,N803
        self._rf_conf_changes = []
        SyncObj._SyncObj__loadDumpFile(self, clearJournal)
        self._rf_conf_rebuild()


class InPlaceRewriteJournal(DurableFileJournal):
    """pysyncobj 0.3.17's ``deleteEntriesTo``: clear the journal, then re-add the kept entries one by one."""

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802,N803
        kept = self[entryTo:]
        FileJournal.clear(self)
        for k, entry in enumerate(kept):
            FileJournal.add(self, *entry)
            if k < len(kept) - 1:
                self._storage.point("rewrite.partial")  # only some of the kept entries are back
        self.needs_flush = True


@OLD
def test_old_dump_load_loses_entries_after_a_crash_between_dump_and_compaction(tmp_path: Any) -> None:
    """Problem 1: killed between the dump rename and the journal compaction, F restarts with the dump's two
    entries only; what it acknowledged after them is gone, and once L is lost, so are the acked writes."""
    run_crash_scenario(str(tmp_path), "kill", "compact.dump_renamed", safe_cls=StockDumpLoadReplica)


def _dump_after_power_loss(root: str, make: Any) -> Any:
    """Write a dump with the serializer ``make(disk, path)`` builds, fsync the directory (as a later ``.meta`` or
    journal replacement does), lose power, and load what is left."""
    disk = CrashDisk(root)
    path = os.path.join(root, "dump")
    data = ({"state": 42}, (b"x", 7, 2), (b"y", 6, 2), ["n2", "n3"])
    make(disk, path).serialize(data, 7)
    disk.fsync_dir(path)
    disk.power_loss()
    try:
        return Serializer(path, 1 << 16, False, None, None, None).deserialize()
    finally:
        disk.close()


def test_a_dump_is_durable_before_its_name_is(tmp_path: Any) -> None:
    """The dump is fsynced before it is renamed into place: a directory fsync afterwards cannot make the name
    durable ahead of the data (``raftkv.filejournal.DurableDumpSerializer``)."""
    loaded = _dump_after_power_loss(str(tmp_path / "d"), lambda disk, path: DurableDumpSerializer(
        disk, path, 1 << 16, False))
    assert loaded[0] == {"state": 42} and loaded[1] == (b"x", 7, 2)


@pytest.mark.xfail(strict=True, raises=EOFError, reason="pysyncobj 0.3.17 renames an unsynced dump")
def test_old_dump_rename_leaves_an_empty_dump_after_a_directory_fsync_and_power_loss(tmp_path: Any) -> None:
    _dump_after_power_loss(str(tmp_path / "d"), lambda disk, path: Serializer(path, 1 << 16, False, None, None,
                                                                              None))


@OLD
def test_old_in_place_rewrite_loses_entries_when_killed_midway(tmp_path: Any) -> None:
    """Problem 2: killed while the kept entries are being re-added, F restarts with part of them."""
    run_crash_scenario(str(tmp_path), "kill", "rewrite.partial", journal_cls=InPlaceRewriteJournal)


@pytest.mark.parametrize("point", ["compact.dump_renamed", "rewrite.written"])
def test_restart_keeps_journal_entries_above_the_dump(tmp_path: Any, point: str) -> None:
    """The positive space of problems 1 and 2 on one replica: killed at the step, restarted, it holds the whole
    log it had (entries after the dump included), and nothing else."""
    c = run_crash_scenario(str(tmp_path), "kill", point, every=1)
    assert sum(d.kills for d in c.crash_disks.values()) >= 2


# --------------------------------------------------------------------------------------------------------------
# Problem 3: the commit index must never be persisted ahead of the durable log
# --------------------------------------------------------------------------------------------------------------


class CommitAtSetJournal(DurableFileJournal):
    """The old ``DurableFileJournal``: the commit index goes into ``.meta`` as soon as it is set, so the next
    term/vote write fsyncs it, possibly before the entries it covers are flushed."""

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802,N803
        FileJournal.setRaftCommitIndex(self, raftCommitIndex)


def run_commit_ahead_of_log(root: str, journal_cls: type[DurableFileJournal] | None) -> list[str]:
    """Follower F on files, driven by hand-made messages, loses power; returns what it applied.

    1. Leader 2 (term 2) sends entries 2..4 (``old*``), never committed; F flushes them.
    2. In one poll, before F's end-of-tick flush: leader 3 (term 3) sends entries 2..6 (``new*``) with commit 6,
       so F replaces 2..4 and sets commit 6; then a vote request for term 4 makes F write ``.meta``.
    3. Power loss: F's journal is back to 1..4 (``old*``); its ``.meta`` says whatever step 2 fsynced.
    4. F restarts, then a leader of term 5 repairs it with the ``new*`` entries.
    """
    net = SimNet(random.Random(4))
    with sim_clock(net, 4):
        c = FileCluster(net, root, "power", journal_cls=journal_cls)
        net.hold = True
        c.crash(2)
        c.crash(3)
        f = c.nodes[1]
        put = f._methodToID[f._getFuncName("put")]

        def cmd(cid: str) -> bytes:
            return bytes([_so._COMMAND_TYPE.REGULAR]) + _so.pickle.dumps((put, (cid,)))

        def send(src: int, message: dict[str, Any]) -> None:
            net.deliver((net.now, 0, src, 1, pickle.dumps(message)))

        def ae(src: int, term: int, names: list[str], entry_term: int, commit: int) -> None:
            entries = [(cmd(name), 2 + k, entry_term) for k, name in enumerate(names)]
            send(src, {"type": "append_entries", "term": term, "commit_index": commit, "entries": entries,
                       "prevLogIdx": 1, "prevLogTerm": 0})

        ae(2, 2, ["old1", "old2", "old3"], 2, commit=1)
        c.nodes[1].doTick(0.0)  # flushed
        new = [f"new{k}" for k in range(1, 6)]
        ae(3, 3, new, 3, commit=6)
        send(2, {"type": "request_vote", "term": 4, "last_log_index": 9, "last_log_term": 3})
        c.kill(1)  # power loss before the next flush
        c.start(1)
        c.tick()
        ae(3, 5, new, 3, commit=6)
        c.tick()
        c.tick()
        c.close_engines()
        return list(c.nodes[1].applied)


@pytest.mark.parametrize("journal_cls", [DurableFileJournal, None], ids=["file", "engine"])
def test_commit_index_never_ahead_of_the_durable_log(tmp_path: Any, journal_cls: Any) -> None:
    applied = run_commit_ahead_of_log(str(tmp_path), journal_cls)
    assert applied == [f"new{k}" for k in range(1, 6)]


@OLD
def test_old_commit_index_at_term_change_applies_uncommitted_entries(tmp_path: Any) -> None:
    """Problem 3 before the fix: F 'commits' and applies the never-committed ``old*`` entries of term 2, then
    refuses the leader's repair (it would truncate 'committed' entries)."""
    applied = run_commit_ahead_of_log(str(tmp_path), CommitAtSetJournal)
    assert applied == [f"new{k}" for k in range(1, 6)], f"applied {applied}"


# --------------------------------------------------------------------------------------------------------------
# raftkv.snapshot: a node killed at every step of a checkpoint (and of the log compaction after it) keeps every
# acknowledged write. A real process (LMDB environments cannot be opened twice in one process), killed as
# ``kill -9`` would: the engine keeps what it committed.
# --------------------------------------------------------------------------------------------------------------

_CHECKPOINT_CHILD = """
import os, sys, threading, time
from raftkv.engine import Engine
from raftkv.replica import APPLIED, ShardReplica
point, data, addr = sys.argv[1:4]
armed = False
def hook(name):
    if armed and name == point:
        os._exit(9)
eng = Engine(os.path.join(data, "engine"), point=hook)
r = ShardReplica(0, addr, [], data, engine=eng, compact_every_cmds=10**9)
def put(cmds):
    done = threading.Event(); out = []
    r.propose(cmds, int(time.time() * 1000), lambda kind, res: (out.append(kind), done.set()))
    assert done.wait(30) and out == [APPLIED], out
while not r.is_leader():
    time.sleep(0.01)
for b in range(4):
    put([("set", b"a%d-%d" % (b, i), b"one") for i in range(250)])
r.forceLogCompaction()
while r.snapshots.stats["checkpoints"] < 1:
    time.sleep(0.01)
put([("set", b"a0-%d" % i, b"two") for i in range(100)] + [("del", [b"a1-%d" % i for i in range(50)])])
put([("set", b"b%d" % i, b"three") for i in range(300)])
print("acked", flush=True)
armed = True
r.forceLogCompaction()
for _ in range(40):  # the log compaction after the checkpoint commits with the next log write
    put([("noop",)])
print("survived", flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("point", ["engine.checkpoint.before", "engine.checkpoint.after", "engine.commit.before",
                                   "engine.commit.after"])
def test_a_kill_at_any_checkpoint_step_keeps_every_acknowledged_write(tmp_path: Any, point: str) -> None:
    data = str(tmp_path / "shard-0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    out = subprocess.run([sys.executable, "-c", _CHECKPOINT_CHILD, point, data, addr], capture_output=True,
                         text=True, timeout=120)
    assert "acked" in out.stdout, out.stderr[-2000:]
    assert out.returncode == 9 and "survived" not in out.stdout, f"never reached {point}: {out.stderr[-2000:]}"
    expected = {b"a%d-%d" % (b, i): b"one" for b in range(4) for i in range(250)}
    expected.update({b"a0-%d" % i: b"two" for i in range(100)})
    for i in range(50):
        del expected[b"a1-%d" % i]
    expected.update({b"b%d" % i: b"three" for i in range(300)})
    r = ShardReplica(0, addr, [], data)
    try:
        deadline = time.monotonic() + 30
        while not (r.is_leader() and r.raftLastApplied >= r.raftCommitIndex > 1):
            assert time.monotonic() < deadline, "restarted replica did not catch up"
            time.sleep(0.02)
        done = threading.Event()
        r.propose([("noop",)], 0, lambda kind, res: done.set())  # everything before it is applied
        assert done.wait(30)
        assert {k: v for k, (v, _rev) in r.state.data.items()} == expected
        assert len(r.state) == len(expected)
    finally:
        r.destroy()


_INSTALL_CHILD = """
import os, sys
from raftkv.engine import Engine
from raftkv.snapshot import ShardSnapshots
point, root = sys.argv[1:3]
def open_side(name, hook=lambda n: None):
    eng = Engine(os.path.join(root, name), point=hook)
    held = {}
    snaps = ShardSnapshots(eng, 5, os.path.join(root, name + ".snapshot"), 4096, lambda: held["s"],
                           lambda s: held.__setitem__("s", s))
    held["s"] = snaps.open_state()
    return snaps, held
def checkpoint(snaps, held, index, values):
    for k, v in values.items():
        held["s"].apply(("set", k, v), 1000)
    snaps.serialize((None, ("c", index, 1), ("c", index - 1, 1), set()), index)
armed = False
def hook(name):
    if armed and name == point:
        os._exit(9)
leader, lh = open_side("leader")
follower, fh = open_side("follower", hook)
checkpoint(follower, fh, 7, {b"old%d" % i: b"o" for i in range(300)})
checkpoint(leader, lh, 90, {b"new%d" % i: b"n" for i in range(3000)})
armed = True
while True:
    if follower.setTransmissionData(leader.getTransmissionData("f")):
        break
follower.deserialize()
print("installed", flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("point", ["engine.install.chunk.before", "engine.install.chunk.after",
                                   "engine.install.flip.before", "engine.install.flip.after"])
def test_a_kill_during_snapshot_install_leaves_the_old_or_the_new_state_whole(tmp_path: Any, point: str) -> None:
    out = subprocess.run([sys.executable, "-c", _INSTALL_CHILD, point, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 9 and "installed" not in out.stdout, f"never reached {point}: {out.stderr[-2000:]}"
    from raftkv.kvstore import shard_range
    from raftkv.snapshot import ShardSnapshots

    engine = Engine(str(tmp_path / "follower"))
    try:
        held: dict = {}
        snaps = ShardSnapshots(engine, 5, str(tmp_path / "follower.snapshot"), 4096, lambda: held["s"],
                               lambda s: held.__setitem__("s", s))
        held["s"] = snaps.open_state()
        last = snaps.deserialize()[1]
        got = {k: v for k, (v, _rev) in held["s"].data.items()}
        if point != "engine.install.flip.after":
            assert last[1] == 7 and got == {b"old%d" % i: b"o" for i in range(300)}
        else:
            assert last[1] == 90 and got == {b"new%d" % i: b"n" for i in range(3000)}
        assert len(held["s"]) == len(got)
        while snaps.tidy():  # the generation not in use (partial or replaced) goes, a slice at a time
            pass
        lo, hi = shard_range(5)
        assert sum(1 for _ in engine.scan(lo, hi)) == len(got)
    finally:
        engine.close()


# --------------------------------------------------------------------------------------------------------------
# Vote safety in driver mode: a voter killed around the commit that carries its vote never votes twice in a term
# --------------------------------------------------------------------------------------------------------------


class VoteLedgerCluster(FileCluster):
    """Records every vote as it leaves a node (pysyncobj answers ``response_vote`` only to grant one), and every
    leader per term."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.granted: dict[tuple[int, int], set[Any]] = collections.defaultdict(set)  # (voter, term) -> candidates
        self.leaders: dict[int, set[int]] = collections.defaultdict(set)  # term -> nodes that led in it
        super().__init__(*args, **kwargs)

    def make_node(self, n: int, others: list[int], transport: SimTransport) -> Any:
        node = super().make_node(n, others, transport)
        send = self.real_send[n]

        def recorded(dst: Node, message: Any) -> bool:
            if message.get("type") == "response_vote":
                self.granted[(n, message["term"])].add(dst.id)
            return send(dst, message)

        self.real_send[n] = recorded
        return node

    def tick(self, dt: float = 0.005) -> None:
        super().tick(dt)
        for n, node in self.nodes.items():
            if node._isLeader():
                self.leaders[node.raftCurrentTerm].add(n)


class EarlyVoteCluster(VoteLedgerCluster):
    """A broken node: messages are not held for the writes they vouch for (the gate sees everything as durable)
    and everything a loop produced leaves before the loop's engine commit, votes included."""

    def make_node(self, n: int, others: list[int], transport: SimTransport) -> Any:
        node = super().make_node(n, others, transport)
        node._rf_journal.unsynced_seq = lambda: 0
        return node

    def _release(self, n: int, early: bool) -> None:
        super()._release(n, early=False)


def run_vote_scenario(root: str, point: str, cls: type[VoteLedgerCluster], seed: int,
                      made: list[VoteLedgerCluster] | None = None) -> VoteLedgerCluster:
    """Leaders are cut off one after another, so the others elect; every voter dies at ``point`` every other time
    it is reached (every third time: a commit carrying its new term and vote, among others) and restarts at once."""
    net = SimNet(random.Random(seed))
    with sim_clock(net, seed):
        c = cls(net, root, "kill", journal_cls=None, driver=True)
        if made is not None:
            made.append(c)  # the caller inspects the ledger even if a check below fails
        assert c.run(3.0, until=lambda: c.leader() is not None)
        for disk in c.crash_disks.values():
            disk.kill_point, disk.kill_every, disk.armed = point, 3, True
        for _round in range(8):
            lead = c.leader()
            if lead is not None:
                c.submit(lead, f"w{_round}")
                net.blocked.add(lead)
            c.run(3.0, until=lambda old=lead: c.leader() not in (None, old))
            net.blocked.clear()
            c.run(0.5)
        for disk in c.crash_disks.values():
            disk.armed = False
        c.close_engines()
        return c


@pytest.mark.parametrize("point", ["engine.commit.before", "engine.commit.after"])
@pytest.mark.parametrize("seed", [1, 2])
def test_a_voter_killed_around_its_vote_commit_never_votes_twice_in_a_term(tmp_path: Any, point: str,
                                                                            seed: int) -> None:
    c = run_vote_scenario(str(tmp_path), point, VoteLedgerCluster, seed)
    assert len(c.leaders) >= 4, f"too few elections to mean anything: {dict(c.leaders)}"
    double = {k: v for k, v in c.granted.items() if len(v) > 1}
    assert not double, f"a node voted for two candidates in one term: {double}"
    assert all(len(v) == 1 for v in c.leaders.values()), f"two leaders in one term: {dict(c.leaders)}"


def test_votes_sent_before_their_commit_are_caught(tmp_path: Any) -> None:
    """Negative control: a node that lets votes and acks out before the commit that records them is caught, by
    the vote ledger (a voter killed before that commit forgets its vote and grants another in the same term) or
    by the scenario's own check (an entry it acknowledged is gone after the restart)."""
    for seed in range(1, 9):
        made: list[VoteLedgerCluster] = []
        try:
            run_vote_scenario(str(tmp_path / str(seed)), "engine.commit.before", EarlyVoteCluster, seed, made)
        except AssertionError:
            made[0].close_engines()
            return
        if any(len(v) > 1 for v in made[0].granted.values()):
            return
    pytest.fail("a node voting and acknowledging before its commit went unnoticed in 8 runs")

"""Snapshots of a shard replica: written off the Raft thread, loaded back exactly."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from pysyncobj.config import SERIALIZER_STATE

from raftkv.replica import APPLIED, ShardReplica


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _put_all(r: ShardReplica, items: list[tuple[bytes, bytes]], timeout: float = 30.0) -> None:
    done = threading.Event()
    outcome: list = []

    def cb(kind: str, res: object) -> None:
        outcome.append(kind)
        done.set()

    r.propose([("set", k, v) for k, v in items], int(time.time() * 1000), cb)
    assert done.wait(timeout) and outcome == [APPLIED]


def _wait(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _log_len(r: ShardReplica) -> int:
    return len(r._SyncObj__raftLog)


def _hold_background_dumps(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Dumps written in slices (the background path) wait at their start until ``release``;
    ``started`` is set when one is waiting there."""
    started, release = threading.Event(), threading.Event()
    real = ShardReplica._write_snapshot_file

    def held(self, path, frozen, raft_data, yield_between):  # noqa: ANN001
        if yield_between:
            started.set()
            assert release.wait(120), "a held dump was never released"
        return real(self, path, frozen, raft_data, yield_between)

    monkeypatch.setattr(ShardReplica, "_write_snapshot_file", held)
    return started, release


def _dump_synchronously(monkeypatch) -> None:
    """A broken build: every dump is written on the tick thread (in slices, so it can be held)."""
    def synchronous(self, path, raft_data):  # noqa: ANN001
        self._write_snapshot_file(path, self.state.freeze(), raft_data, yield_between=True)
        self._snap_status = SERIALIZER_STATE.SUCCESS

    monkeypatch.setattr(ShardReplica, "_write_snapshot", synchronous)


def test_background_snapshot_compacts_the_log_and_restores_exactly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("raftkv.replica.COMPACT_EVERY_CMDS", 10**9)  # compactions only when forced here
    addr = f"127.0.0.1:{_free_port()}"
    data = str(tmp_path / "shard-0")
    r = ShardReplica(0, addr, [], data)
    try:
        _wait(r.is_leader)
        expected = {}
        for batch in range(60):  # 60 entries of 500 keys
            items = [(b"k%06d" % (batch * 500 + i), b"v%d" % batch) for i in range(500)]
            _put_all(r, items)
            expected.update(items)
        snap = r.conf.fullDumpFile
        r.forceLogCompaction()  # the first dump is written in place
        _wait(lambda: os.path.exists(snap) and _log_len(r) < 10)
        first = os.stat(snap).st_ino
        for batch in range(60, 120):
            items = [(b"k%06d" % (batch * 500 + i), b"w%d" % batch) for i in range(500)]
            _put_all(r, items)
            expected.update(items)
        before = _log_len(r)
        started, release = _hold_background_dumps(monkeypatch)
        r.forceLogCompaction()  # now a dump exists: the new one is written by a background thread
        assert started.wait(30), "no background dump started"
        # The group keeps committing while the dump is being written (held here until the
        # write commits: a dump written on the tick thread would block the commit).
        _put_all(r, [(b"during", b"snapshot")])
        expected[b"during"] = b"snapshot"
        assert r._snap_status == SERIALIZER_STATE.SERIALIZING and os.stat(snap).st_ino == first
        release.set()
        _wait(lambda: os.stat(snap).st_ino != first and _log_len(r) < before)
        assert not os.path.exists(snap + ".bg") and not os.path.exists(snap + ".tmp")
    finally:
        r.destroy()
        time.sleep(0.3)
    again = ShardReplica(0, addr, [], data)
    try:
        _wait(lambda: again.is_leader() and again.raftLastApplied >= again.raftCommitIndex > 1)
        _put_all(again, [(b"after", b"restart")])  # applied after everything restored
        expected[b"after"] = b"restart"
        got = {k: v for k, (v, _rev) in again.state.data.items()}
        assert got == expected
    finally:
        again.destroy()


def test_log_is_compacted_by_commands_not_only_by_entries(tmp_path: Path, monkeypatch) -> None:
    # 30 entries of 1,000 commands: far below pysyncobj's 5,000-entry trigger.
    monkeypatch.setattr("raftkv.replica.COMPACT_EVERY_CMDS", 10_000)
    r = ShardReplica(0, f"127.0.0.1:{_free_port()}", [], str(tmp_path / "shard-0"))
    try:
        _wait(r.is_leader)
        for batch in range(30):
            _put_all(r, [(b"k%06d" % (batch * 1000 + i), b"v") for i in range(1000)])
        _wait(lambda: os.path.exists(r.conf.fullDumpFile) and _log_len(r) < 25)
        assert len(r.state) == 30_000
    finally:
        r.destroy()


def test_a_dump_on_the_tick_thread_is_caught_blocking_commits(tmp_path: Path, monkeypatch) -> None:
    """Negative control for the "keeps committing" check above: against a build that writes the
    dump on the tick thread, a write proposed while the dump is held does not commit until it
    is released."""
    monkeypatch.setattr("raftkv.replica.COMPACT_EVERY_CMDS", 10**9)
    _dump_synchronously(monkeypatch)
    started, release = _hold_background_dumps(monkeypatch)
    r = ShardReplica(0, f"127.0.0.1:{_free_port()}", [], str(tmp_path / "shard-0"))
    try:
        _wait(r.is_leader)
        _put_all(r, [(b"k%d" % i, b"v") for i in range(100)])
        r.forceLogCompaction()
        assert started.wait(30), "no dump started"
        done = threading.Event()
        r.propose([("set", b"during", b"dump")], int(time.time() * 1000), lambda kind, res: done.set())
        committed_while_held = done.wait(2.0)  # it cannot: the tick thread is inside the dump
        release.set()
        assert not committed_while_held
        assert done.wait(30)  # and commits once the dump is done
    finally:
        release.set()
        r.destroy()

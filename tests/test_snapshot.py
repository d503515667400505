"""Snapshots of a shard replica: written off the Raft thread, loaded back exactly."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

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
        r.forceLogCompaction()  # now a dump exists: the new one is written by a background thread
        # The group keeps committing while the dump is written.
        _put_all(r, [(b"during", b"snapshot")])
        expected[b"during"] = b"snapshot"
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

"""Checkpoints and snapshots of a shard replica: the data stays in the engine, a checkpoint writes what changed,
a restart loads no data, a snapshot streams to a follower and installs atomically (raftkv.snapshot)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pysyncobj.config import SERIALIZER_STATE

from raftkv.raftfix import SafeSyncObj
from raftkv.replica import APPLIED, ShardReplica, first_checkpoint
from tests.conftest import examples

SERIALIZING, SUCCESS = SERIALIZER_STATE.SERIALIZING, SERIALIZER_STATE.SUCCESS


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


def test_checkpoint_compacts_the_log_and_a_restart_loads_no_data(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint writes the keys changed since the previous one into the engine and the log below it is
    dropped; a restart reads only the checkpoint's metadata and replays just the entries after it."""
    monkeypatch.setattr("raftkv.replica.COMPACT_EVERY_CMDS", 10**9)  # checkpoints only when forced here
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
        r.forceLogCompaction()
        _wait(lambda: r.snapshots.stats["checkpoints"] == 1 and _log_len(r) < 10)
        assert r.snapshots.stats["checkpoint_keys"] == 30_000 and r.state.data.pending() == 0
        # The second checkpoint writes only what changed since the first: 1,000 overwritten keys, 1 new one.
        for batch in range(2):
            items = [(b"k%06d" % (batch * 500 + i), b"w%d" % batch) for i in range(500)]
            _put_all(r, items)
            expected.update(items)
        _put_all(r, [(b"during", b"checkpoints")])
        expected[b"during"] = b"checkpoints"
        r.forceLogCompaction()
        _wait(lambda: r.snapshots.stats["checkpoints"] == 2)
        assert r.snapshots.stats["checkpoint_keys"] == 30_000 + 1_001
        # Written after the last checkpoint: only in the log (and the overlay) when the replica stops.
        _put_all(r, [(b"late%d" % i, b"x") for i in range(7)])
        expected.update({b"late%d" % i: b"x" for i in range(7)})
    finally:
        r.destroy()
        time.sleep(0.3)
    again = ShardReplica(0, addr, [], data)
    try:
        # Leader, and its own first entry (the last in its log) applied: everything before it is, too. (A leader
        # may not have committed that entry yet: its commit index, from the hard state, can be older.)
        _wait(lambda: again.is_leader() and again.raftLastApplied >= again._SyncObj__raftLog[-1][1] > 1)
        # Only the entries after the checkpoint were applied again: their 7 keys are the whole overlay.
        assert again.state.data.pending() == 7
        _put_all(again, [(b"after", b"restart")])  # applied after everything restored
        expected[b"after"] = b"restart"
        got = {k: v for k, (v, _rev) in again.state.data.items()}
        assert got == expected and len(again.state) == len(expected)
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


def test_the_replicas_of_a_group_take_their_first_checkpoints_apart() -> None:
    """A checkpoint holds its node's engine writer: were all replicas of a group to begin one at the same entry,
    none could make an entry durable meanwhile. Each member, by id, starts at its own fraction of the interval
    (the same on every member, whatever order it lists its peers in); a group of one keeps the interval."""
    members = ["127.0.0.1:7102", "127.0.0.1:7002", "127.0.0.1:7202"]
    firsts = {m: first_checkpoint(10_000, m, [p for p in reversed(members) if p != m]) for m in members}
    assert firsts == {"127.0.0.1:7002": 3_333, "127.0.0.1:7102": 6_666, "127.0.0.1:7202": 10_000}
    assert first_checkpoint(10_000, "127.0.0.1:7002", []) == 10_000
    assert first_checkpoint(1, "127.0.0.1:7002", members[:1]) == 1  # never 0: every entry would checkpoint


# ---- streaming a checkpoint to a follower (raftkv.snapshot.ShardSnapshots, no network) --------------------------


def _snapshots(engine, path: Path, holder: dict):  # noqa: ANN001, ANN202
    from raftkv.snapshot import ShardSnapshots

    snaps = ShardSnapshots(engine, 3, str(path), 4096, lambda: holder["state"],
                           lambda s: holder.__setitem__("state", s))
    holder["state"] = snaps.open_state()
    return snaps


def _checkpoint_at(snaps, holder: dict, index: int) -> None:  # noqa: ANN001
    raft_data = (("c", index, 1), ("c", index - 1, 1), set())
    snaps.serialize((None, *raft_data), index)
    assert snaps.checkSerializing() == (2, index)  # SERIALIZER_STATE.SUCCESS, once


@contextlib.contextmanager
def _leader_and_follower(tmp_path: Path):  # noqa: ANN202
    """Two engines, the leader's and the follower's, each with a ``ShardSnapshots`` of shard 3 and the holder
    of its state; closed afterwards. Yields (leader engine, follower engine, leader, its holder, follower, its
    holder)."""
    from raftkv.engine import Engine

    le, fe = Engine(str(tmp_path / "leader")), Engine(str(tmp_path / "follower"))
    lh: dict = {}
    fh: dict = {}
    try:
        yield le, fe, _snapshots(le, tmp_path / "l.snapshot", lh), lh, _snapshots(fe, tmp_path / "f.snapshot", fh), fh
    finally:
        le.close()
        fe.close()


def _transfer(sender, receiver, node: str = "f", corrupt_at: int | None = None) -> tuple[bool, set]:  # noqa: ANN001
    """Send the whole stream; (whether the receiver accepted it, the snapshot tags the sender gave)."""
    tags, n = set(), 0
    while True:
        data, first, last = sender.getTransmissionData(node)
        tags.add(sender.transmission_tag(node))
        if corrupt_at is not None and n == corrupt_at and data:
            data = data[:-1] + bytes([data[-1] ^ 1])
        n += 1
        accepted = receiver.setTransmissionData((data, first, last))
        if last:
            return accepted, tags - {None}


def test_a_checkpoint_streams_to_a_follower_and_installs_atomically(tmp_path: Path) -> None:
    from raftkv.kvstore import shard_range

    with _leader_and_follower(tmp_path) as (le, fe, leader, lh, follower, fh):
        for i in range(10_000):
            lh["state"].apply(("set", b"k%05d" % i, b"v%d" % i), 1000)
        _checkpoint_at(leader, lh, 40)
        expected = dict(lh["state"].data.items())
        # The follower holds an older state of its own: the install replaces it whole.
        fh["state"].apply(("set", b"stale", b"x"), 5)
        _checkpoint_at(follower, fh, 3)
        first = leader.getTransmissionData("f")
        # The leader checkpoints again while the transfer is under way: the stream stays the view it started on.
        lh["state"].apply(("set", b"k00000", b"newer"), 2000)
        _checkpoint_at(leader, lh, 41)
        follower.setTransmissionData(first)
        assert _transfer(leader, follower) == (True, {(40, 1)})
        # Until the switch the follower still serves its own state (the new keys sit in the next generation).
        assert {k: v for k, (v, _rev) in fh["state"].data.items()} == {b"stale": b"x"}
        assert follower.deserialize()[1] == ("c", 40, 1)
        got = fh["state"]
        assert dict(got.data.items()) == expected and len(got) == 10_000 and got.revision == 10_000
        # The old generation's keys go a slice at a time.
        while follower.tidy(max_keys=1_000):
            pass
        lo, hi = shard_range(3)
        assert sum(1 for _ in fe.scan(lo, hi)) == 10_000
        # A damaged stream is refused and changes nothing; the next full transfer is accepted.
        for corrupt_at in (0, 3, 6):  # the stream is 8 chunks of 64 KiB
            accepted, _ = _transfer(leader, follower, corrupt_at=corrupt_at)
            assert not accepted
            assert dict(fh["state"].data.items()) == expected
        assert _transfer(leader, follower)[0]
        follower.deserialize()
        assert fh["state"].data.get(b"k00000") == (b"newer", 10_001)


def _legacy_dump(path: str, state, raft_data: tuple) -> None:  # noqa: ANN001
    """A dump as nodes wrote it before the engine held the data: RKVSNAP2, CRC-32, length-prefixed pickles."""
    import pickle
    import zlib

    body = b"".join(len(b).to_bytes(8, "big") + b
                    for b in [pickle.dumps(raft_data), *state.freeze().chunks(keys_per_chunk=7)])
    with open(path, "wb") as f:
        f.write(b"RKVSNAP2" + zlib.crc32(body).to_bytes(4, "big") + body)


def test_a_dump_of_the_old_layout_moves_into_the_engine_once(tmp_path: Path) -> None:
    from pysyncobj import syncobj as _so

    from raftkv.state import KVState

    old = KVState()
    for i in range(50):
        old.apply(("set", b"k%02d" % i, b"v%d" % i), 1000 + i)
    old.apply(("session", b"client-1", 7, ("set", b"s", b"once")), 2000)
    noop = bytes([_so._COMMAND_TYPE.NO_OP])
    data = tmp_path / "shard-0"
    os.makedirs(data)
    dump = str(data / "shard-0.snapshot")
    _legacy_dump(dump, old, ((noop, 60, 1), (noop, 59, 1), set()))
    addr = f"127.0.0.1:{_free_port()}"
    for _restart in range(2):
        r = ShardReplica(0, addr, [], str(data))
        try:
            _wait(lambda r=r: r.is_leader() and r.raftLastApplied >= 60)
            assert dict(r.state.data.items()) == dict(old.data.items())
            assert r.state.revision == old.revision and r.state.sessions == old.sessions
            assert os.path.exists(dump + ".migrated")
            with open(dump, "rb") as f:
                assert f.read(8) == b"RKVENGN1"  # now only a marker: the state is in the engine
        finally:
            r.destroy()
            time.sleep(0.2)


def test_a_checkpoint_commits_on_its_own_thread_while_writes_go_on(tmp_path: Path) -> None:
    """In a node (``background``): the writes up to the checkpoint's index are frozen and committed by a thread;
    writes applied meanwhile stay readable and are not part of it; a crash after it keeps exactly its state."""
    from raftkv.engine import Engine
    from raftkv.kvstore import EngineStore
    from raftkv.snapshot import ShardSnapshots

    held, release = threading.Event(), threading.Event()

    def point(name: str) -> None:
        if name == "engine.checkpoint.before":
            held.set()
            assert release.wait(30)

    engine = Engine(str(tmp_path / "e"), point=point)
    box: dict = {}
    try:
        snaps = ShardSnapshots(engine, 2, str(tmp_path / "m.snapshot"), 4096, lambda: box["s"],
                               lambda s: box.__setitem__("s", s), background=True)
        box["s"] = snaps.open_state()
        state = box["s"]
        for i in range(100):
            state.apply(("set", b"k%03d" % i, b"v1"), 1000)
        snaps.serialize((None, ("c", 9, 1), ("c", 8, 1), set()), 9)
        assert held.wait(30)
        assert snaps.checkSerializing() == (SERIALIZING, 9)
        state.apply(("set", b"k000", b"v2"), 1001)  # applied while the checkpoint commits
        state.apply(("del", [b"k001"]), 1001)
        assert state.data.get(b"k000")[0] == b"v2" and state.data.get(b"k002")[0] == b"v1"
        assert state.data.get(b"k001") is None and len(state) == 99
        release.set()
        snaps.wait_checkpoint()
        assert snaps.checkSerializing() == (SUCCESS, 9)
        assert state.data.pending() == 2  # only the two writes after the checkpoint
        crashed = EngineStore(engine, 2, count=100, gen=state.data.gen)  # what a restart finds: the checkpoint, whole
        assert crashed.get(b"k000")[0] == b"v1" and crashed.get(b"k001")[0] == b"v1" and len(crashed) == 100
    finally:
        release.set()
        engine.close()


def test_applying_is_bounded_per_tick_and_still_applies_everything_in_order(tmp_path: Path, monkeypatch) -> None:
    """With no time to spare (budget 0) each tick applies one committed entry and leaves the rest to the next
    ticks (a driver loop is never held for long by a backlog): the replica still applies every entry, in
    order, live and when replaying its log after a restart."""
    monkeypatch.setattr("raftkv.raftfix.APPLY_BUDGET_S", 0.0)
    monkeypatch.setattr("raftkv.replica.COMPACT_EVERY_CMDS", 10**9)
    addr = f"127.0.0.1:{_free_port()}"
    data = str(tmp_path / "shard-0")
    r = ShardReplica(0, addr, [], data)
    expected = {}
    try:
        _wait(r.is_leader)
        for batch in range(30):
            items = [(b"k%d" % (i % 7), b"v%d-%d" % (batch, i)) for i in range(20)]
            _put_all(r, items)
            expected.update(items)
        assert {k: v for k, (v, _rev) in r.state.data.items()} == expected
    finally:
        r.destroy()
        time.sleep(0.3)
    per_tick: list[int] = []  # entries applied by each tick of the restarted replica
    stock = SafeSyncObj._SyncObj__applyLogEntries

    def counting(self) -> bool:  # noqa: ANN001
        before = self.raftLastApplied
        result = stock(self)
        per_tick.append(self.raftLastApplied - before)
        return result

    monkeypatch.setattr(SafeSyncObj, "_SyncObj__applyLogEntries", counting)
    again = ShardReplica(0, addr, [], data)
    try:
        _wait(lambda: again.is_leader() and again.raftLastApplied >= again._SyncObj__raftLog[-1][1] > 30)
        assert max(per_tick) == 1 and sum(per_tick) >= 30  # the replay of 30 entries took 30 ticks or more
        assert {k: v for k, (v, _rev) in again.state.data.items()} == expected
        assert again.state.revision == 30 * 20
    finally:
        again.destroy()


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.binary(min_size=1, max_size=3), max_size=60), st.binary(max_size=3), st.binary(max_size=3),
       st.integers(1, 7))
def test_scan_batches_is_scan_cut_into_lists(tmp_path: Path, keys: set, lo: bytes, hi: bytes, size: int) -> None:
    from raftkv.engine import Engine

    engine = Engine(str(tmp_path / f"e{len(os.listdir(tmp_path))}"), map_size=1 << 22)
    try:
        engine.commit_now(lambda b: b.put_many(sorted((k, k + b"!") for k in keys)))
        with engine.read_view() as view:
            batches = list(view.scan_batches(lo, hi, size))
            assert all(0 < len(b) <= size for b in batches)
            assert [row for b in batches for row in b] == list(view.scan(lo, hi))
    finally:
        engine.close()


def test_a_version_1_stream_still_installs(tmp_path: Path) -> None:
    """A leader of an earlier build streams rows as (key, value) lists (format 1): this build installs them."""
    import pickle

    from raftkv.kvstore import data_range
    from raftkv.snapshot import FORMAT, STREAM_MAGIC, _load_meta, _record, meta_key

    with _leader_and_follower(tmp_path) as (le, fe, leader, lh, follower, fh):
        for i in range(5_000):
            lh["state"].apply(("set", b"k%05d" % i, b"v%d" % i), 1000)
        _checkpoint_at(leader, lh, 40)
        expected = dict(lh["state"].data.items())
        raft_data, meta, _count, gen = _load_meta(le.get(meta_key(3)), 3, le.get)
        lo, hi = data_range(3, gen)
        rows = [(k[len(lo):], v) for k, v in le.scan(lo, hi)]
        stream = STREAM_MAGIC + _record(pickle.dumps((FORMAT, raft_data, meta)))
        stream += b"".join(_record(pickle.dumps(rows[i:i + 700])) for i in range(0, len(rows), 700)) + _record(b"")
        chunks = [stream[i:i + 20_000] for i in range(0, len(stream), 20_000)]
        for i, chunk in enumerate(chunks):
            accepted = follower.setTransmissionData((chunk, i == 0, i == len(chunks) - 1))
        assert accepted
        follower.deserialize()
        assert dict(fh["state"].data.items()) == expected


def test_a_version_2_stream_still_installs(tmp_path: Path) -> None:
    """A leader of the previous build streams ([keys without the prefix], (values,)) records (format 2)."""
    import pickle

    from raftkv.kvstore import data_range
    from raftkv.snapshot import STREAM_MAGIC, _load_meta, _record, meta_key

    with _leader_and_follower(tmp_path) as (le, fe, leader, lh, follower, fh):
        _rich_state(lh, 5_000)
        _checkpoint_at(leader, lh, 40)
        raft_data, meta, _count, gen = _load_meta(le.get(meta_key(3)), 3, le.get)
        lo, hi = data_range(3, gen)
        rows = [(k[len(lo):], v) for k, v in le.scan(lo, hi)]
        stream = STREAM_MAGIC + _record(pickle.dumps((2, raft_data, meta)))
        for i in range(0, len(rows), 700):
            keys, values = zip(*rows[i:i + 700], strict=True)
            stream += _record(pickle.dumps((list(keys), values)))
        stream += _record(b"")
        chunks = [stream[i:i + 20_000] for i in range(0, len(stream), 20_000)]
        for i, chunk in enumerate(chunks):
            accepted = follower.setTransmissionData((chunk, i == 0, i == len(chunks) - 1))
        assert accepted
        follower.deserialize()
        _same_state(le, lh, leader, fe, fh, follower)


def _rich_state(holder: dict, n: int) -> None:
    """Keys set and deleted, keys with a TTL, a one-shard transaction remembered by id, a session."""
    s = holder["state"]
    for i in range(n):
        s.apply(("set", b"k%05d" % i, b"v%d" % i), 1000)
    s.apply(("del", [b"k%05d" % i for i in range(0, n, 7)]), 1001)
    for i in range(1, n, 11):
        s.apply(("expire", b"k%05d" % i, 60_000, False, None), 1002)
    s.apply(("txn_once", b"tx1", [], [("set", b"t1", b"x")], []), 1003)
    s.apply(("session", b"c1", 1, ("set", b"s", b"v")), 1004)


def _same_state(le, lh: dict, leader, fe, fh: dict, follower) -> None:  # noqa: ANN001
    """The follower holds what the leader checkpointed: data, metadata, and the engine rows themselves."""
    from raftkv.kvstore import data_range

    got, want = fh["state"], lh["state"]
    assert dict(got.data.items()) == dict(want.data.items())
    assert got.meta() == want.meta()
    assert got.txns.dump() == want.txns.dump() and got.expiries.dump() == want.expiries.dump()

    def rows(engine, gen: int) -> list:  # noqa: ANN001
        lo, hi = data_range(3, gen)
        return [(k[len(lo):], v) for k, v in engine.scan(lo, hi)]

    assert rows(fe, follower._gen) == rows(le, leader._gen)


def test_a_stream_installs_the_same_state_into_the_leaders_generation_or_the_next(tmp_path: Path) -> None:
    """Version-3 streams carry the leader's own rows: a follower that does not serve from the leader's generation
    stores them as they are; one that does (it installed from this leader before) re-prefixes them into the next."""

    with _leader_and_follower(tmp_path) as (le, fe, leader, lh, follower, fh):
        _rich_state(lh, 6_000)
        _checkpoint_at(leader, lh, 50)
        assert follower._gen != leader._gen  # fresh replicas draw their generation at random
        assert _transfer(leader, follower)[0]
        follower.deserialize()
        assert follower._gen == leader._gen
        _same_state(le, lh, leader, fe, fh, follower)
        lh["state"].apply(("set", b"k00001", b"newer"), 2000)
        lh["state"].apply(("del", [b"k00002"]), 2001)
        _checkpoint_at(leader, lh, 51)
        assert _transfer(leader, follower)[0]
        follower.deserialize()
        assert follower._gen == leader._gen + 1
        _same_state(le, lh, leader, fe, fh, follower)
        while follower.tidy():
            pass
        from raftkv.kvstore import shard_range

        assert sum(1 for _ in fe.scan(*shard_range(3))) == len(fh["state"])


def _records(engine) -> list[bytes]:  # noqa: ANN001
    """Shard 3's whole version-3 stream cut into its records (length and CRC-32 included)."""
    from raftkv.snapshot import STREAM_MAGIC, _Transmission

    tx = _Transmission.open(engine, 3)
    stream = tx.read(1 << 30)
    tx.close()
    assert stream.startswith(STREAM_MAGIC)
    out, pos = [], len(STREAM_MAGIC)
    while pos < len(stream):
        n = int.from_bytes(stream[pos:pos + 4], "big")
        out.append(stream[pos:pos + 8 + n])
        pos += 8 + n
    return out


def test_a_record_replayed_reordered_or_out_of_range_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    import marshal

    from raftkv.kvstore import data_prefix, shard_range
    from raftkv.snapshot import STREAM_MAGIC, _record

    with _leader_and_follower(tmp_path) as (le, fe, leader, lh, follower, fh):
        _rich_state(lh, 9_000)  # 5 records of 2,000 keys or fewer
        _checkpoint_at(leader, lh, 50)
        fh["state"].apply(("set", b"mine", b"old"), 5)
        _checkpoint_at(follower, fh, 3)
        head, *data, end = _records(le)
        assert len(data) >= 4
        foreign = _record(marshal.dumps([(data_prefix(4, leader._gen) + b"k", b"v")], 4))  # shard 4's key
        triples = _record(marshal.dumps([(data_prefix(3, leader._gen) + b"\xff", b"v", b"x")], 4))
        variants = {
            "a record twice": [head, *data[:2], data[1], *data[2:], end],
            "two records swapped": [head, data[1], data[0], *data[2:], end],
            "a record missing": [head, *data[1:], end],
            "a key of another shard": [head, *data, foreign, end],
            "rows that are not pairs": [head, *data, triples, end],
        }
        for name, records in variants.items():
            stream = STREAM_MAGIC + b"".join(records)
            chunks = [stream[i:i + 50_000] for i in range(0, len(stream), 50_000)]
            accepted = [follower.setTransmissionData((c, i == 0, i == len(chunks) - 1)) for i, c in enumerate(chunks)]
            assert not any(accepted), name
            assert {k: v for k, (v, _rev) in fh["state"].data.items()} == {b"mine": b"old"}, name
        stream = STREAM_MAGIC + b"".join([head, *data, end])
        chunk = stream[:50_000]  # a chunk delivered twice splices the stream
        assert not follower.setTransmissionData((chunk, True, False))
        assert not follower.setTransmissionData((chunk, False, False))
        assert not follower.setTransmissionData((stream[50_000:], False, True))
        while follower.tidy():  # what the refused transfers wrote goes; the old state stays whole
            pass
        assert [k for k, _ in fe.scan(*shard_range(3))] == [data_prefix(3, follower._gen) + b"mine"]
        assert _transfer(leader, follower)[0]
        follower.deserialize()
        _same_state(le, lh, leader, fe, fh, follower)


def test_the_sender_holds_chunks_back_while_the_connection_has_a_backlog(tmp_path: Path) -> None:
    from raftkv.snapshot import SEND_BACKLOG_BYTES

    with _leader_and_follower(tmp_path) as (le, fe, leader, lh, follower, fh):
        _rich_state(lh, 3_000)
        _checkpoint_at(leader, lh, 50)
        backlog = {"f": 0}
        leader.unsent = backlog.__getitem__
        chunks, held = [], 0
        while not chunks or not chunks[-1][2]:
            backlog["f"] = SEND_BACKLOG_BYTES + 1 if len(chunks) % 2 and not held % 3 == 2 else 0
            got = leader.getTransmissionData("f")
            if got is None:
                held += 1
                continue
            chunks.append(got)
        assert held > 0
        assert [follower.setTransmissionData(c) for c in chunks][-1]
        follower.deserialize()
        _same_state(le, lh, leader, fe, fh, follower)


# ---- the transaction history: segments as rows of their own (raftkv.retained, snapshot.history_key) --------


def _history(engine) -> dict:  # noqa: ANN001
    from raftkv.snapshot import history_range

    lo, hi = history_range(3)
    return dict(engine.scan(lo, hi))


def _finish_txns(state, first: int, count: int, at_ms: int) -> None:
    """``count`` two-shard transactions whose home is shard 3 (this one), prepared, decided and acked here."""
    for i in range(first, first + count):
        txid = f"t{i:06d}"
        state.apply(("tx_stage", txid, (3, 4), at_ms), at_ms)
        state.apply(("tx_prepare", txid, 3, [], [("set", b"k%06d" % i, b"v")], [], at_ms), at_ms)
        state.apply(("tx_settle", txid, "COMMITTED", True, None, "", 3, at_ms), at_ms)
        state.apply(("tx_ack", txid), at_ms)


def test_a_checkpoint_writes_only_the_history_segments_that_changed_and_a_restart_reads_them_back(
        tmp_path: Path, monkeypatch) -> None:
    """Ten minutes of finished transactions are kept per shard: a checkpoint must cost what changed since the
    last one, not all of them, and every path that reads a checkpoint (restart, a transfer to a follower)
    gets the whole history back."""
    from raftkv import retained
    from raftkv.engine import Engine
    from raftkv.txn import TOMBSTONE_TTL_MS

    monkeypatch.setattr(retained, "SEGMENT", 50)
    with _leader_and_follower(tmp_path) as (le, fe, leader, lh, follower, fh):
        _finish_txns(lh["state"], 0, 390, 1_000)  # records and tombstones: 8 segments each, the last 40 full
        _checkpoint_at(leader, lh, 40)
        first = _history(le)
        assert len(first) == 16
        assert len(le.get(b"M" + (3).to_bytes(4, "big"))) < 10_000  # the metadata itself stays small

        _finish_txns(lh["state"], 390, 30, 2_000)  # each table's last segment fills up, and one more starts
        _checkpoint_at(leader, lh, 80)
        second = _history(le)
        assert len(second) == 18
        kept = set(first) & set(second)
        assert len(kept) == 14 and all(first[k] == second[k] for k in kept)  # the full ones are not rewritten

        # A restart reads the history back from the rows, and writes nothing new while nothing changes.
        want = lh["state"].txns
        restarted: dict = {}
        again = _snapshots(le, tmp_path / "l.snapshot", restarted)
        again.deserialize()
        assert restarted["state"].txns == want and len(want.records) == 420 and len(want.done) == 420
        _checkpoint_at(again, restarted, 81)
        assert _history(le) == second

        # A follower that takes the checkpoint by transfer has the same history, inline at first, in rows
        # at its own next checkpoint.
        accepted, _ = _transfer(again, follower)
        assert accepted
        follower.deserialize()
        assert fh["state"].txns == want and _history(fe) == {}
        _checkpoint_at(follower, fh, 82)
        assert len(_history(fe)) == 18

        # GC of the oldest transactions deletes their rows at the next checkpoint.
        s = restarted["state"]
        s.apply(("tx_gc",), 1_500 + TOMBSTONE_TTL_MS)
        assert len(s.txns.records) == 30 and len(s.txns.done) == 30
        _checkpoint_at(again, restarted, 90)
        assert len(_history(le)) == 4  # per table: the segment shared by both batches, and the newest

    # And from a cold start of the engine files.
    le = Engine(str(tmp_path / "leader"))
    try:
        cold: dict = {}
        _snapshots(le, tmp_path / "l.snapshot", cold).deserialize()
        assert sorted(cold["state"].txns.records) == [f"t{i:06d}" for i in range(390, 420)]
    finally:
        le.close()


def test_a_checkpoint_of_the_previous_build_loads_and_its_history_moves_into_rows(tmp_path: Path) -> None:
    """A node upgraded over a data directory whose checkpoint holds the history in the metadata (format 1,
    the transaction table as plain dicts) loads it whole, and its next checkpoint writes it as rows."""
    import pickle
    from dataclasses import replace

    from raftkv.engine import Engine
    from raftkv.snapshot import FORMAT, meta_key

    engine = Engine(str(tmp_path / "leader"))
    try:
        holder: dict = {}
        snaps = _snapshots(engine, tmp_path / "l.snapshot", holder)
        _finish_txns(holder["state"], 0, 300, 1_000)
        holder["state"].apply(("txn_once", "once-1", [], [("put", b"o", b"1")], []), 1_001)
        want = holder["state"].txns
        _checkpoint_at(snaps, holder, 40)
        # Rewrite the stored checkpoint as the previous build wrote it: format 1, the history inline as dicts.
        parts = pickle.loads(engine.get(meta_key(3)))
        meta = parts[2]
        t = want
        old_txns = {"locks": dict(t.locks), "prepared": {k: replace(p) for k, p in t.prepared.items()},
                    "done": dict(t.done), "records": {k: replace(r) for k, r in t.records.items()},
                    "prepare_floor": dict(t.prepare_floor), "once": dict(t.once)}
        old_meta = (*meta[:3], old_txns, *meta[4:])
        blob = pickle.dumps((FORMAT, parts[1], old_meta, parts[3]), protocol=pickle.HIGHEST_PROTOCOL)
        engine.commit_now(lambda b: b.put(meta_key(3), blob))

        upgraded: dict = {}
        again = _snapshots(engine, tmp_path / "l.snapshot", upgraded)
        again.deserialize()
        assert upgraded["state"].txns == want and "once-1" in upgraded["state"].txns.once
        _checkpoint_at(again, upgraded, 41)
        assert len(_history(engine)) == 3  # done, records, once: one segment each (2,048 entries per segment)
        assert pickle.loads(engine.get(meta_key(3)))[0] == 4  # CHECKPOINT_FORMAT
        cold: dict = {}
        _snapshots(engine, tmp_path / "l.snapshot", cold).deserialize()
        assert cold["state"].txns == want
    finally:
        engine.close()

"""Reclaiming a removed replica's engine space (raftkv.reclaim): a stopped group's log, hard state, checkpoint
metadata and keys are deleted in bounded chunks, other groups' data is untouched, a crash between (or inside)
chunks resumes on restart, and a group placed on the node again starts clean. Then real node processes: a
replica moved off a node by ``rebalance --drain`` leaves no key of its shard there, and moved back it catches
up from the leader."""

from __future__ import annotations

import math
import os
import pickle
import time
from pathlib import Path

import pytest

from jepsen_like.replicas import check as check_replicas
from raftkv.cluster import LocalCluster
from raftkv.engine import Engine
from raftkv.kvstore import data_prefix, pack
from raftkv.membership import Operator
from raftkv.raftlog import _hard_key, _log_key
from raftkv.rebalance import Rebalancer
from raftkv.reclaim import Reclaimer, group_ranges, incarnation_key, mark_key
from raftkv.replica import ShardReplica
from raftkv.snapshot import meta_key
from shards.shardmap import ShardMap

from .conftest import dump_logs, free_port, start_cluster, wait_for_writes, writers_running
from .test_rebalance import _assert_readable_through_every_node
from .test_snapshot import _free_port, _put_all, _wait


def _fill(engine: Engine, group: int, data_keys: int, log_entries: int) -> None:
    """What a group stores: hard state, checkpoint metadata, log entries and data keys in two generations."""
    engine.put(_hard_key(group), pickle.dumps((3, None, 7)))
    engine.put(meta_key(group), b"meta")
    for i in range(log_entries):
        engine.put(_log_key(group, i + 1), b"\0" * 8 + b"entry %d" % i)
    for i in range(data_keys):
        engine.put(data_prefix(group, i % 2) + b"k%06d" % i, pack((b"v%d" % i, i)))
    engine.sync()


def _everything(engine: Engine) -> dict[bytes, bytes]:
    return dict(engine.scan(b"", b"\xff" * 8))


def _keys_of(engine: Engine, group: int) -> int:
    return sum(1 for lo, hi in group_ranges(group) for _ in engine.scan(lo, hi))


def _engine(path: Path, **kw: object) -> Engine:
    return Engine(str(path), map_size=1 << 26, **kw)  # type: ignore[arg-type]


def test_the_ranges_cover_every_key_a_group_stores_and_no_other_groups() -> None:
    keys = [_hard_key(5), meta_key(5), _log_key(5, 1), _log_key(5, 2**63), data_prefix(5, 0) + b"k",
            data_prefix(5, 2**32 - 1) + b"\xff" * 10]
    for key in keys:
        assert sum(lo <= key < hi for lo, hi in group_ranges(5)) == 1, key
        assert not any(lo <= key < hi for g in (4, 6) for lo, hi in group_ranges(g)), key
    assert not any(lo <= mark_key(5) < hi for lo, hi in group_ranges(5))  # the mark outlives the data


def test_a_member_never_starts_from_the_data_of_another_incarnation_of_its_shard(tmp_path: Path) -> None:
    """``adopt`` before a member starts: data recorded for another incarnation (``ShardMap.born``) of the shard
    id is reclaimed and the new incarnation recorded durably; data of the same incarnation stays."""
    engine = _engine(tmp_path)
    for group in (2, 3):
        _fill(engine, group, data_keys=50, log_entries=10)
    rc = Reclaimer(engine)
    stored = _keys_of(engine, 3)
    assert rc.holds(3) and rc.incarnation(3) is None  # data of before incarnations: incarnation 0
    assert rc.adopt(3, 0) is False and _keys_of(engine, 3) == stored  # the same group: kept
    others = {k: v for k, v in _everything(engine).items() if not any(lo <= k < hi for lo, hi in group_ranges(3))}
    assert rc.adopt(3, 7) is True  # removed and added again while this node held the old group's data
    assert not rc.holds(3) and rc.incarnation(3) == 7 and rc.pending() == []
    assert {k: v for k, v in _everything(engine).items() if k != incarnation_key(3)} == others  # group 2 intact
    _fill(engine, 3, data_keys=5, log_entries=2)  # the new member's own data
    engine.close()
    engine = _engine(tmp_path)  # the record is durable
    rc = Reclaimer(engine)
    assert rc.incarnation(3) == 7 and rc.adopt(3, 7) is False and rc.holds(3)
    assert rc.adopt(3, 9) is True and rc.incarnation(3) == 9 and not rc.holds(3)
    assert rc.adopt(3, 0) is False and rc.incarnation(3) is None  # nothing held: only the record changes
    engine.close()


def test_a_group_is_deleted_in_chunks_and_other_groups_are_untouched(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    for group in (2, 3, 4):
        _fill(engine, group, data_keys=5_000, log_entries=300)
    before = _everything(engine)
    stored = _keys_of(engine, 3)
    assert stored == 5_302
    rc = Reclaimer(engine, chunk_keys=1_000)
    assert rc.leftover({2, 4}) == {3: stored}
    rc.mark(3)
    assert engine.get(mark_key(3)) is not None and rc.pending() == [3]
    steps = 0
    while rc.step():
        steps += 1
        assert 0 < _keys_of(engine, 3) < stored  # one bounded commit at a time
    st = rc.stats()
    assert (st.groups, st.keys, st.chunks) == (1, stored, math.ceil((stored + 1) / 1_000))
    assert st.bytes == sum(len(k) + len(v) for k, v in before.items()
                           if any(lo <= k < hi for lo, hi in group_ranges(3)))
    assert _keys_of(engine, 3) == 0 and engine.get(mark_key(3)) is None and rc.pending() == []
    assert _everything(engine) == {k: v for k, v in before.items()
                                   if not any(lo <= k < hi for lo, hi in group_ranges(3))}
    assert rc.leftover({2, 4}) == {} and rc.leftover({2}) == {4: 5_302}
    assert not rc.step()  # nothing left to do
    engine.close()


def test_a_crash_between_or_inside_chunks_resumes_on_restart_and_the_mark_survives(tmp_path: Path) -> None:
    class Killed(Exception):
        pass

    reclaim_commits = 0

    def kill_in_the_fourth_chunk(point: str) -> None:
        nonlocal reclaim_commits
        if point == "engine.reclaim.before":
            reclaim_commits += 1
            if reclaim_commits == 4:
                raise Killed(point)  # as kill -9 before the commit: this chunk's deletions never happen

    engine = _engine(tmp_path, point=kill_in_the_fourth_chunk)
    for group in (1, 2):
        _fill(engine, group, data_keys=3_000, log_entries=100)
    others = {k: v for k, v in _everything(engine).items() if k[1:5] != b"\0\0\0\2"}
    rc = Reclaimer(engine, chunk_keys=500)
    rc.mark(2)
    with pytest.raises(Killed):
        while rc.step():
            pass
    left = _keys_of(engine, 2)
    assert left == 3_102 - 3 * 500  # three chunks committed, the fourth did not
    engine.close()

    engine = _engine(tmp_path)  # the restart
    rc = Reclaimer(engine, chunk_keys=500)
    assert rc.pending() == [2] and engine.get(mark_key(2)) is not None
    assert _keys_of(engine, 2) == left
    rc.step()
    engine.close()  # and a crash after one more chunk
    engine = _engine(tmp_path)
    rc = Reclaimer(engine, chunk_keys=500)
    assert rc.pending() == [2] and _keys_of(engine, 2) == left - 500
    while rc.step():
        pass
    assert _keys_of(engine, 2) == 0 and rc.pending() == [] and engine.get(mark_key(2)) is None
    assert {k: v for k, v in _everything(engine).items() if k[1:5] != b"\0\0\0\2"} == others
    engine.close()
    assert Reclaimer(_engine(tmp_path)).pending() == []  # done for good


def test_writes_the_group_buffered_before_it_stopped_never_land_after_the_deletions(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    _fill(engine, 7, data_keys=10, log_entries=10)
    rc = Reclaimer(engine)
    rc.mark(7)
    engine.put(_log_key(7, 11), b"\0" * 8 + b"appended as it was being destroyed")  # buffered, not committed
    while rc.step():
        pass
    engine.sync()  # the node's next group commit
    assert _keys_of(engine, 7) == 0
    engine.close()


def test_a_live_group_is_not_touched_and_finish_reclaims_a_marked_one_to_the_end(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    _fill(engine, 0, data_keys=2_000, log_entries=10)
    rc = Reclaimer(engine, chunk_keys=300)
    rc.mark(0)
    assert not rc.step(in_use={0})  # still in the driver (its removal not yet done): wait
    assert _keys_of(engine, 0) == 2_012
    rc.finish(0)
    assert _keys_of(engine, 0) == 0 and rc.pending() == []
    rc.finish(0)  # not marked: nothing to do
    engine.close()


def test_a_group_placed_on_the_node_again_starts_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica with a checkpoint and a log is stopped and reclaimed: its directory (checkpoint marker) is gone
    with its engine data, and a new replica of the shard on that engine starts empty, as a new member."""
    monkeypatch.setattr("raftkv.replica.COMPACT_EVERY_CMDS", 50)
    engine = _engine(tmp_path / "engine")
    data = str(tmp_path / "shard-0")
    r = ShardReplica(0, f"127.0.0.1:{_free_port()}", [], data, engine=engine)
    try:
        _wait(r.is_leader)
        for batch in range(4):
            _put_all(r, [(b"k%03d" % (batch * 40 + i), b"v") for i in range(40)])
        _wait(lambda: r.snapshots.stats["checkpoints"] >= 1)
        _put_all(r, [(b"after", b"v")])
    finally:
        r.destroy()
    assert engine.get(meta_key(0)) is not None and os.listdir(data)
    rc = Reclaimer(engine, group_dir=lambda g: str(tmp_path / f"shard-{g}"))
    rc.mark(0)
    rc.finish(0)
    assert not os.path.exists(data) and rc.leftover(set()) == {}
    r = ShardReplica(0, f"127.0.0.1:{_free_port()}", [], data, engine=engine)
    try:
        assert len(r.state) == 0 and r.state.peek(b"after") is None and r.state.peek(b"k000") is None
    finally:
        r.destroy()
    engine.close()


# -- real processes ---------------------------------------------------------------------------

def _engine_status(op: Operator, name: str) -> dict:
    return op.statuses()[name]["engine"]


def test_a_replica_moved_off_a_node_leaves_no_key_of_its_shard_there(tmp_path: Path) -> None:
    """3 nodes, 2 shards, checkpoints every 50 commands; under writes n4 joins and n1 is drained: n1's engine
    then holds no key of either shard (status: nothing unhosted, two groups reclaimed), and every acknowledged
    write reads back through every node. Rebalanced again, n1 gets replicas back and they catch up clean."""
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2, node_args=["--compact-every", "50"])
    try:
        with writers_running(lc, 2) as writers:
            wait_for_writes(writers, 200, "before the move")
            op = Operator(lc.config, timeout=30.0, say=print)
            assert op.add(f"127.0.0.1:{free_port()}", join=False) == "n4"
            before = _engine_status(op, "n1")
            assert before["unhosted_keys"] == {} and before["reclaim"]["groups"] == 0
            rb = Rebalancer(op, step_timeout=30.0, say=print)
            rb.run(drain=["n1"])
            assert op.map.shards_on("n1") == []
            deadline = time.monotonic() + 20
            while (st := _engine_status(op, "n1"))["reclaim"]["pending"] or st["unhosted_keys"]:
                assert time.monotonic() < deadline, st
                time.sleep(0.2)
            print("n1 engine after the drain:", st)
            assert st["reclaim"]["groups"] == 2 and st["reclaim"]["failure"] is None
            assert st["reclaim"]["keys"] > 200 and st["reclaim"]["bytes"] > 200 * 20
            assert st["keys"] == 0  # nothing else in n1's engine: no group's log, state or key
            assert not [p for p in os.listdir(ShardMap.load(lc.config).node_data_dir("n1")) if p.startswith("shard-")]
            wait_for_writes(writers, 50, "after the drain")
            rb.run()  # n1 holds nothing: the balanced placement gives it replicas back, as new members
            assert len(op.map.shards_on("n1")) >= 1
            wait_for_writes(writers, 50, "after the move back")
        for w in writers:
            print("reclaim under load:", w.check(lc.config))
        _assert_readable_through_every_node(lc, [k for w in writers for k, _, _ in w.acked])
        back = op.statuses()
        for s in op.map.shards_on("n1"):  # caught up from the leader, not from leftovers
            assert back["n1"]["shards"][str(s)]["keys"] > 0
        deadline = time.monotonic() + 20  # n4 gave a replica back: reclaimed too
        while any(st["engine"]["unhosted_keys"] or st["engine"]["reclaim"]["pending"] for st in back.values()):
            assert time.monotonic() < deadline, {n: st["engine"] for n, st in back.items()}
            time.sleep(0.2)
            back = op.statuses()
        # Every replica (n1's rebuilt ones included) at one revision holds the same data as the others.
        placement = {s: [n.name for n in op.map.replicas(s)] for s in range(op.map.nshards)}
        now = LocalCluster(lc.dir)  # the cluster file as the rebalance left it (n4 in it)
        agree = check_replicas(lambda n, s: _hashkv(now, n, s), placement, timeout=30)
        assert agree["valid"] is True, agree
    except Exception:
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        LocalCluster(lc.dir).stop()
        lc.stop()


def _hashkv(lc: LocalCluster, node: str, shard: int) -> tuple[int, str] | str:
    reply = lc.call(node, "RAFTKV.HASHKV", str(shard))
    return (reply[0], reply[1].decode()) if isinstance(reply, list) else str(reply)

"""Backup fence and bulk load in the state machine (pure)."""

from __future__ import annotations

import pickle

from raftkv.backup_state import owned_rows
from raftkv.reshard import Owner, ring_of
from raftkv.results import CmdError
from raftkv.state import KVState
from raftkv.txn import ABORTED


def _prepare(txid: str, key: bytes) -> tuple:
    return ("tx_prepare", txid, 0, [], [("put", key, b"v")], [])


def test_fence_refuses_new_prepares_but_keeps_earlier_votes() -> None:
    s = KVState()
    yes = s.apply(_prepare("t1", b"a"), 1000)
    assert yes[0] == "yes"
    assert s.apply(("bk_fence", "b1", 5000), 1000) is True
    assert s.apply(_prepare("t1", b"a"), 1001) == yes  # duplicate of an earlier prepare: same vote
    no = s.apply(_prepare("t2", b"b"), 1001)
    assert no[0] == "no" and s.txns.done["t2"][0] == ABORTED and b"b" not in s.txns.locks
    assert s.apply(("bk_check", "b1"), 1002)[:4] == (True, 1, 0, 0)
    s.apply(("tx_finish", "t1", "COMMITTED", True), 1003)
    assert s.apply(("bk_check", "b1"), 1004)[:4] == (True, 0, 1, 1)
    # the snapshot keeps the fence (replicas restored from it must refuse too)
    s2 = KVState.restore(s.snapshot())
    assert s2.fences == {"b1": 6000}
    assert s2.apply(_prepare("t3", b"c"), 1005)[0] == "no"
    assert s.apply(("bk_lift", "b1"), 1006) is True
    assert s.apply(_prepare("t4", b"d"), 1007)[0] == "yes"


def test_expired_fence_is_gone_for_good_even_if_log_time_goes_back() -> None:
    s = KVState()
    s.apply(("bk_fence", "b1", 100), 1000)
    assert s.apply(_prepare("t1", b"a"), 2000)[0] == "yes"  # expired: accepted, fence dropped
    assert s.apply(("bk_check", "b1"), 1050)[0] is False  # a backup must notice


def test_load_keeps_revisions() -> None:
    s = KVState()
    assert s.apply(("bk_load", [(b"k", b"v", 7), (b"j", b"w", 3)], 9), 1) == 2
    assert s.data[b"k"] == (b"v", 7) and s.revision == 9
    assert s.apply(("set", b"x", b"y"), 2) == 10


# -- backups and shard moves (raftkv.reshard) ---------------------------------------------------------

def _owning(nshards: int, shard: int, vnodes: int = 16) -> list[bytes]:
    """Keys the ring of ``nshards`` shards gives ``shard``."""
    return [k for k in (f"k{i}".encode() for i in range(200)) if ring_of(nshards, vnodes).shard_for(k) == shard]


def test_a_fence_is_refused_while_a_move_is_under_way_and_accepted_after_it() -> None:
    s = KVState()
    assert s.apply(("mv_precopy", 5, 0, 2, 16), 1000) == "copying"  # shard 0 gives keys to a new shard 2
    refused = s.apply(("bk_fence", "b1", 5000), 1001)
    assert isinstance(refused, CmdError) and refused.code == "SHARDMOVE"
    assert "shard move" in refused.message and "after" in refused.message
    assert s.fences == {} and s.fence_marks == {}
    assert s.apply(("mv_abort", 5), 1002) == "aborted"
    assert s.apply(("bk_fence", "b1", 5000), 1003) is True


def test_check_says_whether_the_shards_ring_and_move_are_as_when_the_fence_went_up() -> None:
    s = KVState(owner=Owner(0, 2, 16, 3))
    s.apply(("bk_fence", "b1", 60_000), 1000)
    # (fence up, prepared, keys, revision, unchanged since the fence, ring (shards, vnodes) or None)
    assert s.apply(("bk_check", "b1"), 1001) == (True, 0, 0, 0, True, (2, 16))
    s.apply(("mv_precopy", 5, 0, 2, 16), 1002)  # a move starts during the backup
    assert s.apply(("bk_check", "b1"), 1003)[4:] == (False, (2, 16))
    for step in (("mv_freeze", 5, 0, 2, 16), ("mv_handoff", 5), ("mv_done", 5)):
        s.apply(step, 1004)
    assert s.move is None  # ... and ends: the shard serves a 3-shard ring now
    assert s.apply(("bk_check", "b1"), 1005)[4:] == (False, (3, 16))
    # a fence raised again under the same id keeps what it saw first
    s.apply(("bk_fence", "b1", 60_000), 1006)
    assert s.apply(("bk_check", "b1"), 1007)[4] is False
    # a shard that never took part in a move has no ring of its own; no fence: never "unchanged"
    fresh = KVState()
    fresh.apply(("bk_fence", "b2", 60_000), 1000)
    assert fresh.apply(("bk_check", "b2"), 1001)[4:] == (True, None)
    assert fresh.apply(("bk_check", "nope"), 1001)[4] is False


def test_what_a_fence_saw_is_snapshotted_and_dropped_with_the_fence() -> None:
    s = KVState(owner=Owner(1, 2, 16, 3))
    s.apply(("bk_fence", "b1", 100), 1000)
    s2 = KVState.restore(s.snapshot())
    assert s2.fence_marks == s.fence_marks and s2.apply(("bk_check", "b1"), 1001)[4] is True
    s3 = KVState.from_chunks(iter(list(s.freeze().chunks())))
    assert s3.apply(("bk_check", "b1"), 1001)[4] is True
    assert s.apply(("bk_lift", "b1"), 1002) is True and s.fence_marks == {}
    assert s2.apply(_prepare("t1", _owning(2, 1)[0]), 2000)[0] == "yes"  # the fence lapsed: it and its mark go
    assert s2.fences == {} and s2.fence_marks == {}
    # a snapshot without marks (taken before they existed) loads; its fences cannot prove "unchanged"
    parts = pickle.loads(s3.snapshot())
    del parts[7]["fence_marks"]
    old = KVState.restore(pickle.dumps(parts))
    assert old.fences == {"b1": 1100} and old.fence_marks == {}
    active, *_, unchanged, _ring = old.apply(("bk_check", "b1"), 1001)
    assert active and not unchanged


def test_a_dump_leaves_out_keys_the_shard_does_not_serve() -> None:
    mine, gone = _owning(3, 0), _owning(3, 2)
    s = KVState(owner=Owner(0, 3, 16, 7))
    for key in mine + gone:  # ``gone``: keys a 3-shard ring gives shard 2, left here by an unfinished cleanup
        s.data[key] = (b"v", 1)
    assert sorted(k for k, _v, _r in owned_rows(s.data.items(), s.owner, s.move)) == sorted(mine)
    # a source that handed its moving keys off leaves them out too (the new shard has them)
    t = KVState()
    for key in _owning(2, 0):
        t.data[key] = (b"v", 1)
    for step in (("mv_freeze", 5, 0, 2, 16), ("mv_handoff", 5)):
        t.apply(step, 1000)
    assert sorted(k for k, _v, _r in owned_rows(t.data.items(), t.owner, t.move)) == sorted(
        k for k in _owning(2, 0) if ring_of(3, 16).shard_for(k) == 0)
    # a shard that never took part in a move: every key
    u = KVState()
    u.data[b"x"] = (b"1", 4)
    assert list(owned_rows(u.data.items(), u.owner, u.move)) == [(b"x", b"1", 4)]

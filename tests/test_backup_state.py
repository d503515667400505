"""Backup fence and bulk load in the state machine (pure)."""

from __future__ import annotations

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
    assert s.apply(("bk_check", "b1"), 1002) == (True, 1, 0, 0)
    s.apply(("tx_finish", "t1", "COMMITTED", True), 1003)
    assert s.apply(("bk_check", "b1"), 1004) == (True, 0, 1, 1)
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

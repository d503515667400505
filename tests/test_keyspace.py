"""SCAN and KEYS: a scan returns every key present for the whole scan, whatever changes meanwhile."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.cluster import LocalCluster
from raftkv.server.commands.keyspace import decode_cursor, encode_cursor
from raftkv.state import KVState
from tests.conftest import redis_to


@given(st.integers(1, 64), st.data())
def test_cursors_round_trip(nshards: int, data: st.DataObject) -> None:
    shard = data.draw(st.integers(0, nshards - 1))
    after = data.draw(st.none() | st.binary(max_size=40))
    assert decode_cursor(nshards, encode_cursor(nshards, shard, after)) == (shard, after)
    assert encode_cursor(nshards, 0, None) == 0


@settings(max_examples=200, deadline=None)
@given(st.sets(st.binary(min_size=1, max_size=3), max_size=40), st.integers(1, 7),
       st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=3)), max_size=30))
def test_a_scan_returns_every_key_present_throughout(initial: set, count: int, churn: list) -> None:
    """Keys are added and deleted between steps; every key present from start to end is returned."""
    s = KVState()
    for k in initial:
        s.apply(("set", k, b"v"), 0)
    seen, after, steady = set(), None, set(initial)
    while True:
        if churn:
            add, k = churn.pop()
            s.apply(("set", k, b"v") if add else ("del", [k]), 0)
            steady.discard(k)
        keys, after = s.read(("scan", after, count, None))
        seen |= set(keys)
        if after is None:
            break
    assert steady <= seen


@pytest.fixture
def lc(cluster: LocalCluster) -> LocalCluster:
    return cluster  # the module's shared 3-node cluster (conftest)


def test_scan_and_keys_on_a_live_cluster(lc: LocalCluster) -> None:
    r = redis_to(lc, "n3")
    names = {f"ks:{i}".encode() for i in range(57)} | {b"other"}
    for k in names:
        r.set(k, "v")
    r.set("ks:gone", "v", px=1)
    assert set(r.scan_iter(count=5)) == names  # the reserved ACL key and the expired key are not listed
    assert set(r.scan_iter(match="ks:*", count=7)) == names - {b"other"}
    assert r.keys("ks:1?") == sorted(k for k in names if k.startswith(b"ks:1") and len(k) == 5)
    assert list(r.scan_iter(_type="hash")) == []
    with pytest.raises(redis.ResponseError, match="invalid cursor"):
        r.scan(cursor=12345678901234567890)

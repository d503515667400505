"""SCAN and KEYS: a scan returns every key present for the whole scan, whatever changes meanwhile;
RAFTKV.RANGE: every shard's smallest keys of a range, merged, are the range's smallest keys."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.cluster import LocalCluster
from raftkv.keyspace import prefix_end
from raftkv.server.commands.keyspace import decode_cursor, encode_cursor, range_prefix
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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=3), max_size=40), st.binary(max_size=3), st.one_of(st.none(), st.binary(max_size=3)),
       st.integers(1, 10), st.integers(1, 4))
def test_a_range_merged_from_every_shard_is_the_smallest_keys_in_it(keys, start, end, limit, nshards) -> None:
    shards = [KVState() for _ in range(nshards)]
    hidden = b"\x00h"
    for i, k in enumerate([*keys, hidden + b"1"]):  # one key of the cluster's own, never listed
        shards[hash(k) % nshards].apply(("set", k, b"v" + k), now_ms=i)
    answers = [s.read(("range", start, end, limit, hidden)) for s in shards]
    merged = sorted(kv for a in answers for kv in a)[:limit]
    want = sorted(k for k in set(keys) if start <= k and (end is None or k < end) and not k.startswith(hidden))
    assert merged == [(k, b"v" + k) for k in want[:limit]]


@pytest.mark.parametrize(("prefix", "end"), [(b"user:", b"user;"), (b"a\xff", b"b"), (b"\xff\xff", None), (b"", None)])
def test_prefix_end_is_the_first_key_after_the_prefix(prefix: bytes, end: bytes | None) -> None:
    assert prefix_end(prefix) == end


def test_a_range_needs_read_permission_on_the_prefix_that_holds_it() -> None:
    assert range_prefix(b"user:", b"user;") == b"user:"
    assert range_prefix(b"user:10", b"user:2") == b"user:1"  # every key in it starts with user:1
    assert range_prefix(b"user:10", b"user:3") == b"user:"
    assert range_prefix(b"a", b"c") == b""  # spans first bytes: every key
    assert range_prefix(b"user:", None) == b""

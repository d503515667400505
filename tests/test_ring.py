"""Properties of the consistent-hash ring (shards/ring.py), measured on sampled keys.

Ring points are deterministic, so the shard counts 3..16 are checked exhaustively
in every example; hypothesis varies the key sets (random bytes, sequential names).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections import Counter

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.ring import DEFAULT_VNODES, HASH_SPACE, Ring, key_hash

KEYS_N = 100_000
SHARDS_MIN, SHARDS_MAX = 3, 16
BALANCE_RATIO_MAX = 1.3  # busiest shard / mean
MOVE_FACTOR_MAX = 1.25  # moved fraction / (1 / (n + 1))


def make_keys(seed: int, style: str, prefix: str, count: int = KEYS_N) -> list[bytes]:
    """A reproducible key set: random bytes, or sequential names like real key spaces."""
    rng = random.Random(seed)
    if style == "random":
        return [rng.randbytes(rng.randint(1, 24)) for _ in range(count)]
    start = rng.randrange(10**6)
    return [f"{prefix}{i}".encode() for i in range(start, start + count)]


key_sets = st.builds(
    make_keys,
    seed=st.integers(0, 2**32 - 1),
    style=st.sampled_from(["random", "sequential"]),
    prefix=st.sampled_from(["", "user:", "order/", "k"]),
)


def owners(ring: Ring, keys: list[bytes]) -> list[int]:
    shard_for = ring.shard_for
    return [shard_for(k) for k in keys]


# -- (a) balance --------------------------------------------------------------


@settings(max_examples=4, deadline=None)
@given(keys=key_sets)
def test_balance_busiest_shard_at_most_1_3x_mean(keys: list[bytes]) -> None:
    for n in range(SHARDS_MIN, SHARDS_MAX + 1):
        counts = Counter(owners(Ring(range(n)), keys))
        assert set(counts) == set(range(n)), f"n={n}: some shard owns no key"
        ratio = max(counts.values()) / (len(keys) / n)
        assert ratio <= BALANCE_RATIO_MAX, f"n={n}: busiest shard holds {ratio:.3f}x the mean"


# -- (b) minimal movement -----------------------------------------------------


@settings(max_examples=3, deadline=None)
@given(keys=key_sets)
def test_adding_a_shard_moves_few_keys_and_only_onto_it(keys: list[bytes]) -> None:
    ring = Ring(range(SHARDS_MIN))
    before = owners(ring, keys)
    for n in range(SHARDS_MIN, SHARDS_MAX + 1):
        grown = ring.with_shard(n)
        after = owners(grown, keys)
        moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert all(b == n for _, b in moved), f"n={n}: a key moved between old shards"
        assert moved, f"n={n}: the new shard received no key"
        factor = len(moved) / len(keys) * (n + 1)
        assert factor <= MOVE_FACTOR_MAX, f"n={n}->{n + 1}: moved {factor:.3f} x 1/(n+1) of keys"
        ring, before = grown, after


@settings(max_examples=25, deadline=None)
@given(data=st.data(), n=st.integers(SHARDS_MIN, SHARDS_MAX), seed=st.integers(0, 2**32 - 1))
def test_removing_a_shard_moves_only_its_keys(data: st.DataObject, n: int, seed: int) -> None:
    victim = data.draw(st.integers(0, n - 1), label="victim")
    keys = make_keys(seed, "random", "", count=10_000)
    ring = Ring(range(n))
    shrunk = ring.without_shard(victim)
    for k, a, b in zip(keys, owners(ring, keys), owners(shrunk, keys), strict=True):
        if a == victim:
            assert b != victim
        else:
            assert a == b, f"key {k!r} moved {a}->{b} though shard {victim} was removed"


def test_add_then_remove_restores_placement() -> None:
    keys = make_keys(7, "random", "", count=5_000)
    ring = Ring(range(5))
    assert ring.with_shard(9).without_shard(9) == ring
    assert owners(ring.with_shard(9).without_shard(9), keys) == owners(ring, keys)


# -- (c) determinism ----------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    ids=st.lists(st.integers(0, 200), min_size=1, max_size=16, unique=True),
    perm_seed=st.integers(0, 2**16),
    keys=st.lists(st.binary(max_size=40) | st.text(max_size=20), min_size=1, max_size=50),
)
def test_same_key_same_shard_regardless_of_build_order(ids: list[int], perm_seed: int, keys: list) -> None:
    shuffled = list(ids)
    random.Random(perm_seed).shuffle(shuffled)
    a, b = Ring(ids), Ring(shuffled)
    assert a == b and a.shards == tuple(sorted(ids))
    for k in keys:
        assert a.shard_for(k) == b.shard_for(k)
        assert a.shard_for(k) in a.shards


@given(st.text(max_size=30))
def test_str_keys_are_utf8_bytes(key: str) -> None:
    ring = Ring(range(7))
    assert ring.shard_for(key) == ring.shard_for(key.encode("utf-8"))


def test_key_hash_is_mmh3_x64_low_64_bits() -> None:
    # The hot path masks hash128; the documented scheme is hash64(...)[0]. They must agree.
    for k in [b"", b"a", b"user:42", bytes(range(256))]:
        assert key_hash(k) == mmh3.hash64(k, signed=False)[0]


# Golden placements: if any of these change, every deployed cluster would reshuffle.
GOLDEN = [
    # key, shard among 0..2, shard among 0..15, key hash
    (b"", 2, 8, 0),
    (b"a", 1, 13, 9607679276477937801),
    (b"user:1", 2, 12, 6120565781388772718),
    (b"user:42", 0, 13, 14772097168846764648),
    ("h\u00e9llo", 1, 1, 5634419923683204234),
    (b"\x00\xff", 1, 3, 15970081977526235200),
]


@pytest.mark.parametrize(("key", "shard3", "shard16", "hashed"), GOLDEN)
def test_golden_placement(key: bytes | str, shard3: int, shard16: int, hashed: int) -> None:
    assert DEFAULT_VNODES == 256, "changing DEFAULT_VNODES reshuffles keys: update GOLDEN on purpose"
    assert key_hash(key) == hashed
    assert Ring(range(3)).shard_for(key) == shard3
    assert Ring(range(16)).shard_for(key) == shard16


# -- ranges: the ring as hash intervals (what the scale-out planner overlays) --------


@settings(max_examples=30, deadline=None)
@given(
    ids=st.lists(st.integers(0, 100), min_size=1, max_size=8, unique=True),
    vnodes=st.sampled_from([1, 3, 16, DEFAULT_VNODES]),
    keys=st.lists(st.binary(max_size=24), max_size=200),
)
def test_arcs_tile_the_hash_space_and_match_lookup(ids: list[int], vnodes: int, keys: list[bytes]) -> None:
    ring = Ring(ids, vnodes)
    arcs = ring.arcs()
    assert arcs[0][0] == 0 and arcs[-1][1] == HASH_SPACE
    for (_, hi, s), (lo, _, t) in zip(arcs, arcs[1:], strict=False):
        assert hi == lo, "no gap, no overlap"
        assert s != t, "adjacent ranges of one shard are merged"
    for lo, hi, s in arcs:
        assert lo < hi and ring.shard_for_hash(lo) == s and ring.shard_for_hash(hi - 1) == s
    los = [lo for lo, _, _ in arcs]
    for k in keys:
        h = key_hash(k)
        assert ring.shard_for_hash(h) == ring.shard_for(k)
        assert arcs[bisect_right(los, h) - 1][2] == ring.shard_for(k)


def test_a_point_owns_its_own_hash_and_the_wrap_goes_to_the_first_point() -> None:
    ring = Ring([0, 1], vnodes=2)
    arcs = ring.arcs()
    first_point = arcs[0][1] - 1
    assert ring.shard_for_hash(first_point) == ring.shard_for_hash(0) == arcs[0][2]
    assert ring.shard_for_hash(HASH_SPACE - 1) == arcs[0][2], "past the last point the circle wraps"
    assert arcs[-1][2] == arcs[0][2], "the range after the last point is listed last, not wrapped"
    assert Ring([5]).arcs() == [(0, HASH_SPACE, 5)]
    assert Ring([]).arcs() == []
    for bad in (-1, HASH_SPACE):
        with pytest.raises(ValueError, match="key hash"):
            ring.shard_for_hash(bad)


# -- API and errors -----------------------------------------------------------


def test_empty_ring_lookup_raises_clear_error() -> None:
    with pytest.raises(ValueError, match="empty ring"):
        Ring([]).shard_for(b"k")
    with pytest.raises(ValueError, match="empty ring"):
        Ring([4]).without_shard(4).shard_for("k")


def test_duplicate_shard_ids_rejected() -> None:
    with pytest.raises(ValueError, match=r"duplicate shard id\(s\) in ring: \[1\]"):
        Ring([0, 1, 1, 2])
    with pytest.raises(ValueError, match="already on the ring"):
        Ring([0, 1]).with_shard(1)


def test_invalid_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="not on the ring"):
        Ring([0, 1]).without_shard(5)
    for bad in (-1, "1", 1.0, True):
        with pytest.raises(ValueError, match="shard ids"):
            Ring([0, bad])
    for vnodes in (0, -3, 10**6, 2.5):
        with pytest.raises(ValueError, match="vnodes"):
            Ring([0], vnodes=vnodes)


def test_rings_are_immutable_values() -> None:
    ring = Ring([2, 0, 1], vnodes=8)
    grown = ring.with_shard(3)
    assert ring.shards == (0, 1, 2) and grown.shards == (0, 1, 2, 3)
    assert len(grown) == 4 and grown.vnodes == 8
    assert ring != Ring([0, 1, 2]) and ring == Ring([0, 1, 2], vnodes=8)
    assert hash(ring) == hash(Ring((0, 1, 2), 8))
    assert repr(ring) == "Ring(shards=[0, 1, 2], vnodes=8)"


def test_single_shard_owns_everything() -> None:
    ring = Ring([11])
    assert {ring.shard_for(k) for k in make_keys(3, "random", "", count=1000)} == {11}

"""The scale-out planner (shards/plan.py): which keys a ring change moves, and replica placement plans.

Key movement is checked against the ring itself (``Ring.shard_for`` on sampled
keys, ``Ring.shard_for_hash`` at every arc boundary). Placement plans are
applied step by step to random clusters, checking the safety invariants after
every step and balance at the end, and compared with brute force on small ones.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.flow import FlowNetwork
from shards.plan import (
    Arc,
    KeyMovement,
    PlanError,
    ReplicaStep,
    apply_step,
    key_movement,
    plan_replicas,
    plan_shard_add,
    plan_shard_remove,
)
from shards.ring import DEFAULT_VNODES, HASH_SPACE, Ring, key_hash

MOVE_FACTOR_MAX = 1.25  # moved fraction / (1 / (n + 1)) for an added shard, as issue 15 asks
MOVE_FACTOR_MIN = 0.8


def sample_keys(seed: int, count: int = 2_000) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, 16)) for _ in range(count)]


# -- key movement ---------------------------------------------------------------------------------

ring_changes = st.builds(
    lambda ids, vnodes, add, pick: (Ring(ids, vnodes), add, pick),
    ids=st.lists(st.integers(0, 300), min_size=1, max_size=12, unique=True),
    vnodes=st.sampled_from([1, 2, 8, 64, DEFAULT_VNODES]),
    add=st.booleans(),
    pick=st.integers(0, 10**6),
)


def change_of(ring: Ring, add: bool, pick: int) -> tuple[Ring, int]:
    """The changed ring and the shard added or removed (a removal needs two shards; else it adds)."""
    if add or len(ring) == 1:
        new_id = next(i for i in itertools.count(pick % 400) if i not in ring.shards)
        return ring.with_shard(new_id), new_id
    victim = ring.shards[pick % len(ring)]
    return ring.without_shard(victim), victim


@settings(max_examples=40, deadline=None)
@given(change=ring_changes, seed=st.integers(0, 2**32 - 1))
def test_a_key_moves_exactly_when_its_shard_changes(change: tuple[Ring, bool, int], seed: int) -> None:
    old, add, pick = change
    new, shard = change_of(old, add, pick)
    movement = key_movement(old, new)
    for k in sample_keys(seed):
        before, after = old.shard_for(k), new.shard_for(k)
        arc = movement.arc_for_hash(key_hash(k))
        assert movement.moves_key(k) == (before != after), f"key {k!r}: {before} -> {after}"
        if arc is not None:
            assert (arc.src, arc.dst) == (before, after)
    if len(new) > len(old):
        assert all(a.dst == shard and a.src != shard for a in movement.arcs), "an added shard only receives"
    else:
        assert all(a.src == shard and a.dst != shard for a in movement.arcs), "a removed shard only gives"


def assert_exact_and_maximal(movement: KeyMovement, hashes: Iterable[int]) -> None:
    """At each hash, the arc found (or none) says exactly how the two rings differ; arcs are maximal."""
    old, new = movement.old, movement.new
    for h in hashes:
        if not 0 <= h < HASH_SPACE:
            continue
        arc, src, dst = movement.arc_for_hash(h), old.shard_for_hash(h), new.shard_for_hash(h)
        assert (arc is None) == (src == dst), f"hash {h}: {src} -> {dst}, arc {arc}"
        assert arc is None or (arc.src, arc.dst) == (src, dst)
    for a, b in itertools.pairwise(movement.arcs):
        assert a.hi <= b.lo, "arcs are disjoint and ascending"
        assert a.hi < b.lo or (a.src, a.dst) != (b.src, b.dst), f"{a} and {b} should be one arc"


@settings(max_examples=40, deadline=None)
@given(change=ring_changes)
def test_arcs_are_exact_at_their_boundaries_and_maximal(change: tuple[Ring, bool, int]) -> None:
    old, add, pick = change
    movement = key_movement(old, change_of(old, add, pick)[0])
    edges = (h for a in movement.arcs[:50] for h in (a.lo - 1, a.lo, a.hi - 1, a.hi))
    assert_exact_and_maximal(movement, edges)


@settings(max_examples=30, deadline=None)
@given(old_ids=st.lists(st.integers(0, 20), min_size=1, max_size=6, unique=True),
       new_ids=st.lists(st.integers(0, 20), min_size=1, max_size=6, unique=True),
       vnodes=st.integers(1, 8))
def test_any_two_rings_differ_exactly_on_their_arcs(old_ids: list[int], new_ids: list[int],
                                                     vnodes: int) -> None:
    old, new = Ring(old_ids, vnodes), Ring(new_ids, vnodes)
    boundaries = [lo for lo, _, _ in old.arcs() + new.arcs()]
    hashes = boundaries + [b - 1 for b in boundaries] + [HASH_SPACE - 1]
    assert_exact_and_maximal(key_movement(old, new), hashes)


@settings(max_examples=30, deadline=None)
@given(change=ring_changes)
def test_moved_fraction_is_the_changed_shards_share_of_the_ring(change: tuple[Ring, bool, int]) -> None:
    old, add, pick = change
    new, shard = change_of(old, add, pick)
    movement = key_movement(old, new)
    owner = new if len(new) > len(old) else old
    share = sum(hi - lo for lo, hi, s in owner.arcs() if s == shard)
    assert movement.moved_hashes == share
    assert movement.fraction == share / HASH_SPACE
    assert sum(size for _, size in movement.flows().values()) == share
    assert sum(n for n, _ in movement.flows().values()) == len(movement.arcs)


@settings(max_examples=40, deadline=None)
@given(change=ring_changes)
def test_each_sources_share_is_the_part_of_its_own_arcs_that_moves(change: tuple[Ring, bool, int]) -> None:
    # (the denominator of a move's progress estimate: a source's keys times its share)
    old, add, pick = change
    new, shard = change_of(old, add, pick)
    movement = key_movement(old, new)
    shares = movement.source_shares()
    owned = {s: sum(hi - lo for lo, hi, o in old.arcs() if o == s) for s in old.shards}
    assert set(shares) == {src for src, _dst in movement.flows()}
    assert all(0 < f <= 1 for f in shares.values())
    assert sum(round(shares[s] * owned[s]) for s in shares) == pytest.approx(movement.moved_hashes, rel=1e-9)
    if len(new) < len(old):  # a removal: every hash of the removed shard moves, nobody else's
        assert shares == {shard: 1.0}


@pytest.mark.parametrize("n", range(1, 33))
def test_adding_shard_n_to_a_cluster_map_moves_about_1_over_n_plus_1(n: int) -> None:
    # Shard maps number shards 0..n-1 and grow by n: exact fractions, measured max 1.100x (n = 15).
    factor = plan_shard_add(Ring(range(n))).fraction * (n + 1)
    assert MOVE_FACTOR_MIN <= factor <= MOVE_FACTOR_MAX, f"{n} -> {n + 1} shards moved {factor:.3f} x 1/(n+1)"


@pytest.mark.parametrize(("n", "k"), [(1, 2), (3, 3), (4, 4), (8, 2), (16, 4), (31, 3)])
def test_adding_k_shards_at_once_moves_keys_only_onto_them_about_k_over_n_plus_k(n: int, k: int) -> None:
    movement = plan_shard_add(Ring(range(n)), count=k)
    assert movement.new == Ring(range(n + k))
    assert all(a.src < n <= a.dst for a in movement.arcs), "keys move only from old shards to new ones"
    assert {dst for _, dst in movement.flows()} == set(range(n, n + k))
    factor = movement.fraction / (k / (n + k))  # measured 0.93..1.07 for n in 1..32, k in 2..4
    assert MOVE_FACTOR_MIN <= factor <= MOVE_FACTOR_MAX


@settings(max_examples=12, deadline=None)
@given(ids=st.lists(st.integers(0, 1023), min_size=2, max_size=17, unique=True))
def test_adding_any_shard_id_moves_about_1_over_n_plus_1_with_enough_vnodes(ids: list[int]) -> None:
    # Arbitrary ids at the default 256 vnodes: 1 of 2000 random draws reached 1.252x (the sum of
    # 256 arcs varies by ~6%); at 1024 vnodes 300 draws stayed within 0.92..1.09x.
    *old, new = ids
    factor = plan_shard_add(Ring(old, 1024), new).fraction * len(ids)
    assert MOVE_FACTOR_MIN <= factor <= MOVE_FACTOR_MAX


def test_adding_then_removing_a_shard_moves_the_same_arcs_back() -> None:
    ring = Ring(range(4), 32)
    grow, shrink = plan_shard_add(ring), plan_shard_remove(ring.with_shard(4), 4)
    back = [(a.lo, a.hi, a.dst, a.src) for a in shrink.arcs]
    assert [(a.lo, a.hi, a.src, a.dst) for a in grow.arcs] == back


def test_key_movement_spec_one_shard_to_two() -> None:
    movement = plan_shard_add(Ring([0]))
    assert movement.new == Ring([0, 1]) and movement.flows().keys() == {(0, 1)}
    assert all(a.src == 0 and a.dst == 1 for a in movement.arcs)
    assert 0.4 < movement.fraction < 0.6
    assert key_movement(Ring([0, 1]), Ring([1, 0])).arcs == (), "the same ring moves nothing"


def test_key_movement_refuses_impossible_changes() -> None:
    with pytest.raises(PlanError, match="last shard"):
        plan_shard_remove(Ring([3]))
    with pytest.raises(PlanError, match="cannot add shard 1: shard 1 is already on the ring"):
        plan_shard_add(Ring([0, 1]), 1)
    with pytest.raises(PlanError, match="cannot add shard 3: shard 3 is already on the ring"):
        plan_shard_add(Ring([0, 3]), 1, count=3)
    with pytest.raises(PlanError, match=r"count must be an int in 1\.\.1024, got 0"):
        plan_shard_add(Ring([0]), count=0)
    with pytest.raises(PlanError, match="cannot remove shard 7"):
        plan_shard_remove(Ring([0, 1]), 7)
    with pytest.raises(PlanError, match="at least one shard"):
        key_movement(Ring([]), Ring([0]))
    with pytest.raises(PlanError, match="between two shards"):
        Arc(0, 10, 2, 2)
    with pytest.raises(PlanError, match="non-empty range"):
        Arc(5, 5, 1, 2)


# -- replica placement ----------------------------------------------------------------------------


def even_placement(nodes: list[str], shards: int, r: int) -> dict[int, tuple[str, ...]]:
    """What ShardMap places by default: shard s on nodes s, s+1, ... (mod N)."""
    return {s: tuple(nodes[(s + i) % len(nodes)] for i in range(r)) for s in range(shards)}


@st.composite
def clusters(draw: st.DrawFn) -> tuple[str, dict[int, tuple[str, ...]], list[str], int]:
    """(scenario, current placement, target nodes, R): 3..9 target nodes, 1..16 shards, R <= 3."""
    n = draw(st.integers(3, 9), label="nodes")
    names = [f"n{i}" for i in range(1, n + 1)]
    shards = draw(st.integers(1, 16), label="shards")
    r = draw(st.integers(1, 3), label="R")
    scenario = draw(st.sampled_from(["node add", "node remove", "legacy add", "shuffled", "arbitrary"]))
    if scenario == "node add":  # nodes joined an evenly placed cluster
        old = names[: draw(st.integers(1, n - 1))]
        placement = even_placement(old, shards, min(r, len(old)))
    elif scenario == "node remove":  # drain one or two nodes out of an evenly placed cluster
        old = names + [f"d{i}" for i in range(1, draw(st.integers(1, 2)) + 1)]
        placement = even_placement(draw(st.permutations(old)), shards, r)
    elif scenario == "legacy add":  # `raftkv node add` today: every shard on every node
        placement = {s: tuple(names) for s in range(shards)}
    elif scenario == "shuffled":
        placement = {s: tuple(draw(st.permutations(names))[:r]) for s in range(shards)}
    else:  # any replica counts, some on drained nodes
        pool = names + ["d1", "d2"]
        placement = {s: tuple(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5, unique=True)))
                     for s in range(shards)}
    return scenario, placement, names, r


@settings(max_examples=150, deadline=None)
@given(cluster=clusters())
def test_applying_a_plan_step_by_step_stays_safe_and_ends_balanced(cluster) -> None:
    scenario, placement, nodes, r = cluster
    plan = plan_replicas(placement, nodes, r)
    majority = r // 2 + 1
    drained = {n for names in placement.values() for n in names} - set(nodes)
    assert set(plan.drained) == drained
    current = {s: tuple(v) for s, v in placement.items()}
    for step in plan.steps:
        count = len(current[step.shard])
        if step.action == "remove":
            assert count > r, f"{step} while the shard has only {count} replicas (R = {r})"
        else:
            assert step.node not in drained, f"{step}: a drained node only ever loses replicas"
        current = apply_step(current, step)
        for s, names in current.items():
            floor = min(len(placement[s]), r)
            assert len(names) >= floor, f"after {step}: shard {s} has {len(names)} replicas"
            assert len(names) <= max(len(placement[s]), r + 1)
            if len(placement[s]) >= majority:
                assert len(names) >= majority
    assert current == plan.after
    draining = [any(n in drained for n in placement[st.shard]) for st in plan.steps]
    assert draining == sorted(draining, reverse=True), "the shards on drained nodes move first"
    assert all(len(names) == r and set(names) <= set(nodes) for names in current.values())
    loads = plan.loads_after()
    mean = len(placement) * r / len(nodes)
    assert all(abs(load - mean) < 1 for load in loads.values()), f"not balanced: {loads} (mean {mean:.2f})"
    assert len(set(plan.steps)) == len(plan.steps) and not {
        (st.shard, st.node) for st in plan.steps if st.action == "add"} & {
        (st.shard, st.node) for st in plan.steps if st.action == "remove"}, "no replica is added and removed"
    assert plan.adds >= plan.adds_lower_bound
    if scenario in ("node add", "node remove", "shuffled"):
        assert plan.adds == plan.adds_lower_bound, "a node moves only what balance needs"


@settings(max_examples=40, deadline=None)
@given(cluster=clusters(), seed=st.integers(0, 2**16))
def test_plans_are_deterministic_whatever_the_node_order(cluster, seed: int) -> None:
    _, placement, nodes, r = cluster
    shuffled = list(nodes)
    random.Random(seed).shuffle(shuffled)
    reordered = {s: placement[s] for s in sorted(placement, reverse=True)}
    assert plan_replicas(placement, nodes, r) == plan_replicas(reordered, shuffled, r)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(2, 4), shards=st.integers(1, 3))
def test_no_balanced_placement_needs_fewer_new_replicas(data: st.DataObject, n: int, shards: int) -> None:
    nodes = [f"n{i}" for i in range(1, n + 1)]
    pool = [*nodes, "d1"]
    replica_sets = st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool), unique=True)
    placement = {s: tuple(data.draw(replica_sets)) for s in range(shards)}
    r = data.draw(st.integers(1, n), label="R")
    best = min(
        sum(len(set(choice) - set(placement[s])) for s, choice in enumerate(combo))
        for combo in itertools.product(itertools.combinations(nodes, r), repeat=shards)
        if max(loads := [sum(x in c for c in combo) for x in nodes]) - min(loads) <= 1
    )
    assert plan_replicas(placement, nodes, r).adds == best


# Hand-made examples: what an operator sees.


def test_spec_a_fourth_node_takes_two_replicas_each_added_before_one_is_removed() -> None:
    plan = plan_replicas(even_placement(["n1", "n2", "n3"], 3, 3), ["n1", "n2", "n3", "n4"])
    assert plan.replication == 3
    assert sorted(plan.loads_after().values()) == [2, 2, 2, 3]
    assert [(st.action, st.node) for st in plan.steps][::2] == [("add", "n4"), ("add", "n4")]
    for add, remove in zip(plan.steps[::2], plan.steps[1::2], strict=True):
        assert remove.action == "remove" and remove.shard == add.shard and remove.node != "n4"


def test_spec_draining_a_node_moves_each_of_its_replicas_to_the_node_missing_that_shard() -> None:
    placement = even_placement(["n1", "n2", "n3", "n4"], 4, 3)
    plan = plan_replicas(placement, ["n1", "n2", "n3"])
    assert plan.drained == ("n4",)
    expected = []
    for s, names in placement.items():
        if "n4" in names:
            (missing,) = {"n1", "n2", "n3"} - set(names)
            expected += [ReplicaStep(s, "add", missing), ReplicaStep(s, "remove", "n4")]
    assert list(plan.steps) == expected
    assert plan.loads_after() == {"n1": 4, "n2": 4, "n3": 4}


def test_spec_a_balanced_cluster_has_nothing_to_do() -> None:
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    plan = plan_replicas(even_placement(nodes, 10, 3), nodes)
    assert plan.steps == ()
    assert plan.describe() == ["balanced: nothing to move (replicas per node: n1=6, n2=6, n3=6, n4=6, n5=6)"]


def test_spec_after_todays_node_add_only_removes_are_needed() -> None:
    # `raftkv node add` puts the new node in every group: 4 replicas of each shard on 4 nodes.
    plan = plan_replicas({s: ("n1", "n2", "n3", "n4") for s in range(3)}, ["n1", "n2", "n3", "n4"])
    assert plan.adds == 0 and len(plan.steps) == 3
    assert sorted(plan.loads_after().values()) == [2, 2, 2, 3]


def test_spec_an_under_replicated_shard_only_gains_replicas() -> None:
    plan = plan_replicas({0: ("n2",), 1: ("n1", "n2", "n3")}, ["n1", "n2", "n3"])
    assert plan.steps == (ReplicaStep(0, "add", "n1"), ReplicaStep(0, "add", "n3"))
    assert "2 step(s): 2 replica(s) added, 0 removed" in plan.describe()[-1]


def test_spec_describe_lists_numbered_steps() -> None:
    plan = plan_replicas({0: ("n1",), 1: ("n1",)}, ["n1", "n2"], replication=1)
    assert plan.describe() == [
        "   1. add replica of shard 1 on n2",
        "   2. remove replica of shard 1 from n1",
        "2 step(s): 1 replica(s) added, 1 removed; replicas per node after: n1=1, n2=1",
    ]


def test_placement_plans_refuse_impossible_inputs() -> None:
    with pytest.raises(PlanError, match=r"replication must be an int in 1\.\.2"):
        plan_replicas({0: ("n1",)}, ["n1", "n2"], replication=3)
    with pytest.raises(PlanError, match="no target nodes"):
        plan_replicas({0: ("n1",)}, [])
    with pytest.raises(PlanError, match="listed twice"):
        plan_replicas({0: ("n1",)}, ["n1", "n1"])
    with pytest.raises(PlanError, match="shard 0 has no replica"):
        plan_replicas({0: ()}, ["n1"])
    with pytest.raises(PlanError, match="shard 0 is already on n1"):
        apply_step({0: ("n1",)}, ReplicaStep(0, "add", "n1"))
    with pytest.raises(PlanError, match="shard 0 is not on n2"):
        apply_step({0: ("n1",)}, ReplicaStep(0, "remove", "n2"))


def test_flow_network_takes_the_cheapest_of_the_maximum_flows() -> None:
    # s -> a -> t costs 3, s -> a -> b -> t costs 1, s -> b -> t costs 2 + 1: the cheapest flow of 2
    # sends both units through a (cost 4), not one through b (cost 6).
    s, a, b, t = range(4)
    net = FlowNetwork(4)
    sa, sb = net.edge(s, a, 2), net.edge(s, b, 1, cost=2)
    at, ab, bt = net.edge(a, t, 1, cost=3), net.edge(a, b, 1), net.edge(b, t, 1, cost=1)
    assert net.max_flow(s, t) == 2
    assert [net.flow(e) for e in (sa, sb, at, ab, bt)] == [2, 0, 1, 1, 1]
    assert net.max_flow(s, t) == 0, "a maximum flow has no augmenting path left"
    with pytest.raises(ValueError, match=">= 0"):
        net.edge(a, b, -1)

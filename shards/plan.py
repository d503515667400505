"""Scale-out planning: which keys a ring change moves, and which replicas to move between nodes.

Theory of operation
-------------------
Everything here is pure: values in, a plan out, no I/O, clocks or threads. The
plans say *what* moves, never *how*: ``raftkv.rebalance`` carries replica plans
out online (add, catch up, remove), using the two pure decisions at the end of
this module (``step_blocker``: may a step start; ``reconcile_placement``: the
map after an interrupted run). Nothing carries key movement out yet (freeze a
range, stream it, flip the map: issue 15).

**Key movement** (``key_movement``, ``plan_shard_add``, ``plan_shard_remove``).
A ``Ring`` is a list of half-open hash ranges ``[lo, hi)`` on ``[0, 2**64)``, each
owned by one shard (``Ring.arcs``). Overlaying the old and the new ring's ranges
gives the *moving arcs*: the maximal ranges whose owner differs, each with its
source and destination shard. A key moves exactly when its hash
(``shards.ring.key_hash``) falls in a moving arc, so ``KeyMovement.moves_hash`` is
the executor's filter for a range scan. Because a shard's ring points depend
only on its own id, adding shard ``t`` only inserts points: every arc goes *to*
``t``; removing ``t`` only deletes points: every arc comes *from* ``t``. The moved
fraction is exact (sizes of arcs over ``2**64``), not sampled.

**Replica placement** (``plan_replicas``). Given the current placement
(shard -> nodes), the nodes that should hold replicas afterwards (after a
``node add``, or without the nodes being drained before a ``node remove``) and the
replication ``R`` (default ``min(3, N)``), the plan is a sequence of single steps,
``add`` (shard, node) and ``remove`` (shard, node), that ends with:

* every shard on exactly ``R`` distinct nodes of the target set;
* every target node holding ``floor(S*R/N)`` or ``ceil(S*R/N)`` replicas (within
  one of the mean);
* as few new replicas (data copies) as any plan reaching that can have;
* no replica left on a drained node.

Safety, at every step: a ``remove`` is only planned while its shard has more
than ``R`` replicas (so after it, at least ``R``: never below a majority), which
means the ``add`` that replaces a replica always comes before the ``remove`` of
the one it replaces. A shard never has fewer than ``min(current, R)`` replicas
nor more than ``max(current, R + 1)``. Moving leadership off a replica before
it is removed is the executor's business. Drained nodes are only ever the node of a ``remove``. Steps are
ordered: drains first, then replication repairs (a shard with too few or too
many replicas), then balancing moves; within each, by shard id.

How the final placement is found: as a minimum-cost flow (``shards.flow``) from
shards to nodes, where keeping a replica costs 0 and creating one costs 1 and the
node capacities are the balanced loads. So the plan creates as few replicas as
any balanced plan can (checked against brute force on small clusters in
tests/test_plan.py), and removes exactly the replicas it does not keep. The
steps are the difference between the current and the final placement, shard by
shard. ``PlacementPlan.adds_lower_bound`` is a simple bound; the
tests check the plan meets it for node adds and drains of evenly placed
clusters (on odd inputs no plan can). ``bench/plan_bench.py`` times it: 6-8 ms
for 100 shards on 9 nodes, 0.5-0.9 s for 1024 shards (the shard map's limit)
on 16, on a shared 2-core machine.

Leader spread is ``raftkv.membership.plan_balance``'s job, run after a placement
change (leadership moves cost no data).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from shards.flow import FlowNetwork
from shards.ring import HASH_SPACE, Ring, key_hash

__all__ = [
    "Arc",
    "KeyMovement",
    "PlacementPlan",
    "PlanError",
    "ReplicaStep",
    "apply_step",
    "key_movement",
    "plan_replicas",
    "plan_shard_add",
    "plan_shard_remove",
    "reconcile_placement",
    "step_blocker",
]

REPLICATION_DEFAULT_MAX = 3  # R = min(3, N) unless the caller says otherwise
SHARDS_ADD_MAX = 1024  # a limit on everything: shards added in one plan (the shard map's own limit)


class PlanError(ValueError):
    """A plan was asked for an impossible change; the message says what and how to fix it."""


# -- key movement ---------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Arc:
    """The key hashes ``[lo, hi)`` move from shard ``src`` to shard ``dst``."""

    lo: int
    hi: int
    src: int
    dst: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo < self.hi <= HASH_SPACE:
            raise PlanError(f"an arc is a non-empty range inside [0, 2**64), got [{self.lo}, {self.hi})")
        if self.src == self.dst:
            raise PlanError(f"an arc moves keys between two shards, got {self.src} -> {self.dst}")

    @property
    def size(self) -> int:
        """How many hash values the arc covers."""
        return self.hi - self.lo

    def __contains__(self, h: object) -> bool:
        return isinstance(h, int) and self.lo <= h < self.hi


@dataclass(frozen=True)
class KeyMovement:
    """What a ring change moves: the arcs, in hash order, from ``old`` to ``new``."""

    old: Ring
    new: Ring
    arcs: tuple[Arc, ...]
    _los: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for a, b in zip(self.arcs, self.arcs[1:], strict=False):
            assert a.hi <= b.lo, f"arcs overlap or are out of order: {a} then {b}"
        object.__setattr__(self, "_los", tuple(a.lo for a in self.arcs))

    def arc_for_hash(self, h: int) -> Arc | None:
        """The moving arc holding key hash ``h``, or None if that hash stays where it is."""
        i = bisect_right(self._los, h) - 1
        if i >= 0 and h in self.arcs[i]:
            return self.arcs[i]
        return None

    def moves_hash(self, h: int) -> bool:
        """Whether a key with hash ``h`` changes shard."""
        return self.arc_for_hash(h) is not None

    def moves_key(self, key: bytes | str) -> bool:
        """Whether ``key`` changes shard (str keys are utf-8, as everywhere)."""
        return self.moves_hash(key_hash(key))

    @property
    def moved_hashes(self) -> int:
        """How many of the ``2**64`` hash values move (exact)."""
        return sum(a.size for a in self.arcs)

    @property
    def fraction(self) -> float:
        """The fraction of the ring (and so, in expectation, of the keys) that moves."""
        return self.moved_hashes / HASH_SPACE

    def source_shares(self) -> dict[int, float]:
        """Per source shard, the fraction of its own part of the old ring that moves: in expectation, the
        fraction of its keys (a progress estimate's denominator)."""
        owned: dict[int, int] = {}
        for lo, hi, shard in self.old.arcs():
            owned[shard] = owned.get(shard, 0) + hi - lo
        moved: dict[int, int] = {}
        for (src, _dst), (_count, size) in self.flows().items():
            moved[src] = moved.get(src, 0) + size
        return {s: moved[s] / owned[s] for s in sorted(moved)}

    def describe(self, list_arcs: bool = False) -> list[str]:
        """Human-readable lines: arcs and share of the ring, one line per flow (and per arc if asked)."""
        head = f"{len(self.arcs)} moving arc(s), {_pct(self.moved_hashes)} of the ring"
        old, new = set(self.old.shards), set(self.new.shards)
        added, removed = new - old, old - new
        if bool(added) != bool(removed):  # only added or only removed: k of n shards' even share
            k, n = len(added | removed), max(len(self.new), len(self.old))
            head += f" (an even share: {k}/{n} = {100 * k / n:.2f}%)"
        lines = [head]
        for (src, dst), (count, size) in self.flows().items():
            lines.append(f"  shard {src} -> shard {dst}: {count} arc(s), {_pct(size)} of the ring")
        if list_arcs:
            lines += [f"    [{a.lo:#018x}, {a.hi:#018x}) {a.src} -> {a.dst}" for a in self.arcs]
        return lines

    def flows(self) -> dict[tuple[int, int], tuple[int, int]]:
        """``(src, dst) -> (arc count, hash values)``, sorted by ``(src, dst)``."""
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for a in self.arcs:
            n, size = out.get((a.src, a.dst), (0, 0))
            out[(a.src, a.dst)] = (n + 1, size + a.size)
        return dict(sorted(out.items()))


def _pct(hashes: int) -> str:
    return f"{100 * hashes / HASH_SPACE:.2f}%"


def key_movement(old: Ring, new: Ring) -> KeyMovement:
    """The arcs whose owner differs between ``old`` and ``new`` (any two non-empty rings).

    Every arc is maximal (its neighbours stay put or move along another flow).
    ``KeyMovement.moves_hash(h)`` is exactly
    ``old.shard_for_hash(h) != new.shard_for_hash(h)``.
    """
    if not len(old) or not len(new):
        raise PlanError("both rings need at least one shard (an empty ring owns no key)")
    a, b = old.arcs(), new.arcs()
    arcs: list[Arc] = []
    i = j = lo = 0
    # Merge walk over the two sorted range lists: each step ends at the nearer range end. Each
    # ring's adjacent ranges have different owners, so consecutive pieces differ in (src, dst):
    # the arcs come out maximal with no merging.
    while lo < HASH_SPACE:
        hi = min(a[i][1], b[j][1])
        src, dst = a[i][2], b[j][2]
        if src != dst:
            arcs.append(Arc(lo, hi, src, dst))
        i += a[i][1] == hi
        j += b[j][1] == hi
        lo = hi
    return KeyMovement(old, new, tuple(arcs))


def plan_shard_add(ring: Ring, shard_id: int | None = None, count: int = 1) -> KeyMovement:
    """Adding shards ``shard_id .. shard_id + count - 1`` to ``ring``; every arc goes to one of them.

    ``shard_id`` defaults to one past the largest id on the ring (a shard map's
    ids are ``0..shards-1``, so the new ones continue the numbering).
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= SHARDS_ADD_MAX:
        raise PlanError(f"count must be an int in 1..{SHARDS_ADD_MAX}, got {count!r}")
    first = max(ring.shards, default=-1) + 1 if shard_id is None else shard_id
    ids = range(first, first + count)
    clash = [i for i in ids if i in ring.shards]
    if clash:
        raise PlanError(f"cannot add shard {clash[0]}: shard {clash[0]} is already on the ring")
    try:
        new = Ring((*ring.shards, *ids), ring.vnodes)
    except ValueError as e:
        raise PlanError(f"cannot add shard(s) {list(ids)}: {e}") from None
    return key_movement(ring, new)


def plan_shard_remove(ring: Ring, shard_id: int | None = None) -> KeyMovement:
    """Removing ``shard_id`` (default: the largest id) from ``ring``; every arc comes from it."""
    if len(ring) < 2:
        raise PlanError("cannot remove the last shard: its keys would have nowhere to go")
    if shard_id is None:
        shard_id = max(ring.shards)
    try:
        new = ring.without_shard(shard_id)
    except ValueError as e:
        raise PlanError(f"cannot remove shard {shard_id}: {e}") from None
    return key_movement(ring, new)


# -- replica placement ----------------------------------------------------------------------------

Placement = Mapping[int, Sequence[str]]


@dataclass(frozen=True, order=True)
class ReplicaStep:
    """One membership change of one shard group: ``add`` a replica on ``node``, or ``remove`` it.

    For ``add`` the executor adds a learner, lets it catch up and promotes it; the
    step is done once the node is a voting member.
    """

    shard: int
    action: Literal["add", "remove"]
    node: str

    def __str__(self) -> str:
        where = "on" if self.action == "add" else "from"
        return f"{self.action} replica of shard {self.shard} {where} {self.node}"


def apply_step(placement: Placement, step: ReplicaStep) -> dict[int, tuple[str, ...]]:
    """The placement after ``step``: an added node goes last, a removed one leaves its place.

    Raises PlanError if the step does not fit (adding a node the shard is already
    on, removing one it is not on, an unknown shard).
    """
    if step.shard not in placement:
        raise PlanError(f"shard {step.shard} is not in the placement")
    names = tuple(placement[step.shard])
    if step.action == "add":
        if step.node in names:
            raise PlanError(f"shard {step.shard} is already on {step.node}")
        names = (*names, step.node)
    elif step.action == "remove":
        if step.node not in names:
            raise PlanError(f"shard {step.shard} is not on {step.node}")
        names = tuple(n for n in names if n != step.node)
    else:
        raise PlanError(f"unknown step action {step.action!r} (add or remove)")
    out = {s: tuple(v) for s, v in placement.items()}
    out[step.shard] = names
    return out


@dataclass(frozen=True)
class PlacementPlan:
    """The steps from ``before`` to ``after`` (every shard on ``replication`` of ``nodes``, balanced)."""

    before: dict[int, tuple[str, ...]]
    after: dict[int, tuple[str, ...]]
    nodes: tuple[str, ...]
    drained: tuple[str, ...]
    replication: int
    steps: tuple[ReplicaStep, ...]

    @property
    def adds(self) -> int:
        """Replicas created (each one copies a shard's data to a node)."""
        return sum(st.action == "add" for st in self.steps)

    @property
    def adds_lower_bound(self) -> int:
        """Fewer adds than this cannot balance ``before``, whatever the plan.

        Every missing replica of a shard is an add, and so is every replica a node
        lacks against the least demanding balanced targets (the extra replicas on the
        nodes holding most).
        """
        kept = {s: {n for n in names if n in self.nodes} for s, names in self.before.items()}
        missing = sum(max(0, self.replication - len(names)) for names in kept.values())
        load = _loads(kept, self.nodes)
        targets = _targets(kept, self.nodes, self.replication)
        return max(missing, sum(max(0, targets[n] - load[n]) for n in self.nodes))

    def loads_after(self) -> dict[str, int]:
        """Replicas per target node once every step is done."""
        return _loads(self.after, self.nodes)

    def describe(self) -> list[str]:
        """Human-readable lines: one per step, or one saying the placement is balanced."""
        after = ", ".join(f"{n}={c}" for n, c in self.loads_after().items())
        if not self.steps:
            return [f"balanced: nothing to move (replicas per node: {after})"]
        lines = [f"{i:>4}. {st}" for i, st in enumerate(self.steps, 1)]
        lines.append(f"{len(self.steps)} step(s): {self.adds} replica(s) added, "
                     f"{len(self.steps) - self.adds} removed; replicas per node after: {after}")
        return lines


def _loads(placement: Placement, nodes: Iterable[str]) -> dict[str, int]:
    load = {n: 0 for n in nodes}
    for names in placement.values():
        for n in names:
            if n in load:
                load[n] += 1
    return load


def _check_inputs(placement: Placement, nodes: Sequence[str], replication: int | None) -> int:
    if not nodes:
        raise PlanError("no target nodes: a placement needs at least one node")
    if len(set(nodes)) != len(nodes):
        raise PlanError(f"a target node is listed twice: {sorted(nodes)}")
    if not placement:
        raise PlanError("no shards in the placement")
    for s, names in placement.items():
        if len(set(names)) != len(names):
            raise PlanError(f"shard {s} lists a node twice: {list(names)}")
        if not names:
            raise PlanError(f"shard {s} has no replica: nothing to copy it from")
    r = min(REPLICATION_DEFAULT_MAX, len(nodes)) if replication is None else replication
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= len(nodes):
        raise PlanError(f"replication must be an int in 1..{len(nodes)} (the target nodes), got {r!r}")
    return r


def _targets(kept: Mapping[int, set[str]], nodes: Sequence[str], r: int) -> dict[str, int]:
    """The least demanding balanced loads: floor or ceil of the mean, ceil on the nodes holding most."""
    total = len(kept) * r
    q, extra = divmod(total, len(nodes))
    load = _loads(kept, nodes)
    heaviest = sorted(nodes, key=lambda n: (-load[n], n))
    return {n: q + (i < extra) for i, n in enumerate(heaviest)}


def _balanced_placement(before: Mapping[int, tuple[str, ...]], nodes: Sequence[str],
                        r: int) -> dict[int, set[str]]:
    """A placement with every shard on ``r`` of ``nodes``, loads within one, fewest new replicas.

    A minimum-cost maximum flow (``shards.flow``): source -> shard (capacity ``r``),
    shard -> node (capacity 1; cost 0 if the node holds the shard now, 1 if the
    replica would be new), node -> sink (capacity ``floor``), and node -> "extra"
    -> sink (capacity 1 per node, ``S*R mod N`` in all) for the nodes that hold
    one more than the floor. A flow of ``S*R`` is exactly a balanced placement,
    and its cost is the number of replicas it creates.
    """
    shards = sorted(before)
    q, extra = divmod(len(shards) * r, len(nodes))
    src, sink, extra_v = 0, 1, 2
    shard_v = {s: 3 + i for i, s in enumerate(shards)}
    node_v = {n: 3 + len(shards) + i for i, n in enumerate(nodes)}
    net = FlowNetwork(3 + len(shards) + len(nodes))
    feed = {s: net.edge(src, shard_v[s], r) for s in shards}
    holds = {(s, n): net.edge(shard_v[s], node_v[n], 1, 0 if n in before[s] else 1)
             for s in shards for n in nodes}
    floor = {n: net.edge(node_v[n], sink, q) for n in nodes}
    plus = {n: net.edge(node_v[n], extra_v, 1) for n in nodes}
    extra_e = net.edge(extra_v, sink, extra)
    # A head start (zero cost, so the flow stays a cheapest one): keep existing replicas where they fit.
    for s in shards:
        for n in before[s]:
            if n not in node_v or net.residual(feed[s]) == 0:
                continue
            if net.residual(floor[n]):
                net.push([feed[s], holds[(s, n)], floor[n]])
            elif net.residual(plus[n]) and net.residual(extra_e):
                net.push([feed[s], holds[(s, n)], plus[n], extra_e])
    total = sum(net.flow(e) for e in feed.values()) + net.max_flow(src, sink)
    assert total == len(shards) * r, f"a balanced placement exists (R <= N) but the flow found {total}"
    return {s: {n for n in nodes if net.flow(holds[(s, n)])} for s in shards}


def _steps_for_shard(shard: int, before: tuple[str, ...], after: set[str], r: int,
                     drained: Iterable[str]) -> list[ReplicaStep]:
    """Adds and removes that keep the shard between ``min(len(before), r)`` and ``max(len(before), r + 1)``.

    A remove comes only while the shard has more than ``r`` replicas, so a replaced
    replica is removed after its replacement was added; drained replicas go first.
    """
    adds = sorted(after - set(before))
    removes = sorted((n for n in before if n not in after), key=lambda n: n not in drained)
    count = len(before)
    steps: list[ReplicaStep] = []
    while adds or removes:
        # Only removes left means count = r + len(removes) > r; with adds left, add until above r.
        if removes and count > r:
            steps.append(ReplicaStep(shard, "remove", removes.pop(0)))
            count -= 1
        else:
            steps.append(ReplicaStep(shard, "add", adds.pop(0)))
            count += 1
        assert min(len(before), r) <= count <= max(len(before), r + 1), f"shard {shard}: {count} replicas"
    assert count == r
    return steps


def plan_replicas(placement: Placement, nodes: Iterable[str],
                  replication: int | None = None) -> PlacementPlan:
    """Steps that place every shard on ``replication`` of ``nodes``, balanced; see the module doc.

    ``placement`` maps every shard to the nodes holding it now (all of them live).
    A node in ``placement`` but not in ``nodes`` is drained: its replicas move off
    first and it ends with none. ``replication`` defaults to ``min(3, len(nodes))``.
    Deterministic: the same placement gives the same steps, in whatever order ``nodes`` come.
    """
    target_nodes = tuple(sorted(nodes))
    r = _check_inputs(placement, target_nodes, replication)
    before = {s: tuple(placement[s]) for s in sorted(placement)}
    original = {s: set(names) for s, names in before.items()}
    drained = tuple(sorted({n for names in before.values() for n in names} - set(target_nodes)))
    kept = _balanced_placement(before, target_nodes, r)

    def phase(s: int) -> int:  # drains first, then replication repairs, then balancing
        if any(n in drained for n in before[s]):
            return 0
        return 1 if len(before[s]) != r else 2

    steps: list[ReplicaStep] = []
    for s in sorted(before, key=lambda s: (phase(s), s)):
        steps += _steps_for_shard(s, before[s], kept[s], r, drained)
    # As apply_step leaves it: the surviving replicas in their order, then the new ones in step order.
    after = {s: tuple([n for n in before[s] if n in kept[s]] + sorted(kept[s] - original[s])) for s in before}
    return PlacementPlan(before=before, after=after, nodes=target_nodes, drained=drained, replication=r,
                         steps=tuple(steps))


# -- executing a placement plan: the pure decisions (raftkv.rebalance runs them) ------------------


def reconcile_placement(placement: Placement, members: Mapping[int, Iterable[str]]) -> dict[int, tuple[str, ...]]:
    """The placement that agrees with the shard groups' committed ``members`` (node names per shard).

    A group's membership is replicated by Raft; the map is written after each change, so a run that
    stopped between the two leaves them apart. The groups win: names still members keep their
    place, new members go last (sorted), names no longer members leave. Shards without an entry in
    ``members`` keep their placement.
    """
    out = {s: tuple(names) for s, names in placement.items()}
    for s, names in members.items():
        if s not in out:
            raise PlanError(f"shard {s} is not in the placement")
        now = set(names)
        if not now:
            raise PlanError(f"shard {s} reports no member")
        kept = [n for n in out[s] if n in now]
        out[s] = (*kept, *sorted(now - set(kept)))
    return out


def step_blocker(step: ReplicaStep, members: Iterable[str], caught_up: Iterable[str]) -> str | None:
    """Why ``step`` must not start yet, or None if it may.

    ``members`` is the shard's group now, ``caught_up`` those of them whose applied index has reached
    the leader's commit index. A membership change is safe to start only if a majority of the group
    after it is caught up: a majority that includes a replica still catching up (receiving a
    snapshot, say) cannot commit, and the leader steps down. So before adding a replica (which is
    not caught up until it has caught up) the old members must hold a majority of the new group,
    and before removing one, the members that stay must.
    """
    group = set(members)
    if step.action == "add":
        if step.node in group:
            return f"shard {step.shard}: {step.node} is already a member"
        after = group | {step.node}
    else:
        if step.node not in group:
            return f"shard {step.shard}: {step.node} is not a member"
        after = group - {step.node}
    ready = set(caught_up) & after
    need = len(after) // 2 + 1
    if len(ready) < need:
        lagging = ", ".join(sorted(after - ready - {step.node} if step.action == "add" else after - ready))
        return (f"shard {step.shard}: {len(ready)} of the {len(after)} members after '{step}' are caught up, "
                f"{need} needed (lagging: {lagging or '-'})")
    return None

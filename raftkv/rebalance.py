"""Replica rebalancing, online: ``raftkv rebalance`` carries out a ``shards.plan.plan_replicas`` plan.

Theory of operation
-------------------
The plan (pure, ``shards.plan``) is a list of single steps, ``add`` or ``remove`` one replica of one
shard, ordered so that no shard ever has fewer than ``R`` replicas. ``Rebalancer`` runs them one at
a time against the live cluster, through the same primitives as ``raftkv node add|remove``
(``raftkv.membership.Operator``):

``add (shard, node)``
    ``RAFTKV.MEMBER shard ADD`` on the shard's leader (the group grows by one; its quorum is met by
    the old members, all caught up), then the map with the node in the shard's placement is saved
    (epoch + 1) and pushed to every node. A node installing a map starts the groups the placement
    now gives it (``Node.install_map``), with the other replicas as peers; the leader then sends it
    the log or a snapshot. The step ends when the new replica's applied index has reached the
    leader's commit index as read right after the add committed: caught up, not merely "knows a
    leader".
``remove (shard, node)``
    if ``node`` leads the shard, leadership moves to another member first (``RAFTKV.TRANSFER``);
    then ``RAFTKV.MEMBER shard REMOVE`` on the leader, and the map without the node is saved and
    pushed: the node stops and destroys its member of the group.

Before every step the executor waits until every shard has a majority of its members caught up,
and until the step's own shard keeps a caught-up majority *after* the change
(``shards.plan.step_blocker``): a configuration whose majority includes a replica still receiving a
snapshot cannot commit, and its leader steps down. "Caught up" is measured from two consecutive
rounds of ``RAFTKV.STATUS`` (one per node): a member whose ``last_applied`` in this round has
reached its leader's ``commit_idx`` of the previous round.

Re-running after a failure is safe: a run starts by making the map agree with the groups'
committed membership (``RAFTKV.MEMBER shard LIST``; ``shards.plan.reconcile_placement``), since a
run that died between a membership change and the map save leaves them apart, and then plans again
from that map. Every map change is a compare-and-set on the cluster's map (``raftkv.mapregister``): a
rebalance and another command run at once cannot both change it (the later one stops; run it again).

``raftkv node remove NODE`` drains the node first (``remove_node``) when the other nodes can hold every
shard's replicas, so the replication stays.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

from raftkv.client import RaftKVError
from raftkv.membership import MembershipError, Operator
from shards.plan import PlacementPlan, ReplicaStep, plan_replicas, reconcile_placement, step_blocker

__all__ = ["Rebalancer", "RebalanceResult"]

POLL_S = 0.1  # between two rounds of RAFTKV.STATUS while waiting


@dataclasses.dataclass
class RebalanceResult:
    """What a run did: the plan it carried out, how long each step took, and leadership moves after."""

    plan: PlacementPlan
    step_seconds: list[float]
    leader_moves: int
    seconds: float


class Rebalancer:
    """Carries out replica placement plans against the cluster of ``op`` (see module doc)."""

    def __init__(self, op: Operator, step_timeout: float = 120.0,
                 say: Callable[[str], None] | None = None) -> None:
        self.op = op
        self.step_timeout = step_timeout
        self.say = say or op.say

    # -- observing the cluster (Operator.statuses / leader_view / applied) -----------------------------
    def _caught_up(self, before: dict[str, dict], now: dict[str, dict], shard: int) -> set[str] | str:
        """Members of ``shard`` whose applied index now reached the leader's commit index ``before``."""
        view = self.op.leader_view(before, shard)
        if view is None:
            return f"shard {shard}: no leader"
        _leader, commit = view
        return {n for n in self.op.map.placement[shard]
                if (self.op.applied(now, n, shard) or 0) >= commit}

    def _blockers(self, before: dict[str, dict], now: dict[str, dict], step: ReplicaStep | None) -> list[str]:
        problems = []
        for s, members in self.op.map.placement.items():
            caught = self._caught_up(before, now, s)
            if isinstance(caught, str):
                problems.append(caught)
                continue
            if len(caught) <= len(members) // 2:
                problems.append(f"shard {s}: {len(caught)} of {len(members)} members caught up")
            if step is not None and step.shard == s:
                why = step_blocker(step, members, caught)
                if why is not None:
                    problems.append(why)
        return problems

    def wait_safe(self, step: ReplicaStep | None = None) -> None:
        """Until every shard has a caught-up majority, and ``step``'s shard keeps one after ``step``."""
        deadline = time.monotonic() + self.step_timeout
        before = self.op.statuses()
        while True:
            time.sleep(POLL_S)
            now = self.op.statuses()
            problems = self._blockers(before, now, step)
            if not problems:
                return
            if time.monotonic() > deadline:
                what = f"'{step}'" if step is not None else "rebalancing"
                raise MembershipError(f"not starting {what}: {'; '.join(problems)} (waited "
                                      f"{self.step_timeout:.0f} s; check the nodes' logs and "
                                      "'raftkv status', then run 'raftkv rebalance' again)")
            before = now

    # -- the map follows the groups -------------------------------------------------------------------
    def reconcile(self) -> bool:
        """Make the map's placement agree with the groups' committed members; True if it changed."""
        m = self.op.map
        members: dict[int, list[str]] = {}
        for s in range(m.nshards):
            names = []
            try:
                addrs = self.op.members(s)
            except RaftKVError as e:
                raise MembershipError(f"shard {s}: cannot read the group's members ({e}); is a majority of "
                                      "its replicas up?") from None
            for addr in addrs:
                name = m.node_for_raft_addr(addr)
                if name is None:
                    raise MembershipError(f"shard {s}: member {addr} is no node of {self.op.path}; remove it "
                                          f"with RAFTKV.MEMBER {s} REMOVE {addr} first")
                names.append(name)
            members[s] = names
        placement = reconcile_placement(m.placement, members)
        if placement == dict(m.placement):
            return False
        for s in sorted(placement):
            if placement[s] != m.placement[s]:
                self.say(f"shard {s}: the map said {list(m.placement[s])}, the group has {list(placement[s])}: "
                         "map updated (an earlier run stopped half-way)")
        self._publish(dataclasses.replace(m, epoch=m.epoch + 1, placement=placement))
        for s in sorted(placement):  # members nobody waited for: as an add step would, before going on
            for node in sorted(set(placement[s]) - set(m.placement[s])):
                self._wait_caught_up(s, node, self._leader(s)[1])
        return True

    def remove_node(self, name: str, stop: bool = True, drain: bool = True) -> RebalanceResult | None:
        """``raftkv node remove``: first move ``name``'s replicas to the other nodes (a run with ``--drain``)
        when they are enough to hold every shard's replicas, so the replication stays; then take it out of
        the map (``Operator.remove``, which otherwise has it leave every group: replication - 1)."""
        m = self.op.map
        if name not in m.nodes:
            raise MembershipError(f"unknown node {name!r} (nodes: {', '.join(sorted(m.nodes))})")
        result = None
        if drain and m.shards_on(name) and len(m.nodes) - 1 >= m.replication:
            self.say(f"draining {name}: its replicas move to the other nodes first")
            result = self.run(drain=[name])
        self.op.remove(name, stop=stop)
        return result

    def _publish(self, new: Any) -> None:
        self.op._save(new, verbose=False)
        self.op.push_map(verbose=False)

    # -- running ------------------------------------------------------------------------------------
    def plan(self, drain: Iterable[str] = (), replication: int | None = None) -> PlacementPlan:
        """The plan from the current map (every node not drained is a target)."""
        m = self.op.map
        drained = set(drain)
        unknown = sorted(drained - set(m.nodes))
        if unknown:
            raise MembershipError(f"--drain names unknown node(s) {unknown} (nodes: {', '.join(sorted(m.nodes))})")
        return plan_replicas(m.placement, [n for n in m.nodes if n not in drained], replication)

    def run(self, drain: Iterable[str] = (), replication: int | None = None,
            balance_leaders: bool = True) -> RebalanceResult:
        """Reconcile, plan, and carry out every step; then spread leaders (``Operator.balance``)."""
        t0 = time.monotonic()
        drain = tuple(drain)
        self.reconcile()
        plan = self.plan(drain, replication)
        m = self.op.map
        if plan.replication != m.replication:
            self._publish(dataclasses.replace(m, epoch=m.epoch + 1, replication=plan.replication))
        total = len(plan.steps)
        times = []
        for i, step in enumerate(plan.steps, 1):
            self.wait_safe(step)
            started = time.monotonic()
            if step.action == "add":
                self._add(step)
                verb, done = f"add {step.node}", "caught up"
            else:
                moved = self._remove(step)
                verb, done = f"remove {step.node}", "removed" + (f" (leadership to {moved})" if moved else "")
            times.append(time.monotonic() - started)
            self.say(f"step {i}/{total}: shard {step.shard}: {verb} ... {done} in {times[-1]:.1f} s")
        moves = 0
        if balance_leaders:
            self.wait_safe()
            moves = len(self.op.balance())
        return RebalanceResult(plan=plan, step_seconds=times, leader_moves=moves, seconds=time.monotonic() - t0)

    def _leader(self, shard: int) -> tuple[str, int]:
        deadline = time.monotonic() + self.step_timeout
        while True:
            view = self.op.leader_view(self.op.statuses(), shard)
            if view is not None:
                return view
            if time.monotonic() > deadline:
                raise MembershipError(f"shard {shard}: no leader for {self.step_timeout:.0f} s")
            time.sleep(POLL_S)

    def _add(self, step: ReplicaStep) -> None:
        m = self.op.map
        info = m.nodes[step.node]
        self.op._member(step.shard, "ADD", info.raft_addr(step.shard), verbose=False)
        # Committed: the leader's commit index now covers the configuration with the new member.
        _leader, commit = self._leader(step.shard)
        placement = {**m.placement, step.shard: (*m.placement[step.shard], step.node)}
        self._publish(dataclasses.replace(m, epoch=m.epoch + 1, placement=placement))
        self._wait_caught_up(step.shard, step.node, commit)

    def _wait_caught_up(self, shard: int, node: str, commit: int) -> None:
        """Until ``node``'s replica of ``shard`` has applied index ``commit`` (a snapshot install included)."""
        deadline = time.monotonic() + self.step_timeout
        while (self.op.applied(self.op.statuses(), node, shard) or -1) < commit:
            if time.monotonic() > deadline:
                raise MembershipError(f"shard {shard}: {node} did not catch up to index {commit} within "
                                      f"{self.step_timeout:.0f} s (see its log); it is a member: run "
                                      "'raftkv rebalance' again once it has")
            time.sleep(POLL_S)

    def _remove(self, step: ReplicaStep) -> str | None:
        """Returns the node leadership moved to, if the removed node led the shard."""
        m = self.op.map
        info = m.nodes[step.node]
        moved = None
        leader, _ = self._leader(step.shard)
        if leader == step.node:
            moved = self._move_leadership(step.shard, step.node)
        self.op._member(step.shard, "REMOVE", info.raft_addr(step.shard), verbose=False)
        placement = {**m.placement, step.shard: tuple(n for n in m.placement[step.shard] if n != step.node)}
        self._publish(dataclasses.replace(m, epoch=m.epoch + 1, placement=placement))
        return moved

    def _move_leadership(self, shard: int, away_from: str) -> str:
        deadline = time.monotonic() + self.step_timeout
        addr = self.op.map.nodes[away_from].client_addr
        while True:
            try:
                # No target: the leader picks its most caught-up follower.
                self.op._call(addr, "RAFTKV.TRANSFER", str(shard), timeout=5.0)
            except (OSError, ConnectionError):
                pass
            time.sleep(0.3)
            leader, _ = self._leader(shard)
            if leader != away_from:
                return leader
            if time.monotonic() > deadline:
                raise MembershipError(f"shard {shard}: could not move leadership off {away_from} in "
                                      f"{self.step_timeout:.0f} s; run 'raftkv rebalance' again")

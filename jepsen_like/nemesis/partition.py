"""Network partitions: the pure choice of which node pairs to cut (:func:`partition_edges`) and the
``partition`` fault that applies it with :class:`jepsen_like.netns.Firewall` and checks that it holds.

Partition shapes (node addresses, via :class:`jepsen_like.netns.Firewall`):

* ``halves``: the nodes shuffled and split into a minority and a majority;
  half the time the minority holds the leader of a random shard (as the
  process faults pick their target), else it is random: with 3 nodes whose
  shards all elected the same leader, a random minority holds it only a
  third of the time, and no other shape deposes it (a 3-node bridge leaves
  every node a majority);
* ``isolate-leader``: the leader of a random shard (``LocalCluster.leaders()``)
  alone against the rest (the classic stale-leader setup);
* ``majority-ring``: every node still sees a majority, but no two see the same
  one: nodes on a shuffled ring keep links to their nearest neighbours only.
  With 3 or 4 nodes that rule cuts nothing, so one random link is cut instead
  (Jepsen's "bridge": the middle node sees everyone, the two ends only it).
"""

from __future__ import annotations

import random

from .base import Fault, NemesisBase

PARTITION_SHAPES = ("halves", "isolate-leader", "majority-ring")


def partition_edges(shape: str, nodes: list[str], rng: random.Random,
                    leader: str | None = None) -> tuple[list[tuple[str, str]], list[list[str]], str]:
    """Pure: which node pairs to cut for ``shape``; returns ``(edges, groups, detail)``."""
    nodes = list(nodes)
    if shape == "halves":
        rng.shuffle(nodes)
        k = len(nodes) // 2
        if leader in nodes:  # the leader first: in the minority
            nodes.remove(leader)
            nodes.insert(0, leader)
        groups = [sorted(nodes[:k]), sorted(nodes[k:])]
        how = f" (leader {leader} in the minority)" if leader in nodes else ""
        return _between(groups), groups, f"halves {groups[0]} | {groups[1]}{how}"
    if shape == "isolate-leader":
        target = leader if leader in nodes else rng.choice(nodes)
        rest = sorted(n for n in nodes if n != target)
        groups = [[target], rest]
        how = "leader" if leader in nodes else "random node (no leader known)"
        return _between(groups), groups, f"isolate {how} {target} from {rest}"
    if shape == "majority-ring":
        rng.shuffle(nodes)
        n = len(nodes)
        reach = (n // 2 + 1) // 2  # ring distance kept: 2*reach >= n//2 others, so each sees a majority
        edges = []
        for i in range(n):
            for j in range(i + 1, n):
                d = min(j - i, n - (j - i))
                if d > reach:
                    edges.append((nodes[i], nodes[j]))
        if not edges and n >= 3:
            a, b = rng.sample(nodes, 2)
            edges = [(a, b)]
            mid = [x for x in nodes if x not in (a, b)]
            return edges, [[a, *mid], [b, *mid]], f"majority ring (bridge): {a} x {b}, {mid} sees both"
        return edges, [], "majority ring " + " - ".join(nodes) + f" (cut: {sorted(map(sorted, edges))})"
    raise ValueError(f"unknown partition shape {shape!r}")


def _between(groups: list[list[str]]) -> list[tuple[str, str]]:
    return [(a, b) for i, g in enumerate(groups) for h in groups[i + 1:] for a in g for b in h]


class PartitionFaults(NemesisBase):
    """``partition``: cut the links of a shape drawn from ``self.shapes``; the window's end heals the network."""

    shapes: tuple[str, ...]

    def _start_partition(self) -> Fault:
        if self.firewall is None:
            raise RuntimeError("partition nemesis unavailable (no network namespace / iptables)")
        shape = self.rng.choice(self.shapes)
        leader = None
        if shape == "isolate-leader" or (shape == "halves" and self.rng.random() < 0.5):
            leader = self._leaders().get(self.rng.randrange(self.cluster.map.nshards))
        # A node the reshard nemesis added (and will remove) is cut like the run's own: it hosts replicas too.
        nodes = [*self.nodes, *sorted(n for n in self.cluster.map.nodes if n not in self.nodes)]
        edges, groups, detail = partition_edges(shape, nodes, self.rng, leader)
        f = Fault("partition", f"{shape}: {detail}", sorted({n for e in edges for n in e}),
                  self.clock(), groups=groups)
        for a, b in edges:
            self.firewall.drop_between(self._host(a), self._host(b))
        for a, b in edges:  # a probe packet must be dropped, or the fault did not happen
            port = self.cluster.map.nodes[b].client_port
            if not self.firewall.drops(self._host(a), self._host(b), port):
                self.firewall.heal()
                raise RuntimeError(f"partition not in effect: a connection from {a} to {b} got through")
        return f

    def _end_partition(self, f: Fault) -> None:
        if self.firewall is not None:
            self.firewall.heal()

    def _heal_network(self) -> list[str]:
        """The heal: flush every partition; what was done."""
        done = []
        if self.firewall is not None:
            try:
                self.firewall.heal()
                done.append("network healed")
            except Exception as e:  # noqa: BLE001
                done.append(f"network heal failed: {e}")
        return done

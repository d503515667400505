"""Minimum-cost flow on a small integer network (successive shortest paths).

Theory of operation
-------------------
Used by ``shards.plan`` to choose a replica placement: a placement is a flow
from shards to nodes, an edge that keeps an existing replica costs 0 and one
that creates a new replica costs 1, so a minimum-cost maximum flow is a
balanced placement that copies as little data as possible.

The network is a residual graph in flat lists (edge ``e`` and its reverse
``e ^ 1``). ``max_flow`` first augments along paths of zero-cost edges only
(breadth-first), which is a minimum-cost flow for its value because no cost is
negative; then along cheapest paths of the whole residual graph (Bellman-Ford
with a queue, since reverse edges cost less than zero). A flow built that way is
a minimum-cost flow at every value, so the last one is a minimum-cost maximum
flow. Vertices and edges are scanned in the order they were added, so the
result is deterministic. Pure: no I/O, clocks or randomness.

Cost: one shortest-path search (``O(V * E)`` at worst, about ``O(E)`` in
practice) per unit of flow that needs a positive-cost edge; callers keep the
zero-cost part cheap by pushing an initial flow with ``push``.
"""

from __future__ import annotations

from collections import deque

__all__ = ["FlowNetwork"]


class FlowNetwork:
    """A directed network on vertices ``0..n-1`` with integer capacities and costs."""

    def __init__(self, n: int) -> None:
        if n < 2:
            raise ValueError(f"a flow network needs a source and a sink, got {n} vertices")
        self._adj: list[list[int]] = [[] for _ in range(n)]
        self._to: list[int] = []
        self._cap: list[int] = []
        self._cost: list[int] = []

    def edge(self, u: int, v: int, cap: int, cost: int = 0) -> int:
        """Add an edge ``u -> v``; returns its id (for ``flow`` and ``push``)."""
        if cap < 0 or cost < 0:
            raise ValueError(f"capacity and cost must be >= 0, got {cap} and {cost}")
        e = len(self._to)
        self._to += [v, u]
        self._cap += [cap, 0]
        self._cost += [cost, -cost]
        self._adj[u].append(e)
        self._adj[v].append(e + 1)
        return e

    def flow(self, e: int) -> int:
        """The flow on edge ``e`` (the residual capacity of its reverse)."""
        return self._cap[e ^ 1]

    def residual(self, e: int) -> int:
        """How much more edge ``e`` can carry."""
        return self._cap[e]

    def push(self, path: list[int], amount: int = 1) -> None:
        """Send ``amount`` along the edges ``path``; each must have that much residual capacity."""
        for e in path:
            assert self._cap[e] >= amount, f"edge {e} has {self._cap[e]} left, cannot carry {amount}"
            self._cap[e] -= amount
            self._cap[e ^ 1] += amount

    def _cheapest_path(self, s: int, t: int, zero_cost_only: bool) -> list[int] | None:
        n = len(self._adj)
        dist: list[float] = [float("inf")] * n
        via = [-1] * n
        queued = [False] * n
        dist[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            queued[u] = False
            for e in self._adj[u]:
                if self._cap[e] <= 0 or (zero_cost_only and self._cost[e] != 0):
                    continue
                v, d = self._to[e], dist[u] + self._cost[e]
                if d < dist[v]:
                    dist[v], via[v] = d, e
                    if not queued[v]:
                        queued[v] = True
                        queue.append(v)
        if via[t] < 0:
            return None
        path = []
        v = t
        while v != s:
            e = via[v]
            path.append(e)
            v = self._to[e ^ 1]
        return path[::-1]

    def max_flow(self, s: int, t: int) -> int:
        """Augment to a minimum-cost maximum flow from ``s`` to ``t``; returns the flow added."""
        added = 0
        for zero_cost_only in (True, False):
            while (path := self._cheapest_path(s, t, zero_cost_only)) is not None:
                amount = min(self._cap[e] for e in path)
                self.push(path, amount)
                added += amount
        return added

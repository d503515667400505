"""Dependency graphs over transactions: edges, SCCs and typed cycle search.

Theory of operation
===================

Nodes are transaction numbers ``0..n-1``; ``adj[a]`` maps a successor ``b``
to a bit mask of edge types (``WW | WR | RW | PROCESS | REALTIME``): one pair
can carry several types (T1 both wrote ``x`` before T2 and wrote what T2 read).
Self edges are never stored.

* :func:`realtime_edges` adds ``a -> b`` whenever ``a`` returned before ``b``
  was invoked, but only the *frontier* edges (Elle's realtime graph): when
  ``b`` is invoked it gets an edge from every completed op not already known
  to precede another completed op.  The transitive closure is the full
  real-time order with O(n * concurrency) edges instead of O(n^2).
  Indeterminate ops never return (``ret = inf``), so they get no outgoing
  real-time edge: they may have taken effect at any later time.
* :func:`process_edges` chains each process's ops in invocation order, but an
  indeterminate op gets no outgoing process edge (same reason); its
  predecessor is linked to its successor instead.
* :func:`sccs` is an iterative Tarjan over the edges whose type is in a mask.
* :func:`find_cycle` is a breadth-first search from a start node over states
  ``(node, rw edges so far capped at 2, required type seen)``, so the first
  return to the start that satisfies the spec is a *shortest* cycle through
  that node of that anomaly shape (Elle's path-state BFS).  Every step costs
  one unit of a shared :class:`Budget`; when it runs out the search stops and
  the caller reports the classification as incomplete (never a pass).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

__all__ = ["WW", "WR", "RW", "PROCESS", "REALTIME", "DATA", "ALL", "EDGE_NAMES", "Graph", "Budget",
           "realtime_edges", "process_edges", "sccs", "find_cycle"]

WW, WR, RW, PROCESS, REALTIME = 1, 2, 4, 8, 16
DATA = WW | WR | RW
ALL = DATA | PROCESS | REALTIME
EDGE_NAMES = {WW: "ww", WR: "wr", RW: "rw", PROCESS: "process", REALTIME: "realtime"}
_BITS = [tuple(b for b in (WW, WR, RW, PROCESS, REALTIME) if m & b) for m in range(32)]


class Graph:
    """Adjacency maps ``adj[a] = {b: mask}`` over ``n`` transactions."""

    __slots__ = ("adj", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self.adj: list[dict[int, int]] = [{} for _ in range(n)]

    def link(self, a: int, b: int, kind: int) -> None:
        """Add an edge ``a -> b`` of type ``kind`` (self edges are dropped)."""
        if a != b:
            d = self.adj[a]
            d[b] = d.get(b, 0) | kind

    def link_all(self, froms: Iterable[int], tos: Sequence[int], kind: int) -> None:
        for a in froms:
            for b in tos:
                self.link(a, b, kind)

    def edge_count(self) -> int:
        return sum(len(d) for d in self.adj)


class Budget:
    """A shared limit on search steps; ``exhausted`` once spent."""

    __slots__ = ("left", "exhausted")

    def __init__(self, steps_max: int) -> None:
        assert steps_max > 0
        self.left = steps_max
        self.exhausted = False


def realtime_edges(g: Graph, calls: Sequence[float], rets: Sequence[float]) -> None:
    """Add frontier real-time edges: ``a -> b`` when ``rets[a] < calls[b]`` (closed intervals)."""
    events = [(c, 0, i) for i, c in enumerate(calls)]
    events += [(r, 1, i) for i, r in enumerate(rets) if r != float("inf")]
    events.sort()
    frontier: set[int] = set()
    preds: dict[int, tuple[int, ...]] = {}
    for _, is_ret, i in events:
        if is_ret:
            frontier.difference_update(preds.pop(i, ()))
            frontier.add(i)
        else:
            p = tuple(frontier)
            preds[i] = p
            for a in p:
                g.link(a, i, REALTIME)


def process_edges(g: Graph, processes: Sequence[object], calls: Sequence[float],
                  indeterminate: Sequence[bool]) -> None:
    """Chain each process's ops by invocation; no outgoing edge from an indeterminate op."""
    by_proc: dict[object, list[int]] = {}
    for i, p in enumerate(processes):
        by_proc.setdefault(p, []).append(i)
    for ids in by_proc.values():
        ids.sort(key=lambda i: calls[i])
        last = None
        for i in ids:
            if last is not None:
                g.link(last, i, PROCESS)
            if not indeterminate[i]:
                last = i


def sccs(g: Graph, nodes: Iterable[int], mask: int, within: set[int] | None = None) -> list[list[int]]:
    """Strongly connected components (size > 1) of the edges of type ``mask`` (iterative Tarjan).

    Only ``nodes`` are roots and, when ``within`` is given, only edges into it are followed.
    """
    adj = g.adj
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    out: list[list[int]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(adj[root].items()))]
        while work:
            v, it = work[-1]
            pushed = False
            for w, m in it:
                if not m & mask or (within is not None and w not in within):
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(adj[w].items())))
                    pushed = True
                    break
                if w in on_stack and index[w] < low[v]:
                    low[v] = index[w]
            if pushed:
                continue
            work.pop()
            if work:
                u = work[-1][0]
                if low[v] < low[u]:
                    low[u] = low[v]
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def find_cycle(g: Graph, start: int, within: set[int], allowed: int, required: int, rw_want: int,
               budget: Budget) -> list[tuple[int, int, int]] | None:
    """Shortest cycle through ``start`` inside ``within`` using edge types in ``allowed``,
    with at least one edge of type ``required`` and exactly ``rw_want`` rw edges (2 = two or more).

    Returns the cycle as ``[(from, to, type), ...]`` or ``None`` (also when the budget ran out).
    """
    adj = g.adj
    parent: dict[tuple[int, int, int], tuple[tuple[int, int, int], int] | None] = {(start, 0, 0): None}
    queue = deque([(start, 0, 0)])
    while queue:
        if budget.left <= 0:
            budget.exhausted = True
            return None
        state = queue.popleft()
        u, rwc, seen = state
        budget.left -= 1
        for v, m in adj[u].items():
            m &= allowed
            if not m or v not in within:
                continue
            for t in _BITS[m]:
                nr = rwc + 1 if t == RW and rwc < 2 else rwc
                ns = 1 if seen or t & required else 0
                nxt = (v, nr, ns)
                if v == start:
                    if ns and nr == rw_want:
                        return _path(parent, state, nxt, t)
                    continue
                if nr > rw_want or nxt in parent:
                    continue
                parent[nxt] = (state, t)
                queue.append(nxt)
    return None


def _path(parent: dict, last: tuple[int, int, int], end: tuple[int, int, int], t: int) -> list[tuple[int, int, int]]:
    steps = [(last[0], end[0], t)]
    cur = last
    while parent[cur] is not None:
        prev, pt = parent[cur]
        steps.append((prev[0], cur[0], pt))
        cur = prev
    steps.reverse()
    return steps

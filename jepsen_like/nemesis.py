"""Faults: kill -9 and restart, SIGSTOP/SIGCONT pauses, network partitions, on a seeded schedule.

Theory of operation
===================

:func:`make_schedule` is pure: from a ``random.Random`` and the run's length
it lays out alternating quiet and fault windows (offsets in seconds from the
start of the run).  :class:`Nemesis` executes a schedule against a
:class:`raftkv.cluster.LocalCluster`: at a window's start it picks its target
(a random node, or the current leader of a random shard, so the choice
depends on the live cluster) with the same ``Random``, injects the fault, and
at the window's end undoes exactly that fault.  Every fault becomes a
:class:`Fault` record with start/end times on the run's clock (the history's
clock), which the report shades on its plots and uses for availability per
window.  :meth:`Nemesis.heal_all` undoes everything whatever happened
(network flushed, every node resumed, every dead node restarted); the runner
calls it when the schedule ends, and on any error.

Partition shapes (node addresses, via :class:`jepsen_like.netns.Firewall`):

* ``halves``: the nodes shuffled and split into a minority and a majority;
* ``isolate-leader``: the leader of a random shard (``LocalCluster.leaders()``)
  alone against the rest (the classic stale-leader setup);
* ``majority-ring``: every node still sees a majority, but no two see the same
  one: nodes on a shuffled ring keep links to their nearest neighbours only.
  With 3 or 4 nodes that rule cuts nothing, so one random link is cut instead
  (Jepsen's "bridge": the middle node sees everyone, the two ends only it).
"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Fault", "Nemesis", "NEMESES", "FAULT_KINDS", "PARTITION_SHAPES", "make_schedule", "partition_edges"]

FAULT_KINDS = ("kill", "pause", "partition")
NEMESES = ("none", *FAULT_KINDS, "all")
PARTITION_SHAPES = ("halves", "isolate-leader", "majority-ring")


@dataclass
class Fault:
    """One injected fault; ``start``/``end`` on the run's clock (seconds)."""

    kind: str
    detail: str
    nodes: list[str]
    start: float
    end: float | None = None
    groups: list[list[str]] = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_schedule(kinds: list[str], duration: float, rng: random.Random, first_quiet: float = 2.0,
                  quiet: tuple[float, float] = (2.0, 4.0), fault: tuple[float, float] = (2.0, 4.0),
                  tail_quiet: float = 1.0) -> list[tuple[float, str, float]]:
    """``[(start, kind, length), ...]`` covering ``duration`` seconds; empty if no kinds.

    Starts after ``first_quiet`` seconds, alternates a fault window with a quiet
    one, and ends every fault ``tail_quiet`` seconds before ``duration``.
    """
    out: list[tuple[float, str, float]] = []
    if not kinds:
        return out
    t = first_quiet
    while True:
        length = rng.uniform(*fault)
        if t + length > duration - tail_quiet:
            length = duration - tail_quiet - t
            if length < 1.0:
                break
        out.append((round(t, 3), rng.choice(kinds), round(length, 3)))
        t += length + rng.uniform(*quiet)
    return out


def partition_edges(shape: str, nodes: list[str], rng: random.Random,
                    leader: str | None = None) -> tuple[list[tuple[str, str]], list[list[str]], str]:
    """Pure: which node pairs to cut for ``shape``; returns ``(edges, groups, detail)``."""
    nodes = list(nodes)
    if shape == "halves":
        rng.shuffle(nodes)
        k = len(nodes) // 2
        groups = [sorted(nodes[:k]), sorted(nodes[k:])]
        return _between(groups), groups, f"halves {groups[0]} | {groups[1]}"
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


class Nemesis:
    """Injects faults into a LocalCluster; thread-safe; records every fault."""

    def __init__(self, cluster: Any, rng: random.Random, clock: Callable[[], float],
                 firewall: Any | None = None, log: Callable[[str], None] | None = None,
                 shapes: tuple[str, ...] = PARTITION_SHAPES) -> None:
        bad = [x for x in shapes if x not in PARTITION_SHAPES]
        if bad or not shapes:
            raise ValueError(f"unknown partition shape(s) {bad} (expected some of {', '.join(PARTITION_SHAPES)})")
        self.shapes = tuple(shapes)
        self.cluster = cluster
        self.rng = rng
        self.clock = clock
        self.firewall = firewall
        self.log = log or (lambda msg: None)
        self.faults: list[Fault] = []
        self._lock = threading.RLock()
        self.nodes = list(cluster.map.nodes)

    # -- primitives ----------------------------------------------------------------
    def _host(self, node: str) -> str:
        return self.cluster.map.nodes[node].host

    def _target(self) -> tuple[str, str]:
        """A random node (half the time) or the current leader of a random shard."""
        if self.rng.random() < 0.5:
            shard = self.rng.randrange(self.cluster.map.nshards)
            leader = self._leaders().get(shard)
            if leader is not None:
                return leader, f"leader of shard {shard}"
        return self.rng.choice(self.nodes), "random node"

    def _leaders(self) -> dict[int, str | None]:
        try:
            return self.cluster.leaders()
        except Exception:  # noqa: BLE001 - a status probe failing must not stop the nemesis
            return {}

    def start_fault(self, kind: str) -> Fault:
        with self._lock:
            if kind == "kill":
                node, why = self._target()
                f = Fault("kill", f"kill -9 {node} ({why})", [node], self.clock())
                self.cluster.kill_node(node)  # raises unless the process is gone
            elif kind == "pause":
                node, why = self._target()
                f = Fault("pause", f"SIGSTOP {node} ({why})", [node], self.clock())
                self.cluster.pause_node(node)  # raises unless the kernel reports it stopped
            elif kind == "partition":
                if self.firewall is None:
                    raise RuntimeError("partition nemesis unavailable (no network namespace / iptables)")
                shape = self.rng.choice(self.shapes)
                leader = None
                if shape == "isolate-leader":
                    leader = self._leaders().get(self.rng.randrange(self.cluster.map.nshards))
                edges, groups, detail = partition_edges(shape, self.nodes, self.rng, leader)
                f = Fault("partition", f"{shape}: {detail}", sorted({n for e in edges for n in e}),
                          self.clock(), groups=groups)
                for a, b in edges:
                    self.firewall.drop_between(self._host(a), self._host(b))
                for a, b in edges:  # a probe packet must be dropped, or the fault did not happen
                    port = self.cluster.map.nodes[b].client_port
                    if not self.firewall.drops(self._host(a), self._host(b), port):
                        self.firewall.heal()
                        raise RuntimeError(f"partition not in effect: a connection from {a} to {b} got through")
            else:
                raise ValueError(f"unknown fault kind {kind!r}")
            self.faults.append(f)
            self.log(f"nemesis: {f.detail} at {f.start:.2f} s")
            return f

    def end_fault(self, f: Fault) -> None:
        with self._lock:
            try:
                if f.kind == "kill":
                    for n in f.nodes:
                        self.cluster.start_node(n)
                elif f.kind == "pause":
                    for n in f.nodes:
                        self.cluster.resume_node(n)
                elif f.kind == "partition" and self.firewall is not None:
                    self.firewall.heal()
            except Exception as e:  # noqa: BLE001 - recorded; heal_all retries
                f.error = f"undo failed: {e}"
            f.end = self.clock()
            self.log(f"nemesis: healed {f.kind} at {f.end:.2f} s")

    def heal_all(self) -> list[str]:
        """Flush partitions, resume every node, restart every dead node; return what was done."""
        done = []
        with self._lock:
            if self.firewall is not None:
                try:
                    self.firewall.heal()
                    done.append("network healed")
                except Exception as e:  # noqa: BLE001
                    done.append(f"network heal failed: {e}")
            for n in self.nodes:
                self.cluster.signal_node(n, signal.SIGCONT)
            for n in self.nodes:
                if self.cluster.pid(n) is None:
                    self.cluster.start_node(n)
                    done.append(f"restarted {n}")
            now = self.clock()
            for f in self.faults:
                if f.end is None:
                    f.end = now
        return done

    # -- the schedule ------------------------------------------------------------------
    def run(self, schedule: list[tuple[float, str, float]], stop: threading.Event) -> None:
        """Execute ``schedule`` (offsets on ``clock``) until done or ``stop`` is set."""
        for start, kind, length in schedule:
            if _wait_until(self.clock, start, stop):
                return
            try:
                f = self.start_fault(kind)
            except Exception as e:  # noqa: BLE001 - keep going; recorded for the report
                self.faults.append(Fault(kind, f"could not inject {kind}", [], self.clock(), self.clock(),
                                         error=str(e)))
                self.log(f"nemesis: {kind} failed: {e}")
                continue
            _wait_until(self.clock, start + length, stop)
            self.end_fault(f)
            if stop.is_set():
                return


def _wait_until(clock: Callable[[], float], t: float, stop: threading.Event) -> bool:
    """Sleep until ``clock() >= t``; True if ``stop`` was set first."""
    while True:
        left = t - clock()
        if left <= 0:
            return stop.is_set()
        if stop.wait(min(left, 0.2)):
            return True

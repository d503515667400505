"""Faults: kill -9 and restart, SIGSTOP/SIGCONT pauses, network partitions, membership changes,
clock steps, slow disks, full disks and kills during compactions and snapshot installs, on a seeded schedule.

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

``member``: a membership change under load, with the cluster's own operator
code (:class:`raftkv.membership.Operator`, what ``raftkv node remove|add``
run): a random node (or a shard leader: leadership moves away first) is
removed from every shard group and stopped; at the window's end its data
directory is emptied and it is added back under the same name and address,
as a new empty member that catches up from the leaders (log or snapshot).
The Operator starts and stops nodes through the harness's cluster, so the
nodes keep the run's options and network namespace.

``clock``: ``RAFTKV.FAULT CLOCK.SKEW_MS`` steps a random node's clock for
log time (:mod:`raftkv.logclock`) *back* by ``CLOCK_SKEW_S`` seconds (1 s to
2 min).  Steps only ever go back (a node's offset only decreases; a restarted
node is at 0, above any offset the nemesis set), because that is the fault
log time is built to tolerate: monotonic clocks never jump forward, and log
time stands still rather than go back.  The window's end undoes nothing (a
clock that is behind stays behind).

``slow-disk``: ``RAFTKV.FAULT DISK.SLOW_MS`` makes every durable commit of a
random node's storage engine (:mod:`raftkv.engine`) take ``SLOW_DISK_MS`` (20 to
400 ms) longer, as an fsync that slow would; the window's end sets it back to 0.
The node's engine commit counters (``RAFTKV.STATUS`` ``engine``), read at both
ends of the window, go into the fault's detail: the mean commit time during the
window shows the fault was in effect.

``disk``: a full disk.  Runs with this nemesis put each node's data directory
on a tmpfs of ``--disk-mib`` MiB (mounted by the runner inside the run's private
mount namespace, :func:`jepsen_like.netns.mount_tmpfs`).  The fault fills one
node's file system (a random node or a shard leader; a quarter of the time every
node's) with a filler file until ``ENOSPC``, so the next storage-engine commit
that needs a new page fails: "No space left on device", or "Input/output error"
when a page write was cut short (LMDB reports a short write as ``EIO``).  By design a failed
durable commit stops the node's Raft driver (raftkv/driver.py: a failed fsync
cannot be retried safely, and the frames that would acknowledge it are never
sent); the node's RESP server stays up.  At the window's end the filler is
removed, and every filled node whose driver stopped (or whose process died) is
restarted from its data directory; the fault's detail says which nodes stopped
with that error in their log.  The nemesis refuses to fill a directory that is
not a small tmpfs mount point.

``compaction``: kill -9 while a node checkpoints and compacts its Raft log, and while it installs a
snapshot.  ``RAFTKV.FAULT COMPACT.NOW -1`` makes every replica of a node checkpoint into the engine and
drop its log prefix at its next tick, caught-up followers or not (the runner arms it with ``--fault
compact.now:0``).  The two variants alternate, the first drawn at random; each first waits until every
node answers.  *checkpoint kill*: a random node (or a shard leader) is told to compact, and killed
``COMPACTION_KILL_DELAY_S * u**3`` (0-200 ms, half the time within 20 ms) after its log says its first
checkpoint began.  *install kill*: a random node Y is killed; once every shard committed
``COMPACTION_MISSED`` entries without it, every other node is told to compact (their logs then start past
what Y holds); Y is restarted, so it must install snapshots, and is killed again the same random delay after
its log says the first snapshot chunk arrived.  The window's end restarts the killed node.  The detail gives
the others' per-shard ``RAFTKV.STATUS`` counters (``checkpoints``, ``snapshots_sent``, since the process
started) before and after, and what the killed node logged before the kill: ``event=checkpoint_begin`` /
``event=checkpoint`` and ``event=snapshot_receiving`` / ``event=snapshot_installed``; more begun than
finished is a kill in the middle of one.

``power``: a power loss (:mod:`jepsen_like.power`). Runs with this nemesis start
every node with a preloaded shim that keeps an undo log of the writes each node
has not yet fsynced. The fault cuts the power of one node (a random one or a
shard leader), of a majority with that node in it, or of every node, a third
of the time each: kill -9 of each, then every unsynced write undone, so the
nodes restart from what their disks would hold. The fault's detail says how
many writes (and KiB) were undone per node, which shows the fault was real;
with ``--unsafe-no-sync`` (nodes that never fsync) it undoes acknowledged
writes, and the checks must catch it. The window's end restarts the nodes.

``reshard`` (not in ``all``): one ``raftkv shard add`` or ``raftkv shard remove`` per window, alternating
(an add when the cluster has ``RESHARD_MIN_SHARDS`` shards, a removal at ``RESHARD_MAX_SHARDS``), against the
live cluster and with its own code (:class:`raftkv.resharder.Resharder` behind a
:class:`raftkv.membership.Operator`, what the CLI runs), so successive windows go 3 -> 4 -> 3 -> 4 ...
shards. Half the windows run the command in the nemesis's thread to its end; the other half run the CLI
itself (``python -m raftkv shard add --chunk 1`` / ``shard remove ID --chunk 1``) and ``kill -9`` it right
after a line of progress drawn from ``RESHARD_CUT_POINTS`` (placed, a source pre-copied, frozen, a source
copied, open, the new map out) or ``REMOVE_CUT_POINTS`` (marked, pre-copied, frozen, copied,
handed off and open, the new map out), so it stops between steps: moving keys stay refused (``-MOVING`` /
``-WRONGSHARD``, both "not applied") until the next window's run, which finishes that add or removal first
(``Resharder`` resumes from where the shards stand), or the heal, which finishes any left before the final
reads.  No move is ever left half-done at the end of a run.  After each window the harness's
``LocalCluster`` adopts the new cluster file (its shard count), so the nemeses' leader picks, the recovery
wait and the replicas check cover the shards the ring has. Every ``RESHARD_NODE_EVERY``-th window moves a
node instead: ``raftkv node add --empty`` of a new node (on ``127.0.0.k`` in the namespace) then ``raftkv
rebalance`` onto it, or, when the nemesis added one before, ``raftkv node remove`` of it, which drains its
replicas to the others first. Only that node comes and goes; the run's own nodes (the other nemeses'
targets) stay.

``clock-forward`` (not in ``all``): steps of +/- ``CLOCK_SKEW_S`` seconds, set
back to 0 at the window's end, so every fault includes a *forward* step: the
node's log time jumps ahead, which the design excludes (logclock's
assumption: monotonic clocks tick at the real rate) and which expires leases
early on the shards that node leads.  It shows that hazard (docs/jepsen.md).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jepsen_like import power

__all__ = ["Fault", "Nemesis", "NEMESES", "FAULT_KINDS", "OPTIONAL_KINDS", "PARTITION_SHAPES", "make_schedule",
           "moves_left", "parse_nemesis",
           "partition_edges"]

FAULT_KINDS = ("kill", "pause", "partition", "member", "clock", "slow-disk", "disk", "compaction", "power")
EXTRA_KINDS = ("clock-forward",)
"""Fault kinds outside the design's fault model: named explicitly, never part of ``all``."""
OPTIONAL_KINDS = ("reshard",)
"""Fault kinds inside the fault model that are not (yet) part of ``all``: named explicitly."""
NEMESES = ("none", *FAULT_KINDS, *OPTIONAL_KINDS, *EXTRA_KINDS, "all")
PARTITION_SHAPES = ("halves", "isolate-leader", "majority-ring")
CLOCK_SKEW_S = (1.0, 120.0)
"""Size range of a clock step (seconds)."""
CLOCK_RATE_SLOW_PCT = (25, 90)
"""Range of a ``clock`` rate fault (percent of real time): slow clocks only make log time lag."""
CLOCK_RATE_FAST_PCT = (110, 400)
"""Range of a ``clock-forward`` rate fault: fast clocks advance log time too soon, like a forward step."""
SLOW_DISK_MS = (20, 400)
"""Range of the latency a ``slow-disk`` fault adds to each durable commit (milliseconds)."""
FAULT_CALL_WAIT_S = 10.0
"""How long a fault that needs a node's RAFTKV.FAULT waits for a node that is still starting."""
FILLER = "jepsen-disk-filler"
"""Name of the file the ``disk`` nemesis fills a node's data directory with."""
FILL_LIMIT_BYTES = 1 << 30
"""The ``disk`` nemesis refuses to fill a file system larger than this (it must be the run's small tmpfs)."""
COMPACTION_KILL_DELAY_S = 0.2
"""A ``compaction`` kill lands at most this long after the node logged that its first checkpoint began (or
that the first chunk of a snapshot reached it); the delay is drawn as ``max * u**3`` (u uniform), so nearly
half the kills land within 20 ms, while a checkpoint or a small snapshot install (a few to tens of ms each in
a harness run) may still be under way."""
COMPACTION_LOAD_S = 0.5
"""How long the ``compaction`` nemesis lets the load run with its follower down, at least, before forcing the
compaction that cuts the entries it missed out of the others' logs ..."""
COMPACTION_MISSED = 3
"""... and how many entries every shard must have committed without it by then (a follower missing fewer
than 2 is caught up from the log even after the compaction, which keeps the last two applied entries)."""
COMPACTION_WAIT_S = 5.0
"""The longest the ``compaction`` nemesis waits for those commits, for forced checkpoints to begin or commit."""
COMPACTION_INSTALL_WAIT_S = 10.0
"""The longest it waits for the restarted node to receive its first snapshot chunk (start-up included)."""
RESHARD_MAX_SHARDS = 8
"""The ``reshard`` nemesis adds shards up to this many (at this many, a window removes one)."""
RESHARD_NODE_EVERY = 3
"""Every this many ``reshard`` windows (when no shard move is left half-done) the window adds a node and
rebalances onto it, or removes the node it added (drained first), instead of moving a shard."""
RESHARD_MIN_SHARDS = 2
"""... and removes shards down to this many (at this many, a window adds one)."""
RESHARD_STEP_TIMEOUT_S = 30.0
"""``shard add --timeout``: the longest one step of an add waits (a leader, transactions holding moving keys)."""
RESHARD_CUT_POINTS = {"placed": "group placed on", "pre-copied": " pre-copied ", "frozen": "frozen: ",
                      "copying": " keys copied, ",
                      "open": " open; every source handed off", "new map": " is on the ring ("}
"""Where a cut ``shard add`` is killed (one drawn uniformly): right after the first line of its progress that
holds the text: the new group placed (not on the ring), the first source pre-copied (still serving its keys,
a copy of them at the new shard), the sources frozen (writes of moving keys refused),
the first source copied, the new shard open with every source handed off (moved keys refused by the sources,
the map not out yet), the new map out (the sources' cleanup not done)."""
REMOVE_CUT_POINTS = {"marked": " is being removed (still on", "pre-copied": " pre-copied ", "frozen": "frozen: ",
                     "copying": " keys copied, ", "open": " handed off; shards ", "new map": " removed ("}
"""Where a cut ``shard remove`` is killed: the removal marked in the map, the last shard pre-copied (still
serving its keys), frozen, its keys copied, it handed off and the others open (the map not out yet), the map
without it out."""
RESHARD_CLI_WAIT_S = 60.0
"""The longest the nemesis waits for a cut ``shard add`` process to reach its line (it is killed then)."""


def parse_nemesis(spec: str) -> list[str]:
    """The fault kinds of ``--nemesis``: ``none``, ``all``, or a comma-separated mix such as ``kill,member``."""
    if spec == "none":
        return []
    if spec == "all":
        return list(FAULT_KINDS)
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS + OPTIONAL_KINDS + EXTRA_KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown nemesis {', '.join(bad) or spec!r}: use none, all, or a comma-separated mix of "
                         f"{', '.join(FAULT_KINDS + OPTIONAL_KINDS + EXTRA_KINDS)}")
    return list(dict.fromkeys(kinds))


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


class Nemesis:
    """Injects faults into a LocalCluster; thread-safe; records every fault."""

    def __init__(self, cluster: Any, rng: random.Random, clock: Callable[[], float],
                 firewall: Any | None = None, log: Callable[[str], None] | None = None,
                 shapes: tuple[str, ...] = PARTITION_SHAPES, client_kw: dict | None = None,
                 power_log: str | os.PathLike | None = None) -> None:
        bad = [x for x in shapes if x not in PARTITION_SHAPES]
        if bad or not shapes:
            raise ValueError(f"unknown partition shape(s) {bad} (expected some of {', '.join(PARTITION_SHAPES)})")
        self.shapes = tuple(shapes)
        self.cluster = cluster
        self.rng = rng
        self.clock = clock
        self.firewall = firewall
        self.log = log or (lambda msg: None)
        self.client_kw = client_kw or {}  # how the membership operator logs in (--auth runs)
        self.power_log = power_log  # the nodes' undo logs (jepsen_like.power), when they run with the shim
        self.faults: list[Fault] = []
        self.skews: dict[str, int] = {}  # clock offsets (ms) the nemesis set, per node
        self._rates: dict[int, str] = {}  # clock-rate fault -> its node (the other clock faults are steps)
        self._engine_before: dict[int, tuple[int, float] | None] = {}  # slow-disk fault -> counters at its start
        self._log_at: dict[int, dict[str, int]] = {}  # disk fault -> its nodes' log sizes when it started
        self._compaction_turn: int | None = None  # which compaction variant comes next (first one: random)
        self._last_reshard = "remove"  # the reshard nemesis alternates: an add first, then a removal, ...
        self._reshard_windows = 0  # ... and every third window moves a node instead (RESHARD_NODE_EVERY)
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

    def _power_targets(self) -> tuple[list[str], str]:
        """Who loses power: one node (a third of the time), a majority with a shard leader in it, or every node."""
        r = self.rng.random()
        if r < 1 / 3:
            node, why = self._target()
            return [node], f"{node} ({why})"
        if r < 2 / 3:
            node, why = self._target()
            others = [n for n in self.nodes if n != node]
            nodes = sorted([node, *self.rng.sample(others, len(self.nodes) // 2)])
            return nodes, f"a majority {nodes} (with {node}, {why})"
        return list(self.nodes), "every node"

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
                if shape == "isolate-leader" or (shape == "halves" and self.rng.random() < 0.5):
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
            elif kind == "member":
                node, why = self._target()
                f = Fault("member", f"remove {node} ({why}) from every shard group", [node], self.clock())
                try:
                    self._operator().remove(node, stop=True)
                except Exception as e:  # noqa: BLE001 - it may have left some groups: the window's end
                    f.error = f"remove failed: {e}"  # (or the heal) adds it back, which is idempotent
            elif kind in ("clock", "clock-forward") and self.rng.random() < 0.5:
                node, why = self._target()
                pct = round(self.rng.uniform(*(CLOCK_RATE_SLOW_PCT if kind == "clock" else CLOCK_RATE_FAST_PCT)))
                f = Fault(kind, f"clock of {node} ({why}) runs at {pct} % of real time", [node], self.clock())
                self._set_rate(node, pct)
                self._rates[id(f)] = node
            elif kind in ("clock", "clock-forward"):
                node, why = self._target()
                step_ms = round(self.rng.uniform(*CLOCK_SKEW_S) * 1000)
                if kind == "clock":
                    skew_ms = self.skews.get(node, 0) - step_ms
                else:
                    step_ms = skew_ms = step_ms * self.rng.choice((1, -1))
                    step_ms -= self.skews.get(node, 0)
                f = Fault(kind, f"clock of {node} ({why}) stepped {(-step_ms if kind == 'clock' else step_ms) / 1000:+.1f} s "
                          f"(offset {skew_ms / 1000:+.1f} s)", [node], self.clock())
                self._set_skew(node, skew_ms)
            elif kind == "slow-disk":
                node, why = self._target()
                ms = round(self.rng.uniform(*SLOW_DISK_MS))
                f = Fault(kind, f"disk of {node} ({why}) slowed: +{ms} ms per durable commit", [node], self.clock())
                self._set_slow_disk(node, ms)  # then read the counters, so the window's commits are all slowed
                self._engine_before[id(f)] = self._engine_counters(node)
            elif kind == "disk":
                if self.rng.random() < 0.25:
                    nodes, why = list(self.nodes), "every node"
                else:
                    node, why = self._target()
                    nodes, why = [node], f"{node} ({why})"
                f = Fault("disk", f"filled the disk of {why}", nodes, self.clock())
                self._log_at[id(f)] = {n: _size(self.cluster.log_file(n)) for n in nodes}
                filled = [fill_disk(self.cluster.map.node_data_dir(n)) for n in nodes]
                f.detail += f": {sum(filled) / 2**20:.1f} MiB of filler"
            elif kind == "power":
                if self.power_log is None:
                    raise RuntimeError("power nemesis unavailable (the nodes run without the power-loss shim)")
                nodes, why = self._power_targets()
                f = Fault("power", f"power loss on {why}", nodes, self.clock())
                for n in nodes:  # every process dead first: a rollback under a live node would be torn
                    self.cluster.kill_node(n)
                cuts = [f"{n}: {power.rollback(self.power_log, self.cluster.map.node_data_dir(n)).summary()}"
                        for n in nodes]
                f.detail += " (" + "; ".join(cuts) + ")"
            elif kind == "compaction":
                f = self._compaction_fault()
            elif kind == "reshard":
                f = self._reshard_fault()
            else:
                raise ValueError(f"unknown fault kind {kind!r}")
            self.faults.append(f)
            self.log(f"nemesis: {f.detail} at {f.start:.2f} s")
            return f

    def end_fault(self, f: Fault) -> None:
        with self._lock:
            try:
                if f.kind in ("kill", "compaction", "power"):
                    for n in f.nodes:
                        self.cluster.start_node(n)
                elif f.kind == "pause":
                    for n in f.nodes:
                        self.cluster.resume_node(n)
                elif f.kind == "partition" and self.firewall is not None:
                    self.firewall.heal()
                elif f.kind == "member":
                    for n in f.nodes:
                        self._add_back(n)
                elif id(f) in self._rates:  # a rate fault (clock or clock-forward): back to real time
                    self._set_rate(self._rates[id(f)], 100)
                elif f.kind == "clock-forward":
                    for n in f.nodes:
                        self._set_skew(n, 0)
                elif f.kind == "disk":
                    self._free_disk(f)
                elif f.kind == "slow-disk":
                    after = self._engine_counters(f.nodes[0])  # before the undo, for the same reason
                    for n in f.nodes:
                        self._set_slow_disk(n, 0)
                    f.detail += _commit_summary(self._engine_before.pop(id(f), None), after)
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
            for f in self.faults:
                if f.kind == "member" and f.nodes and (f.end is None or f.error):
                    try:
                        self._add_back(f.nodes[0])
                        done.append(f"{f.nodes[0]} added back")
                    except Exception as e:  # noqa: BLE001
                        done.append(f"adding {f.nodes[0]} back failed: {e}")
            for f in self.faults:  # a clock rate still changed: back to real time (no step, so always safe)
                if id(f) in self._rates and f.end is None:
                    try:
                        self._set_rate(self._rates[id(f)], 100)
                        done.append(f"clock of {f.nodes[0]} back to real time")
                    except Exception:  # noqa: BLE001 - a node that does not answer is restarted below, at 100 %
                        pass
            # A forward-step fault still open: its clock back to 0 (clocks the clock nemesis set back stay back).
            for f in self.faults:
                if f.kind == "clock-forward" and f.end is None and id(f) not in self._rates:
                    try:
                        self._set_skew(f.nodes[0], 0)
                        done.append(f"clock of {f.nodes[0]} reset")
                    except Exception:  # noqa: BLE001 - a node that does not answer is restarted below, at 0
                        pass
            for f in self.faults:  # a slow disk still open: back to normal speed (a restart also is)
                if f.kind == "slow-disk" and f.nodes and f.end is None:
                    try:
                        self._set_slow_disk(f.nodes[0], 0)
                        done.append(f"disk of {f.nodes[0]} back to normal speed")
                    except Exception:  # noqa: BLE001 - a node that does not answer is restarted below, at 0
                        pass
            for f in self.faults:  # a disk still full: free it, restart the nodes it stopped
                if f.kind == "disk" and f.nodes and f.end is None:
                    try:
                        self._free_disk(f)
                        done.append(f"disk of {', '.join(f.nodes)} freed")
                    except Exception as e:  # noqa: BLE001
                        done.append(f"freeing the disk of {', '.join(f.nodes)} failed: {e}")
            for n in self.nodes:
                if self.cluster.pid(n) is None:
                    self.cluster.start_node(n)
                    done.append(f"restarted {n}")
            if any(f.kind == "reshard" for f in self.faults):
                done.append(self._finish_reshard())
                if "failed" in done[-1]:  # e.g. a node still starting: once more
                    done.append(self._finish_reshard())
            now = self.clock()
            for f in self.faults:
                if f.end is None:
                    f.end = now
        return done

    def _set_skew(self, node: str, skew_ms: int) -> None:
        """Set ``node``'s clock offset; raises unless the node confirms (it replies the previous offset)."""
        reply = self._fault_call(node, "CLOCK.SKEW_MS", str(skew_ms))
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise RuntimeError(f"{node} refused RAFTKV.FAULT CLOCK.SKEW_MS {skew_ms}: {reply}")
        self.skews[node] = skew_ms

    def _fault_call(self, node: str, *args: str, wait_s: float = FAULT_CALL_WAIT_S) -> object:
        """``RAFTKV.FAULT args`` to ``node``, waiting up to ``wait_s`` for a node that is still starting (a kill
        or power window just restarted it) to accept connections; the last failure is raised."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.cluster.call(node, "RAFTKV.FAULT", *args)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _set_rate(self, node: str, pct: int) -> None:
        """Set ``node``'s clock rate (percent of real time); raises unless the node confirms."""
        reply = self._fault_call(node, "CLOCK.RATE_PCT", str(pct))
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise RuntimeError(f"{node} refused RAFTKV.FAULT CLOCK.RATE_PCT {pct}: {reply}")

    def _set_slow_disk(self, node: str, ms: int) -> None:
        """Set ``node``'s injected commit latency; raises unless the node confirms."""
        reply = self._fault_call(node, "DISK.SLOW_MS", str(ms))
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise RuntimeError(f"{node} refused RAFTKV.FAULT DISK.SLOW_MS {ms}: {reply}")

    def _free_disk(self, f: Fault) -> None:
        """Remove the filler of ``f``'s nodes, then restart each one whose Raft driver stopped (or that died)."""
        log_at = self._log_at.pop(id(f), {})
        for n in f.nodes:
            free_disk(self.cluster.map.node_data_dir(n))
        notes = []
        for n in f.nodes:
            failure = engine_failure(_read_from(self.cluster.log_file(n), log_at.get(n, 0)))
            if self._driver_alive(n):
                notes.append(f"{n} served on" + (f" (a commit failed: {failure})" if failure else ""))
                continue
            self.cluster.kill_node(n)
            self.cluster.start_node(n)
            why = f"its Raft driver stopped: {failure}" if failure else "it stopped, no engine error in its log"
            notes.append(f"{n} restarted ({why})")
        f.detail += "; freed: " + "; ".join(notes)

    def _driver_alive(self, node: str) -> bool:
        """Whether ``node`` runs and its Raft driver is alive (RAFTKV.STATUS)."""
        if self.cluster.pid(node) is None:
            return False
        try:
            return bool(json.loads(self.cluster.call(node, "RAFTKV.STATUS"))["raft"]["driver_alive"])
        except Exception:  # noqa: BLE001 - not answering counts as stopped: a restart is what it needs
            return False

    def _engine_counters(self, node: str) -> tuple[int, float] | None:
        """``(durable commits, seconds in them)`` of ``node``'s engine, None if it does not answer."""
        try:
            eng = json.loads(self.cluster.call(node, "RAFTKV.STATUS"))["engine"]
            return int(eng["commits"]), float(eng["commit_s"])
        except Exception:  # noqa: BLE001 - only the fault's detail loses its figure
            return None

    # -- compaction: kill -9 during a checkpoint, and during a snapshot install ---------------------------------
    def _compaction_fault(self) -> Fault:
        """The two variants alternate (the first drawn at random), so any run with two compaction windows has
        both: ``checkpoint`` kills a node right after forcing its compactions; ``install`` makes a restarted
        node install snapshots and kills it during the install."""
        if self._compaction_turn is None:
            self._compaction_turn = self.rng.randrange(2)
        variant = ("checkpoint", "install")[self._compaction_turn % 2]
        self._compaction_turn += 1
        return self._kill_in_checkpoint() if variant == "checkpoint" else self._kill_in_install()

    def _kill_delay(self) -> float:
        return COMPACTION_KILL_DELAY_S * self.rng.random() ** 3

    def _kill_in_checkpoint(self) -> Fault:
        """Force every replica of one node to checkpoint and compact its log; kill -9 it a random few ms after
        its first checkpoint began (``event=checkpoint_begin`` in its log).

        The detail counts the checkpoints the node logged as begun and as committed (``event=checkpoint``)
        before the kill: more begun than committed is a kill in the middle of a checkpoint.
        """
        self._wait_answering(self.nodes)
        node, why = self._target()
        f = Fault("compaction", f"checkpoint kill: {node} ({why})", [node], self.clock())
        log_at = _size(self.cluster.log_file(node))
        told = self._compact_now(node)
        begun = self._wait_log(node, log_at, "event=checkpoint_begin ", COMPACTION_WAIT_S)
        delay = self._kill_delay()
        _sleep(delay)
        self.cluster.kill_node(node)  # raises unless the process is gone
        text = _read_from(self.cluster.log_file(node), log_at)
        f.detail += (f": RAFTKV.FAULT COMPACT.NOW to {told} replicas, kill -9 {delay * 1000:.0f} ms after "
                     + ("its first checkpoint began" if begun else
                        f"waiting {COMPACTION_WAIT_S:g} s for a checkpoint that never began")
                     + f"; checkpoints begun {text.count('event=checkpoint_begin ')}, committed "
                     f"{text.count('event=checkpoint ')} before the kill")
        return f

    def _kill_in_install(self) -> Fault:
        """kill -9 a node Y; wait until every shard committed a few entries without it; force compactions on
        every other node (their logs then start past what Y has); restart Y, which must install snapshots;
        kill -9 it again a random few ms after the first snapshot chunk reached it (``event=snapshot_receiving``
        in its log); the window's end restarts it.  The detail gives the others' checkpoint and snapshots-sent
        counters before and after, and the installs Y logged as begun and as finished
        (``event=snapshot_installed``) before the second kill: more begun than finished is a kill in the
        middle of an install."""
        self._wait_answering(self.nodes)  # a node the last window restarted may still be starting
        node = self.rng.choice(self.nodes)
        f = Fault("compaction", f"install kill: {node} (random node)", [node], self.clock())
        others = [n for n in self.nodes if n != node]
        at_kill = self._commit_indexes(self.nodes)
        self.cluster.kill_node(node)
        try:
            _sleep(COMPACTION_LOAD_S)
            progressed = self._wait_commits(others, at_kill, COMPACTION_MISSED, COMPACTION_WAIT_S)
            before = self._snapshot_counters(others)
            for n in others:
                self._compact_now(n)
            compacted = self._wait_counters(others, "checkpoints", before, timeout=COMPACTION_WAIT_S)
            log_at = _size(self.cluster.log_file(node))
            self.cluster.start_node(node)
            receiving = self._wait_log(node, log_at, "event=snapshot_receiving ", COMPACTION_INSTALL_WAIT_S)
            delay = self._kill_delay()
            _sleep(delay)
            self.cluster.kill_node(node)
            sent = self._snapshot_counters(others)
            text = _read_from(self.cluster.log_file(node), log_at)
            f.detail += (": kill -9, then "
                         + ("" if progressed else f"(fewer than {COMPACTION_MISSED} commits in some shard after "
                                                  f"{COMPACTION_WAIT_S:g} s) ")
                         + f"COMPACT.NOW on {', '.join(others)}: checkpoints "
                         f"{_total(before, 'checkpoints')} -> {_total(compacted, 'checkpoints')}; restarted {node}: "
                         f"snapshots sent {_total(compacted, 'snapshots_sent')} -> {_total(sent, 'snapshots_sent')}; "
                         f"kill -9 {delay * 1000:.0f} ms after "
                         + ("the first snapshot chunk reached it" if receiving else
                            f"waiting {COMPACTION_INSTALL_WAIT_S:g} s for a snapshot that never came")
                         + f"; snapshot installs begun {text.count('event=snapshot_receiving ')}, finished "
                         f"{text.count('event=snapshot_installed ')} before the kill")
        except Exception as e:  # noqa: BLE001 - Y is down: return the fault, so that the window's end restarts it
            f.error = f"{type(e).__name__}: {e}"
        return f

    def _status(self, node: str) -> dict | None:
        """``node``'s RAFTKV.STATUS, None if it does not answer."""
        try:
            return json.loads(self.cluster.call(node, "RAFTKV.STATUS"))
        except Exception:  # noqa: BLE001 - callers treat a silent node as missing
            return None

    def _wait_answering(self, nodes: list[str], timeout: float = 15.0) -> None:
        """Until every node in ``nodes`` answers RAFTKV.STATUS (or ``timeout`` s passed)."""
        deadline = self.clock() + timeout
        while any(self._status(n) is None for n in nodes) and self.clock() < deadline:
            _sleep(0.1)

    def _commit_indexes(self, nodes: list[str]) -> dict[str, int]:
        """Per shard, the highest commit index any of ``nodes`` reports."""
        out: dict[str, int] = {}
        for n in nodes:
            for shard, v in ((self._status(n) or {}).get("shards") or {}).items():
                out[shard] = max(out.get(shard, 0), int(v.get("commit_idx") or 0))
        return out

    def _wait_commits(self, nodes: list[str], since: dict[str, int], count: int, timeout: float) -> bool:
        """Until every shard in ``since`` committed ``count`` more entries (as ``nodes`` report); False if
        ``timeout`` s passed first."""
        deadline = self.clock() + timeout
        while True:
            now = self._commit_indexes(nodes)
            if all(now.get(shard, 0) >= i + count for shard, i in since.items()):
                return True
            if self.clock() >= deadline:
                return False
            _sleep(0.05)

    def _wait_log(self, node: str, offset: int, needle: str, timeout: float) -> bool:
        """Until ``node``'s log has ``needle`` past ``offset``; False if ``timeout`` s passed first."""
        deadline = self.clock() + timeout
        while needle not in _read_from(self.cluster.log_file(node), offset):
            if self.clock() >= deadline:
                return False
            _sleep(0.001)
        return True

    def _compact_now(self, node: str) -> int:
        """``RAFTKV.FAULT COMPACT.NOW -1`` to ``node``; the number of replicas told; raises unless confirmed."""
        reply = self.cluster.call(node, "RAFTKV.FAULT", "COMPACT.NOW", "-1")
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise RuntimeError(f"{node} refused RAFTKV.FAULT COMPACT.NOW: {reply}")
        return reply

    def _snapshot_counters(self, nodes: list[str]) -> dict[str, dict[str, int]]:
        """Per node, its shards' checkpoint and snapshot counters summed (RAFTKV.STATUS) and its shard count;
        a node that does not answer is left out."""
        out = {}
        for n in nodes:
            shards = ((self._status(n) or {}).get("shards") or {}).values()
            if shards:
                out[n] = {k: sum(int(v.get(k, 0)) for v in shards)
                          for k in ("checkpoints", "snapshots_sent", "snapshots_installed")}
                out[n]["shards"] = len(shards)
        return out

    def _wait_counters(self, nodes: list[str], key: str, before: dict[str, dict[str, int]],
                       timeout: float) -> dict[str, dict[str, int]]:
        """Poll the counters until ``key`` moved or ``timeout`` s passed; the last reading.  Checkpoints must
        have moved by a shard count on every node (each replica compacted); anything else, anywhere."""
        deadline = self.clock() + timeout
        while True:
            now = self._snapshot_counters(nodes)
            if key == "checkpoints":
                moved = all(n in now and now[n][key] - before.get(n, {}).get(key, 0) >= now[n]["shards"]
                            for n in nodes)
            else:
                moved = _total(now, key) > _total(before, key)
            if moved or self.clock() >= deadline:
                return now
            _sleep(0.02)

    def _operator(self) -> Any:
        """The cluster's membership operator, starting and stopping nodes through the harness's cluster."""
        from raftkv.membership import Operator

        cluster = self.cluster

        class HarnessOperator(Operator):
            def _local_cluster(self) -> Any:
                return cluster

        return HarnessOperator(cluster.config, timeout=30.0, say=lambda m: self.log(f"nemesis: member: {m}"),
                               client_kw=self.client_kw)

    def _add_back(self, node: str) -> None:
        """Add a removed ``node`` back under its old name and address, with an empty data directory."""
        info = self.cluster.map.nodes[node]
        op = self._operator()
        if node not in op.map.nodes:  # removed: it comes back as a new, empty member
            shutil.rmtree(os.path.join(op.map.data_dir, node), ignore_errors=True)
            if self.power_log is not None:  # its files are gone: their undo logs must not meet a reused inode
                power.forget_under(self.power_log, os.path.join(op.map.data_dir, node))
        # else the removal stopped half-way (the file is written last): adding is idempotent, finish it
        op.add(f"{info.host}:{info.client_port}", name=node, raft_port=info.raft_port, start=True)

    # -- reshard: raftkv shard add under load ---------------------------------------------
    def _resharder(self, op: Any) -> Any:
        from raftkv.resharder import Resharder

        return Resharder(op, step_timeout=RESHARD_STEP_TIMEOUT_S,
                         say=lambda m: self.log(f"nemesis: reshard: {m}"))

    def _adopt_map(self) -> Any:
        """The cluster file as ``shard add`` left it, adopted by the harness's cluster (its shard count: leader
        picks, the recovery wait and the replicas check then cover the new shards); returns it."""
        from shards.shardmap import ShardMap

        m = ShardMap.load(self.cluster.config)
        self.cluster.map = m
        return m

    def _reshard_fault(self) -> Fault:
        """One ``shard add`` or ``shard remove`` per window: a move an earlier window left half-done is finished
        first (that is the window's move); else the other of the last window's (an add at
        ``RESHARD_MIN_SHARDS`` shards, a removal at ``RESHARD_MAX_SHARDS``), half the time in this thread to its
        end, half the time by the CLI killed after a line of progress (left for the next window or the heal)."""
        f = Fault("reshard", "shard move", [], self.clock())
        op = self._operator()
        m = op.map
        resharder = self._resharder(op)
        self._reshard_windows += 1
        try:
            pending = m.removing is not None or m.adding is not None or resharder._unfinished_cleanup() is not None
            if not pending and self._reshard_windows % RESHARD_NODE_EVERY == 0:
                self._node_step(f, op)
            elif m.removing is not None:
                self._shard_remove(f, resharder, m.nshards, pending=True)
            elif m.adding is not None or resharder._unfinished_cleanup() is not None:
                self._shard_add(f, resharder, m.nshards, pending=True)
            else:
                remove = m.nshards >= RESHARD_MAX_SHARDS or (
                    m.nshards > RESHARD_MIN_SHARDS and self._last_reshard == "add")
                self._last_reshard = "remove" if remove else "add"
                if self.rng.random() < 0.5:
                    self._cut_reshard(f, m.nshards, remove)
                elif remove:
                    self._shard_remove(f, resharder, m.nshards, pending=False)
                else:
                    self._shard_add(f, resharder, m.nshards, pending=False)
        except Exception as e:  # noqa: BLE001 - a failed move is recorded; the next window or the heal re-runs it
            f.error = f"{type(e).__name__}: {e}"
            f.detail += " failed (the next reshard window or the heal runs it again)"
        finally:
            resharder.close()
            after = self._adopt_map()
            if not f.nodes:  # a shard move: the nodes of the shard it added (or of the last one)
                f.nodes = sorted(after.placement.get(after.adding if after.adding is not None
                                                     else after.nshards - 1, ()))
        return f

    def _node_step(self, f: Fault, op: Any) -> None:
        """Grow or shrink the cluster by a node, as an operator would: ``raftkv node add --empty`` of a new node
        then ``raftkv rebalance`` (replicas move onto it, one at a time, each caught up before the next), or,
        when the nemesis added one before, ``raftkv node remove`` of it (its replicas are drained to the others
        first). The run's own nodes are never removed (the other nemeses and the checks count on them)."""
        from raftkv.rebalance import Rebalancer

        say = lambda m: self.log(f"nemesis: reshard (node): {m}")  # noqa: E731
        rebalancer = Rebalancer(op, step_timeout=RESHARD_STEP_TIMEOUT_S, say=say)
        added = sorted(n for n in op.map.nodes if n not in self.nodes)
        if added:
            name = added[0]
            f.detail = f"node remove {name}: drained, then removed"
            f.nodes = [name]
            res = rebalancer.remove_node(name, stop=True)
            f.detail += f" ({len(res.plan.steps) if res else 0} replica step(s))"
            return
        m = op.map
        first = m.nodes[self.nodes[0]]
        per_host = len({i.host for i in m.nodes.values()}) > 1  # node i on 127.0.0.i (a private namespace)
        k = len(m.nodes) + 1
        name = f"n{k}"
        while name in m.nodes:
            k += 1
            name = f"n{k}"
        data = os.path.join(m.data_dir, name)
        shutil.rmtree(data, ignore_errors=True)  # an earlier window's node of that name left its files
        if self.power_log is not None:
            power.forget_under(self.power_log, data)
        if per_host:
            host, port, raft_port = f"127.0.0.{k}", first.client_port, first.raft_port
        else:
            from raftkv.cluster import free_base_port

            host = "127.0.0.1"
            base = free_base_port(1, RESHARD_MAX_SHARDS + 1)  # its client port, and room for every shard's group
            port, raft_port = base, base + 1000
        f.detail = f"node add {name} ({host}) --empty, then rebalance"
        f.nodes = [name]
        op.add(f"{host}:{port}", name=name, raft_port=raft_port, start=True, join=False)
        res = rebalancer.run()
        f.detail += (f": {res.plan.adds} replica(s) onto {name}, {len(res.plan.steps) - res.plan.adds} removed "
                     f"from the others, {res.leader_moves} leadership move(s), {res.seconds:.1f} s")

    def _shard_remove(self, f: Fault, resharder: Any, nshards: int, pending: bool) -> None:
        """Run ``shard remove`` of the last shard in this thread to its end; the detail says what it moved."""
        f.detail = (f"shard remove: finished the removal of shard {nshards - 1} an earlier window left" if pending
                    else f"shard remove: {nshards} -> {nshards - 1} shards")
        res = resharder.remove(nshards - 1)
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
        f.detail += f": shard {res.shard} (epoch {res.epoch}) gave {res.moved} of {res.total} keys away; {steps}"

    def _shard_add(self, f: Fault, resharder: Any, nshards: int, pending: bool) -> None:
        """Run ``shard add`` in this thread to its end; the detail says what it moved."""
        f.detail = (f"shard add: finished the add an earlier window left ({nshards} shards on the ring)" if pending
                    else f"shard add: {nshards} -> {nshards + 1} shards")
        res = resharder.run()
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
        if res.total:
            f.detail += (f": shard {res.shard} (epoch {res.epoch}) got {res.moved} of {res.total} keys "
                         f"({res.fraction:.1%}; an even share 1/{res.shard + 1} = {1 / (res.shard + 1):.1%}), "
                         f"{res.purged} deleted from the sources; {steps}")
        else:
            f.detail += (f": shard {res.shard} (epoch {res.epoch}) on the ring, {res.purged} moved keys deleted "
                         f"from the sources; {steps}")

    def _cut_reshard(self, f: Fault, nshards: int, remove: bool) -> None:
        """Run the CLI (``python -m raftkv shard add --chunk 1``, or ``shard remove ID --chunk 1``) and
        ``kill -9`` it right after its line of progress that marks a point drawn from ``RESHARD_CUT_POINTS``
        (``REMOVE_CUT_POINTS``); the detail quotes that line."""
        points = REMOVE_CUT_POINTS if remove else RESHARD_CUT_POINTS
        point = self.rng.choice(sorted(points))
        needle = points[point]
        what, after = ("remove", nshards - 1) if remove else ("add", nshards + 1)
        f.detail = f"shard {what} {nshards} -> {after} shards by the CLI, cut when {point}"
        auth = []
        if self.client_kw.get("password"):
            auth = ["--password", str(self.client_kw["password"])]
        cmd = [sys.executable, "-m", "raftkv", *auth, "shard", what, *([str(nshards - 1)] if remove else []),
               "--chunk", "1",
               "--timeout", f"{RESHARD_STEP_TIMEOUT_S:g}", "--cluster", str(self.cluster.config)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, env=env, start_new_session=True)
        timer = threading.Timer(RESHARD_CLI_WAIT_S, proc.kill)  # a hung add must not hang the nemesis
        timer.start()
        lines: list[str] = []
        cut = False
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip())
                self.log(f"nemesis: reshard (cli): {lines[-1]}")
                if needle in line:
                    proc.kill()  # SIGKILL: no cleanup of its own, as when the operator's machine dies
                    cut = True
                    break
            rc = proc.wait(10)
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        last = lines[-1] if lines else ""
        if cut and rc == -signal.SIGKILL:
            f.detail += f": kill -9 after {last!r} (left for the next window or the heal)"
        elif rc == 0:
            f.detail = f"shard {what} {nshards} -> {after} shards by the CLI (ended before the cut): {last!r}"
        else:
            raise RuntimeError(f"raftkv shard {what} exited {rc} after {len(lines)} lines: {lines[-3:]}")

    def _finish_reshard(self) -> str:
        """The heal: finish an add or removal a window left half-done (none is started); what was done."""
        try:
            op = self._operator()
            resharder = self._resharder(op)
            try:
                if op.map.removing is not None:
                    res = resharder.remove(op.map.removing)
                    return f"finished the removal of shard {res.shard} (epoch {res.epoch}, {res.moved} keys moved)"
                if op.map.adding is None and resharder._unfinished_cleanup() is None:
                    return f"no shard add or removal left half-done ({op.map.nshards} shards)"
                res = resharder.run()
            finally:
                resharder.close()
                self._adopt_map()
            return f"finished the add of shard {res.shard} (epoch {res.epoch}, {res.purged} moved keys deleted)"
        except Exception as e:  # noqa: BLE001 - reported; the recovery wait and the checks will show what is left
            return f"finishing the shard move failed: {type(e).__name__}: {e}"

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


def moves_left(m: Any, statuses: dict[str, dict]) -> list[str]:
    """Pure: what a ``shard add`` or ``shard remove`` left half-done, from the cluster file ``m`` and every node's ``RAFTKV.STATUS``
    (name -> status): the file still placing a shard that is not on the ring, a replica with a move under way,
    or one serving under a ring older than the file's (a shard that took part in a move and missed its end).
    Empty: no move is left."""
    left = [f"the cluster file still adds shard {m.adding}"] if m.adding is not None else []
    if getattr(m, "removing", None) is not None:
        left.append(f"the cluster file still removes shard {m.removing}")
    for name, st in sorted(statuses.items()):
        for shard, sh in sorted((st.get("shards") or {}).items(), key=lambda kv: int(kv[0])):
            if sh.get("move") is not None:
                left.append(f"{name} shard {shard}: move {sh['move']}")
            ring = sh.get("ring_shards")
            if ring is not None and ring != m.nshards:
                left.append(f"{name} shard {shard}: serves a ring of {ring} shards (the file: {m.nshards})")
    return left


def is_small_tmpfs(path: str) -> bool:
    """Whether ``path`` is a mount point of a tmpfs no larger than :data:`FILL_LIMIT_BYTES` (what the runner
    mounts for the ``disk`` nemesis): the only kind of file system the nemesis will fill."""
    try:
        st = os.statvfs(path)
        with open("/proc/self/mounts") as mounts:
            fstype = {fields[1]: fields[2] for fields in (line.split() for line in mounts) if len(fields) > 2}
    except OSError:
        return False
    return fstype.get(os.path.realpath(path)) == "tmpfs" and st.f_blocks * st.f_frsize <= FILL_LIMIT_BYTES


def fill_disk(path: str, chunk: int = 1 << 20) -> int:
    """Write a filler file in ``path`` until its file system is full (``ENOSPC``); returns the bytes written."""
    if not is_small_tmpfs(path):
        raise RuntimeError(f"refusing to fill {path}: not a tmpfs of at most {FILL_LIMIT_BYTES >> 20} MiB "
                           "(run the disk nemesis inside the harness's namespace, which mounts one)")
    written = 0
    block = b"\0" * chunk
    with open(os.path.join(path, FILLER), "ab", buffering=0) as out:
        while chunk >= 4096:
            try:
                written += out.write(block[:chunk])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 2  # down to single pages: leave nothing a commit could use
    return written


def free_disk(path: str) -> None:
    """Remove the filler from ``path`` (absent is fine)."""
    try:
        os.remove(os.path.join(path, FILLER))
    except FileNotFoundError:
        pass


_ENGINE_FAILURE = re.compile(r"EngineError: storage engine (?:commit failed in \S+: (?:mdb_txn_commit: )?(.+)|in \S+ is full.*)")


def engine_failure(log_text: str) -> str:
    """Pure: the last storage-engine commit error in a node's log text ("" if none), e.g. "No space left on
    device", or "Input/output error" (what LMDB reports for a short write on a full file system)."""
    found = _ENGINE_FAILURE.findall(log_text)
    if not found:
        return ""
    return found[-1].strip() or "map full"


def _size(path: Any) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path: Any, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _total(counters: dict[str, dict[str, int]], key: str) -> int:
    return sum(c.get(key, 0) for c in counters.values())


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _commit_summary(before: tuple[int, float] | None, after: tuple[int, float] | None) -> str:
    """Pure: the fault detail's note on the engine commits made between two counter readings."""
    if before is None or after is None or after[0] < before[0]:
        return " (commit times unknown: the node did not answer, or restarted)"
    n = after[0] - before[0]
    if n == 0:
        return " (no durable commit in the window)"
    return f" (mean durable commit {(after[1] - before[1]) / n * 1000:.0f} ms over {n} commits)"


def _wait_until(clock: Callable[[], float], t: float, stop: threading.Event) -> bool:
    """Sleep until ``clock() >= t``; True if ``stop`` was set first."""
    while True:
        left = t - clock()
        if left <= 0:
            return stop.is_set()
        if stop.wait(min(left, 0.2)):
            return True

"""The :class:`Nemesis`: one object that injects, undoes and heals every fault kind, on a seeded schedule.

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

Each fault family's steps live in its own module (:mod:`.process`, :mod:`.partition`, :mod:`.member`,
:mod:`.clock`, :mod:`.disk`, :mod:`.compaction`, :mod:`.power_loss`, :mod:`.reshard`) as a mixin;
this class holds the state they share, takes the lock, and dispatches by fault kind.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from typing import Any

from .base import Fault
from .clock import ClockFaults
from .compaction import CompactionFaults
from .disk import DiskFaults
from .member import MemberFaults
from .partition import PARTITION_SHAPES, PartitionFaults
from .power_loss import PowerLossFaults
from .process import ProcessFaults
from .reshard import ReshardFaults
from .schedule import _wait_until


class Nemesis(ProcessFaults, PartitionFaults, MemberFaults, ClockFaults, DiskFaults, CompactionFaults,
              PowerLossFaults, ReshardFaults):
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

    def start_fault(self, kind: str) -> Fault:
        starts: dict[str, Callable[[], Fault]] = {
            "kill": self._start_kill, "pause": self._start_pause, "partition": self._start_partition,
            "member": self._start_member, "clock": lambda: self._start_clock("clock"),
            "clock-forward": lambda: self._start_clock("clock-forward"), "slow-disk": self._start_slow_disk,
            "disk": self._start_disk, "power": self._start_power, "compaction": self._compaction_fault,
            "reshard": self._reshard_fault,
        }
        with self._lock:
            start = starts.get(kind)
            if start is None:
                raise ValueError(f"unknown fault kind {kind!r}")
            f = start()
            self.faults.append(f)
            self.log(f"nemesis: {f.detail} at {f.start:.2f} s")
            return f

    def end_fault(self, f: Fault) -> None:
        undo: dict[str, Callable[[Fault], None]] = {
            "kill": self._restart_nodes, "compaction": self._restart_nodes, "power": self._restart_nodes,
            "pause": self._resume_nodes, "partition": self._end_partition, "member": self._end_member,
            "clock": self._end_clock, "clock-forward": self._end_clock, "disk": self._free_disk,
            "slow-disk": self._end_slow_disk,
        }  # a reshard window leaves nothing to undo: its move is done, or left for the next window or the heal
        with self._lock:
            try:
                if f.kind in undo:
                    undo[f.kind](f)
            except Exception as e:  # noqa: BLE001 - recorded; heal_all retries
                f.error = f"undo failed: {e}"
            f.end = self.clock()
            self.log(f"nemesis: healed {f.kind} at {f.end:.2f} s")

    def heal_all(self) -> list[str]:
        """Flush partitions, resume every node, restart every dead node; return what was done."""
        done = []
        with self._lock:
            done += self._heal_network()
            self._resume_all()
            done += self._heal_members()
            done += self._heal_clocks()
            done += self._heal_disks()
            done += self._restart_dead()
            done += self._heal_reshard()
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

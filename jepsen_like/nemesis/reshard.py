"""Resharding under load: the ``reshard`` fault adds or removes a shard (or a node) per window with the
cluster's own resharder, rebalancer and CLI, and the heal finishes any move a window left half-done.

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
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from jepsen_like import power

from .base import Fault, NemesisBase

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


class ReshardFaults(NemesisBase):
    """``reshard``: one shard add or removal per window, or a node step; finished by the next window or the heal."""

    _last_reshard: str
    _reshard_windows: int

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
        root = str(Path(__file__).resolve().parents[2])  # the repository: jepsen_like/nemesis/ is two below
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

    def _heal_reshard(self) -> list[str]:
        """The heal: once the run held a ``reshard`` window, finish a move left half-done (twice if need be)."""
        done: list[str] = []
        if any(f.kind == "reshard" for f in self.faults):
            done.append(self._finish_reshard())
            if "failed" in done[-1]:  # e.g. a node still starting: once more
                done.append(self._finish_reshard())
        return done


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

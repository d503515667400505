"""Power loss: the ``power`` fault cuts the power of one node, a majority or every node, undoing the writes
their disks had not made durable (the undo logs of :mod:`jepsen_like.power`, which holds the shim side).

``power``: a power loss (:mod:`jepsen_like.power`). Runs with this nemesis start
every node with a preloaded shim that keeps an undo log of the writes each node
has not yet fsynced. The fault cuts the power of one node (a random one or a
shard leader), of a majority with that node in it, or of every node, a third
of the time each: kill -9 of each, then every unsynced write undone, so the
nodes restart from what their disks would hold. The fault's detail says how
many writes (and KiB) were undone per node, which shows the fault was real;
with ``--unsafe-no-sync`` (nodes that never fsync) it undoes acknowledged
writes, and the checks must catch it. The window's end restarts the nodes.
"""

from __future__ import annotations

from jepsen_like import power

from .base import Fault, NemesisBase


class PowerLossFaults(NemesisBase):
    """``power``: kill -9 of each target, then every unsynced write undone; the window's end restarts them."""

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

    def _start_power(self) -> Fault:
        if self.power_log is None:
            raise RuntimeError("power nemesis unavailable (the nodes run without the power-loss shim)")
        nodes, why = self._power_targets()
        f = Fault("power", f"power loss on {why}", nodes, self.clock())
        for n in nodes:  # every process dead first: a rollback under a live node would be torn
            self.cluster.kill_node(n)
        cuts = [f"{n}: {power.rollback(self.power_log, self.cluster.map.node_data_dir(n)).summary()}"
                for n in nodes]
        f.detail += " (" + "; ".join(cuts) + ")"
        return f

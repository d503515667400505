"""Membership changes under load: the ``member`` fault removes a node from every shard group with the
cluster's own operator code, and adds it back, empty, at the window's end (or in the heal).

``member``: a membership change under load, with the cluster's own operator
code (:class:`raftkv.membership.Operator`, what ``raftkv node remove|add``
run): a random node (or a shard leader: leadership moves away first) is
removed from every shard group and stopped; at the window's end its data
directory is emptied and it is added back under the same name and address,
as a new empty member that catches up from the leaders (log or snapshot).
The Operator starts and stops nodes through the harness's cluster, so the
nodes keep the run's options and network namespace.
"""

from __future__ import annotations

import os
import shutil

from jepsen_like import power

from .base import Fault, NemesisBase


class MemberFaults(NemesisBase):
    """``member``: remove a node from every shard group and stop it; add it back as a new empty member."""

    def _start_member(self) -> Fault:
        node, why = self._target()
        f = Fault("member", f"remove {node} ({why}) from every shard group", [node], self.clock())
        try:
            self._operator().remove(node, stop=True)
        except Exception as e:  # noqa: BLE001 - it may have left some groups: the window's end
            f.error = f"remove failed: {e}"  # (or the heal) adds it back, which is idempotent
        return f

    def _end_member(self, f: Fault) -> None:
        for n in f.nodes:
            self._add_back(n)

    def _heal_members(self) -> list[str]:
        """The heal: add back every node a ``member`` window removed and did not (or failed to) add back."""
        done = []
        for f in self.faults:
            if f.kind == "member" and f.nodes and (f.end is None or f.error):
                try:
                    self._add_back(f.nodes[0])
                    done.append(f"{f.nodes[0]} added back")
                except Exception as e:  # noqa: BLE001
                    done.append(f"adding {f.nodes[0]} back failed: {e}")
        return done

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

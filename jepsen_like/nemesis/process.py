"""Process faults: ``kill`` (kill -9, restarted at the window's end) and ``pause`` (SIGSTOP, SIGCONT at
the window's end), each on a random node or the leader of a random shard; and the heal's part for every
fault that stops processes: every node resumed, every dead node restarted from its data directory.
"""

from __future__ import annotations

import signal

from .base import Fault, NemesisBase


class ProcessFaults(NemesisBase):
    """``kill`` and ``pause``; restarting and resuming nodes (also the undo of the faults that kill nodes)."""

    def _start_kill(self) -> Fault:
        node, why = self._target()
        f = Fault("kill", f"kill -9 {node} ({why})", [node], self.clock())
        self.cluster.kill_node(node)  # raises unless the process is gone
        return f

    def _start_pause(self) -> Fault:
        node, why = self._target()
        f = Fault("pause", f"SIGSTOP {node} ({why})", [node], self.clock())
        self.cluster.pause_node(node)  # raises unless the kernel reports it stopped
        return f

    def _restart_nodes(self, f: Fault) -> None:
        """The end of a window that killed ``f``'s nodes (``kill``, ``compaction``, ``power``): start them."""
        for n in f.nodes:
            self.cluster.start_node(n)

    def _resume_nodes(self, f: Fault) -> None:
        for n in f.nodes:
            self.cluster.resume_node(n)

    def _resume_all(self) -> None:
        """The heal: SIGCONT to every node (a node that is not stopped ignores it)."""
        for n in self.nodes:
            self.cluster.signal_node(n, signal.SIGCONT)

    def _restart_dead(self) -> list[str]:
        """The heal: restart every node whose process is gone; what was done."""
        done = []
        for n in self.nodes:
            if self.cluster.pid(n) is None:
                self.cluster.start_node(n)
                done.append(f"restarted {n}")
        return done

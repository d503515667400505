"""What every fault family shares: the :class:`Fault` record and :class:`NemesisBase`, the state and the
primitives (target picks, ``RAFTKV.FAULT`` calls, the membership operator) the family mixins build on.

:class:`jepsen_like.nemesis.Nemesis` combines the mixins of the family modules (``process``,
``partition``, ``member``, ``clock``, ``disk``, ``compaction``, ``power_loss``, ``reshard``); each mixin
holds one family's inject, undo and heal steps, and reaches the cluster only through what is here.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

FAULT_CALL_WAIT_S = 10.0
"""How long a fault that needs a node's RAFTKV.FAULT waits for a node that is still starting."""


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


class NemesisBase:
    """The state the fault families share (set by :class:`jepsen_like.nemesis.Nemesis`) and their primitives."""

    cluster: Any
    rng: random.Random
    clock: Callable[[], float]
    firewall: Any | None
    log: Callable[[str], None]
    client_kw: dict
    power_log: str | os.PathLike | None
    faults: list[Fault]
    nodes: list[str]
    _lock: threading.RLock

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

    def _operator(self) -> Any:
        """The cluster's membership operator, starting and stopping nodes through the harness's cluster."""
        from raftkv.membership import Operator

        cluster = self.cluster

        class HarnessOperator(Operator):
            def _local_cluster(self) -> Any:
                return cluster

        return HarnessOperator(cluster.config, timeout=30.0, say=lambda m: self.log(f"nemesis: member: {m}"),
                               client_kw=self.client_kw)


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

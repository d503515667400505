"""raftkv.heap: short garbage-collector pauses in a node whose heap is mostly long-lived.

A node keeps ten minutes of transaction history in memory (``raftkv.txn``: records, tombstones, ids): under a
sustained cross-shard load, hundreds of thousands of objects. CPython's cyclic collector walks every tracked
object of the oldest generation in a full collection, holding the GIL all along, and CPython starts one each
time that generation has grown by a quarter. On the nodes of ``bench/txn_soak.py`` (MSET at 32 clients) full
collections took 76-108 ms after a minute (one took 344 ms), each one a stop of every group's heartbeats and of
every request: elections followed (election timeouts are 120-300 ms).

Those objects hold no reference cycles: reference counting frees them when the history drops them, and the
cyclic collector never has anything to find among them. ``HeapFreezer.freeze`` collects the young generations
and then moves every object still alive out of the collector's reach (``gc.freeze``); run every few seconds
(``run``), a full collection only walks what was created since the last freeze.

The price: a reference cycle that is alive at a freeze and becomes garbage later is never collected.
Reference counting frees everything else as before, and asyncio breaks its transports' and protocols' cycles
when a connection closes. ``stats()`` reports how many objects are frozen and what every collection cost
(status ``heap``, metrics ``raftkv_gc_*``); ``bench/txn_soak.py`` reports both (``--serve-arg=--gc-freeze-period
--serve-arg=0`` for a run without freezing).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

__all__ = ["FREEZE_PERIOD_S", "SLOW_GC_S", "HeapFreezer"]

log = logging.getLogger("raftkv.heap")

#: How often a node freezes its survivors (``raftkv serve --gc-freeze-period``; 0: never).
FREEZE_PERIOD_S = 10.0
#: A collection longer than this is logged (``event=slow_gc``): every thread of the node stood still.
SLOW_GC_S = 0.05


class HeapFreezer:
    """Times every garbage collection of this process and freezes survivors (see module doc).

    One per process is enough; several (tests) each count every collection.
    """

    def __init__(self, slow_s: float = SLOW_GC_S) -> None:
        self.slow_s = slow_s
        self.freezes = 0
        self.collections = [0, 0, 0]  # per generation
        self.pause_s = [0.0, 0.0, 0.0]
        self.max_pause_s = [0.0, 0.0, 0.0]
        self._started: float | None = None
        self._installed = False

    def install(self) -> None:
        """Start timing collections (``gc.callbacks``)."""
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def uninstall(self) -> None:
        """Stop timing collections."""
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def freeze(self) -> int:
        """Collect the young generations, then put every object alive now out of the collector's reach.

        Returns how many objects are frozen in all (``gc.get_freeze_count``).
        """
        gc.collect(1)  # young garbage, cycles included, goes now rather than being frozen with the survivors
        gc.freeze()
        self.freezes += 1
        return gc.get_freeze_count()

    async def run(self, period_s: float) -> None:
        """``freeze()`` every ``period_s`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(period_s)
            self.freeze()

    def stats(self) -> dict[str, Any]:
        """Frozen objects, freezes so far, and per generation: collections, their total and longest pause."""
        return {"frozen_objects": gc.get_freeze_count(), "freezes": self.freezes,
                "collections": list(self.collections), "pause_s": [round(s, 6) for s in self.pause_s],
                "max_pause_ms": [round(s * 1000, 3) for s in self.max_pause_s]}

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        dt = time.perf_counter() - self._started
        self._started = None
        gen = info.get("generation", 2)
        self.collections[gen] += 1
        self.pause_s[gen] += dt
        self.max_pause_s[gen] = max(self.max_pause_s[gen], dt)
        if dt > self.slow_s:
            log.warning("event=slow_gc generation=%d ms=%.0f collected=%d frozen=%d", gen, dt * 1000,
                        info.get("collected", 0), gc.get_freeze_count())

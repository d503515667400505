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
Reference counting frees everything else as before. A closed connection is the one such cycle found: Python
3.11's socket transport keeps its read callback as one of its own bound methods, so every connection that is
open at a freeze would stay in memory once closed. ``release_closed`` breaks that cycle (the node's client
connections and its links to other nodes call it). ``stats()`` reports how many objects are frozen and what every collection cost
(status ``heap``, metrics ``raftkv_gc_*``); ``bench/txn_soak.py`` reports both (``--serve-arg=--gc-freeze-period
--serve-arg=0`` for a run without freezing).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

__all__ = ["CLOSE_WAIT_S", "FREEZE_PERIOD_S", "SLOW_GC_S", "HeapFreezer", "release_closed", "transports_of"]

log = logging.getLogger("raftkv.heap")

#: How often a node freezes its survivors (``raftkv serve --gc-freeze-period``; 0: never).
FREEZE_PERIOD_S = 10.0
#: A collection longer than this is logged (``event=slow_gc``): every thread of the node stood still.
SLOW_GC_S = 0.05
#: How long a closed connection may take to finish closing (a TLS shutdown, unsent bytes to a peer that does
#: not read them) before it is aborted (``release_closed``).
CLOSE_WAIT_S = 5.0


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


def transports_of(writer: asyncio.StreamWriter) -> list[asyncio.BaseTransport]:
    """A connection's transports: the stream's and, with TLS, the socket's beneath it (asyncio drops its own
    reference to that one when the connection is lost: take it while the connection is open)."""
    inner = getattr(getattr(writer.transport, "_ssl_protocol", None), "_transport", None)
    return [writer.transport] if inner is None else [writer.transport, inner]


async def release_closed(writer: asyncio.StreamWriter, transports: list[asyncio.BaseTransport]) -> None:
    """After ``writer.close()``: once the connection has closed, break the reference cycle each socket
    transport keeps to itself, so that reference counting frees it, frozen or not (module doc).
    ``transports``: ``transports_of(writer)``, taken while the connection was open."""
    closed = asyncio.ensure_future(writer.wait_closed())
    try:
        async with asyncio.timeout(CLOSE_WAIT_S):
            await asyncio.shield(closed)  # a timeout must not cancel the stream's own close waiter
    except TimeoutError:
        # Still closing: bytes the peer does not take (or a TLS shutdown it does not answer) keep it open,
        # possibly for good. Drop them: a frozen transport left to the collector would never be freed.
        for t in transports:
            t.abort()
        try:
            async with asyncio.timeout(CLOSE_WAIT_S):
                await closed
        except (TimeoutError, ConnectionError, OSError) as exc:
            exc.__traceback__ = None
    except (ConnectionError, OSError) as exc:  # closed by the peer's reset: the error's frames refer back to it
        exc.__traceback__ = None
    for t in transports:
        if t.is_closing() and getattr(t, "_read_ready_cb", None) is not None:
            t._read_ready_cb = None  # closed: never read again

"""The watch delivery benchmark (``raftkv bench watch``): how fast one watcher receives a change feed.

Theory of operation
-------------------
``run_watch_bench`` brings up a fresh local cluster (3 nodes, ``shards`` shards, as the suite's) and starts
one watcher: ``Client.watch`` on the prefix every written key has (``key:``, so all shards), or on one key
with ``one_key``, polled on a thread of this process.  Its cursors are pinned (a non-blocking poll from
now) before any write is sent, so every event it receives comes from the writers.  Then ``writers``
closed-loop clients put to the watched keys at full speed through the suite's load generator
(``raftkv.bench.load``: worker processes, raw sockets, session-wrapped ``SET`` to the shard leader) with
``stamp``: each value starts with ``time.time()`` at the moment the put is sent.

Delivery latency is the watcher's ``time.time()`` when the reply carrying the event arrived minus the
stamp: from the put's *send*, so it includes the put's own latency and is compared with the puts' p99 of the
same run.  ``time.time()`` is the one clock both ends read (writers and watcher are different processes on
the same machine); a step of the wall clock during a run would distort it, nothing else does.  Events/s
and the latencies count the events received inside the measured window (the load generator's, after
warm-up).

Exact delivery: the writers drain at the end of the window (no new puts; the replies still due are
awaited), then the watcher polls without blocking until a poll comes back empty (each poll is a
linearizable read, so an empty one has seen every acknowledged put).  ``events_total`` must then equal the
acknowledged puts (``puts_acked_total``), or lie between them and those plus the puts that may have been
applied without an answer (``maybe_applied``, zero in a healthy run); a shard revision seen twice is
counted in ``duplicates``.

The live rate cannot exceed the writers' put rate.  To show what the watcher itself can take, the run's
events are then read once more from the cursors pinned at the start, without blocking, as fast as polls
go (``replay_events_s``: a backlog of up to ``COUNT`` events per shard per poll).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raftkv.bench.hist import Hist
from raftkv.bench.load import LoadParams, LoadRun, Result
from raftkv.bench.report import machine
from raftkv.bench.systems import RaftKVSystem
from raftkv.bench.workloads import key_name
from raftkv.client import Client

# What the issue asks of one watcher: events/s delivered, and p99 delivery against the puts' p99.
TARGET_EVENTS_S = 10_000
TARGET_P99_RATIO = 2.0
WATCHED_PREFIX = b"key:"  # every key_name() starts with it
CLOCK = ("time.time() in both processes: delivery = the watcher's receipt of the reply with the event "
         "minus the time the put was sent (stamped in its value)")


@dataclass
class WatchBenchConfig:
    writers: int = 32
    duration: float = 6.0
    warmup: float = 1.0
    shards: int = 3
    keyspace: int = 1_000  # keys the writers spread over (all watched); 1 with one_key
    value_size: int = 100
    one_key: bool = False  # the watcher watches one key and every writer puts it
    block: float = 1.0  # seconds one long poll waits on the node when nothing changes
    procs: int = 0  # writer processes (0: the load generator's default)
    workdir: str | None = None


class Watcher:
    """One ``Client.watch`` polled on its own thread; records each event's receipt time and latency.

    ``start`` pins the cursors (a non-blocking poll from now) before returning; ``finish`` asks it to catch
    up (poll without blocking until a poll is empty) and waits for the thread.
    """

    def __init__(self, config: str, subject: bytes, prefix: bool, block: float) -> None:
        self.client = Client(cluster=config, timeout=10.0)
        self.watch = self.client.watch(subject, prefix=prefix, block=block)
        # (perf_counter at receipt, delivery latency in seconds) per event; (shard, revision) seen.
        self.received: list[tuple[float, float]] = []
        self.seen: set[tuple[int, int]] = set()
        self.duplicates = 0
        self.polls = 0
        self.unparsed = 0  # values without a send stamp (none expected: every writer stamps)
        self.error: BaseException | None = None
        self._draining = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def start(self) -> Watcher:
        self.watch.poll(block=False)  # cursors := every shard's revision now
        self.start_cursors = dict(self.watch.cursors or {})
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                draining = self._draining.is_set()
                events = self.watch.poll(block=not draining)
                pc, wall = time.perf_counter(), time.time()
                self.polls += 1
                for e in events:
                    self._record(e, pc, wall)
                if draining and not events:
                    return
        except BaseException as e:  # noqa: BLE001 - reported by finish() in the caller's thread
            self.error = e

    def _record(self, e: Any, pc: float, wall: float) -> None:
        if (e.shard, e.revision) in self.seen:
            self.duplicates += 1
        self.seen.add((e.shard, e.revision))
        try:
            sent = float((e.value or b"").split(b" ", 1)[0])
        except ValueError:
            self.unparsed += 1
            return
        self.received.append((pc, wall - sent))

    def finish(self, timeout: float = 60.0) -> None:
        """Catch up with every change made so far, then stop; raises what the watcher thread raised."""
        self._draining.set()
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self._thread.is_alive():
            raise TimeoutError(f"the watcher did not catch up within {timeout:g} s")

    def replay(self) -> tuple[int, float]:
        """Read the run's events again from the pinned cursors, as fast as polls go (a backlog, so never
        waiting for writes): (events read, seconds).  The watcher's own capacity, apart from the write rate."""
        w = self.client.watch(self.watch.subject, prefix=self.watch.prefix, start_revision=self.start_cursors)
        n, t0 = 0, time.perf_counter()
        while n < len(self.seen):
            events = w.poll(block=False)
            if not events:
                break
            n += len(events)
        return n, time.perf_counter() - t0

    def close(self) -> None:
        self.client.close()


def say(msg: str) -> None:
    """Progress output: one flushed line."""
    print(msg, flush=True)


def run_watch_bench(cfg: WatchBenchConfig, out: Callable[[str], None] = say) -> dict:
    """Run the benchmark on a fresh cluster; returns the report (see ``summarize``)."""
    base = Path(cfg.workdir or tempfile.mkdtemp(prefix="raftkv-bench-watch-"))
    keyspace = 1 if cfg.one_key else cfg.keyspace
    out(f"== raftkv: starting ({cfg.shards} shards)")
    system = RaftKVSystem(str(base / "raftkv"), shards=cfg.shards)
    try:
        subject, prefix = (key_name(0), False) if cfg.one_key else (WATCHED_PREFIX, True)
        watcher = Watcher(system.spec()["config"], subject, prefix, cfg.block).start()
        out(f"   watching {'key ' + subject.decode() if cfg.one_key else 'prefix ' + subject.decode()}; "
            f"{cfg.writers} writers over {keyspace} key(s), {cfg.warmup:g} s warm-up + {cfg.duration:g} s")
        run = LoadRun(system, LoadParams("put", cfg.writers, cfg.duration, cfg.warmup, keyspace, cfg.value_size,
                                         procs=cfg.procs, stamp=True, drain=True)).start()
        puts = run.finish()
        watcher.finish()
        replayed = watcher.replay()
        watcher.close()
    finally:
        system.stop()
        if cfg.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    doc = summarize(cfg, puts, watcher, run.measure_from, run.measure_to, replayed)
    doc["machine"] = machine()
    for line in render(doc):
        out(line)
    return doc


def summarize(cfg: WatchBenchConfig, puts: Result, watcher: Watcher, t0: float, t1: float,
              replayed: tuple[int, float]) -> dict:
    """The report: the puts' figures, the watcher's, the delivery check, the replay and the issue's targets."""
    hist = Hist()
    in_window = 0
    for pc, latency in watcher.received:
        if t0 <= pc <= t1:
            in_window += 1
            hist.record(max(0.0, latency))
    seconds = max(1e-6, t1 - t0)
    events_total = len(watcher.seen)
    put_p99 = puts.p99_ms
    p99 = _ms(hist.quantile(0.99))
    exact = puts.acked <= events_total <= puts.acked + puts.maybe_applied and watcher.duplicates == 0
    return {
        "config": asdict(cfg),
        "watch": "one key" if cfg.one_key else f"prefix {WATCHED_PREFIX.decode()} (every shard)",
        "clock": CLOCK,
        "seconds": round(seconds, 3),
        "puts": puts.row(),
        "put_ops_s": puts.ops_s,
        "put_p50_ms": puts.p50_ms,
        "put_p99_ms": put_p99,
        "events_in_window": in_window,
        "events_s": round(in_window / seconds, 1),
        "delivery_p50_ms": _ms(hist.quantile(0.5)),
        "delivery_p99_ms": p99,
        "delivery_p999_ms": _ms(hist.quantile(0.999)),
        "delivery_p99_over_put_p99": round(p99 / put_p99, 2) if p99 is not None and put_p99 else None,
        "events_total": events_total,
        "puts_acked_total": puts.acked,
        "maybe_applied": puts.maybe_applied,
        "duplicates": watcher.duplicates,
        "unstamped": watcher.unparsed,
        "every_event_once": exact,
        "polls": watcher.polls,
        "events_per_poll": round(events_total / max(1, watcher.polls), 1),
        "replay_events": replayed[0],
        "replay_events_s": round(replayed[0] / max(1e-6, replayed[1]), 1),
        "targets": {"events_s": TARGET_EVENTS_S, "delivery_p99_over_put_p99": TARGET_P99_RATIO},
    }


def render(doc: dict) -> list[str]:
    """The report as a few lines of text."""
    return [
        f"puts:    {doc['put_ops_s']:.0f}/s  p50 {doc['put_p50_ms']} ms  p99 {doc['put_p99_ms']} ms  "
        f"({doc['config']['writers']} writers; errors {doc['puts']['errors']})",
        f"watcher: {doc['events_s']:.0f} events/s  delivery p50 {doc['delivery_p50_ms']} ms  "
        f"p99 {doc['delivery_p99_ms']} ms  p99.9 {doc['delivery_p999_ms']} ms  "
        f"(p99 ÷ put p99: {doc['delivery_p99_over_put_p99']}; target ≤ {TARGET_P99_RATIO:g}; "
        f"events/s target ≥ {TARGET_EVENTS_S})",
        f"exact:   {doc['events_total']} events for {doc['puts_acked_total']} acknowledged puts "
        f"(+{doc['maybe_applied']} maybe applied), {doc['duplicates']} duplicates: "
        + ("every change delivered once" if doc["every_event_once"] else "MISMATCH"),
        f"polls:   {doc['polls']} ({doc['events_per_poll']} events per poll); clock: {doc['clock']}",
        f"replay:  the same {doc['replay_events']} events read again from the start: "
        f"{doc['replay_events_s']:.0f} events/s (the watcher's capacity when events are waiting)",
    ]


def _ms(x: float | None) -> float | None:
    """A histogram quantile (already in ms) rounded, or None."""
    return None if x is None else round(x, 3)

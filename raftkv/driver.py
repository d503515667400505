"""raftkv.driver: one thread ticks every Raft group of a node.

Theory of operation
-------------------
Each group is a ``SafeSyncObj`` built with ``autoTick=False`` (no thread of its own), ``deferFlush=True``
(its tick does not flush) and a ``MuxTransport`` on the node's ``RaftNetwork``. The driver thread owns all of
them: every pysyncobj callback (apply, ``onStateChanged``, tick callbacks, ``readIndex`` callbacks) runs on
it, and so does every socket operation of the network. One loop iteration:

1. **receive**: wait on the network's sockets and the wake pipe (at most until some group's tick is due),
   read what arrived and dispatch each frame to its group's pysyncobj handler;
2. **tick**: ``group._onTick(0)`` for every group that received frames or was woken, and for every group
   whose last tick is ``period_s`` old (so ``period_s``, pysyncobj's ``autoTickPeriod``, stays the upper
   bound between two ticks of a group);
3. **sync**: first the leaders' AppendEntries leave (``RaftNetwork.flush_early``: a leader may replicate
   entries before its own copy is durable, it only may not count itself), then ``group._rf_sync()`` for every
   group: the first durable flush covers every group's appends (a node-wide storage engine) or each group
   flushes its own journal, then each group releases the acks that waited for it;
4. **send**: the network seals each connection's queued frames into one record and writes it;
5. **chores**: node work that is not any group's, in bounded slices (``add_chore``: deleting the engine data
   of a group this node no longer hosts, ``raftkv.reclaim``), after the frames of the loop have left.

Pipelined commits (a node-wide ``Engine`` with ``start_committer(driver.on_durable)``): step 3 only *requests*
the commit; the engine's committer thread runs it while this loop goes on receiving, ticking and sending.
What must wait for durability waits inside each group (raftfix's gate: acks, votes and vote requests are held
until a commit covers the writes they vouch for; a leader counts itself only for its durable entries), so
nothing the network sends needs the loop's commit. When a commit completes, ``on_durable`` wakes the loop;
step 3 then releases what it covers, and the groups that asked for it (leaders whose own entries became
countable) are ticked so their commit index moves at once.

A thread that proposes a command or a read barrier to a group (``SafeSyncObj``'s ``wake`` hook) or queues a
tick action calls ``wake(shard)``: the group is ticked in the next iteration and the wait is cut short (one
pipe byte per wait, however many wake-ups).

Groups may be added and removed while the driver runs (``add``/``remove``, any thread): they are adopted or
destroyed on the driver thread between two iterations.

Concurrency contract: ``add``, ``remove``, ``wake``, ``start``, ``stop`` and ``alive`` are thread-safe; nothing
else of a group or of the network may be touched off the driver thread while it runs. Callbacks run here must
not block: the loop is every group's heartbeat.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from raftkv.raftnet import MuxTransport, RaftNetwork

__all__ = ["Group", "RaftDriver"]

log = logging.getLogger("raftkv.driver")

#: Threads that flush different groups' journals at once (``_flush_in_parallel``). With a node-wide storage
#: engine whose one flush covers every group, pass ``flush_threads=0``: the first ``_rf_sync`` does it all.
FLUSH_THREADS = 4
#: An iteration busy for longer than this is logged: it delays every group's heartbeats by as much.
SLOW_ITERATION_S = 0.05


class Group(Protocol):
    """What the driver needs of a group: a ``SafeSyncObj`` built for it (see module doc)."""

    group_id: int

    def _onTick(self, timeToWait: float = 0.0) -> None: ...  # noqa: N802,N803 - pysyncobj's names

    def _rf_sync(self) -> bool | None: ...

    def _rf_flush_if_needed(self) -> None: ...

    def needs_flush(self) -> bool: ...

    def postponeElection(self, seconds: float) -> None: ...  # noqa: N802

    def mux_transport(self) -> MuxTransport: ...

    def destroy_now(self) -> None: ...


class RaftDriver:
    """The node's Raft loop (see module doc)."""

    def __init__(self, network: RaftNetwork, period_s: float = 0.01, name: str = "raft-driver",
                 flush_threads: int = FLUSH_THREADS) -> None:
        self.network = network
        self._flushers = (concurrent.futures.ThreadPoolExecutor(flush_threads, thread_name_prefix=f"{name}-flush")
                          if flush_threads > 1 else None)
        self.period_s = period_s
        self.name = name
        self.groups: dict[int, Any] = {}
        self.last_tick: dict[int, float] = {}
        self.stats = {"loops": 0, "ticks": 0, "tick_errors": 0}
        self._lock = threading.Lock()  # guards the hand-over sets below
        self._woken: set[int] = set()
        self._adds: list[Any] = []
        self._removes: list[tuple[Any, threading.Event]] = []
        self._chores: list[Callable[[], bool]] = []
        self._wake_pending = False
        self._awaiting: set[int] = set()  # groups to tick after the next completed commit (driver thread)
        self._durable = False  # a commit completed since the last iteration took the flag
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.network.add_reader(self._wake_r, self._drain)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why a failed durable sync stopped the driver (None: it did not)

    # -- any thread ---------------------------------------------------------------------------------------------
    def add(self, group: Any) -> None:
        """Start ticking ``group`` (built with this driver's network); adopted on the driver thread."""
        with self._lock:
            self._adds.append(group)
        self.wake(group.group_id)

    def remove(self, group: Any, timeout: float = 10.0) -> None:
        """Stop ticking ``group`` and destroy it on the driver thread; waits until done (or the driver is gone)."""
        if not self.alive() or threading.current_thread() is self._thread:
            self._forget(group)
            return
        done = threading.Event()
        with self._lock:
            self._removes.append((group, done))
        self.wake(group.group_id)
        if not done.wait(timeout):
            log.warning("event=driver_remove_timeout group=%s", group.group_id)

    def add_chore(self, chore: Callable[[], bool]) -> None:
        """Call ``chore()`` on the driver thread once per loop, after the send (step 5 of the module doc).

        It must do a bounded slice of work (a few ms: every group's heartbeat waits for it) and return whether
        more is left (informative: the loop runs every ``period_s`` at least, whatever the groups do).
        """
        with self._lock:
            self._chores = [*self._chores, chore]
        self.wake()

    def wake(self, group_id: int | None = None) -> None:
        """Tick ``group_id`` (if given) in the next iteration, and cut the current wait short."""
        if group_id is not None:
            with self._lock:
                self._woken.add(group_id)
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError):  # pipe full: a wake-up is pending anyway
                os.write(self._wake_w, b"w")

    def on_durable(self) -> None:
        """A pipelined engine commit completed (any thread): release what it covers in the next iteration."""
        with self._lock:
            self._durable = True
        self.wake()

    def start(self) -> None:
        """Start the driver thread (once)."""
        if self._thread is not None:
            raise RuntimeError("driver already started")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for the thread; groups stay built (destroy them afterwards)."""
        self._stopping = True
        self.wake()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def alive(self) -> bool:
        """The driver thread is running (every group is being ticked)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def close(self) -> None:
        """After ``stop``: release the wake pipe and the flush threads."""
        if self._flushers is not None:
            self._flushers.shutdown(wait=True)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- driver thread --------------------------------------------------------------------------------------------
    def _drain(self) -> None:
        # Read first, then clear the flag. Cleared first, a wake() landing between the two would write a byte
        # that this read swallows and leave the flag set over an empty pipe: every later wake() would then be
        # skipped and wait for the period timer (seen: 10 ms reads after a 32-client load). Read first, a
        # wake() in between finds the flag set and writes nothing, but its group is already in _woken, which
        # this iteration takes after poll() returns.
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        self._wake_pending = False

    def _run(self) -> None:
        log.info("event=driver_started groups=%d period_s=%g", len(self.groups) + len(self._adds), self.period_s)
        while not self._stopping:
            try:
                self._iteration()
            except Exception:
                # Never let one bad iteration stop every group's heartbeat; pysyncobj's tick thread does the same.
                log.exception("event=driver_iteration_failed")
                time.sleep(self.period_s)
        log.info("event=driver_stopped")

    def _iteration(self) -> None:
        now = time.monotonic()
        due = min(self.last_tick.values(), default=now) + self.period_s
        waited = max(0.0, due - now)
        active = self.network.poll(waited)  # 1. receive (frames dispatched to groups here)
        read_at = time.monotonic()  # frames arriving after this stay unread until the next iteration
        self._adopt()
        with self._lock:
            woken, self._woken = self._woken, set()
            durable, self._durable = self._durable, False  # taken before the groups look at the engine
        active |= woken
        if durable:
            active |= self._awaiting
            self._awaiting = set()
        t_tick = time.monotonic()
        groups = self.groups
        ticked = 0
        for gid, group in list(groups.items()):  # 2. tick
            if gid in active or t_tick - self.last_tick[gid] >= self.period_s:
                self.last_tick[gid] = t_tick
                ticked += 1
                try:
                    unread_s = time.monotonic() - read_at
                    if unread_s > self.period_s:
                        # Earlier groups' ticks (or the receive step's own work) kept the sockets unread: a
                        # heartbeat may be waiting there. Never let our slowness pass for the leader's silence.
                        group.postponeElection(unread_s)
                    group._onTick(0.0)
                except Exception:
                    self.stats["tick_errors"] += 1
                    log.exception("event=group_tick_failed group=%s", gid)
        t_sync = time.monotonic()
        self.network.flush_early()  # leaders' AppendEntries: the followers' fsyncs overlap ours
        try:
            if self._flushers is not None:
                self._flush_in_parallel(groups)
            awaiting = self._awaiting
            for gid, group in list(groups.items()):  # 3. one durable sync (or a request), then the acks
                if group._rf_sync():
                    awaiting.add(gid)
        except Exception as exc:
            # Frames queued this loop may acknowledge what just failed to reach the disk: never send them.
            # A failed fsync cannot be retried safely either (the page cache may have dropped the data).
            self.failure = str(exc) or type(exc).__name__
            log.critical("event=driver_sync_failed msg='stopping every group of this node'", exc_info=True)
            self.network.close()
            self._stopping = True
            return
        t_send = time.monotonic()
        self.network.flush()  # 4. send
        t_chores = time.monotonic()
        for chore in self._chores:  # 5. chores
            try:
                chore()
            except Exception:
                log.exception("event=driver_chore_failed")
        end = time.monotonic()
        self.stats["loops"] += 1
        self.stats["ticks"] += ticked
        busy = end - now - min(waited, t_tick - now)
        if busy > SLOW_ITERATION_S:
            # Every group's heartbeats wait for this loop: a slow one is what turns into spurious elections.
            log.warning("event=driver_slow_iteration busy_ms=%.0f receive_ms=%.0f tick_ms=%.0f ticked=%d "
                        "sync_ms=%.0f send_ms=%.0f chores_ms=%.0f", busy * 1000, (t_tick - now) * 1000,
                        (t_sync - t_tick) * 1000, ticked, (t_send - t_sync) * 1000, (t_chores - t_send) * 1000,
                        (end - t_chores) * 1000)

    def _flush_in_parallel(self, groups: dict[int, Any]) -> None:
        """While every group has journal files of its own, their fsyncs overlap on a few threads.

        Each group is flushed by one thread while the driver waits, so no group is touched by two threads at
        once; ``_rf_sync()`` then finds nothing left to flush and only releases the acks.
        """
        dirty = [g for g in groups.values() if g.needs_flush()]
        if len(dirty) < 2:
            return
        assert self._flushers is not None
        for future in [self._flushers.submit(g._rf_flush_if_needed) for g in dirty]:
            future.result()  # re-raises a failed flush here, as _rf_sync would

    def _adopt(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            removes, self._removes = self._removes, []
        for group in adds:
            if group.group_id in self.groups:
                log.error("event=driver_duplicate_group group=%s", group.group_id)
                continue
            self.groups[group.group_id] = group
            self.last_tick[group.group_id] = 0.0
            self.network.attach(group.mux_transport())
        for group, done in removes:
            self._forget(group)
            done.set()

    def _forget(self, group: Any) -> None:
        if self.groups.get(group.group_id) is group:
            del self.groups[group.group_id]
            self.last_tick.pop(group.group_id, None)
        try:
            group.destroy_now()  # pysyncobj's destroy: the transport detaches from the network
        except Exception:
            log.exception("event=group_destroy_failed group=%s", group.group_id)

"""Per-shard batching on the leader: every command that arrives in one event-loop
turn becomes ONE Raft entry (``Proposer``), every read one ReadIndex round (``Reader``).

Group commit is where raftkv's write speed comes from: one log append, one
replication round trip and one fsync carry the whole batch.  Both batchers run
on the event loop; the replica answers on its tick thread, and the answer hops
back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from raftkv.replica import APPLIED, NOT_APPLIED, UNKNOWN, ShardReplica, log_if_slow

# (kind, result-or-reason), set on each command's future
Outcome = tuple[str, Any]


class Proposer:
    """Batches commands for one shard into Raft entries."""

    def __init__(self, replica: ShardReplica, loop: asyncio.AbstractEventLoop, batch_max: int,
                 outcomes: Any = None) -> None:
        self.replica = replica
        self.outcomes = outcomes  # counter with labels (shard, outcome), or None
        self.loop = loop
        self.batch_max = batch_max
        self.pending: list[tuple[tuple, asyncio.Future]] = []
        self.inflight: set[asyncio.Future] = set()  # handed to the replica, not answered yet
        self.scheduled = False
        self.closed: tuple[str, str] | None = None

    #: What a command still waiting gets when the group stops here (``close``): a proposed one may still
    #: commit through the group's other members (a replica moved off a leader), so its outcome is unknown.
    closed_kind = UNKNOWN

    def submit(self, cmd: tuple) -> asyncio.Future:
        """A future of ``(kind, result)`` for ``cmd``, proposed with this turn's batch."""
        fut = self.loop.create_future()
        if self.closed is not None:
            fut.set_result(self.closed)
            return fut
        self.pending.append((cmd, fut))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self.scheduled = False
        while self.pending:
            batch, self.pending = self.pending[: self.batch_max], self.pending[self.batch_max:]
            cmds = [c for c, _ in batch]
            futs = [f for _, f in batch]
            for f in futs:
                self.inflight.add(f)
                f.add_done_callback(self.inflight.discard)

            def done(kind: str, res: Any, futs: list = futs) -> None:
                if self.outcomes is not None:
                    self.outcomes.labels(str(self.replica.shard), kind).inc(len(futs))
                self.loop.call_soon_threadsafe(_resolve, futs, kind, res)

            self._send(cmds, done)

    def _send(self, cmds: list, done: Callable[[str, Any], None]) -> None:
        self.replica.propose(cmds, self.replica.log_now_ms(), done)

    def close(self, reason: str) -> None:
        """The group stopped on this node (event loop only): its callbacks will never come, so every command
        still waiting is answered now (``closed_kind``), instead of at its request timeout."""
        self.closed = (self.closed_kind, reason)
        _resolve([f for _, f in self.pending] + list(self.inflight), *self.closed)
        self.pending = []


class Reader(Proposer):
    """Batches linearizable reads for one shard behind one ReadIndex round (no log entry).

    A read not answered when the group stops did not happen: safe to run elsewhere (``closed_kind``).

    The replica confirms its leadership with a majority after the reads arrived
    and waits until everything committed before is applied; the reads then run
    against the state on the tick thread, where it is consistent.
    """

    closed_kind = NOT_APPLIED

    def _send(self, cmds: list, done: Callable[[str, Any], None]) -> None:
        replica = self.replica

        def confirmed(ok: bool, reason: str) -> None:
            if ok:
                state = replica.state
                now_ms = replica.log_now_ms()  # expired keys read as missing at once
                t0 = time.perf_counter()
                results = [state.read(c, now_ms) for c in cmds]
                log_if_slow("slow_read", replica.shard, time.perf_counter() - t0, cmds)  # the driver thread too
                done(APPLIED, results)
            else:
                done(NOT_APPLIED, reason)  # the read did not happen; safe to retry

        replica.read_barrier(confirmed)


def _resolve(futs: list[asyncio.Future], kind: str, res: Any) -> None:
    if kind == APPLIED:
        for f, r in zip(futs, res, strict=True):
            if not f.done():
                f.set_result((APPLIED, r))
    else:
        for f in futs:
            if not f.done():
                f.set_result((kind, res))

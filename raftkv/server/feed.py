"""Long polls of the change feed: wake waiting watchers when a hosted replica applies an entry.

Theory of operation
-------------------
A blocking ``RAFTKV.WATCH`` that found nothing new waits here until one of its
shards moves past the revision it has seen, then reads again (linearizably,
through the router).  The wait is a future on the event loop, so neither the
loop nor a Raft tick thread ever blocks: each replica calls ``applied(shard)``
on its tick thread after every entry it applies, which costs a dict lookup
when nobody waits, and otherwise hands one wake-up to the loop with
``call_soon_threadsafe``.

The local replica's revision is only a hint (a follower applies a little after
its leader commits, a partitioned one not at all), never an answer: the caller
always reads again through the shard's leader, and a wait ends after
``timeout`` anyway, so a node that hosts no replica of a shard, or hosts a
lagging one, still answers within ``RECHECK_S``.

Concurrency contract: ``applied`` runs on tick threads; everything else on the
node's event loop.  A waiter registers, *then* compares the replica's revision,
and ``applied`` runs after the replica's state changed, so a change that lands
in between is never missed (under the GIL each step is atomic).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

RECHECK_S = 1.0  # a long poll re-reads at least this often, whatever the local replicas say


class AppliedWaiters:
    """Futures waiting for shards' revisions to move, woken from the replicas' tick threads."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: dict[int, set[asyncio.Future]] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def applied(self, shard: int) -> None:
        """Called on ``shard``'s tick thread after each applied entry: wake its waiters, if any."""
        loop = self.loop
        if loop is not None and self.waiting.get(shard):
            loop.call_soon_threadsafe(self._wake, shard)

    def _wake(self, shard: int) -> None:
        for fut in self.waiting.pop(shard, set()):
            if not fut.done():
                fut.set_result(None)

    async def wait(self, revisions: Mapping[int, int], replicas: Mapping[int, Any], timeout: float) -> None:
        """Return once a local replica of one of ``revisions``' shards is past its revision, or after
        ``timeout`` seconds (at once when nothing is hosted here to wait on: then after ``timeout``)."""
        assert self.loop is not None and timeout >= 0
        deadline = self.loop.time() + timeout
        hosted = {s: rev for s, rev in revisions.items() if s in replicas}
        while True:
            fut = self.loop.create_future()
            for shard in hosted:
                self.waiting.setdefault(shard, set()).add(fut)
            try:
                if any(replicas[s].state.revision > rev for s, rev in hosted.items()):
                    return
                left = deadline - self.loop.time()
                if left <= 0:
                    return
                try:
                    await asyncio.wait_for(fut, left)
                except TimeoutError:
                    return
            finally:
                for shard in hosted:
                    waiters = self.waiting.get(shard)
                    if waiters is not None:
                        waiters.discard(fut)

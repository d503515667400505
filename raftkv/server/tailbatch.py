"""The asynchronous tail of many transactions, sent to each shard as one message.

Once a cross-shard transaction is answered, its coordinator still writes the decision (``tx_settle``),
finishes the other participants (``tx_finish``) and marks the record finished (``tx_ack``): three Raft
writes, one of them forwarded to another node, for every transaction, where a put costs one.  Under load
many transactions reach their tail in the same event-loop turn (their records and votes were applied by the
same Raft entries), so ``TailBatcher`` collects the tail messages for each shard during one turn and sends
them as one ``("tx_batch", (cmd, ...))`` state-machine command: one proposal and at most one forwarded call
for all of them.  Each message is applied as if sent alone (``raftkv.state``: same handler, same checks, one
result each), and each caller gets its own result or failure back, so a run resends exactly what failed.

Only the tail messages go this way: they name no key (nothing the edge checks per key) and nobody waits on
them to answer a client.  Off while the node runs classic 2PC (``Timing.txn_parallel_commits`` off), the
setting for clusters with nodes of earlier versions, which do not know ``tx_batch``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from raftkv.protocol import Error
from raftkv.results import CmdError
from raftkv.state import TX_BATCHABLE as TAIL  # the messages that may share a tx_batch

__all__ = ["TAIL", "TailBatcher"]


class TailBatcher:
    """Per shard, the tail messages of one event-loop turn, sent together.

    ``send(shard, cmd, timeout)`` is the single-message call (``coordinator.tx_call``): it returns the result
    or raises ``fail_type``; a batch's own failure fails each of its messages the same way."""

    def __init__(self, send: Callable[[int, tuple, float], Awaitable[Any]], fail_type: type[Exception]) -> None:
        self._send = send
        self._fail = fail_type
        self._pending: dict[int, list[tuple[tuple, asyncio.Future]]] = {}
        self._sending: set[asyncio.Task] = set()  # held: the loop keeps only weak references to tasks
        self.batches = 0  # sent with more than one message (status, tests)
        self.messages = 0  # messages sent in those

    def call(self, shard: int, cmd: tuple, timeout: float) -> asyncio.Future:
        """Queue ``cmd`` for ``shard``; the future has its result (or the failure ``send`` raises)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        queue = self._pending.get(shard)
        if queue is None:
            queue = self._pending[shard] = []
            loop.call_soon(self._flush, shard, timeout)
        queue.append((cmd, fut))
        return fut

    def _flush(self, shard: int, timeout: float) -> None:
        queue = self._pending.pop(shard)
        task = asyncio.ensure_future(self._run(shard, queue, timeout))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _run(self, shard: int, queue: list[tuple[tuple, asyncio.Future]], timeout: float) -> None:
        if len(queue) == 1:
            cmd, fut = queue[0]
            try:
                _settle(fut, result=await self._send(shard, cmd, timeout))
            except self._fail as exc:
                _settle(fut, error=exc)
            return
        self.batches += 1
        self.messages += len(queue)
        try:
            results = await self._send(shard, ("tx_batch", tuple(c for c, _ in queue)), timeout)
        except self._fail as exc:
            for _, fut in queue:
                _settle(fut, error=exc)
            return
        if not isinstance(results, tuple) or len(results) != len(queue):
            for _, fut in queue:
                _settle(fut, error=self._fail(Error("ERR", f"shard {shard}: tx_batch answered {results!r}")))
            return
        for (_, fut), res in zip(queue, results, strict=True):
            if isinstance(res, CmdError):
                _settle(fut, error=self._fail(Error(res.code, res.message)))
            else:
                _settle(fut, result=res)


def _settle(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if fut.done():  # the caller gave up waiting (cancelled)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)

"""Cross-shard transactions inside a node: the I/O edge of ``raftkv.txn``.

Theory of operation
-------------------
``raftkv.txn`` holds every rule (record CAS, votes, locks, recovery
transitions) as pure code.  This module only moves its messages: each 2PC
message is a state-machine command (``tx_*``) that ``Node.execute`` runs on
the target shard's leader, locally or forwarded to the leader's node as
``RAFTKV.TXMSG shard payload``.  Every message is idempotent by transaction
id, so a message whose outcome is unknown (leader change, lost connection) is
simply sent again.

* ``coordinate``: a client transaction (MSET, RAFTKV.TXN, EXEC) is forwarded
  to the node leading its home shard (``RAFTKV.TXRUN``), which drives a
  ``TxnRun`` there: begin, prepare in parallel, decide, answer the client,
  then finish and ack in the background.  One-shard transactions are one Raft
  entry, wrapped in a session keyed by the transaction id so a retry cannot
  apply twice.
* ``recovery_loop``: for every shard this node leads, every ~100 ms: abort
  PENDING records older than ``PENDING_TIMEOUT_MS``, re-send the outcome of
  decided but unfinished records, resolve locks older than
  ``LOCK_TIMEOUT_MS`` (ask the home shard with a Raft write, then finish here)
  and garbage-collect finished state now and then.
* ``resolve_lock``: also called by ``Node.execute`` when a command meets an
  old lock, so a reader never waits on a dead coordinator for long.

Time here is wall-clock milliseconds compared with the ``now_ms`` the leaders
stamp into entries: a skewed clock only makes recovery earlier or later, never
unsafe, because every decision is a CAS in the home shard's log.

Test-only fault hook: on a node started with ``RAFTKV_TEST_TXN_PAUSE=1`` in
its environment, a transaction whose id is ``pause:<point>:<seconds>:<anything>``
(point ``after_prepare`` or ``after_decide``) makes its coordinator sleep there,
so a test can ``kill -9`` it at that moment.  Never set it in production.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from typing import Any

from raftkv.protocol import Error
from raftkv.state import CmdError, Locked
from raftkv.txn import (
    ABORTED,
    COMMITTED,
    PENDING,
    REASON_CONFLICT,
    TxnResult,
    TxnRun,
    plan_txn,
    recovery_action,
    validate,
)

log = logging.getLogger("raftkv.txn")

LOCK_TIMEOUT_MS = 1500  # a lock older than this is resolved at its home shard
PENDING_TIMEOUT_MS = 2000  # a PENDING record older than this is aborted by its home leader
PREPARE_TIMEOUT_S = 1.5  # how long a coordinator waits for votes before aborting
MESSAGE_TIMEOUT_S = 2.0  # one attempt of one 2PC message
DRIVE_BUDGET_S = 60.0  # a coordinator gives up after this; the recovery loop takes over
RECOVERY_PERIOD_S = 0.1
GC_PERIOD_S = 5.0

_TX_OPS = {"getrev", "tx_begin", "tx_prepare", "tx_decide", "tx_finish", "tx_resolve", "tx_gc", "tx_ack"}
_RETRY = {"UNKNOWN", "TRYAGAIN", "NOQUORUM", "MOVED", "LOCKED", "BUSY"}


# -- a small JSON codec for messages between nodes (never pickle on a client port) ----

def encode_msg(obj: Any) -> bytes:
    return json.dumps(_enc(obj), separators=(",", ":")).encode()


def decode_msg(data: bytes) -> Any:
    return _dec(json.loads(data))


def _enc(o: Any) -> Any:
    if isinstance(o, bytes):
        return {"b": base64.b64encode(o).decode()}
    if isinstance(o, TxnResult):
        return {"r": [o.succeeded, _enc(o.results)]}
    if isinstance(o, (list, tuple)):
        return [_enc(x) for x in o]
    if o is None or isinstance(o, (bool, int, str)):
        return o
    raise TypeError(f"cannot encode {type(o).__name__} in a transaction message")


def _dec(o: Any) -> Any:
    if isinstance(o, dict):
        if "b" in o:
            return base64.b64decode(o["b"])
        return TxnResult(bool(o["r"][0]), _dec(o["r"][1]))
    if isinstance(o, list):
        return tuple(_dec(x) for x in o)
    return o


class TxnCallFailed(Exception):
    """A 2PC message was not (known to be) applied; ``error`` says why.  Safe to resend."""

    def __init__(self, error: Error) -> None:
        super().__init__(str(error))
        self.error = error


def _plain(res: Any) -> Any:
    """A reply another node produced (``protocol.Raw``/``node.Forwarded``), as a plain value."""
    kind = type(res).__name__
    if kind == "Raw":
        return res.value
    if kind == "Forwarded":
        return _plain(res.reply)
    return res


def _unwrap(res: Any) -> Any:
    res = _plain(res)
    if isinstance(res, bytes):
        return decode_msg(res)
    return res


async def tx_call(node: Any, shard: int, cmd: tuple, timeout: float = MESSAGE_TIMEOUT_S) -> Any:
    """Run one 2PC message on ``shard``'s leader; raises ``TxnCallFailed`` (resend it)."""
    req = [b"RAFTKV.TXMSG", str(shard).encode(), encode_msg(cmd)]
    try:
        res = await asyncio.wait_for(node.execute(shard, cmd, req, 0, idempotent=True), timeout)
    except TimeoutError:
        raise TxnCallFailed(Error("UNKNOWN", f"shard {shard}: {cmd[0]} timed out")) from None
    res = _unwrap(res)
    if isinstance(res, CmdError):
        res = Error(res.code, res.message)
    if isinstance(res, Error):
        raise TxnCallFailed(res)
    return res


# -- RESP commands used between nodes ----------------------------------------------------

def cmd_txmsg(node: Any, conn: Any, req: list[bytes], hops: int) -> Any:
    """RAFTKV.TXMSG shard payload: one 2PC message (internal, node to node)."""
    try:
        shard, cmd = int(req[1]), decode_msg(req[2])
    except (ValueError, KeyError, TypeError):
        return Error("ERR", "RAFTKV.TXMSG: malformed message")
    if not cmd or (cmd[0] not in _TX_OPS and not (cmd[0] == "session" and cmd[3][0] == "txn")):
        return Error("ERR", "RAFTKV.TXMSG: not a transaction message")

    async def go() -> Any:
        res = _plain(await node.execute(shard, cmd, req, hops, idempotent=True))
        if isinstance(res, CmdError):
            return Error(res.code, res.message)
        if isinstance(res, (Error, bytes)):
            return res
        return encode_msg(res)
    return node.run(go())


def cmd_txrun(node: Any, conn: Any, req: list[bytes], hops: int) -> Any:
    """RAFTKV.TXRUN txid payload: coordinate a transaction here (forwarded to the home leader)."""
    try:
        compares, then_ops, else_ops = decode_msg(req[2])
    except (ValueError, KeyError, TypeError):
        return Error("ERR", "RAFTKV.TXRUN: malformed message")

    async def go() -> Any:
        res = await coordinate(node, req[1].decode(), compares, then_ops, else_ops, hops + 1)
        return res if isinstance(res, Error) else encode_msg(res)
    return node.run(go())


# -- coordinating a transaction ------------------------------------------------------------

def new_txid() -> str:
    return uuid.uuid4().hex


async def coordinate(node: Any, txid: str, compares: Any, then_ops: Any, else_ops: Any,
                     hops: int = 0) -> TxnResult | Error:
    """Run a transaction; answer once the home shard has applied its decision."""
    why = validate(compares, then_ops, else_ops)
    if why is not None:
        return Error("ERR", why)
    if not txid or len(txid) > 64:
        return Error("ERR", "transaction id must be 1-64 characters")
    plan = plan_txn(txid, compares, then_ops, else_ops, node.shard_of)
    replica = node.replicas.get(plan.home)
    leading = replica is not None and replica.is_leader()
    target = None if leading or hops > 0 else node._leader_node(plan.home)
    if target is not None and target != node.name:
        # The coordinator is the home shard's leader: hand the transaction over.
        payload = encode_msg((tuple(compares), tuple(then_ops), tuple(else_ops)))
        reply = _plain(await node._forward(target, [b"RAFTKV.TXRUN", txid.encode(), payload], hops,
                                           node.timing.request_timeout_s))
        if isinstance(reply, bytes):
            return decode_msg(reply)
        if isinstance(reply, Error) and reply.code not in ("MOVED", "NOQUORUM"):
            return reply
        # Unreachable leader (maybe after it began): coordinate here with the same
        # txid; every message is idempotent, so two coordinators cannot disagree.
    return await _run_here(node, plan, compares, then_ops, else_ops)


async def _run_here(node: Any, plan: Any, compares: Any, then_ops: Any, else_ops: Any) -> TxnResult | Error:
    if len(plan.participants) == 1:
        cmd = ("session", b"tx:" + plan.txid.encode(), 1, ("txn", tuple(compares), tuple(then_ops), tuple(else_ops)))
        try:
            return await tx_call(node, plan.home, cmd, node.timing.request_timeout_s)
        except TxnCallFailed as e:
            return e.error
    svc = service(node)
    decided = asyncio.get_running_loop().create_future()
    svc.spawn(plan.txid, _drive(node, TxnRun(plan), decided))
    try:
        return await asyncio.wait_for(asyncio.shield(decided), node.timing.request_timeout_s + PREPARE_TIMEOUT_S)
    except TimeoutError:
        return Error("UNKNOWN", f"transaction {plan.txid}: no decision yet; it may still commit")


def _answer(run: TxnRun) -> TxnResult | Error:
    state, branch, results, reason, _ = run.decision  # type: ignore[misc]
    if state == COMMITTED:
        return TxnResult(bool(branch), tuple(results or ()))
    if reason == REASON_CONFLICT:
        key = run.conflict[0] if run.conflict else b"?"
        other = run.conflict[1] if run.conflict else "?"
        return Error("TXNCONFLICT", f"transaction {run.plan.txid} aborted: key {key!r} is locked by "
                                    f"transaction {other}; retry")
    return Error("TRYAGAIN", f"transaction {run.plan.txid} aborted ({reason}); not applied, retry")


def _pause(point: str, txid: str) -> float:
    if os.environ.get("RAFTKV_TEST_TXN_PAUSE") != "1" or not txid.startswith("pause:"):
        return 0.0
    parts = txid.split(":")
    try:
        return float(parts[2]) if len(parts) > 3 and parts[1] == point else 0.0
    except ValueError:
        return 0.0


async def _drive(node: Any, run: TxnRun, decided: asyncio.Future | None = None) -> None:
    """Move ``run`` to the end, resending messages until they are applied."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    prepare_deadline = start + PREPARE_TIMEOUT_S
    backoff = 0.01
    counted = run.decision is not None  # a recovery run resends an outcome counted before
    while run.phase != "done" and loop.time() - start < DRIVE_BUDGET_S:
        if run.phase in ("begin", "prepare") and loop.time() > prepare_deadline:
            run.expire()
        phase_before = run.phase
        cmds = run.commands()
        timeout = MESSAGE_TIMEOUT_S
        if run.phase in ("begin", "prepare"):
            timeout = max(0.05, min(timeout, prepare_deadline - loop.time()))
        results = await asyncio.gather(*[tx_call(node, s, c, timeout) for s, c in cmds], return_exceptions=True)
        progressed = False
        for (s, c), r in zip(cmds, results, strict=True):
            if isinstance(r, TxnCallFailed):
                continue
            if isinstance(r, BaseException):
                log.error("event=txn_message_error txid=%s cmd=%s err=%r", run.plan.txid, c[0], r)
                continue
            run.on_result(s, c, r)
            progressed = True
        if run.conflict is not None:
            _maybe_resolve_conflict(node, run.conflict)
        if phase_before == "prepare" and run.phase == "decide" and (secs := _pause("after_prepare", run.plan.txid)):
            log.warning("event=test_pause point=after_prepare txid=%s secs=%s", run.plan.txid, secs)
            await asyncio.sleep(secs)
        if run.decision is not None and not counted:
            counted = True
            node.metrics.txn_outcomes.labels(str(run.decision[0]).lower()).inc()
        if run.decision is not None and decided is not None and not decided.done():
            decided.set_result(_answer(run))
            if secs := _pause("after_decide", run.plan.txid):
                log.warning("event=test_pause point=after_decide txid=%s secs=%s", run.plan.txid, secs)
                await asyncio.sleep(secs)
        if progressed:
            backoff = 0.01
        else:
            await asyncio.sleep(backoff)
            backoff = min(0.5, backoff * 2)
    if decided is not None and not decided.done():
        if run.phase in ("begin", "prepare"):
            decided.set_result(Error("TRYAGAIN", f"transaction {run.plan.txid} not committed; retry"))
        else:
            decided.set_result(Error("UNKNOWN", f"transaction {run.plan.txid}: decision unknown"))


def _maybe_resolve_conflict(node: Any, conflict: tuple) -> None:
    """A NO vote met an old lock: resolve it now rather than wait for the lock's shard."""
    key, txid, home, since_ms = conflict
    if time.time() * 1000 - since_ms >= LOCK_TIMEOUT_MS:
        shard = node.shard_of(key)
        service(node).resolve_soon(shard, Locked(key, txid, home, since_ms))


async def resolve_lock(node: Any, shard: int, lock: Locked) -> None:
    """Ask the lock's home shard for the outcome (a Raft write there), then finish it here."""
    try:
        ans = await tx_call(node, lock.home_shard, ("tx_resolve", lock.txid, PENDING_TIMEOUT_MS))
        if ans[0] == PENDING:
            return
        await tx_call(node, shard, ("tx_finish", lock.txid, ans[0], ans[1]))
        log.info("event=txn_lock_resolved txid=%s shard=%d outcome=%s", lock.txid, shard, ans[0])
    except TxnCallFailed as e:
        log.info("event=txn_lock_resolve_failed txid=%s shard=%d err=%s", lock.txid, shard, e)


def lock_is_old(lock: Locked) -> bool:
    return time.time() * 1000 - lock.since_ms >= LOCK_TIMEOUT_MS


# -- per-node service: background runs and the recovery loop ------------------------------

class TxnService:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.tasks: dict[str, asyncio.Task] = {}  # txid -> the run driving it on this node
        self.resolving: dict[tuple[int, str], asyncio.Task] = {}
        self.loop_task: asyncio.Task | None = None
        self.last_gc = 0.0

    def spawn(self, txid: str, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks[txid] = task
        task.add_done_callback(lambda t, txid=txid: self.tasks.pop(txid, None) if self.tasks.get(txid) is t
                               else None)

    def resolve_soon(self, shard: int, lock: Locked) -> asyncio.Task:
        key = (shard, lock.txid)
        task = self.resolving.get(key)
        if task is None or task.done():
            task = self.resolving[key] = asyncio.ensure_future(resolve_lock(self.node, shard, lock))
            task.add_done_callback(lambda t, key=key: self.resolving.pop(key, None))
        return task

    async def recovery_loop(self) -> None:
        while True:
            try:
                self._recover_once()
            except Exception:  # never let a bug stop recovery
                log.exception("event=txn_recovery_error")
            await asyncio.sleep(RECOVERY_PERIOD_S)

    def _recover_once(self) -> None:
        now_ms = time.time() * 1000
        gc = time.monotonic() - self.last_gc > GC_PERIOD_S
        if gc:
            self.last_gc = time.monotonic()
        for shard, replica in self.node.replicas.items():
            if not replica.is_leader():
                continue
            txns = replica.state.txns
            try:  # a racy read of the replica's state: only a trigger, every action is a Raft write
                records = list(txns.records.items())
                locks = list(txns.locks.values())
                has_done = bool(txns.done)
            except RuntimeError:
                continue
            for txid, rec in records:
                if txid in self.tasks:
                    continue
                if recovery_action(rec, now_ms, PENDING_TIMEOUT_MS) is not None:
                    log.info("event=txn_recover txid=%s shard=%d state=%s", txid, shard, rec.state)
                    self.spawn(txid, _drive(self.node, TxnRun.recover(txid, shard, rec.answer())))
            for lock in locks:
                if lock.txid not in self.tasks and lock_is_old(lock):
                    self.resolve_soon(shard, lock)
            if gc and (records or has_done):
                self.spawn(f"gc-{shard}", _gc(self.node, shard))


async def _gc(node: Any, shard: int) -> None:
    try:
        await tx_call(node, shard, ("tx_gc",))
    except TxnCallFailed:
        pass


def service(node: Any) -> TxnService:
    svc = getattr(node, "_txn_service", None)
    if svc is None:
        svc = node._txn_service = TxnService(node)
    return svc


def start(node: Any) -> TxnService:
    """Start the recovery loop (call from the node's event loop)."""
    svc = service(node)
    if svc.loop_task is None:
        svc.loop_task = asyncio.ensure_future(svc.recovery_loop())
    return svc


def cmd_txstats(node: Any, conn: Any, req: list[bytes], hops: int) -> Any:
    """RAFTKV.TXSTATS: this node's local view per shard: [shard, role, locks, prepared, open records,
    records, tombstones] (a racy local read, for operators and tests)."""
    out = []
    for shard, r in sorted(node.replicas.items()):
        t = r.state.txns
        try:
            open_records = sum(1 for rec in list(t.records.values()) if rec.state == PENDING or not rec.acked)
            out.append([shard, b"leader" if r.is_leader() else b"follower", len(t.locks), len(t.prepared),
                        open_records, len(t.records), len(t.done)])
        except RuntimeError:
            continue
    return out


__all__ = ["ABORTED", "COMMITTED", "coordinate", "start", "resolve_lock", "tx_call", "cmd_txmsg", "cmd_txrun"]

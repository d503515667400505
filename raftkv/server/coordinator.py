"""Cross-shard transactions inside a node: the I/O edge of ``raftkv.txn``.

Theory of operation
-------------------
``raftkv.txn`` holds every rule (record CAS, votes, locks, recovery
transitions) as pure code.  This module only moves its messages: each 2PC
message is a state-machine command (``tx_*``) that ``Node.execute`` runs on
the target shard's leader (``NodeAPI.execute``: locally, or handed to the
leader's node as it is).  Every message is idempotent by transaction id, so a
message whose outcome is unknown (leader change, lost connection) is simply
sent again.

* ``coordinate``: a client transaction (MSET, RAFTKV.TXN, EXEC) is handed
  to the node leading its home shard (the internal RPC's ``txn`` message), which drives a
  ``TxnRun`` there: the STAGING record and every PREPARE in one round (parallel
  commits), answer the client once they are all in, then settle, finish and
  ack in the background (classic 2PC with ``--txn-classic-2pc``: begin, prepare,
  decide, answer).  Until an answered run has released its locks, a transaction
  or single-key command on its keys waits for that (``wait_settled``) instead of
  meeting the lock.  One-shard transactions are one Raft entry (``txn_once``),
  applied at most once per transaction id.
* ``recovery_loop``: for every shard this node leads, every ~100 ms: abort
  PENDING records and settle STAGING ones (``tx_refuse`` to the participants)
  older than ``PENDING_TIMEOUT_MS``, re-send the outcome of
  decided but unfinished records, resolve locks older than
  ``LOCK_TIMEOUT_MS`` (ask the home shard with a Raft write, then finish here)
  and garbage-collect finished state now and then.
* ``gate_prepare``/``ungate`` (``raftkv.server.waitgate``): called by the router
  around this node's proposal of a PREPARE, as a shard's leader: wait-die.
  ``with_conflict_retries`` (MSET, EXEC) keeps one priority over its
  attempts and does not count dies and queued losses (for ``DIE_WINDOW_S``).
* ``wait_for_lock``: called by the router when a command meets a lock; an
  old lock is resolved at once (a STAGING record is settled from here), so a
  reader never waits on a dead coordinator for long.  ``lock_met``: the same
  resolution, without the wait, for a forwarded command, which the router
  answers ``-LOCKED`` at once (it waits at the node it came in to).

Ages here (locks, PENDING records) are log time (``raftkv.logclock``): the
replica's ``log_now_ms()`` compared with the log times stamped into its
entries, never a wall clock.  A wrong estimate only makes recovery earlier or
later, never unsafe, because every decision is a CAS in the home shard's log.

Fault points (``raftkv.server.api.Faults``, armed only by tests and the fault
harness with ``raftkv serve --fault``): ``txn.after_prepare`` and
``txn.after_decide`` make a coordinator sleep there, so a test can ``kill -9``
it at that moment; ``txn.partial_prepare`` sends only the record and the home's
PREPARE before sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from typing import Any

from raftkv import reshard
from raftkv.protocol import Error
from raftkv.results import CmdError, Locked
from raftkv.server.api import NodeAPI
from raftkv.server.peer import PeerRefused, PeerUnreachable
from raftkv.server.tailbatch import TAIL, TailBatcher
from raftkv.server.waitgate import WaitDieGate
from raftkv.txn import (
    ABORTED,
    COMMITTED,
    PENDING,
    REASON_CONFLICT,
    REASON_MOVING,
    REASON_TOOBIG,
    STAGING,
    TxnResult,
    answer_read_only,
    is_read_only,
    keys_of,
    single_shard_cmd,
    validate,
)
from raftkv.txnrun import TxnRun, plan_txn, recovery_action
from raftkv.waitdie import (
    LOCKED_BY,
    QUEUED_NOTE,
    attempt_txid,
    conflict_charged,
    holder_of,
    new_priority,
)

log = logging.getLogger("raftkv.txn")

CONFLICT_RETRIES = 8  # a transaction that meets another's lock is re-run with a new id this many more times

LOCK_TIMEOUT_MS = 1500  # a lock older than this is resolved at its home shard
PENDING_TIMEOUT_MS = 2000  # a PENDING record older than this is aborted by its home leader
PREPARE_TIMEOUT_S = 1.5  # how long a coordinator waits for votes before aborting
MESSAGE_TIMEOUT_S = 2.0  # one attempt of one 2PC message
DRIVE_BUDGET_S = 60.0  # a coordinator gives up after this; the recovery loop takes over
RECOVERY_PERIOD_S = 0.1
# Wait-die (raftkv.waitdie; its queues are raftkv.server.waitgate's) at the coordinator's end:
DIE_SLEEP_S = 0.05  # after a die or a queued loss: about a lock's life here (its place waits 0.25 s for it)
DIE_WINDOW_S = 2.0  # MSET/EXEC retry dies uncounted for this long (the client's own deadline is unknown here)
GC_PERIOD_S = 5.0

_RETRY = {"UNKNOWN", "TRYAGAIN", "NOQUORUM", "MOVED", "LOCKED", "BUSY"}
# Answers that say "nothing ran here": after a hand-over that may have run, they cannot be the answer.
_NOT_RUN_HERE = {"TRYAGAIN", "NOQUORUM", "MOVED", "LOCKED", "BUSY", "STORAGE", "UNAVAILABLE"}


class TxnCallFailed(Exception):
    """A 2PC message was not (known to be) applied; ``error`` says why.  Safe to resend."""

    def __init__(self, error: Error) -> None:
        super().__init__(str(error))
        self.error = error


async def tx_call(node: NodeAPI, shard: int, cmd: tuple, timeout: float = MESSAGE_TIMEOUT_S,
                  read: bool = False) -> Any:
    """Run one 2PC message (or a read) on ``shard``'s leader; raises ``TxnCallFailed`` (resend it)."""
    try:
        async with asyncio.timeout(timeout + 0.5):  # (no task of its own, as wait_for would make)
            res = await node.execute(shard, cmd, read=read, idempotent=True, budget_s=timeout)
    except TimeoutError:
        raise TxnCallFailed(Error("UNKNOWN", f"shard {shard}: {cmd[0]} timed out")) from None
    if isinstance(res, CmdError):
        res = Error(res.code, res.message)
    if isinstance(res, Error):
        raise TxnCallFailed(res)
    return res


# -- coordinating a transaction ------------------------------------------------------------

def new_txid() -> str:
    return uuid.uuid4().hex


async def with_conflict_retries(node: NodeAPI, compares: list, then_ops: list, else_ops: list,
                                retries: int = CONFLICT_RETRIES) -> Any:
    """A new transaction each time it meets another's lock (``-TXNCONFLICT``), up to ``retries`` more times;
    and each time a key is being moved to a new shard (``-MOVING``, not counted) until the request timeout.

    With wait-die on (the default, ``raftkv.waitdie``) every attempt carries the priority of the first, and
    an abort by an older transaction (a *die*) is retried without counting for ``DIE_WINDOW_S`` (then it
    counts like any conflict): the node does not know its client's deadline, so it stays well inside the
    usual ones instead of retrying until its own request timeout."""
    delay = 0.005
    attempt = tries = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + node.timing.request_timeout_s
    die_until = loop.time() + min(DIE_WINDOW_S, node.timing.request_timeout_s)
    prio = new_priority(int(time.time() * 1000)) if node.timing.txn_wait_die else None
    while True:
        txid = new_txid() if prio is None else attempt_txid(prio, tries)
        tries += 1
        res = await node.coordinate_at_home(txid, compares, then_ops, else_ops)
        # -RINGCHANGED: this attempt ran nowhere (its id was fresh), so a new one under the new ring is safe
        moving = isinstance(res, Error) and res.code in ("MOVING", "RINGCHANGED") and loop.time() < deadline
        if not moving:
            if not (isinstance(res, Error) and res.code == "TXNCONFLICT"):
                return res
            if not conflict_charged(txid, holder_of(res.message), res.message) and loop.time() < die_until:
                # a die or a queued loss: come back soon, with the same priority (see Txn.commit)
                await asyncio.sleep(DIE_SLEEP_S * random.uniform(0.5, 1.5))
                continue
            if attempt == retries:
                return res
            attempt += 1
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(0.2, delay * 2)


def ring_changed(node: NodeAPI, ring: str) -> Error:
    """The refusal of a transaction planned under ring ``ring`` (``ShardMap.ring_tag``) by a node whose ring
    differs: nothing was run."""
    now = node.map.ring_tag
    return Error("RINGCHANGED", f"{now} the cluster's ring is {now}, not {ring} (a shard was added or removed): "
                                "not run; plan the transaction again under the new map, with a new id")


async def coordinate(node: NodeAPI, txid: str, compares: Any, then_ops: Any, else_ops: Any,
                     hops: int = 0, ring: str | None = None) -> TxnResult | Error:
    """Run a transaction; answer once the home shard has applied its decision.

    A transaction id is planned under one ring only (``ring``, else this node's): a record lives on the home
    shard the ring gives its first key, so the same id planned under another ring would find no record and
    could run twice. Every node it is handed to checks the ring (``-RINGCHANGED``)."""
    why = validate(compares, then_ops, else_ops)
    if why is not None:
        return Error("ERR", why)
    if not txid or len(txid) > 64:
        return Error("ERR", "transaction id must be 1-64 characters")
    tag = node.map.ring_tag
    if ring is not None and ring != tag:
        return ring_changed(node, ring)
    plan = plan_txn(txid, compares, then_ops, else_ops, node.shard_of)
    if len(plan.participants) > 1 and is_read_only(then_ops, else_ops):
        return await read_only(node, compares, then_ops, else_ops)
    replica = node.replicas.get(plan.home)
    leading = replica is not None and replica.is_leader()
    target = None if leading or hops > 0 else node.leader_node(plan.home)
    handed_over = False  # the home leader may have run it: then "not applied" is no answer (see below)
    if target is not None and target != node.name:
        # The coordinator is the home shard's leader: hand the transaction over.
        try:
            reply = await node.rpc(target, ("txn", txid, tuple(compares), tuple(then_ops), tuple(else_ops), hops + 1,
                                            tag), node.timing.request_timeout_s + PREPARE_TIMEOUT_S)
        except PeerUnreachable as e:
            reply, handed_over = None, e.sent
        except PeerRefused:  # not run there (e.g. its map does not know us yet)
            reply = None
        if isinstance(reply, TxnResult):
            return reply
        if isinstance(reply, Error) and reply.code not in ("MOVED", "NOQUORUM"):
            return reply
        # Unreachable leader (maybe after it began): coordinate here with the same
        # txid; every message is idempotent, so two coordinators cannot disagree (under one ring).
        if node.map.ring_tag != tag:
            if handed_over:
                return Error("UNKNOWN", f"transaction {txid}: outcome unknown: it was handed over to {target}, "
                                        "whose reply was lost, and the ring has changed since")
            return ring_changed(node, tag)
    res = await _run_here(node, plan, compares, then_ops, else_ops)
    if handed_over and isinstance(res, Error) and res.code in _NOT_RUN_HERE:
        # The leader may have committed it before its reply was lost; this node's own attempt not running (no
        # leader reachable from here: e.g. it is being removed from the group) says nothing about that one.
        return Error("UNKNOWN", f"transaction {txid}: outcome unknown: it was handed over to {target}, whose "
                                f"reply was lost, and could not be run from here ({res.code} {res.message})")
    return res


async def read_only(node: NodeAPI, compares: Any, then_ops: Any, else_ops: Any) -> TxnResult | Error:
    """A cross-shard read-only transaction without locks: it never aborts a writer, nor is aborted by one.

    Read every key (linearizably, on each shard's leader), then read them all again.
    Every read of the first round finished before any of the second began, so if
    nothing differs, every key held the value read throughout an interval common
    to all of them: the answer is a consistent snapshot at an instant inside the
    request, i.e. strictly serializable.  While the keys keep changing it reads
    again until the request timeout, then answers ``-TRYAGAIN`` (nothing was
    written); it never falls back to locks, which could abort a writer.
    """
    by_shard: dict[int, list[bytes]] = {}
    for k in keys_of(compares, then_ops, else_ops):
        by_shard.setdefault(node.shard_of(k), []).append(k)

    async def read_all() -> dict | Error:
        parts = await asyncio.gather(*(node.execute(s, ("entries", tuple(ks)), read=True)
                                       for s, ks in by_shard.items()))
        seen: dict[bytes, tuple] = {}
        for ks, part in zip(by_shard.values(), parts, strict=True):
            if isinstance(part, (Error, CmdError)):
                return part if isinstance(part, Error) else Error(part.code, part.message)
            entries, del_rev = part
            for k, entry in zip(ks, entries, strict=True):
                seen[k] = (None if entry is None else tuple(entry), del_rev)
        return seen

    loop = asyncio.get_running_loop()
    deadline = loop.time() + node.timing.request_timeout_s
    before = await read_all()
    while not isinstance(before, Error):
        after = await read_all()
        if after == before:
            assert isinstance(after, dict)
            return answer_read_only(compares, then_ops, else_ops, {k: e for k, (e, _) in after.items()},
                                    {k: d for k, (_, d) in after.items()})
        if loop.time() > deadline:
            return Error("TRYAGAIN", "read-only transaction: the keys kept changing between reads; not "
                                     "applied (nothing to apply), retry")
        await asyncio.sleep(node.timing.retry_sleep_s)
        before = after
    return before


async def _run_here(node: NodeAPI, plan: Any, compares: Any, then_ops: Any, else_ops: Any) -> TxnResult | Error:
    if len(plan.participants) == 1:
        cmd = single_shard_cmd(plan.txid, compares, then_ops, else_ops)
        try:
            return await tx_call(node, plan.home, cmd, node.timing.request_timeout_s)
        except TxnCallFailed as e:
            return e.error
    # Parallel commits answer before the locks are released: a transaction that follows one this
    # node answered (the same client's next MSET, say) waits for it to finish instead of meeting
    # its lock and aborting.
    await node.txns.wait_settled(keys_of(compares, then_ops, else_ops), PREPARE_TIMEOUT_S)
    decided = asyncio.get_running_loop().create_future()
    node.txns.spawn(plan.txid, _drive(node, new_run(node, plan), decided))
    try:
        return await asyncio.wait_for(asyncio.shield(decided), node.timing.request_timeout_s + PREPARE_TIMEOUT_S)
    except TimeoutError:
        return Error("UNKNOWN", f"transaction {plan.txid}: no decision yet; it may still commit")


def new_run(node: NodeAPI, plan: Any) -> TxnRun:
    """Parallel commits when this node has a replica of the home shard to read its log time from
    (the coordinator normally leads it) and the node runs them; else classic 2PC, whose record
    gives the start time (and which nodes of earlier versions understand, for rolling upgrades)."""
    replica = node.replicas.get(plan.home)
    if node.timing.txn_parallel_commits and replica is not None:
        return TxnRun.parallel(plan, replica.log_now_ms())
    return TxnRun(plan)


def _answer(run: TxnRun) -> TxnResult | Error:
    state, branch, results, reason = run.answer  # type: ignore[misc]
    if state == COMMITTED:
        if results is None:  # committed by recovery, which knows the branch but not the op results
            ops = run.plan.n_then if branch else run.plan.n_else
            mine = [op for part in run.plan.parts.values() for op in part[1 if branch else 2]]
            if len(mine) == ops and all(op[0] == "put" for op in mine):  # MSET: every result is OK
                return TxnResult(bool(branch), (True,) * ops)
            return Error("UNKNOWN", f"transaction {run.plan.txid} committed ({'then' if branch else 'else'} "
                                    f"branch, {ops} ops) by recovery; its op results are not kept")
        return TxnResult(bool(branch), tuple(results))
    if reason == REASON_TOOBIG:
        return Error("TOOBIG", f"transaction {run.plan.txid} refused: an APPEND would make a value longer than "
                               "value_bytes_max; nothing applied")
    if reason == REASON_CONFLICT:
        key = run.conflict[0] if run.conflict else b"?"
        other = run.conflict[1] if run.conflict else "?"
        note = f" {QUEUED_NOTE}" if run.queued else ""
        return Error("TXNCONFLICT", f"transaction {run.plan.txid} aborted: key {key!r} {LOCKED_BY}"
                                    f"{other}; retry{note}")
    if reason == REASON_MOVING:  # the clients retry it until their timeout (raftkv shard add, raftkv.reshard)
        return Error("MOVING", f"transaction {run.plan.txid} aborted: a key is being moved to a new shard (or lives "
                               "on another one now); not applied, retry")
    return Error("TRYAGAIN", f"transaction {run.plan.txid} aborted ({reason}); not applied, retry")


async def _pause_at(node: NodeAPI, point: str, txid: str) -> None:
    fault = node.faults.fire(point, txid)
    if fault is not None and fault.value > 0:
        log.warning("event=fault_pause point=%s txid=%s secs=%g", point, txid, fault.value)
        await asyncio.sleep(fault.value)


async def _drive(node: NodeAPI, run: TxnRun, decided: asyncio.Future | None = None) -> None:
    """Move ``run`` to the end, resending messages until they are applied."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    prepare_deadline = start + PREPARE_TIMEOUT_S
    backoff = 0.01
    counted = run.decision is not None  # a recovery run resends an outcome counted before
    partial = run.phase == "stage"  # the txn.partial_prepare fault point is checked once
    while run.phase != "done" and loop.time() - start < DRIVE_BUDGET_S:
        if run.phase in ("begin", "prepare", "stage") and loop.time() > prepare_deadline:
            run.expire()
        phase_before = run.phase
        cmds = _commands(node, run)
        timeout = MESSAGE_TIMEOUT_S
        if run.phase in ("begin", "prepare", "stage"):
            timeout = max(0.05, min(timeout, prepare_deadline - loop.time()))
        hold = None
        if partial:
            partial = False
            hold = node.faults.fire("txn.partial_prepare", run.plan.txid)
            if hold is not None:  # the record and the home's PREPARE only, then a pause
                cmds = [(s, c) for s, c in cmds if s == run.plan.home]
        results = await asyncio.gather(*[_send(node, s, c, timeout) for s, c in cmds], return_exceptions=True)
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
        if run.answer is not None and decided is not None and not decided.done():
            decided.set_result(_answer(run))  # parallel commits: possibly before the decision is written
            if run.phase in ("decide", "finish"):
                node.txns.settling(run.plan.txid, keys_of(*_ops_of(run.plan)))
        if run.phase in ("ack", "done"):
            node.txns.settled(run.plan.txid)
        if hold is not None and hold.value > 0:
            log.warning("event=fault_pause point=txn.partial_prepare txid=%s secs=%g", run.plan.txid, hold.value)
            await asyncio.sleep(hold.value)
        if phase_before in ("prepare", "stage") and run.phase == "decide":
            await _pause_at(node, "txn.after_prepare", run.plan.txid)
        if run.decision is not None and not counted:
            counted = True
            node.metrics.txn_outcomes.labels(str(run.decision[0]).lower()).inc()
        if phase_before == "decide" and run.decision is not None and decided is not None:
            await _pause_at(node, "txn.after_decide", run.plan.txid)
        if progressed:
            backoff = 0.01
        else:
            await asyncio.sleep(backoff)
            backoff = min(0.5, backoff * 2)
    node.txns.settled(run.plan.txid)
    if decided is not None and not decided.done():
        if run.phase in ("begin", "prepare"):  # classic: nothing can commit without this run's decision
            decided.set_result(Error("TRYAGAIN", f"transaction {run.plan.txid} not committed; retry"))
        else:
            decided.set_result(Error("UNKNOWN", f"transaction {run.plan.txid}: decision unknown"))


def _send(node: NodeAPI, shard: int, cmd: tuple, timeout: float) -> Any:
    """One message of a run: a tail message joins its shard's batch (raftkv.server.tailbatch), the others go alone."""
    if cmd[0] in TAIL and node.timing.txn_parallel_commits:
        return node.txns.tail.call(shard, cmd, timeout)
    return tx_call(node, shard, cmd, timeout)


def _removed(node: NodeAPI, shard: int) -> bool:
    """Was ``shard`` taken out of the cluster (``raftkv shard remove``)? Only when the node's map lacks it and one
    of the node's replicas opened under a ring without it (``reshard.home_removed``): a node whose map is merely
    old (a shard being added) never takes a live shard for a removed one."""
    if shard in node.map.groups:
        return False
    return any(reshard.home_removed(r.state.owner, r.state.move, shard) for r in list(node.replicas.values()))


def _commands(node: NodeAPI, run: TxnRun) -> list[tuple[int, tuple]]:
    """``run``'s messages to send, after answering those for removed shards (``TxnRun.on_shard_gone``); without
    this a run whose home was removed resent them until its budget ran out, holding its locks (seen: writes
    of keys it had prepared stalled for a minute after ``raftkv shard remove``)."""
    cmds, answered = run.live_commands(lambda s: _removed(node, s))
    for s, c in answered:
        log.info("event=txn_shard_gone txid=%s shard=%d cmd=%s", run.plan.txid, s, c[0])
    return cmds


def _ops_of(plan: Any) -> tuple[list, list, list]:
    """Every compare and op of ``plan`` (all its shards' parts together)."""
    c: list = []
    t: list = []
    e: list = []
    for pc, pt, pe in plan.parts.values():
        c += pc
        t += pt
        e += pe
    return c, t, e


def _maybe_resolve_conflict(node: NodeAPI, conflict: tuple) -> None:
    """A NO vote met an old lock: resolve it now rather than wait for the lock's shard."""
    key, txid, home, since_ms = conflict
    if home is None or since_ms is None:  # not a lock (a node's refusal in an older transaction's favour)
        return
    shard = node.shard_of(key)
    lock = Locked(key, txid, home, since_ms)
    if lock_is_old(node, shard, lock):
        node.txns.resolve_soon(shard, lock)


async def resolve_lock(node: NodeAPI, shard: int, lock: Locked) -> None:
    """Ask the lock's home shard for the outcome (a Raft write there), then finish it here.

    A lock whose home shard was removed (``raftkv shard remove``) is finished as aborted here: no
    transaction homed there that is unfinished here can have committed (``reshard.home_removed``).
    """
    try:
        replica = node.replicas.get(shard)
        if replica is not None and reshard.home_removed(replica.state.owner, replica.state.move, lock.home_shard):
            await tx_call(node, shard, ("tx_finish", lock.txid, ABORTED, None, lock.home_shard, None))
            log.info("event=txn_lock_resolved txid=%s shard=%d outcome=%s home_removed=%d", lock.txid, shard,
                     ABORTED, lock.home_shard)
            return
        ans = await tx_call(node, lock.home_shard, ("tx_resolve", lock.txid, PENDING_TIMEOUT_MS))
        if ans[0] == PENDING:
            return
        if ans[0] == STAGING:  # parallel commits: only the participants can tell; settle it from here
            if lock.txid not in node.txns.tasks:
                run = TxnRun.recover(lock.txid, lock.home_shard, ans)
                await _drive(node, run)
                log.info("event=txn_lock_settled txid=%s shard=%d outcome=%s", lock.txid, shard,
                         None if run.decision is None else run.decision[0])
            return
        start_ms = ans[5] if len(ans) > 5 else None  # older homes answer without it
        await tx_call(node, shard, ("tx_finish", lock.txid, ans[0], ans[1], lock.home_shard, start_ms))
        log.info("event=txn_lock_resolved txid=%s shard=%d outcome=%s", lock.txid, shard, ans[0])
    except TxnCallFailed as e:
        log.info("event=txn_lock_resolve_failed txid=%s shard=%d err=%s", lock.txid, shard, e)


def lock_is_old(node: NodeAPI, shard: int, lock: Locked) -> bool:
    """Is ``lock`` (stamped in ``shard``'s log time) older than ``LOCK_TIMEOUT_MS``?

    Measured with this node's replica of ``shard``; without one, the lock counts as
    young and that shard's leader resolves it in its own recovery loop.
    """
    replica = node.replicas.get(shard)
    return replica is not None and replica.log_now_ms() - lock.since_ms >= LOCK_TIMEOUT_MS


# -- per-node service: background runs and the recovery loop ------------------------------

class TxnService:
    """One node's transaction machinery: runs it drives, locks it resolves, the recovery loop."""

    def __init__(self, node: NodeAPI) -> None:
        self.node = node
        self.tasks: dict[str, asyncio.Task] = {}  # txid -> the run driving it on this node
        self.resolving: dict[tuple[int, str], asyncio.Task] = {}
        self.last_gc = 0.0
        # Runs answered but still releasing their locks: key -> txid, txid -> set when released.
        self._settling_keys: dict[bytes, str] = {}
        self._settling: dict[str, tuple[asyncio.Event, list[bytes]]] = {}
        # Wait-die at the shards this node leads, before a PREPARE is proposed (raftkv.server.waitgate).
        self.gate = WaitDieGate(node, self)
        # The tail messages of the runs that reach it in one event-loop turn, one message per shard.
        self.tail = TailBatcher(lambda shard, cmd, timeout: tx_call(node, shard, cmd, timeout), TxnCallFailed)
        self.gate_prepare = self.gate.gate_prepare
        self.ungate = self.gate.ungate

    async def coordinate(self, txid: str, compares: Any, then_ops: Any, else_ops: Any,
                         hops: int = 0, ring: str | None = None) -> TxnResult | Error:
        """Run a client transaction (see ``coordinate``)."""
        return await coordinate(self.node, txid, compares, then_ops, else_ops, hops, ring)

    def settling(self, txid: str, keys: list[bytes]) -> None:
        """The run of ``txid`` was answered and is releasing the locks on ``keys``."""
        if txid not in self._settling:
            self._settling[txid] = (asyncio.Event(), list(keys))
            for k in keys:
                self._settling_keys[k] = txid

    def settled(self, txid: str) -> None:
        """The run of ``txid`` released its locks (or stopped trying)."""
        entry = self._settling.pop(txid, None)
        if entry is not None:
            for k in entry[1]:
                if self._settling_keys.get(k) == txid:
                    del self._settling_keys[k]
            entry[0].set()

    async def wait_settled(self, keys: list[bytes], timeout: float) -> None:
        """Wait (at most ``timeout``) for the answered runs holding any of ``keys`` to release them."""
        if not self._settling_keys:
            return
        events = {self._settling[t][0] for k in keys if (t := self._settling_keys.get(k)) is not None}
        if events:
            waits = [asyncio.ensure_future(e.wait()) for e in events]
            _, late = await asyncio.wait(waits, timeout=timeout)
            for w in late:
                w.cancel()

    async def wait_for_lock(self, shard: int, lock: Locked, remaining_s: float) -> None:
        """A command met ``lock``: wait a little, resolving the lock first once it is old."""
        entry = self._settling.get(lock.txid)
        if entry is not None:  # answered by this node and releasing: its finish is on the way
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry[0].wait(), max(0.05, remaining_s))
            return
        if lock_is_old(self.node, shard, lock):
            await asyncio.wait([self.resolve_soon(shard, lock)], timeout=max(0.05, remaining_s))
        await asyncio.sleep(self.node.timing.retry_sleep_s)

    def lock_met(self, shard: int, lock: Locked) -> None:
        """A command met ``lock`` and does not wait for it on this node (a forwarded one waits where it came
        in, ``raftkv.server.router``): start resolving the lock if it is old, as ``wait_for_lock`` would."""
        if lock.txid not in self._settling and lock_is_old(self.node, shard, lock):
            self.resolve_soon(shard, lock)

    def spawn(self, txid: str, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks[txid] = task
        task.add_done_callback(lambda t, txid=txid: self.tasks.pop(txid, None) if self.tasks.get(txid) is t
                               else None)

    def resolve_if_abandoned(self, shard: int, lock: Locked) -> None:
        """Resolve ``lock`` at its home if it is old and no run on this node is driving its transaction."""
        if lock.txid not in self.tasks and lock_is_old(self.node, shard, lock):
            self.resolve_soon(shard, lock)

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
        gc = time.monotonic() - self.last_gc > GC_PERIOD_S
        if gc:
            self.last_gc = time.monotonic()
        for shard, replica in self.node.replicas.items():
            if not replica.is_leader():
                continue
            now_ms = replica.log_now_ms()
            txns = replica.state.txns
            try:  # a racy read of the replica's state: only a trigger, every action is a Raft write
                # only the records not yet acked: the others (kept ten minutes) need nothing
                records = [(t, r) for t in list(txns.records.unacked) if (r := txns.records.get(t)) is not None]
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
                if lock.txid not in self.tasks and now_ms - lock.since_ms >= LOCK_TIMEOUT_MS:
                    self.resolve_soon(shard, lock)
            if gc and (records or has_done):
                self.spawn(f"gc-{shard}", _gc(self.node, shard))


async def _gc(node: NodeAPI, shard: int) -> None:
    try:
        await tx_call(node, shard, ("tx_gc",))
    except TxnCallFailed:
        pass

"""A cross-shard transaction's run, from the coordinator's side: pure, deterministic, no I/O.

``raftkv.txn`` is what each shard's state machine does with transaction messages (records, locks, votes,
tombstones); this module is what a coordinator decides from their answers:

* ``plan_txn`` splits a transaction by shard (the home shard is the shard of its first key) and remembers
  where each op's result goes;
* ``decide`` commits iff every participant voted YES, with the then-branch iff every compare held;
  ``abort_for`` names the reason one refusal gives;
* ``TxnRun`` is the coordinator as a sans-IO state machine: commands out, results in, for parallel commits
  and for classic 2PC.  ``raftkv.server.coordinator`` drives it with real Raft writes; tests/test_txn.py drives
  it through a lossy simulation;
* ``recovery_action`` says what a home leader does with an old record (docs/transactions.md: recovery).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raftkv.txn import (
    ABORTED,
    COMMITTED,
    OUTCOMES,
    PENDING,
    REASON_CONFLICT,
    REASON_MOVING,
    REASON_REFUSED,
    REASON_STALE,
    REASON_TIMEOUT,
    REASON_TOOBIG,
    REASON_UNKNOWN,
    STAGING,
    Record,
    keys_of,
)
from raftkv.waitdie import QUEUED

__all__ = ["Decision", "Plan", "TxnRun", "abort_for", "conflict_of", "decide", "plan_txn", "recovery_action"]


@dataclass(frozen=True)
class Plan:
    """A cross-shard transaction split by shard, with where each op's result goes."""

    txid: str
    home: int
    participants: tuple[int, ...]
    parts: dict  # shard -> (compares, then_ops, else_ops)
    then_pos: dict  # shard -> positions of its then-ops in the whole then list
    else_pos: dict
    n_then: int
    n_else: int

    def prepare_cmd(self, shard: int, start_ms: int | None) -> tuple:
        c, t, e = self.parts[shard]
        if start_ms is None:  # the home answered in the older form (no creation time)
            return ("tx_prepare", self.txid, self.home, c, t, e)
        return ("tx_prepare", self.txid, self.home, c, t, e, start_ms)


def plan_txn(txid: str, compares: list, then_ops: list, else_ops: list,
             shard_of: Callable[[bytes], int]) -> Plan:
    """Split a transaction by shard; the home shard is the shard of its first key."""
    keys = keys_of(compares, then_ops, else_ops)
    if not keys:
        raise ValueError("a transaction needs at least one key")
    home = shard_of(keys[0])
    parts: dict[int, tuple[list, list, list]] = {}
    then_pos: dict[int, list[int]] = {}
    else_pos: dict[int, list[int]] = {}
    for k in keys:
        parts.setdefault(shard_of(k), ([], [], []))
    for c in compares:
        parts[shard_of(c[0])][0].append(tuple(c))
    for i, op in enumerate(then_ops):
        s = shard_of(op[1])
        parts[s][1].append(tuple(op))
        then_pos.setdefault(s, []).append(i)
    for i, op in enumerate(else_ops):
        s = shard_of(op[1])
        parts[s][2].append(tuple(op))
        else_pos.setdefault(s, []).append(i)
    frozen = {s: (tuple(c), tuple(t), tuple(e)) for s, (c, t, e) in parts.items()}
    return Plan(txid, home, tuple(sorted(parts)), frozen,
                {s: tuple(p) for s, p in then_pos.items()}, {s: tuple(p) for s, p in else_pos.items()},
                len(then_ops), len(else_ops))


@dataclass(frozen=True)
class Decision:
    outcome: str
    branch: bool | None
    results: tuple | None
    reason: str


def abort_for(vote: tuple) -> Decision:
    """The abort one non-YES vote (or refusal) implies, with its reason."""
    if vote[0] == "no" and vote[1] in (REASON_STALE, REASON_REFUSED, REASON_TOOBIG, REASON_MOVING):
        return Decision(ABORTED, None, None, vote[1])
    return Decision(ABORTED, None, None, REASON_CONFLICT if vote[0] == "no" else REASON_UNKNOWN)


def decide(plan: Plan, votes: dict[int, tuple]) -> Decision:
    """COMMIT iff every participant voted YES; the then-branch iff every compare held.

    A recovery run's plan knows the participants but not the ops (``parts`` is empty): its
    COMMIT carries the branch and no results.
    """
    for s in plan.participants:
        v = votes.get(s)
        if v is None:
            return Decision(ABORTED, None, None, REASON_TIMEOUT)
        if v[0] != "yes":
            return abort_for(v)
    branch = all(votes[s][1] for s in plan.participants)
    if not plan.parts:
        return Decision(COMMITTED, branch, None, "")
    results: list = [None] * (plan.n_then if branch else plan.n_else)
    pos = plan.then_pos if branch else plan.else_pos
    for s in plan.participants:
        mine = votes[s][2] if branch else votes[s][3]
        for i, r in zip(pos.get(s, ()), mine, strict=True):
            results[i] = r
    return Decision(COMMITTED, branch, tuple(results), "")


def conflict_of(votes: dict[int, tuple]) -> tuple | None:
    """The ``(key, txid, home, since_ms)`` lock a NO vote met, if any."""
    for v in votes.values():
        if v[0] == "no" and len(v) > 2 and v[2] is not None:
            return v[2]
    return None


class TxnRun:
    """One coordinator run of a cross-shard transaction, sans I/O.

    ``commands()`` lists the ``(shard, command)`` messages outstanding in the
    current phase; the driver sends them (again and again if their outcome is
    unknown: every message is idempotent) and feeds each applied result to
    ``on_result``.  ``expire()`` tells the run that its votes did not all come
    in time.  ``answer`` is what the client may be told, as soon as it is known
    (``(state, branch, results, reason)``); ``decision`` is the record's
    decision once the home shard has applied one.

    Two protocols (see docs/transactions.md):

    * parallel commits (``TxnRun.parallel``): phase ``stage`` sends the STAGING
      record and every PREPARE at once.  Once the record is STAGING and every
      vote is YES the transaction is committed (``answer`` is set at once);
      ``decide`` then writes that down.  A NO vote is final (the participant
      keeps a tombstone), so the answer is "aborted" at once.  On ``expire``
      the run goes to ``refuse``: every participant that has not voted is
      asked for its vote or to refuse for good, and the outcome follows from
      the answers.  ``TxnRun.recover`` of a STAGING record starts there too.
    * classic 2PC (the default ``TxnRun(plan)``, which nodes of earlier versions
      speak): ``begin`` (PENDING record), ``prepare``, ``decide``; the answer
      is the decision.

    Both then ``finish`` on the participants and ``ack`` the record.
    """

    def __init__(self, plan: Plan, phase: str = "begin", decision: tuple | None = None) -> None:
        self.plan = plan
        self.phase = phase
        self.votes: dict[int, tuple] = {}
        self.finished: set[int] = set()
        self.proposal: Decision | None = None
        self.decision: tuple | None = decision  # (state, branch, results, reason, participants, start_ms)
        self.answer: tuple | None = None if decision is None else tuple(decision[:4])
        self.conflict: tuple | None = None
        self.queued = False  # a NO vote said the transaction is queued for the key it lost
        # the transaction's start on the home shard (home log time), in every PREPARE and tombstone
        self.start_ms: int | None = None if decision is None else _start_of(decision)
        self.record: str | None = None  # the record's state as the stage answered it (parallel runs)
        self.parallel = False  # parallel commits: decide with tx_settle (the home finishes in the same entry)

    @classmethod
    def parallel(cls, plan: Plan, start_ms: int) -> TxnRun:
        """A parallel-commit run; ``start_ms``: the home shard's log time now (the coordinator's view)."""
        run = cls(plan, "stage")
        run.start_ms, run.parallel = start_ms, True
        return run

    @classmethod
    def recover(cls, txid: str, home: int, record: tuple) -> TxnRun:
        """A run that finishes an existing record: abort if PENDING, settle if STAGING, else resend the outcome."""
        state, participants, start_ms = record[0], record[4], _start_of(record)
        plan = Plan(txid, home, tuple(participants), {}, {}, {}, 0, 0)
        if state == PENDING:
            run = cls(plan, "decide")
            run.start_ms = start_ms
            run.proposal = Decision(ABORTED, None, None, REASON_TIMEOUT)
            return run
        if state == STAGING:
            run = cls(plan, "refuse")
            run.start_ms, run.record, run.parallel = start_ms, STAGING, True
            return run
        return cls(plan, "finish" if participants else "ack", tuple(record))

    def commands(self) -> list[tuple[int, tuple]]:
        p = self.plan
        if self.phase == "begin":
            return [(p.home, ("tx_begin", p.txid, p.participants))]
        if self.phase == "stage":
            stage = [] if self.record is not None else [(p.home, ("tx_stage", p.txid, p.participants, self.start_ms))]
            return stage + [(s, p.prepare_cmd(s, self.start_ms)) for s in p.participants if s not in self.votes]
        if self.phase == "prepare":
            return [(s, p.prepare_cmd(s, self.start_ms)) for s in p.participants if s not in self.votes]
        if self.phase == "refuse":
            return [(s, ("tx_refuse", p.txid, p.home, self.start_ms)) for s in p.participants if s not in self.votes]
        if self.phase == "decide":
            d = self.proposal
            assert d is not None
            if self.parallel:
                here = p.home if p.home in p.participants else None
                return [(p.home, ("tx_settle", p.txid, d.outcome, d.branch, d.results, d.reason, here,
                                  self.start_ms))]
            return [(p.home, ("tx_decide", p.txid, d.outcome, d.branch, d.results, d.reason))]
        if self.phase == "finish":
            assert self.decision is not None
            state, branch = self.decision[0], self.decision[1]
            return [(s, ("tx_finish", p.txid, state, branch, p.home, self.start_ms)) for s in p.participants
                    if s not in self.finished]
        if self.phase == "ack":
            return [(p.home, ("tx_ack", p.txid))]
        return []

    def on_result(self, shard: int, cmd: tuple, result: Any) -> None:
        """Feed the applied result of ``cmd`` on ``shard``; stale results are ignored."""
        op = cmd[0]
        if op == "tx_begin" and self.phase == "begin":
            self.start_ms = _start_of(result)
            if result[0] == PENDING:
                self.phase = "prepare"
            else:  # decided already (a retry of a known txid): skip straight to finishing
                self._decided(result)
        elif op == "tx_stage" and self.phase == "stage" and self.record is None:
            if result[0] in OUTCOMES:  # decided already: a retry, or aborted by a resolver first
                self._decided(result)
                return
            self.record = result[0]
            # A record another coordinator of this id staged first: its start is the transaction's,
            # for every message from now on (tombstones and the prepare floor go by it).
            self.start_ms = _start_of(result) if _start_of(result) is not None else self.start_ms
            self._settle()
        elif op == "tx_prepare" and self.phase in ("prepare", "stage"):
            self.votes.setdefault(shard, result)
            if result[0] != "yes":  # one NO decides: abort without waiting for the others
                self.conflict = conflict_of({shard: result})
                # the participant's leader queued it for the key (wait-die, raftkv.waitdie): a fourth field
                self.queued = len(result) > 3 and result[3] == QUEUED
                d = abort_for(result)
                if result[0] == "no" and self.phase == "stage":
                    # A NO vote is final (a tombstone): the transaction can never be committed.
                    self.answer = (d.outcome, d.branch, d.results, d.reason)
                self._propose(d if self.phase == "stage" else decide(self.plan, self.votes))
            elif self.phase == "prepare" and len(self.votes) == len(self.plan.participants):
                self._propose(decide(self.plan, self.votes))
            else:
                self._settle()
        elif op == "tx_refuse" and self.phase == "refuse":
            self.votes.setdefault(shard, result)
            if result[0] != "yes":  # refused (or finished, or voted NO): never committed by implication
                self._propose(abort_for(result))
            elif len(self.votes) == len(self.plan.participants):
                # Every participant holds its prepare: committed if the record is STAGING (the CAS
                # below finds it so), aborted if the record was never written (a tombstone results).
                self._propose(decide(self.plan, self.votes))
        elif op in ("tx_decide", "tx_settle") and self.phase == "decide":
            if op == "tx_settle" and cmd[6] is not None:
                self.finished.add(shard)  # the home finished in the same entry
            self._decided(result)
        elif op == "tx_finish" and self.phase == "finish":
            self.finished.add(shard)
            if len(self.finished) == len(self.plan.participants):
                self.phase = "ack"
        elif op == "tx_ack" and self.phase == "ack":
            self.phase = "done"

    def live_commands(self, gone: Callable[[int], bool]) -> tuple[list[tuple[int, tuple]], list[tuple[int, tuple]]]:
        """``(messages to send, messages answered)``: the run's messages after answering every one for a shard
        ``gone`` says was removed (``on_shard_gone``), phase after phase, until only live shards are left."""
        answered: list[tuple[int, tuple]] = []
        for _ in range(8):  # each answer moves the run on by a phase, and it has fewer than 8
            cmds = self.commands()
            dead = [(s, c) for s, c in cmds if gone(s)]
            if not dead:
                return cmds, answered
            phase = self.phase
            for s, c in dead:
                self.on_shard_gone(s, c)
            answered += dead
            if self.phase == phase:  # nothing moved (a COMMITTED proposal): send the rest
                return [(s, c) for s, c in cmds if (s, c) not in dead], answered
        return self.commands(), answered

    def on_shard_gone(self, shard: int, cmd: tuple) -> None:
        """Answer ``cmd`` for ``shard``, a shard ``raftkv shard remove`` took out of the cluster.

        A removed shard refused every PREPARE from its freeze on, and handed off only once it held no lock and
        every transaction it committed had finished on all its shards (``raftkv.reshard.home_removed``, the
        participants' side of the same rule). So a transaction still unfinished that touches it never
        committed: the shard votes NO, an ABORTED decision needs no record there, and nothing is left to finish
        or acknowledge there. A COMMITTED proposal (impossible by the rule above) is left alone: the message
        keeps failing until the coordinator's budget ends, as before.
        """
        op = cmd[0]
        aborted = (ABORTED, None, None, REASON_MOVING, (), self.start_ms)
        if op in ("tx_prepare", "tx_refuse"):
            self.on_result(shard, cmd, ("no", REASON_MOVING, None))
        elif op in ("tx_begin", "tx_stage"):
            self.on_result(shard, cmd, aborted)
        elif op in ("tx_decide", "tx_settle") and self.proposal is not None and self.proposal.outcome == ABORTED:
            self.on_result(shard, cmd[:6] + (None,) + cmd[7:] if op == "tx_settle" else cmd,
                           (ABORTED, None, None, self.proposal.reason, (), self.start_ms))
        elif op in ("tx_finish", "tx_ack"):
            self.on_result(shard, cmd, None)

    def _settle(self) -> None:
        """Parallel commits: a STAGING record and every vote YES is a committed transaction."""
        if self.phase != "stage" or len(self.votes) < len(self.plan.participants):
            return
        if any(v[0] != "yes" for v in self.votes.values()):
            return
        d = decide(self.plan, self.votes)
        if self.record == STAGING:
            self.answer = (d.outcome, d.branch, d.results, d.reason)
            self._propose(d)
        elif self.record is not None:  # a PENDING record of the same id (a classic run): its CAS decides
            self._propose(d)

    def expire(self) -> None:
        """The votes did not all come in time: abort (classic), or ask the silent participants (parallel)."""
        if self.phase in ("begin", "prepare"):
            self._propose(Decision(ABORTED, None, None, REASON_TIMEOUT))
        elif self.phase == "stage":
            self.phase = "refuse"
            if len(self.votes) == len(self.plan.participants):  # all YES; the record's answer was missing
                self._propose(decide(self.plan, self.votes))

    def _propose(self, d: Decision) -> None:
        self.proposal = d
        self.phase = "decide"

    def _decided(self, record: tuple) -> None:
        assert record[0] in OUTCOMES, f"decision {record!r} is not final"
        self.decision = tuple(record)
        if self.answer is None:
            self.answer = tuple(record[:4])
        if self.start_ms is None:
            self.start_ms = _start_of(record)
        # A tombstone (no participants recorded) still finishes on the planned participants.
        self.phase = "finish" if set(self.plan.participants) - self.finished else "ack"


def _start_of(record: tuple) -> int | None:
    """The creation time in a record's answer (answers from older versions lack it)."""
    return record[5] if len(record) > 5 else None


def recovery_action(record: Record, now_ms: int, pending_timeout_ms: int) -> str | None:
    """What a home-shard leader should do about a record: ``"abort"``, ``"settle"``, ``"finish"`` or None.

    ``"settle"``: a STAGING record whose coordinator has had its time; ``TxnRun.recover`` asks the
    participants (commit if all hold their prepare, else make the others refuse and abort).
    """
    if record.state == PENDING:
        return "abort" if now_ms - record.created_ms >= pending_timeout_ms else None
    if record.state == STAGING:
        return "settle" if now_ms - record.created_ms >= pending_timeout_ms else None
    if not record.acked:
        return "finish"
    return None

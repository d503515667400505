"""The 2PC transaction layer as pure code: table-driven transitions and a lossy simulation.

No processes, no sockets, no clock: shards are ``KVState`` objects fed through an
in-memory "log"; time is an integer the test advances.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import raftkv.txn
from raftkv.state import CmdError, KVState, Locked
from raftkv.txn import (
    ABORTED,
    COMMITTED,
    PENDING,
    REASON_CONFLICT,
    REASON_MOVING,
    REASON_REFUSED,
    REASON_TIMEOUT,
    REASON_TOOBIG,
    REASON_UNKNOWN,
    STAGING,
    TOMBSTONE_TTL_MS,
    Record,
    ResultRun,
    TxnResult,
    TxnTable,
    single_shard_cmd,
    validate,
    watch_compare,
    watch_read,
)
from raftkv.txnrun import (
    Decision,
    TxnRun,
    abort_for,
    decide,
    plan_txn,
    recovery_action,
)

from .conftest import examples

T0 = 1_000_000
SIM_EXAMPLES = 200
# The two protocols' atomicity properties share what one of them used to run (make test's budget).
SIM_EXAMPLES_EACH = 100


def fresh(**data: bytes) -> KVState:
    s = KVState()
    for k, v in data.items():
        s.apply(("set", k.encode(), v), T0)
    return s


# -- coordinator record transitions (home shard) -------------------------------------

RECORD_CASES = [
    # (name, [(command, expected state in the answer)])
    ("begin then commit", [(("tx_begin", "t", (0, 1)), PENDING),
                           (("tx_decide", "t", COMMITTED, True, (1,), ""), COMMITTED)]),
    ("begin is idempotent", [(("tx_begin", "t", (0, 1)), PENDING), (("tx_begin", "t", (0, 1)), PENDING)]),
    ("first decision wins", [(("tx_begin", "t", (0, 1)), PENDING),
                             (("tx_decide", "t", ABORTED, None, None, REASON_CONFLICT), ABORTED),
                             (("tx_decide", "t", COMMITTED, True, (), ""), ABORTED)]),
    ("commit then abort keeps commit", [(("tx_begin", "t", (0, 1)), PENDING),
                                        (("tx_decide", "t", COMMITTED, True, (), ""), COMMITTED),
                                        (("tx_decide", "t", ABORTED, None, None, ""), COMMITTED),
                                        (("tx_resolve", "t", 0), COMMITTED)]),
    ("resolve of a missing record aborts", [(("tx_resolve", "t", 5000), ABORTED),
                                            (("tx_begin", "t", (0, 1)), ABORTED),
                                            (("tx_decide", "t", COMMITTED, True, (), ""), ABORTED)]),
    ("decide without begin aborts", [(("tx_decide", "t", COMMITTED, True, (), ""), ABORTED)]),
    ("young pending survives resolve", [(("tx_begin", "t", (0, 1)), PENDING), (("tx_resolve", "t", 5000), PENDING),
                                        (("tx_decide", "t", COMMITTED, True, (), ""), COMMITTED)]),
    ("old pending is aborted by resolve", [(("tx_begin", "t", (0, 1)), PENDING), (("tx_resolve", "t", 0), ABORTED),
                                           (("tx_decide", "t", COMMITTED, True, (), ""), ABORTED)]),
]


@pytest.mark.parametrize("name,steps", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_record_transitions(name: str, steps: list) -> None:
    s = fresh()
    for cmd, want in steps:
        res = s.apply(cmd, T0)
        assert res[0] == want, (cmd, res)
        s.txns.check_invariants()


def test_decision_carries_branch_and_results() -> None:
    s = fresh()
    s.apply(("tx_begin", "t", (0, 1)), T0)
    ans = s.apply(("tx_decide", "t", COMMITTED, False, (b"x",), ""), T0)
    assert ans == (COMMITTED, False, (b"x",), "", (0, 1), T0)
    assert s.apply(("tx_resolve", "t", 0), T0) == ans


def test_ack_of_pending_is_refused_and_changes_nothing() -> None:
    s = fresh()
    s.apply(("tx_begin", "t", (0, 1)), T0)
    before = s.txns.dump()
    assert isinstance(s.apply(("tx_ack", "t"), T0), CmdError)
    assert s.txns.dump() == before


def test_malformed_messages_are_refused() -> None:
    s = fresh(a=b"1")
    before = s.txns.dump()
    for cmd in [("tx_decide", "t", "MAYBE", None, None, ""), ("tx_finish", "t", "MAYBE", True),
                ("tx_begin", "t"), ("tx_begin", "t", ())]:
        assert isinstance(s.apply(cmd, T0), CmdError), cmd
    assert s.txns.dump() == before


def test_recovery_action() -> None:
    assert recovery_action(Record(PENDING, (0, 1), T0), T0 + 10, 100) is None
    assert recovery_action(Record(PENDING, (0, 1), T0), T0 + 100, 100) == "abort"
    assert recovery_action(Record(COMMITTED, (0, 1), T0), T0, 100) == "finish"
    assert recovery_action(Record(ABORTED, (0, 1), T0, acked=True), T0, 100) is None


# -- participant transitions ---------------------------------------------------------------

def prep(txid: str, compares=(), then_ops=(), else_ops=(), home: int = 0) -> tuple:
    return ("tx_prepare", txid, home, tuple(compares), tuple(then_ops), tuple(else_ops))


def test_prepare_locks_and_commit_applies() -> None:
    s = fresh(a=b"1")
    vote = s.apply(prep("t", [(b"a", "value", b"1")], [("put", b"a", b"2"), ("get", b"a")], [("get", b"a")]),
                   T0)
    assert vote == ("yes", True, (True, b"2"), (b"1",))
    assert isinstance(s.apply(("get", b"a"), T0), Locked)
    assert isinstance(s.apply(("set", b"a", b"9"), T0), Locked)
    lock = s.apply(("get", b"a"), T0)
    assert (lock.txid, lock.home_shard, lock.since_ms) == ("t", 0, T0)
    assert s.apply(prep("t", [(b"a", "value", b"1")], [("put", b"a", b"2")]), T0 + 5) == vote  # duplicate
    assert s.apply(("tx_finish", "t", COMMITTED, True), T0) == COMMITTED
    assert s.apply(("get", b"a"), T0) == b"2"
    assert s.apply(("tx_finish", "t", COMMITTED, True), T0) == COMMITTED  # duplicate: no second write
    assert s.revision == 2
    s.txns.check_invariants()


def test_prepare_conflict_votes_no_and_locks_nothing() -> None:
    s = fresh(a=b"1", b=b"1")
    s.apply(prep("t1", then_ops=[("put", b"a", b"2")]), T0)
    vote = s.apply(prep("t2", then_ops=[("put", b"b", b"2"), ("put", b"a", b"3")]), T0 + 1)
    assert vote[:2] == ("no", REASON_CONFLICT) and vote[2][:2] == (b"a", "t1")
    assert s.apply(("get", b"b"), T0) == b"1"  # t2 locked nothing
    # t2's NO is final: after t1 finishes, a re-sent PREPARE of t2 still cannot lock.
    s.apply(("tx_finish", "t1", ABORTED, None), T0)
    assert s.apply(prep("t2", then_ops=[("put", b"b", b"2")]), T0 + 2) == ("done", ABORTED)
    assert s.txns.locks == {}
    s.txns.check_invariants()


def test_abort_drops_staged_writes() -> None:
    s = fresh(a=b"1")
    s.apply(prep("t", then_ops=[("put", b"a", b"2"), ("del", b"a")]), T0)
    assert s.apply(("tx_finish", "t", ABORTED, None), T0) == ABORTED
    assert s.apply(("get", b"a"), T0) == b"1" and s.txns.locks == {}


def test_finish_before_prepare_leaves_tombstone() -> None:
    """A lost PREPARE that arrives after the abort must not lock (reordered messages)."""
    s = fresh(a=b"1")
    assert s.apply(("tx_finish", "t", ABORTED, None), T0) == ABORTED
    assert s.apply(prep("t", then_ops=[("put", b"a", b"2")]), T0) == ("done", ABORTED)
    assert s.txns.locks == {}


def test_contradicting_finish_is_reported_and_changes_nothing() -> None:
    s = fresh(a=b"1")
    s.apply(("tx_finish", "t", ABORTED, None), T0)
    before = s.txns.dump()
    res = s.apply(("tx_finish", "t", COMMITTED, True), T0)
    assert isinstance(res, CmdError) and res.code == "TXNBUG"
    assert s.txns.dump() == before


def test_conditional_else_branch() -> None:
    s = fresh(a=b"1")
    vote = s.apply(prep("t", [(b"a", "value", b"7")], [("put", b"a", b"2")], [("put", b"b", b"x"), ("get", b"a")]),
                   T0)
    assert vote == ("yes", False, (True,), (True, b"1"))
    assert isinstance(s.apply(("get", b"b"), T0), Locked)  # both branches' keys are locked
    s.apply(("tx_finish", "t", COMMITTED, False), T0)
    assert s.apply(("mget", [b"a", b"b"]), T0) == [b"1", b"x"]


def test_compare_kinds_at_prepare() -> None:
    s = fresh(a=b"1")
    rev = s.peek(b"a")[1]
    for compares, ok in [([(b"a", "rev", rev)], True), ([(b"a", "rev", rev + 1)], False),
                         ([(b"a", "exists", None)], True), ([(b"z", "missing", None)], True),
                         ([(b"z", "rev", 0)], True), ([(b"a", "missing", None)], False)]:
        vote = s.apply(prep(f"t{compares}", compares, [("get", b"a")]), T0)
        assert vote[1] is ok, compares
        s.apply(("tx_finish", f"t{compares}", ABORTED, None), T0)


def test_single_shard_txn_waits_for_lock() -> None:
    s = fresh(a=b"1")
    s.apply(prep("t", then_ops=[("put", b"a", b"2")]), T0)
    assert isinstance(s.apply(("txn", [(b"a", "exists", None)], [("put", b"a", b"3")], []), T0), Locked)


def test_gc_forgets_only_old_finished_state() -> None:
    s = fresh()
    s.apply(("tx_begin", "open", (0, 1)), T0)
    s.apply(("tx_begin", "t", (0, 1)), T0)
    s.apply(("tx_decide", "t", COMMITTED, True, (), ""), T0)
    s.apply(("tx_ack", "t"), T0)
    s.apply(("tx_finish", "p", ABORTED, None), T0)
    assert s.apply(("tx_gc",), T0 + TOMBSTONE_TTL_MS - 1) == 0
    assert s.apply(("tx_gc",), T0 + TOMBSTONE_TTL_MS + 1) == 2
    assert set(s.txns.records) == {"open"} and s.txns.done == {}


def test_snapshot_keeps_everything() -> None:
    s = fresh(a=b"1")
    s.apply(prep("t", then_ops=[("put", b"a", b"2")]), T0)
    s.apply(("tx_begin", "h", (0, 2)), T0)
    s.apply(("tx_finish", "x", ABORTED, None), T0)
    r = KVState.restore(s.snapshot())
    assert r.txns == s.txns and r.data == s.data
    r.apply(("tx_finish", "t", COMMITTED, True), T0)
    assert r.apply(("get", b"a"), T0) == b"2"
    assert isinstance(s.apply(("get", b"a"), T0), Locked)  # the original is untouched


# -- pure coordinator decisions --------------------------------------------------------------

SHARD = {b"a": 0, b"b": 1, b"c": 2, b"a2": 0}


def test_plan_and_decide_assemble_results_in_op_order() -> None:
    plan = plan_txn("t", [(b"b", "value", b"1"), (b"a", "exists", None)],
                    [("put", b"a", b"x"), ("get", b"c"), ("get", b"a2")], [("get", b"b")], SHARD.__getitem__)
    assert plan.home == 1 and plan.participants == (0, 1, 2)
    votes = {0: ("yes", True, (True, b"A2"), ()), 1: ("yes", True, (), (b"B",)), 2: ("yes", True, (b"C",), ())}
    assert decide(plan, votes).results == (True, b"C", b"A2") and decide(plan, votes).branch is True
    votes[1] = ("yes", False, (), (b"B",))
    d = decide(plan, votes)
    assert (d.outcome, d.branch, d.results) == (COMMITTED, False, (b"B",))
    assert decide(plan, {0: votes[0], 1: votes[1]}).outcome == ABORTED  # a missing vote
    votes[2] = ("no", REASON_CONFLICT, (b"c", "u", 2, 0))
    assert decide(plan, votes).reason == REASON_CONFLICT


def test_run_skips_to_finish_when_record_is_decided() -> None:
    plan = plan_txn("t", [], [("put", b"a", b"1"), ("put", b"b", b"1")], [], SHARD.__getitem__)
    run = TxnRun(plan)
    (shard, cmd), = run.commands()
    run.on_result(shard, cmd, (COMMITTED, True, (True, True), "", (0, 1)))
    assert run.phase == "finish" and {c[1][0] for c in run.commands()} == {"tx_finish"}
    run2 = TxnRun(plan)
    run2.on_result(0, run2.commands()[0][1], (ABORTED, None, None, REASON_UNKNOWN, ()))
    assert run2.phase == "finish" and len(run2.commands()) == 2  # tombstone: abort on every participant


def test_run_aborts_on_first_no_and_on_expiry() -> None:
    plan = plan_txn("t", [], [("put", b"a", b"1"), ("put", b"b", b"1")], [], SHARD.__getitem__)
    run = TxnRun(plan)
    run.on_result(0, run.commands()[0][1], (PENDING, None, None, "", (0, 1)))
    cmds = dict(run.commands())
    run.on_result(1, cmds[1], ("no", REASON_CONFLICT, (b"b", "u", 1, T0)))
    assert run.phase == "decide" and run.proposal.outcome == ABORTED and run.conflict[1] == "u"
    run.on_result(0, cmds[0], ("yes", True, (True,), ()))  # a late vote changes nothing
    assert run.proposal.outcome == ABORTED
    run3 = TxnRun(plan)
    run3.on_result(0, run3.commands()[0][1], (PENDING, None, None, "", (0, 1)))
    run3.expire()
    assert run3.proposal.reason == REASON_TIMEOUT


def _answer_gone(run: TxnRun, gone: int) -> list[tuple[int, tuple]]:
    """What the coordinator does: answer the messages for a removed shard, until the run has messages for
    live shards only."""
    return run.live_commands(lambda s: s == gone)[0]


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "classic"])
def test_a_run_whose_home_was_removed_aborts_and_releases_its_other_shards(parallel: bool) -> None:
    """Home shard 2 was removed (``raftkv shard remove``) while a run had prepared shard 0: the removed shard
    votes NO and needs no record, so the run finishes ABORTED at shard 0 (releasing its lock) and ends, instead
    of resending to shard 2 until its budget runs out."""
    plan = plan_txn("t", [], [("put", b"c", b"1"), ("put", b"a", b"1")], [], SHARD.__getitem__)
    assert plan.home == 2 and plan.participants == (0, 2)
    run = TxnRun.parallel(plan, T0) if parallel else TxnRun(plan)
    if not parallel:
        run.on_result(2, run.commands()[0][1], (PENDING, None, None, "", (0, 2), T0))  # begun before the freeze
    prepare = next(c for s, c in run.commands() if s == 0)
    run.on_result(0, prepare, ("yes", True, (True,), ()))  # shard 0 holds its lock
    left = _answer_gone(run, 2)
    assert run.phase == "finish" and [(s, c[0], c[2]) for s, c in left] == [(0, "tx_finish", ABORTED)]
    assert run.answer is not None and run.answer[0] == ABORTED
    assert abort_for(("no", REASON_MOVING, None)).reason == REASON_MOVING  # the client retries (-MOVING)
    run.on_result(0, left[0][1], None)
    assert _answer_gone(run, 2) == [] and run.phase == "done"


def test_a_committed_proposal_is_never_settled_for_a_removed_home() -> None:
    plan = plan_txn("t", [], [("put", b"c", b"1"), ("put", b"a", b"1")], [], SHARD.__getitem__)
    run = TxnRun(plan)
    run.on_result(2, run.commands()[0][1], (PENDING, None, None, "", (0, 2), T0))
    for s, c in run.commands():
        run.on_result(s, c, ("yes", True, (True,), ()))
    assert run.phase == "decide" and run.proposal.outcome == COMMITTED
    assert [s for s, _ in _answer_gone(run, 2)] == [] and run.phase == "decide"  # left as it was


# -- the simulation: several shards, lossy messages, coordinator crashes, leader restarts ---

NSHARDS = 3
ACCOUNTS = [f"acct{i}".encode() for i in range(6)]
ACCOUNT_SHARD = {k: i % NSHARDS for i, k in enumerate(ACCOUNTS)}
# Each transfer also APPENDs its id to both accounts' journals (on the accounts' shards, so no new
# conflicts): a journal must list every transfer applied to its account once, matching the balance.
JOURNAL = {k: b"log-" + k for k in ACCOUNTS}
KEY_SHARD = {**ACCOUNT_SHARD, **{JOURNAL[k]: s for k, s in ACCOUNT_SHARD.items()}}
START = 10
PENDING_TIMEOUT_MS = 50
LOCK_TIMEOUT_MS = 80


class Shard:
    """One shard's replicated log plus the state of its current leader."""

    def __init__(self) -> None:
        self.log: list[tuple[tuple, int]] = []
        self.state = KVState()

    def apply(self, cmd: tuple, now_ms: int) -> object:
        self.log.append((cmd, now_ms))
        res = self.state.apply(cmd, now_ms)
        self.state.txns.check_invariants()
        return res

    def restart(self, snapshot_at: int) -> None:
        """A new leader: state rebuilt from a snapshot of a log prefix plus the rest of the log."""
        s = KVState()
        cut = min(snapshot_at, len(self.log))
        for cmd, t in self.log[:cut]:
            s.apply(cmd, t)
        s = KVState.restore(s.snapshot())
        for cmd, t in self.log[cut:]:
            s.apply(cmd, t)
        assert s.data == self.state.data and s.txns == self.state.txns and s.revision == self.state.revision
        self.state = s


class Sim:
    def __init__(self, parallel: bool = False) -> None:
        self.parallel = parallel  # coordinators run parallel commits (else classic 2PC)
        self.answers: dict[str, tuple] = {}  # txid -> what its coordinator told the client
        self.now = T0
        self.shards = [Shard() for _ in range(NSHARDS)]
        for k in ACCOUNTS:
            self.shards[ACCOUNT_SHARD[k]].apply(("set", k, str(START).encode()), self.now)
        self.runs: list[TxnRun] = []
        self.ntx = 0
        self.replies: dict[str, tuple] = {}  # txid -> decision a coordinator reported
        self.reads: list[tuple] = []  # results of committed read-all transactions
        self.homes: dict[str, int] = {}
        self.delayed: list[tuple[int, tuple]] = []  # messages held in a network buffer
        self.forgotten: set[str] = set()  # records garbage-collected mid-run: only balances tell
        self.transfers: dict[str, tuple[bytes, bytes]] = {}  # txid -> (from, to)

    def value(self, k: bytes) -> int:
        entry = self.shards[ACCOUNT_SHARD[k]].state.data.get(k)
        return int(entry[0]) if entry else 0

    def start_transfer(self, a: bytes, b: bytes) -> None:
        va, vb = self.value(a), self.value(b)  # a possibly stale read: the compares decide
        if va <= 0:
            return
        txid = f"tx{self.ntx + 1}"
        self.transfers[txid] = (a, b)
        self._start([(a, "value", str(va).encode()), (b, "value", str(vb).encode())],
                    [("put", a, str(va - 1).encode()), ("put", b, str(vb + 1).encode()),
                     ("append", JOURNAL[a], txid.encode() + b",", 1 << 20),
                     ("append", JOURNAL[b], txid.encode() + b",", 1 << 20)], [("get", a)])

    def start_read_all(self) -> None:
        self._start([], [("get", k) for k in ACCOUNTS], [])

    def _start(self, compares: list, then_ops: list, else_ops: list) -> None:
        self.ntx += 1
        plan = plan_txn(f"tx{self.ntx}", compares, then_ops, else_ops, KEY_SHARD.__getitem__)
        self.homes[plan.txid] = plan.home
        self.runs.append(TxnRun.parallel(plan, self.now) if self.parallel else TxnRun(plan))

    def deliver(self, run: TxnRun, i: int, fate: str) -> None:
        cmds = run.commands()
        if not cmds:
            return
        shard, cmd = cmds[i % len(cmds)]
        if fate == "lost":
            return
        if fate == "delay":  # sits in a buffer; delivered (again) after every shard's GC, see late()
            # Participant messages only: a begin or decide replayed after its record's GC starts the
            # id afresh (documented: same id after GC is a new transaction), outside this property.
            if cmd[0] in ("tx_prepare", "tx_finish", "tx_refuse"):
                self.delayed.append((shard, cmd))
            return
        res = self.shards[shard].apply(cmd, self.now)
        if fate == "dup":
            res = self.shards[shard].apply(cmd, self.now)
        if cmd[0] == "tx_refuse" and res[0] == "no" and currently_in_test_context():
            event(f"recovery made a participant refuse ({res[1]})")
        if fate == "noreply":
            return
        assert not isinstance(res, CmdError), (cmd, res)
        run.on_result(shard, cmd, res)
        self._observe(run)

    def _observe(self, run: TxnRun) -> None:
        txid = run.plan.txid
        if txid in self.forgotten:  # a message after GC finds no record: documented, a new transaction
            return
        if run.answer is not None and run.plan.parts:  # a client's coordinator (not a recovery run)
            prev = self.answers.setdefault(txid, run.answer[:3])
            assert prev == run.answer[:3], f"{txid}: the client was told two things: {prev} vs {run.answer}"
        if run.decision is None:
            return
        if txid in self.answers:  # told before the decision was written (parallel commits): it must agree
            assert self.answers[txid][0] == run.decision[0], f"{txid}: told {self.answers[txid]}, decided " \
                                                             f"{run.decision}"
        prev = self.replies.setdefault(txid, run.decision[:3])
        assert prev == run.decision[:3], f"{txid}: two decisions reported: {prev} vs {run.decision}"
        if run.decision[0] == COMMITTED and run.plan.n_then == len(ACCOUNTS) and run.decision[2]:
            self.reads.append(run.decision[2])

    def recover(self, shard: int) -> None:
        """What a (new) leader of ``shard`` does: finish open records, resolve old locks."""
        st = self.shards[shard].state
        for txid, rec in list(st.txns.records.items()):
            if recovery_action(rec, self.now, PENDING_TIMEOUT_MS) is not None:
                self.runs.append(TxnRun.recover(txid, shard, rec.answer()))
        for lock in list(st.txns.locks.values()):
            if self.now - lock.since_ms >= LOCK_TIMEOUT_MS:
                ans = self.shards[lock.home_shard].apply(("tx_resolve", lock.txid, PENDING_TIMEOUT_MS), self.now)
                if ans[0] == STAGING:  # the resolver settles it by asking the participants (a run, lossy too)
                    self.runs.append(TxnRun.recover(lock.txid, lock.home_shard, ans))
                elif ans[0] != PENDING:
                    res = self.shards[shard].apply(("tx_finish", lock.txid, ans[0], ans[1], lock.home_shard,
                                                    ans[5]), self.now)
                    assert not isinstance(res, CmdError), res

    def late(self) -> None:
        """Time passes beyond the GC horizon, every shard collects, then the delayed messages arrive.

        Coordinators gave up long before (``DRIVE_BUDGET_S``); home leaders' recovery carries on.
        """
        self.now += TOMBSTONE_TTL_MS + 1
        self.runs = []
        for sh in self.shards:
            sh.apply(("tx_gc",), self.now)
        self.forgotten |= set(self.homes)  # records or tombstones may be gone: only balances tell
        for shard, cmd in self.delayed:
            res = self.shards[shard].apply(cmd, self.now)
            assert not isinstance(res, CmdError), (cmd, res)
        self.delayed = []

    def quiesce(self) -> None:
        for _ in range(50):
            self.now += LOCK_TIMEOUT_MS + PENDING_TIMEOUT_MS
            for run in self.runs:  # surviving coordinators carry on; nothing is lost any more
                while run.commands():
                    self.deliver(run, 0, "ok")
            self.runs = []
            for s in range(NSHARDS):
                self.recover(s)
            if not self.runs and not any(sh.state.txns.locks for sh in self.shards):
                return
        raise AssertionError("the simulation did not settle")

    def check_journals(self) -> None:
        """Every applied transfer appended its id once to both accounts' journals, and nothing else did."""
        seen: dict[str, list[bytes]] = {}
        for k in ACCOUNTS:
            entry = self.shards[ACCOUNT_SHARD[k]].state.data.get(JOURNAL[k])
            log = entry[0].decode().split(",")[:-1] if entry else []
            assert len(log) == len(set(log)), f"{k!r}: a transfer appended twice: {log}"
            assert self.value(k) == START + sum(-1 if self.transfers[t][0] == k else 1 for t in log), (k, log)
            for t in log:
                seen.setdefault(t, []).append(k)
        for t, ks in seen.items():
            assert sorted(ks) == sorted(self.transfers[t]), f"{t} appended to {ks} only"
            if t not in self.forgotten and t in self.replies:
                assert self.replies[t][0] == COMMITTED, f"{t} appended, decided {self.replies[t]}"

    def check(self) -> None:
        balances = [self.value(k) for k in ACCOUNTS]
        assert sum(balances) == START * len(ACCOUNTS), balances
        assert min(balances) >= 0, balances
        for read in self.reads:
            assert sum(int(v) for v in read) == START * len(ACCOUNTS), read
        self.check_journals()
        for sh in self.shards:
            assert sh.state.txns.locks == {} and sh.state.txns.prepared == {}
        for txid, home in self.homes.items():
            if txid in self.forgotten:
                continue
            rec = self.shards[home].state.txns.records.get(txid)
            outcomes = {sh.state.txns.done[txid][0] for sh in self.shards if txid in sh.state.txns.done}
            if rec is None:  # never begun: nothing may have happened anywhere
                assert outcomes <= {ABORTED}, (txid, outcomes)
                assert self.answers.get(txid, (ABORTED,))[0] == ABORTED, (txid, self.answers[txid])
                continue
            assert rec.state not in (PENDING, STAGING)
            assert outcomes <= {rec.state}, f"{txid}: home says {rec.state}, participants {outcomes}"
            if rec.state == COMMITTED:
                for s in rec.participants:
                    assert self.shards[s].state.txns.done[txid][0] == COMMITTED
            if txid in self.replies:
                assert self.replies[txid][0] == rec.state
            if txid in self.answers:  # acknowledged COMMITTED means committed; ABORTED, never applied
                assert self.answers[txid][0] == rec.state, f"{txid}: told {self.answers[txid]}, record {rec.state}"
        # GC after the horizon forgets everything that is finished.
        self.now += TOMBSTONE_TTL_MS + 1
        for sh in self.shards:
            sh.apply(("tx_gc",), self.now)
            assert all(r.state not in (PENDING, STAGING) for r in sh.state.txns.records.values())
            assert not sh.state.txns.done and not sh.state.txns.records


_ACTION_ARGS = {
    "transfer": st.tuples(st.sampled_from(ACCOUNTS), st.integers(1, len(ACCOUNTS) - 1)),  # to another account
    "read_all": st.tuples(),
    "step": st.tuples(st.integers(0, 7), st.integers(0, 3),
                      st.lists(st.sampled_from(["ok"] * 5 + ["lost", "noreply", "dup", "delay", "die"]), min_size=1,
                               max_size=8)),
    "crash": st.tuples(st.integers(0, 7)),  # die before any message
    "expire": st.tuples(st.integers(0, 7)),
    "restart": st.tuples(st.integers(0, NSHARDS - 1), st.integers(0, 200)),
    "recover": st.tuples(st.integers(0, NSHARDS - 1)),
    "tick": st.tuples(st.integers(1, 60)),
    "late": st.tuples(),  # past the GC horizon: delayed messages arrive after their tombstones are gone
}
# Weighted toward the interesting interleavings: many transfers in flight, messages moving
# them along, coordinators crashing in whatever phase they are in, recovery racing them.
_ACTION_WEIGHTS = {"transfer": 5, "read_all": 1, "step": 12, "crash": 1, "expire": 1, "restart": 1,
                   "recover": 3, "tick": 3, "late": 1}
ACTIONS = st.sampled_from([k for k, w in _ACTION_WEIGHTS.items() for _ in range(w)]).flatmap(
    lambda kind: _ACTION_ARGS[kind].map(lambda args: (kind, *args)))


def run_simulation(actions: list, parallel: bool = False) -> None:
    sim = Sim(parallel)
    for act in actions:
        kind = act[0]
        live = [r for r in sim.runs if r.commands()]
        if kind == "transfer":
            sim.start_transfer(act[1], ACCOUNTS[(ACCOUNTS.index(act[1]) + act[2]) % len(ACCOUNTS)])
        elif kind == "read_all":
            sim.start_read_all()
        elif kind in ("step", "crash") and live:
            run = live[act[1] % len(live)]
            for fate in act[3] if kind == "step" else ["die"]:
                if fate == "die":  # the coordinator's process dies here, whatever phase it is in
                    sim.runs.remove(run)
                    told = "" if run.answer is None else f", client told {run.answer[0]}"
                    event(f"a coordinator crashed in phase {run.phase}{told}")
                    break
                sim.deliver(run, act[2], fate)
        elif kind == "expire" and live:
            live[act[1] % len(live)].expire()
        elif kind == "restart":
            sim.shards[act[1]].restart(act[2])
        elif kind == "recover":
            sim.recover(act[1])
        elif kind == "tick":
            sim.now += act[1]
        elif kind == "late":
            sim.late()
    event(f"{min(sim.ntx // 5 * 5, 15)}+ transactions started")
    sim.quiesce()
    sim.check()


@settings(max_examples=examples(SIM_EXAMPLES_EACH), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, min_size=20, max_size=100))
def test_simulation_atomicity(actions: list) -> None:
    """Every transaction is applied on all its shards or on none; no lock outlives recovery.

    Runs are 20-100 actions long. Measured over 200 examples (``pytest
    --hypothesis-show-statistics`` prints the current figures): 89 % start 5+ transactions
    and 55 % 10+; a coordinator dies before its first message in ~70 %, during prepare in
    ~60 %, after every vote but before the decision in ~50 %, after the decision in ~50 %.
    (The old generator: 7 of 300 examples had 20+ actions, ~10 % crashed after prepare.)
    Classic 2PC, which coordinators run while older nodes remain (``--txn-classic-2pc``).
    """
    run_simulation(actions)


@settings(max_examples=examples(SIM_EXAMPLES_EACH), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, min_size=20, max_size=100))
def test_parallel_commits_simulation(actions: list) -> None:
    """Parallel commits under the same lossy, crashing, late-message world: every transaction is
    applied on all its shards or none, and a client told COMMITTED (before the decision was
    written) or ABORTED (on a NO vote) is told the truth, however PREPAREs, refusals, recovery
    runs and resolvers interleave.  Measured over 100 examples (``--hypothesis-show-statistics``):
    a coordinator dies after telling the client COMMITTED and before writing the decision in ~25 %,
    recovery makes a participant refuse in 40-48 % (a refusal delayed past GC, answered stale:
    ~14 %)."""
    run_simulation(actions, parallel=True)


def test_simulation_catches_a_recovery_that_presumes_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a broken build whose recovery commits an abandoned PENDING transaction
    instead of aborting it. Half-prepared transfers then commit on some shards only; the
    simulation must catch it. (Measured: caught with each of 10 seeds of 200 examples; the
    old, short and uniform generator caught it with none of them.)"""
    real = TxnRun.recover.__func__

    def presume_commit(cls: type, txid: str, home: int, record: tuple) -> TxnRun:
        run = real(cls, txid, home, record)
        if record[0] == PENDING:
            run.proposal = Decision(COMMITTED, True, None, "")
        return run

    monkeypatch.setattr(TxnRun, "recover", classmethod(presume_commit))

    @settings(max_examples=SIM_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(ACTIONS, min_size=20, max_size=100))
    def prop(actions: list) -> None:
        run_simulation(actions)

    with pytest.raises((AssertionError, ExceptionGroup)):
        prop()


def _parallel_sim_fails() -> bool:
    @settings(max_examples=SIM_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(ACTIONS, min_size=20, max_size=100))
    def prop(actions: list) -> None:
        run_simulation(actions, parallel=True)

    try:
        prop()
    except (AssertionError, ExceptionGroup):
        return True
    return False


def test_parallel_simulation_catches_a_recovery_that_presumes_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: recovery of a STAGING record that commits without asking the participants
    (a participant whose PREPARE never arrived then "commits" nothing while the others apply)."""
    real = TxnRun.recover.__func__

    def presume_commit(cls: type, txid: str, home: int, record: tuple) -> TxnRun:
        run = real(cls, txid, home, record)
        if record[0] == STAGING:
            run.proposal, run.phase = Decision(COMMITTED, True, None, ""), "decide"
        return run

    monkeypatch.setattr(TxnRun, "recover", classmethod(presume_commit))
    assert _parallel_sim_fails()


def _refusal_race() -> Sim:
    """Parallel commits, scripted: the PREPARE to shard 1 is lost; recovery finds the STAGING
    record, shard 1 refuses, recovery aborts; then the live coordinator's re-sent PREPARE arrives."""
    sim = Sim(parallel=True)
    sim.start_transfer(ACCOUNTS[0], ACCOUNTS[1])  # shard 0 (home) and shard 1
    run = sim.runs[0]
    sim.deliver(run, 0, "ok")  # the STAGING record
    sim.deliver(run, 0, "ok")  # shard 0's PREPARE: YES
    sim.deliver(run, 0, "lost")  # shard 1's PREPARE
    assert run.phase == "stage" and run.answer is None
    sim.now += PENDING_TIMEOUT_MS
    sim.recover(0)
    rec_run = sim.runs[1]
    assert rec_run.phase == "refuse"
    for _ in range(2):  # shard 1 refuses, which decides: the abort (its finishes stay in flight)
        sim.deliver(rec_run, 1, "ok")
    assert rec_run.decision[0] == ABORTED and rec_run.decision[3] == REASON_REFUSED
    sim.deliver(run, 0, "ok")  # the coordinator re-sends shard 1's PREPARE
    return sim


def test_parallel_refused_participant_stays_refused() -> None:
    """Recovery that found a participant without its PREPARE aborts only after that participant
    refused for good: the coordinator's late PREPARE then meets the refusal, and the client is
    never told COMMITTED for an aborted transaction."""
    sim = _refusal_race()
    assert sim.runs[0].answer is None or sim.runs[0].answer[0] == ABORTED
    sim.quiesce()
    sim.check()
    assert (sim.value(ACCOUNTS[0]), sim.value(ACCOUNTS[1])) == (START, START)


def test_parallel_refusal_race_catches_a_forgotten_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control for the test above: a participant that answers "refused" but keeps no
    tombstone lets the late PREPARE vote YES, and the client is told COMMITTED although the
    record says ABORTED."""
    real = TxnTable._refuse

    def forgetful(self: TxnTable, s: KVState, cmd: tuple, now_ms: int) -> object:
        res = real(self, s, cmd, now_ms)
        if res[0] == "no" and res[1] == REASON_REFUSED:
            del self.done[cmd[1]]
        return res

    monkeypatch.setitem(raftkv.txn._TX_HANDLERS, "tx_refuse", forgetful)
    sim = _refusal_race()
    assert sim.runs[0].answer[0] == COMMITTED
    with pytest.raises(AssertionError, match="told"):
        sim.quiesce()
        sim.check()


def test_parallel_implicit_commit_survives_the_coordinator() -> None:
    """The coordinator answers COMMITTED once the record is STAGING and both PREPAREs are in, and
    dies before writing the decision: a reader's resolver (or the home's recovery) commits it."""
    sim = Sim(parallel=True)
    sim.start_transfer(ACCOUNTS[0], ACCOUNTS[1])
    run = sim.runs[0]
    for _ in range(3):  # record + both PREPAREs, one round
        sim.deliver(run, 0, "ok")
    assert run.answer[0] == COMMITTED and run.decision is None and run.phase == "decide"
    sim.runs.clear()  # kill -9 before the decision
    assert isinstance(sim.shards[1].state.apply(("get", ACCOUNTS[1]), sim.now), Locked)
    sim.now += LOCK_TIMEOUT_MS
    sim.recover(1)  # shard 1's lock resolver: tx_resolve answers STAGING, so it settles the record
    assert sim.runs and sim.runs[0].phase == "refuse"
    sim.quiesce()
    sim.check()
    assert (sim.value(ACCOUNTS[0]), sim.value(ACCOUNTS[1])) == (START - 1, START + 1)


def test_parallel_no_vote_answers_at_once_and_stage_after_abort_stays_aborted() -> None:
    plan = plan_txn("t", [], [("put", b"a", b"1"), ("put", b"b", b"1")], [], SHARD.__getitem__)
    run = TxnRun.parallel(plan, T0)
    cmds = run.commands()
    assert [c[0] for _, c in cmds] == ["tx_stage", "tx_prepare", "tx_prepare"]
    run.on_result(1, cmds[2][1], ("no", REASON_CONFLICT, (b"b", "u", 1, T0)))
    assert run.answer[0] == ABORTED and run.phase == "decide"  # answered before any record exists
    s = fresh()
    assert s.apply(("tx_decide", "t", ABORTED, None, None, REASON_CONFLICT), T0)[0] == ABORTED
    assert s.apply(cmds[0][1], T0)[0] == ABORTED  # a stage that arrives late finds the abort


def test_refuse_returns_a_prepared_vote_and_refuses_otherwise() -> None:
    s = fresh(a=b"1")
    vote = s.apply(prep("p", [], [("put", b"a", b"2")]), T0)
    assert s.apply(("tx_refuse", "p", 0, T0), T0) == vote and "p" in s.txns.prepared
    assert s.apply(("tx_refuse", "q", 0, T0), T0) == ("no", REASON_REFUSED, None)
    assert s.apply(prep("q", [], [("put", b"a", b"3")]), T0)[0] == "done" and "q" not in s.txns.prepared
    s.txns.check_invariants()


def test_settle_decides_and_finishes_the_home_participant_in_one_entry() -> None:
    s = fresh(a=b"1")
    s.apply(("tx_stage", "t", (0, 1), T0), T0)
    s.apply(prep("t", [], [("put", b"a", b"2")]), T0)
    settle = ("tx_settle", "t", COMMITTED, True, (True,), "", 0, T0)
    assert s.apply(settle, T0)[0] == COMMITTED
    assert s.peek(b"a")[0] == b"2" and not s.txns.locks and s.txns.done["t"][0] == COMMITTED
    assert s.apply(settle, T0)[0] == COMMITTED and s.peek(b"a")[0] == b"2"  # a resend changes nothing
    s.txns.check_invariants()


def test_staging_record_is_never_decided_by_resolve_or_acked() -> None:
    s = fresh()
    assert s.apply(("tx_stage", "t", (0, 1), T0 - 5), T0) == (STAGING, None, None, "", (0, 1), T0 - 5)
    assert s.apply(("tx_resolve", "t", 0), T0 + 10**6)[0] == STAGING
    assert isinstance(s.apply(("tx_ack", "t"), T0), CmdError)
    assert recovery_action(s.txns.records["t"], T0 + PENDING_TIMEOUT_MS, PENDING_TIMEOUT_MS) == "settle"
    assert s.apply(("tx_decide", "t", COMMITTED, True, None, ""), T0)[0] == COMMITTED
    assert s.apply(("tx_stage", "t", (0, 1), T0), T0)[0] == COMMITTED


def test_simulation_crash_after_prepare_then_recovery() -> None:
    """A scripted run: coordinator dies after every participant voted YES; recovery aborts."""
    sim = Sim()
    sim.start_transfer(ACCOUNTS[0], ACCOUNTS[1])
    run = sim.runs[0]
    sim.deliver(run, 0, "ok")  # begin
    sim.deliver(run, 0, "ok")
    sim.deliver(run, 0, "ok")  # both prepared
    assert run.phase == "decide"
    sim.runs.clear()  # kill -9
    assert isinstance(sim.shards[0].state.apply(("get", ACCOUNTS[0]), sim.now), Locked)
    sim.quiesce()
    sim.check()
    assert sim.value(ACCOUNTS[0]) == START


def test_simulation_crash_after_decision_then_recovery() -> None:
    sim = Sim()
    sim.start_transfer(ACCOUNTS[0], ACCOUNTS[1])
    run = sim.runs[0]
    for _ in range(4):  # begin, 2 prepares, decide
        sim.deliver(run, 0, "ok")
    assert run.phase == "finish" and run.decision[0] == COMMITTED
    sim.runs.clear()
    sim.quiesce()
    sim.check()
    assert (sim.value(ACCOUNTS[0]), sim.value(ACCOUNTS[1])) == (START - 1, START + 1)


# -- issue 12: edges of WATCH, late messages, log time and transaction ids -------------------

def _committed_across_two_shards() -> tuple[KVState, KVState, list[tuple[int, tuple]]]:
    """A transaction writing shard 0 (home) and shard 1, run to the end; every message it sent."""
    shards = [fresh(a=b"1"), fresh(b=b"old0")]
    run = TxnRun(plan_txn("late", [], [("put", b"a", b"2"), ("put", b"b", b"old")], [], {b"a": 0, b"b": 1}.__getitem__))
    sent = []
    while run.commands():
        for shard, cmd in run.commands():
            sent.append((shard, cmd))
            run.on_result(shard, cmd, shards[shard].apply(cmd, T0))
    assert run.decision[0] == COMMITTED and shards[1].peek(b"b")[0] == b"old"
    return shards[0], shards[1], sent


def test_watched_missing_key_created_and_deleted_aborts_exec() -> None:
    """Redis aborts EXEC after any change to a watched key, even one that restores it."""
    s = fresh()
    seen = s.read(watch_read(b"k"))
    s.apply(("set", b"k", b"x"), T0)
    s.apply(("del", [b"k"]), T0)
    res = s.apply(("txn", [watch_compare(b"k", seen)], [("put", b"k", b"mine")], []), T0)
    assert not res.succeeded and s.peek(b"k") is None
    # ...and untouched, it commits (positive space), also as a 2PC participant.
    seen = s.read(watch_read(b"k"))
    vote = s.apply(prep("w", [watch_compare(b"k", seen)], [("put", b"k", b"mine")]), T0)
    assert vote[:2] == ("yes", True)


def test_late_prepare_after_gc_cannot_lock_or_reapply_old_writes() -> None:
    """A PREPARE held in a network buffer past the participant's GC must not lock again, and a
    re-sent COMMIT must not bring back the old staged write over a newer acknowledged one."""
    _home, part, sent = _committed_across_two_shards()
    stale = next(c for s, c in sent if s == 1 and c[0] == "tx_prepare")
    part.apply(("set", b"b", b"new"), T0 + 1)
    part.apply(("tx_gc",), T0 + TOMBSTONE_TTL_MS + 1)
    assert "late" not in part.txns.done
    vote = part.apply(stale, T0 + TOMBSTONE_TTL_MS + 2)
    assert vote[0] != "yes" and part.txns.locks == {}
    part.apply(("tx_finish", "late", COMMITTED, True), T0 + TOMBSTONE_TTL_MS + 3)
    assert part.peek(b"b")[0] == b"new"
    part.txns.check_invariants()


def test_single_shard_txn_id_outlives_session_eviction(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried RAFTKV.TXN ID finds its first attempt however many client sessions came since."""
    import raftkv.state

    monkeypatch.setattr(raftkv.state, "SESSIONS_MAX", 20)
    s = fresh()
    cmd = single_shard_cmd("once", [(b"c", "missing", None)], [("put", b"c", b"1")], [("get", b"c")])
    first = s.apply(cmd, T0)
    assert first.succeeded
    for i in range(50):  # clients' sessions push the oldest out of the session table
        s.apply(("session", f"client{i}".encode(), 1, ("get", b"c")), T0 + i)
    assert s.apply(cmd, T0 + 100) == first
    assert s.apply(cmd, T0 + TOMBSTONE_TTL_MS - 1) == first  # for the whole documented window


@given(st.booleans(), st.lists(st.one_of(st.integers(-3, 40), st.binary(max_size=3), st.none(), st.booleans()),
                              max_size=30))
def test_a_remembered_result_expands_to_exactly_the_result(succeeded: bool, results: list) -> None:
    r = TxnResult(succeeded, tuple(results))
    assert ResultRun.expand(ResultRun.of(r)) == r
    run = TxnResult(succeeded, tuple(range(7, 7 + len(results))))
    assert ResultRun.expand(ResultRun.of(run)) == run


def test_a_bulk_batch_is_remembered_in_two_integers_and_a_retry_gets_every_revision() -> None:
    """A one-shard transaction of 500 puts (a bulk load's batch) keeps (first revision, count) in the id table,
    not 500 revisions for the whole window; the same id again answers the same 500 revisions."""
    s = fresh()
    s.apply(("set", b"before", b"x"), T0)
    cmd = single_shard_cmd("bulk-1", [], [("put", b"k%03d" % i, b"v") for i in range(500)], [])
    first = s.apply(cmd, T0 + 1)
    assert first == TxnResult(True, tuple(range(2, 502)))
    assert s.txns.once["bulk-1"][0] == ResultRun(True, 2, 500)
    assert s.apply(cmd, T0 + 2) == first and s.revision == 501
    again = KVState.restore(s.snapshot())
    assert again.apply(cmd, T0 + 3) == first


def test_coordinator_runs_parallel_commits_unless_told_classic_or_without_the_home_replica() -> None:
    """``--txn-classic-2pc`` (rolling upgrades) and a coordinator without a replica of the home
    shard run classic 2PC, whose messages nodes of earlier versions understand."""
    from types import SimpleNamespace

    from raftkv.server.api import Timing
    from raftkv.server.coordinator import new_run

    plan = plan_txn("t", [], [("put", b"a", b"1"), ("put", b"b", b"1")], [], SHARD.__getitem__)
    home = SimpleNamespace(log_now_ms=lambda: T0)

    def first_messages(timing: Timing, replicas: dict) -> list[str]:
        run = new_run(SimpleNamespace(timing=timing, replicas=replicas), plan)  # type: ignore[arg-type]
        return [c[0] for _, c in run.commands()]

    assert first_messages(Timing(), {0: home}) == ["tx_stage", "tx_prepare", "tx_prepare"]
    assert first_messages(Timing(txn_parallel_commits=False), {0: home}) == ["tx_begin"]
    assert first_messages(Timing(), {1: home}) == ["tx_begin"]


# -- APPEND inside transactions (issue 13: Elle's list-append workload on the real store) -------

LEN_MAX = 8  # value_bytes_max as the node passes it in each APPEND op: small, so the limit is reached


def app(key: bytes, suffix: bytes, len_max: int = LEN_MAX) -> tuple:
    return ("append", key, suffix, len_max)


def test_append_in_a_one_shard_transaction_answers_the_new_lengths() -> None:
    s = fresh(a=b"1,")
    res = s.apply(single_shard_cmd("t", [], [app(b"a", b"2,"), ("get", b"a"), app(b"n", b"x,"), app(b"n", b"y,")],
                                   []), T0)
    assert res == TxnResult(True, (4, b"1,2,", 2, 4))
    assert s.peek(b"a")[0] == b"1,2," and s.peek(b"n")[0] == b"x,y,"


def test_prepared_append_is_computed_under_the_lock_and_applied_at_commit() -> None:
    s = fresh(a=b"1,")
    vote = s.apply(prep("t", then_ops=[app(b"a", b"2,"), ("get", b"a")], else_ops=[app(b"a", b"e,")]), T0)
    assert vote == ("yes", True, (4, b"1,2,"), (4,))
    assert s.peek(b"a")[0] == b"1,"  # staged, not applied
    # Nothing can change the value the append was computed from until the outcome.
    for cmd in [("set", b"a", b"x"), ("append", b"a", b"9,", LEN_MAX), ("del", [b"a"])]:
        assert isinstance(s.apply(cmd, T0 + 1), Locked), cmd
    assert s.apply(prep("u", then_ops=[app(b"a", b"3,")]), T0 + 1)[:2] == ("no", REASON_CONFLICT)
    assert s.apply(("tx_finish", "t", COMMITTED, True), T0 + 2) == COMMITTED
    assert s.peek(b"a")[0] == b"1,2,"
    assert s.apply(("tx_finish", "t", COMMITTED, True), T0 + 3) == COMMITTED  # duplicate: appended once
    s.apply(prep("v", then_ops=[app(b"a", b"3,")]), T0 + 4)
    s.apply(("tx_finish", "v", ABORTED, None), T0 + 5)
    assert s.peek(b"a")[0] == b"1,2,"  # an aborted append leaves nothing
    s.txns.check_invariants()


def test_append_in_a_transaction_keeps_the_key_deadline() -> None:
    """As Redis's APPEND does (a PUT replaces the key and its deadline)."""
    s = fresh(a=b"1,")
    s.apply(("expire", b"a", 5000, False, None), T0)
    s.apply(single_shard_cmd("t", [], [app(b"a", b"2,")], []), T0 + 1)
    assert s.expiries.get(b"a") == T0 + 5000
    s.apply(prep("p", then_ops=[app(b"a", b"3,")]), T0 + 2)
    s.apply(("tx_finish", "p", COMMITTED, True), T0 + 3)
    assert s.expiries.get(b"a") == T0 + 5000 and s.peek(b"a")[0] == b"1,2,3,"


def test_append_over_the_value_limit_is_refused_in_either_branch_and_changes_nothing() -> None:
    s = fresh(a=b"123")
    res = s.apply(single_shard_cmd("t", [(b"a", "exists", None)], [("put", b"b", b"x")], [app(b"a", b"456789")]),
                  T0)
    assert isinstance(res, CmdError) and res.code == "TOOBIG"
    assert s.peek(b"b") is None and s.peek(b"a")[0] == b"123"
    vote = s.apply(prep("p", then_ops=[app(b"a", b"4")], else_ops=[app(b"a", b"456789")]), T0)
    assert vote == ("no", REASON_TOOBIG, None) and s.txns.locks == {}
    assert s.apply(prep("p", then_ops=[app(b"a", b"4")]), T0 + 1) == ("done", ABORTED)  # final, like any NO
    assert abort_for(vote).reason == REASON_TOOBIG


def test_validate_knows_append() -> None:
    assert validate([], [app(b"a", b"x")], []) is None
    for bad in [("append", b"a"), ("append", b"a", "x", 8), ("append", b"a", b"x", -1), ("append", b"a", b"x")]:
        assert validate([], [bad], []) is not None, bad


_KEYS = st.sampled_from([b"a", b"b"])
_VALS = st.binary(min_size=1, max_size=3)
_OPS = st.one_of(st.tuples(st.just("put"), _KEYS, _VALS), st.tuples(st.just("del"), _KEYS),
                 st.tuples(st.just("get"), _KEYS), st.tuples(st.just("append"), _KEYS, _VALS, st.just(LEN_MAX)))


@given(st.lists(_OPS, max_size=6))
@settings(max_examples=examples(200), deadline=None)
def test_a_prepared_vote_answers_what_its_append_commit_applies(ops: list) -> None:
    """The results a participant votes at PREPARE (computed under its locks) are those the one-shard
    path gets applying the same ops, and COMMIT leaves the same data (or both refuse: TOOBIG)."""
    one, two = fresh(a=b"1,"), fresh(a=b"1,")
    res = one.apply(single_shard_cmd("t", [], ops, []), T0)
    vote = two.apply(prep("t", then_ops=ops), T0)
    if isinstance(res, CmdError):
        assert res.code == "TOOBIG" and vote == ("no", REASON_TOOBIG, None)
        assert one.peek(b"a")[0] == two.peek(b"a")[0] == b"1," and one.peek(b"b") is None
        return
    assert vote[2] == tuple(True if op[0] == "put" else r for op, r in zip(ops, res.results, strict=True))
    two.apply(("tx_finish", "t", COMMITTED, True), T0 + 1)
    assert dict(one.data.items()) == dict(two.data.items())


def test_a_transaction_aborted_with_tryagain_is_retried_with_a_fresh_id() -> None:
    """-TRYAGAIN may answer an id whose transaction aborted for good (stale, refused, timed out): resending that
    id meets the same abort until the deadline. Txn.commit retries with a fresh id instead, whatever ``retries``
    says, and Client.txn() hands -TRYAGAIN straight back to it."""
    from raftkv.client import Client
    from raftkv.errors import RaftKVError
    from raftkv.txnclient import Txn

    spent: set[bytes] = set()

    def request(shard: int, args: list[bytes]) -> object:
        txid = args[2]
        if not spent:  # the first id aborts, and stays aborted
            spent.add(txid)
        if txid in spent:
            raise RaftKVError("TRYAGAIN", "transaction aborted (stale); not applied, retry")
        return [1, [b"OK"]]

    t = Txn(lambda k: 0, request, wait_s=5.0).then_put("k", "v")
    assert t.commit().succeeded and len(spent) == 1
    from shards.shardmap import local_cluster

    with Client(cluster=local_cluster(), timeout=0.1) as c:
        captured: list = []
        c._request = lambda shard, args, **kw: captured.append(kw) or [1, [b"OK"]]  # type: ignore[method-assign]
        c.txn().then_put("k", "v").commit()
        assert "TRYAGAIN" in captured[0]["final"] and "MOVING" in captured[0]["final"]


def test_a_tx_batch_applies_each_tail_message_as_if_alone_and_refuses_anything_else() -> None:
    """``tx_batch`` (raftkv.server.tailbatch): one command, one result per message, the same state as the
    messages sent one by one; a PREPARE (which names keys, checked at the edge) never rides in one."""
    def run(batched: bool) -> KVState:
        s = KVState()
        for t in ("a", "b"):
            s.apply(("tx_stage", t, (0, 1), T0), T0)
            s.apply(("tx_prepare", t, 0, [], [("put", t.encode(), b"v")], [], T0), T0)
        tail = [("tx_settle", "a", COMMITTED, True, None, "", 0, T0), ("tx_settle", "b", ABORTED, None, None, "x", 0, T0),
                ("tx_ack", "a"), ("tx_ack", "b")]
        if batched:
            out = s.apply(("tx_batch", tuple(tail)), T0 + 1)
            assert [r[0] if isinstance(r, tuple) else r for r in out] == [COMMITTED, ABORTED, True, True]
        else:
            for m in tail:
                s.apply(m, T0 + 1)
        return s

    one, many = run(False), run(True)
    assert one.txns == many.txns and dict(one.data.items()) == dict(many.data.items())
    assert many.read(("get", b"a")) == b"v" and many.read(("get", b"b")) is None
    assert many.txns.records.unacked == set()
    s = KVState()
    out = s.apply(("tx_batch", (("tx_prepare", "c", 0, [], [("put", b"c", b"v")], [], T0), ("tx_ack", "zz"))), T0)
    assert isinstance(out[0], CmdError) and out[1] is False and s.txns.locks == {}


def test_a_record_pickles_every_field_and_records_of_earlier_builds_still_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Record(COMMITTED, (0, 2), 5, True, ((1, b"OK"),), "why", True, 9, 4)
    assert len(rec.__reduce__()[1]) == len(dataclasses.fields(Record)), "a Record field is not pickled"
    assert pickle.loads(pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)) == rec
    with monkeypatch.context() as m:  # what an earlier build wrote: the class and the attribute dict
        m.delattr(Record, "__reduce__")
        earlier = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
    assert earlier != pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
    assert pickle.loads(earlier) == rec

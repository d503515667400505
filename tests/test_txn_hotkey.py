"""Wait-die on hot keys, as pure code: the reservation rules of ``raftkv.txn`` and a round-based
model of many writers on one key, where every writer commits within a bounded number of attempts
whatever order the scheduler picks (and, without priorities, the oldest can lose for ever).

No processes, no sockets, no clock: shards are ``KVState`` objects, time is an integer.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.state import KVState
from raftkv.txn import (
    ABORTED,
    COMMITTED,
    REASON_CONFLICT,
    REASON_RESERVED,
    RESERVATION_QUEUE_MAX,
    RESERVATION_TTL_MS,
    TxnTable,
)
from raftkv.txnrun import (
    PRIO_AGE_MAX_MS,
    TxnRun,
    ahead_of,
    clamp_prio,
    new_prio,
    parse_prio_token,
    plan_txn,
    prio_token,
    prio_token_of,
    retry_delay_s,
)

from .conftest import examples

T0 = 1_000_000
OLD = (100, "0000000000000001")
MID = (200, "0000000000000002")
YOUNG = (300, "0000000000000003")


def prep(txid: str, key: bytes = b"h", prio: tuple | None = None, value: bytes = b"v") -> tuple:
    cmd = ("tx_prepare", txid, 0, (), (("put", key, value),), (), T0)
    return cmd if prio is None else (*cmd, prio)


def locked_by_holder() -> KVState:
    """A shard whose key ``h`` is locked by the prepared transaction ``holder`` (no priority)."""
    s = KVState()
    assert s.apply(prep("holder"), T0)[0] == "yes"
    return s


def test_an_older_loser_waits_and_wins_next_while_a_younger_dies() -> None:
    s = locked_by_holder()
    assert s.apply(prep("old-1", prio=OLD), T0)[:2] == ("no", REASON_CONFLICT)
    assert s.txns.reservation(b"h", T0) == OLD
    s.apply(("tx_finish", "holder", COMMITTED, True), T0 + 1)
    # The lock is gone, but the key is the older transaction's next: a younger PREPARE dies ...
    assert s.apply(prep("young-1", prio=YOUNG), T0 + 2) == ("no", REASON_RESERVED, None, 1)  # 1 ahead of it
    assert s.txns.locks == {} and s.txns.done["young-1"][0] == ABORTED
    # ... and the older one's retry (a new id, the same priority) locks it.
    assert s.apply(prep("old-2", prio=OLD), T0 + 3)[0] == "yes"
    s.apply(("tx_finish", "old-2", COMMITTED, True), T0 + 4)
    # Committed: it leaves the queue, and the younger one, queued when it died, is next.
    assert s.txns.reservation(b"h", T0 + 4) == YOUNG
    assert s.apply(prep("young-2", prio=YOUNG), T0 + 5)[0] == "yes"
    s.apply(("tx_finish", "young-2", COMMITTED, True), T0 + 6)
    assert s.txns.reserved == {}
    s.txns.check_invariants()


def test_losers_queue_oldest_first_and_the_oldest_holds_the_reservation() -> None:
    s = locked_by_holder()
    s.apply(prep("mid", prio=MID), T0)
    s.apply(prep("young", prio=YOUNG), T0)
    assert s.txns.reservation(b"h", T0) == MID
    s.apply(prep("old", prio=OLD), T0)  # older: goes to the front
    assert [p for p, _ in s.txns.waiters(b"h", T0)] == [OLD, MID, YOUNG]
    s.apply(prep("mid-2", prio=MID), T0 + 1)  # a retry refreshes its place, never takes a second one
    assert [p for p, _ in s.txns.waiters(b"h", T0 + 1)] == [OLD, MID, YOUNG]


def test_a_key_queues_a_bounded_number_of_waiters() -> None:
    s = locked_by_holder()
    for i in range(RESERVATION_QUEUE_MAX + 3):
        s.apply(prep(f"t{i}", prio=(1000 - i, f"{i:016x}")), T0)  # each older than the one before
    q = s.txns.waiters(b"h", T0)
    assert len(q) == RESERVATION_QUEUE_MAX and q[0][0][0] == 1000 - (RESERVATION_QUEUE_MAX + 2)


def test_a_transaction_older_than_the_reservation_goes_ahead() -> None:
    s = locked_by_holder()
    s.apply(prep("mid", prio=MID), T0)
    s.apply(("tx_finish", "holder", ABORTED, None), T0)
    assert s.apply(prep("old", prio=OLD), T0 + 1)[0] == "yes"
    assert s.txns.reservation(b"h", T0 + 1) == MID  # still next after it


def test_a_reservation_lapses_when_its_transaction_stops_retrying() -> None:
    s = locked_by_holder()
    s.apply(prep("old", prio=OLD), T0)
    s.apply(("tx_finish", "holder", COMMITTED, True), T0)
    assert s.apply(prep("young-1", prio=YOUNG), T0 + RESERVATION_TTL_MS - 1)[1] == REASON_RESERVED
    # That refusal refreshed nothing of the older one's: it lapses on time, and the younger, queued
    # behind it when it died, is first.
    assert s.txns.reservation(b"h", T0 + RESERVATION_TTL_MS) == YOUNG
    assert s.apply(prep("young-2", prio=YOUNG), T0 + RESERVATION_TTL_MS)[0] == "yes"
    assert s.apply(("tx_gc",), T0 + 3 * RESERVATION_TTL_MS) >= 2 and s.txns.reserved == {}


def test_a_retry_refreshes_its_reservation() -> None:
    s = locked_by_holder()
    s.apply(prep("old-1", prio=OLD), T0)
    s.apply(prep("old-2", prio=OLD), T0 + RESERVATION_TTL_MS - 1)  # still locked: loses again, refreshes
    assert s.txns.reservation(b"h", T0 + RESERVATION_TTL_MS + 10) == OLD


def test_an_aborted_prepared_transaction_keeps_its_keys_for_its_retry() -> None:
    """It voted YES here but lost on another shard: its retry must find these keys free too."""
    s = KVState()
    assert s.apply(prep("old-1", prio=OLD), T0)[0] == "yes"
    s.apply(("tx_finish", "old-1", ABORTED, None), T0 + 1)
    assert s.apply(prep("young", prio=YOUNG), T0 + 2)[1] == REASON_RESERVED
    assert s.apply(prep("old-2", prio=OLD), T0 + 3)[0] == "yes"


def test_a_lineage_passes_its_own_reservation_whatever_its_time() -> None:
    """A retry's priority may be clamped to a later time (PRIO_AGE_MAX_MS): the lineage names it."""
    s = locked_by_holder()
    s.apply(prep("a-1", prio=OLD), T0)
    s.apply(("tx_finish", "holder", COMMITTED, True), T0)
    assert s.apply(prep("a-2", prio=(YOUNG[0] + 1, OLD[1])), T0 + 1)[0] == "yes"


def test_prepares_without_a_priority_neither_read_nor_write_reservations() -> None:
    """The older PREPARE shape (log entries of earlier versions, classic 2PC) replays as before."""
    s = locked_by_holder()
    assert s.apply(prep("older-shape"), T0)[1] == REASON_CONFLICT
    assert s.txns.reserved == {}
    s.apply(prep("old", prio=OLD), T0)
    s.apply(("tx_finish", "holder", COMMITTED, True), T0)
    assert s.apply(prep("older-shape-2"), T0 + 1)[0] == "yes"


def test_a_refused_prepare_is_refused_again_when_resent() -> None:
    s = locked_by_holder()
    s.apply(prep("old", prio=OLD), T0)
    s.apply(("tx_finish", "holder", COMMITTED, True), T0)
    assert s.apply(prep("young", prio=YOUNG), T0)[1] == REASON_RESERVED
    assert s.apply(prep("young", prio=YOUNG), T0) == ("done", ABORTED)  # idempotent by id


def test_malformed_priorities_are_refused_and_change_nothing() -> None:
    s = KVState()
    for bad in [(1,), ("1", "a"), (1, ""), [1, "a"], (1.5, "a")]:
        res = s.apply(prep("t", prio=bad), T0)
        assert getattr(res, "code", None) == "ERR", bad
    assert s.txns == TxnTable()


def test_snapshots_keep_reservations() -> None:
    s = locked_by_holder()
    s.apply(prep("old", prio=OLD), T0)
    assert KVState.restore(s.snapshot()).txns == s.txns
    assert TxnTable.load({}).reserved == {}  # a snapshot from before reservations


def test_a_no_vote_says_how_many_older_waiters_are_ahead() -> None:
    s = locked_by_holder()
    assert s.apply(prep("mid", prio=MID), T0)[3] == 0  # first in line
    assert s.apply(prep("young", prio=YOUNG), T0)[3] == 1
    assert s.apply(prep("old", prio=OLD), T0)[3] == 0  # an older one goes to the front
    assert s.apply(prep("young-2", prio=YOUNG), T0)[3] == 2
    assert len(s.apply(prep("older-shape"), T0)) == 3  # no priority: the vote of earlier versions


def test_retry_delays_follow_the_queue() -> None:
    assert retry_delay_s(0, 7, 0.01, 0.2, 0.02) == 0.02  # first in line: back soon, however often it lost
    assert retry_delay_s(3, 0, 0.01, 0.2, 0.02) == 0.08
    assert retry_delay_s(100, 0, 0.01, 0.2) == 0.2
    assert retry_delay_s(None, 3, 0.01, 0.2) == 0.08  # not told: exponential backoff
    assert ahead_of("...; retry with PRIO 12:0123456789abcdef (3 ahead)") == 3
    assert ahead_of("...; retry with PRIO 12:0123456789abcdef") is None


def test_raftkv_txn_takes_a_prio_token() -> None:
    from raftkv.server.commands.txn import _Syntax, parse_txn, take_prio
    tok = prio_token(OLD)
    for args, rest in [([b"PRIO", tok.encode(), b"0", b"1", b"GET", b"k", b"0"], [b"0", b"1", b"GET", b"k", b"0"]),
                       ([b"ID", b"x", b"prio", tok.encode(), b"0", b"0", b"0"], [b"ID", b"x", b"0", b"0", b"0"])]:
        prio, left = take_prio(args)
        assert prio == OLD and left == rest
        parse_txn(left, 100)
    assert take_prio([b"0", b"0", b"0"]) == (None, [b"0", b"0", b"0"])
    with pytest.raises(_Syntax):
        take_prio([b"PRIO", b"nonsense", b"0", b"0", b"0"])


def test_priorities_tokens_and_clamping() -> None:
    p = new_prio("some id", 12345)
    assert p[0] == 12345 and p == new_prio("some id", 12345) and p != new_prio("other id", 12345)
    assert parse_prio_token(prio_token(p)) == p
    assert prio_token_of(f"transaction x aborted: ...; retry with PRIO {prio_token(p)}") == prio_token(p)
    assert prio_token_of("transaction x aborted; retry") is None
    for bad in ["", "12", "x:0123456789abcdef", "1:0123", "1:0123456789ABCDEF"]:
        with pytest.raises(ValueError):
            parse_prio_token(bad)
    assert clamp_prio((5, p[1]), 10**9) == (10**9 - PRIO_AGE_MAX_MS, p[1])
    assert clamp_prio(p, 12346) == p


def test_runs_carry_their_priority_in_every_prepare() -> None:
    plan = plan_txn("t", [], [("put", b"a", b"1"), ("put", b"b", b"1")], [], {b"a": 0, b"b": 1}.__getitem__)
    run = TxnRun.parallel(plan, T0, OLD)
    prepares = [c for _, c in run.commands() if c[0] == "tx_prepare"]
    assert len(prepares) == 2 and all(c[-1] == OLD and c[-2] == T0 for c in prepares)
    assert all(len(c) == 7 for _, c in TxnRun.parallel(plan, T0).commands() if c[0] == "tx_prepare")


# -- a hot key: rounds of concurrent attempts in any order ------------------------------------

HOT, WRITERS = b"hot", 5


def hot_key_rounds(orders: list[list[int]], priorities: bool) -> dict[int, list[int]]:
    """Writers 0..WRITERS-1 each run transactions "put hot, put own key" (hot on shard 0, own keys
    on shard 1), one at a time, retrying a lost one.  In every round, every writer's current attempt
    sends its PREPAREs in the round's order (a permutation: any interleaving the scheduler likes),
    then every run is driven to its end.  A retry keeps its first attempt's priority; a writer's
    next transaction gets a new, younger one.  Returns writer -> attempts of each committed
    transaction, plus -1 for a transaction still not committed at the end."""
    shards = [KVState(), KVState()]
    shard_of = {HOT: 0, **{f"k{w}".encode(): 1 for w in range(WRITERS)}}.__getitem__
    clock = iter(range(1, 10**6))
    current = {w: (new_prio(f"w{w}-0", next(clock)), 0) for w in range(WRITERS)}  # prio, attempts so far
    out: dict[int, list[int]] = {w: [] for w in range(WRITERS)}
    now = T0
    for r, order in enumerate(orders):
        runs = {}
        for w in range(WRITERS):
            plan = plan_txn(f"w{w}-r{r}", [], [("put", HOT, b"%d" % r), ("put", f"k{w}".encode(), b"x")], [],
                            shard_of)
            runs[w] = TxnRun.parallel(plan, now, current[w][0] if priorities else None)
        for w in order:  # the stage and every PREPARE of each attempt, in the scheduler's order
            for shard, cmd in runs[w].commands():
                runs[w].on_result(shard, cmd, shards[shard].apply(cmd, now))
        for w in range(WRITERS):  # then each run to its end (settle, finish, ack)
            while runs[w].commands():
                shard, cmd = runs[w].commands()[0]
                runs[w].on_result(shard, cmd, shards[shard].apply(cmd, now))
            prio, tries = current[w]
            if runs[w].decision[0] == COMMITTED:
                out[w].append(tries + 1)
                current[w] = (new_prio(f"w{w}-{r + 1}", next(clock)), 0)
            else:
                current[w] = (prio, tries + 1)
        for sh in shards:
            assert sh.txns.locks == {} and sh.txns.prepared == {}
        now += 10  # well inside RESERVATION_TTL_MS: retries come back in time
    for w, (_, tries) in current.items():
        if tries:
            out[w].append(-1)
    return out


ROUNDS = 40
BOUND = WRITERS + 1  # attempts: one per older waiter ahead of it, plus one to join the queue


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.permutations(range(WRITERS)), min_size=ROUNDS, max_size=ROUNDS))
def test_every_writer_of_a_hot_key_commits_within_a_bounded_number_of_attempts(orders: list) -> None:
    out = hot_key_rounds(orders, priorities=True)
    for w, attempts in out.items():
        finished = [a for a in attempts if a > 0]
        assert finished, f"writer {w} never committed: {attempts}"
        assert max(finished) <= BOUND, f"writer {w} needed {max(finished)} attempts: {attempts}"
        if attempts[-1] == -1:  # still trying at the end: it has not waited longer than the bound either
            pass


def test_without_priorities_the_oldest_writer_can_lose_every_round() -> None:
    """Negative control: no-wait alone, a scheduler that lets the youngest attempt go first."""
    youngest_first = [list(range(WRITERS))[::-1]] * ROUNDS
    # Writer 4 is the youngest at first; after its commit its next transaction is younger still.
    starved = hot_key_rounds(youngest_first, priorities=False)
    assert starved[0] == [-1] and all(not a or a == [-1] for w, a in starved.items() if w != WRITERS - 1)
    fair = hot_key_rounds(youngest_first, priorities=True)
    assert all(fair[w] and max(a for a in fair[w] if a > 0) <= BOUND for w in range(WRITERS))


def test_coordinator_gives_prepares_a_priority_unless_told_not_to() -> None:
    """A first attempt gets a new priority, a retry keeps its own (clamped), and
    ``--txn-no-priorities`` (rolling upgrades) sends the PREPARE shape earlier versions understand."""
    from types import SimpleNamespace

    from raftkv.server.api import Timing
    from raftkv.server.coordinator import new_run

    plan = plan_txn("t", [], [("put", b"a", b"1"), ("put", b"b", b"1")], [], {b"a": 0, b"b": 1}.__getitem__)
    home = {0: SimpleNamespace(log_now_ms=lambda: T0)}

    def prepares(timing: Timing, prio: tuple | None = None) -> list[tuple]:
        run = new_run(SimpleNamespace(timing=timing, replicas=home), plan, prio)  # type: ignore[arg-type]
        return [c for _, c in run.commands() if c[0] == "tx_prepare"]

    first = prepares(Timing())
    assert len(first) == 2 and all(len(c) == 8 and c[7][1] == new_prio("t", 0)[1] for c in first)
    kept = prepares(Timing(), OLD)
    assert all(c[7][1] == OLD[1] for c in kept)  # the retry's lineage; its time clamped to a minute ago
    assert all(len(c) == 7 for c in prepares(Timing(txn_priorities=False), OLD))

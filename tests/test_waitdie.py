"""Wait-die decisions (raftkv.waitdie): who waits, who dies, and why no cycle of waits can form."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.waitdie import (
    LOCKED_BY,
    attempt_txid,
    conflict_charged,
    gate,
    holder_of,
    must_wait,
    new_priority,
    priority_of,
    waits_for,
)

OLD, MID, YOUNG = new_priority(1000, "aa"), new_priority(2000, "bb"), new_priority(3000, "cc")


def test_the_priority_travels_in_the_id_of_every_attempt() -> None:
    prio = new_priority(1_764_700_000_000)
    ids = [attempt_txid(prio, n) for n in range(50)]
    assert len(set(ids)) == 50
    assert all(priority_of(t) == prio and len(t) <= 64 for t in ids)


def test_ids_without_a_priority() -> None:
    assert priority_of(uuid.uuid4().hex) is None  # old clients, node retries with wait-die off
    assert priority_of("my-transfer-7") is None  # RAFTKV.TXN ID chosen by a client
    assert priority_of("wd.zz.aa.1") is None


def test_older_waits_for_younger_and_younger_dies() -> None:
    assert must_wait(OLD, YOUNG)
    assert not must_wait(YOUNG, OLD)
    assert must_wait(OLD, None)  # a holder without priority counts as youngest
    assert not must_wait(None, YOUNG)  # no priority: no-wait, as before
    assert not must_wait(None, None)
    assert must_wait(MID, MID)  # an earlier attempt of its own, which is only releasing


def test_gate_verdicts() -> None:
    assert gate(MID, []) == "go"
    assert gate(MID, [YOUNG]) == "queue"
    assert gate(MID, [OLD]) == "go"  # it dies: the state machine votes NO
    assert gate(MID, [YOUNG, OLD]) == "go"
    assert gate(MID, [], claims=[YOUNG]) == "queue"  # see whether the younger one locks or dies first
    assert gate(MID, [OLD], claims=[YOUNG]) == "queue"
    assert gate(MID, [], claims=[OLD]) == "refuse"  # an older PREPARE is on its way in: do not overtake it
    assert gate(MID, [], queued=[OLD]) == "refuse"  # an older one has a place for the key: do not take it
    assert gate(MID, [YOUNG], queued=[YOUNG]) == "queue"
    assert gate(None, [YOUNG]) == "go"  # no priority: no-wait
    assert gate(None, []) == "go"
    assert gate(None, [], queued=[YOUNG]) == "refuse"  # never ahead of a transaction that waits
    assert gate(None, [], claims=[None]) == "go"  # two without priority: as before


def test_a_conflict_costs_the_budget_unless_it_lost_to_an_older_transaction() -> None:
    old, young = attempt_txid(OLD, 0), attempt_txid(YOUNG, 3)
    assert not conflict_charged(young, old)  # a die: retried with the same priority, not counted
    assert conflict_charged(old, young)  # the wait reached its bound (or a node without wait-die)
    assert conflict_charged(uuid.uuid4().hex, old)
    assert conflict_charged(young, uuid.uuid4().hex)
    assert conflict_charged(young, None)


def test_the_holder_is_read_from_the_conflict_message() -> None:
    holder = attempt_txid(OLD, 2)
    msg = f"transaction x aborted: key b'k' {LOCKED_BY}{holder}; retry"
    assert holder_of(msg) == holder
    tricky = f"transaction x aborted: key b'{LOCKED_BY}zz' {LOCKED_BY}{holder}; retry"
    assert holder_of(tricky) == holder
    assert holder_of("something else") is None


prios = st.one_of(st.none(), st.builds(new_priority, st.integers(0, 20), st.sampled_from(["a", "b", "c"])))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_no_cycle_of_waits_can_form(data: st.DataObject) -> None:
    """Any state of an edge: transactions (distinct priorities, or none) hold locks on its keys, have
    PREPAREs on their way in, and have places in the keys' queues, and each asks the gate about a set of
    keys.  Every "queued behind" the gate allows goes from a transaction to a strictly younger one or to
    one without a priority, which never queues: so that graph (over every edge of the cluster: the same
    rule holds at each) has no cycle.  (Nothing blocks on it anyway: a queued PREPARE is proposed at once;
    this is the classic wait-die property, which would keep even a blocking edge free of deadlock.)"""
    n = data.draw(st.integers(2, 8))
    # distinct priorities (two attempts of one transaction share one, but the earlier is only releasing)
    ages = data.draw(st.permutations(range(n)))
    txns = [None if data.draw(st.booleans()) and i % 3 == 0 else new_priority(age, "a")
            for i, age in enumerate(ages)]
    keys = data.draw(st.integers(1, 5))
    lock = {k: data.draw(st.integers(-1, n - 1)) for k in range(keys)}  # -1: free
    claims = {k: data.draw(st.lists(st.integers(0, n - 1), max_size=2)) for k in range(keys)}
    queued = {k: data.draw(st.lists(st.integers(0, n - 1), max_size=2)) for k in range(keys)}
    graph: dict[int, set[int]] = {}
    for t in range(n):
        wants = data.draw(st.lists(st.integers(0, keys - 1), min_size=1, max_size=keys, unique=True))
        held = [lock[k] for k in wants if lock[k] not in (-1, t)]
        claimed = [c for k in wants for c in claims[k] if c != t]
        waiting = [q for k in wants for q in queued[k] if q != t and txns[q] is not None]
        args = ([txns[h] for h in held], [txns[c] for c in claimed], [txns[q] for q in waiting])
        verdict = gate(txns[t], *args)
        targets = waits_for(txns[t], *args)
        if verdict != "queue":
            assert targets == []
            continue
        assert txns[t] is not None  # only a transaction with a priority ever waits
        for h in set(held + claimed):
            if txns[h] in targets:
                graph.setdefault(t, set()).add(h)
                assert txns[h] is None or txns[t] < txns[h]  # older waits for younger, never the reverse

    state: dict[int, int] = {}

    def cyclic(v: int) -> bool:
        state[v] = 1
        for w in graph.get(v, ()):
            if state.get(w) == 1 or (w not in state and cyclic(w)):
                return True
        state[v] = 2
        return False

    assert not any(cyclic(v) for v in range(n) if v not in state)


@settings(max_examples=200, deadline=None)
@given(st.lists(prios, min_size=1, max_size=6), st.lists(prios, max_size=3), st.lists(prios, max_size=3))
def test_the_oldest_transaction_never_dies(others_locks: list, others_claims: list, others_queued: list) -> None:
    """A transaction older than every other one at an edge is never refused and never proposed into an
    older lock: it locks the key, or waits (bounded) for the younger holders."""
    oldest = new_priority(-1 + 0, "0")
    queued = [q for q in others_queued if q is not None]
    verdict = gate(oldest, others_locks, others_claims, queued)
    assert verdict != "refuse"
    if others_locks or others_claims:
        assert verdict == "queue"


def _simulate(judge: object) -> tuple[int, int, list]:
    """One hot key at one edge, 8 clients each running transactions back to back, in a random interleaving
    of arrivals, log applies and commits.  Every PREPARE is judged by ``gate``; a queued one takes a place
    and is proposed; a NO vote or a refusal is a lost attempt, retried with the same priority.  A loss is
    charged only when ``conflict_charged`` says so.  Every client makes progress, and no transaction is
    charged more than once (its first attempt, which does not queue): one retry is always enough.
    Returns (most charged conflicts of one transaction, longest time one took, the clients)."""
    import random

    rnd = random.Random(7)
    clients = [{"prio": new_priority(0, f"{i:02x}"), "attempt": 0, "charged": 0, "done": 0, "busy": False}
               for i in range(8)]
    lock: tuple | None = None  # (priority, client) of the holder
    claims: list[tuple] = []  # (priority, client, queued) of PREPAREs on their way in, in log order
    places: dict[int, tuple] = {}  # client -> its priority, while it has a place in the key's queue
    worst = most = 0  # most charged conflicts of one transaction, longest time one took

    def lost(c: int, holder: tuple, queued: bool) -> None:
        nonlocal worst
        cl = clients[c]
        txid = attempt_txid(cl["prio"], cl["attempt"])
        note = " (queued for the key: not counted)" if queued else ""
        if conflict_charged(txid, attempt_txid(holder, 0), f"{LOCKED_BY}{attempt_txid(holder, 0)}; retry{note}"):
            cl["charged"] += 1
            worst = max(worst, cl["charged"])
        cl["attempt"] += 1
        cl["busy"] = False

    for clock in range(1, 6000):
        event = rnd.random()
        if event < 0.3 and claims:  # the next PREPARE in the log applies
            prio, c, queued = claims.pop(0)
            if lock is None:
                lock = (prio, c)
                places.pop(c, None)
            else:
                lost(c, lock[0], queued)
        elif event < 0.45 and lock is not None:  # the holder commits and releases
            c = lock[1]
            most = max(most, clock - clients[c]["prio"][0])
            clients[c].update(done=clients[c]["done"] + 1, busy=False, attempt=0, charged=0,
                              prio=new_priority(clock, f"{c:02x}"))  # its next transaction is a new one
            lock = None
        else:  # an idle client sends its PREPARE
            idle = [i for i, cl in enumerate(clients) if not cl["busy"]]
            if not idle:
                continue
            c = rnd.choice(idle)
            cl = clients[c]
            cl["busy"] = True
            verdict = judge(cl["prio"], [] if lock is None else [lock[0]], [p for p, _, _ in claims],
                           [p for o, p in places.items() if o != c], may_wait=cl["attempt"] >= 1)
            if verdict == "refuse":
                older = min(p for p in [q for q, _, _ in claims] + list(places.values()) if p < cl["prio"])
                lost(c, older, False)
            else:
                if verdict == "queue":
                    places[c] = cl["prio"]
                claims.append((cl["prio"], c, verdict == "queue"))
    return worst, most, clients


def test_hot_key_simulation_no_transaction_is_charged_twice() -> None:
    """``_simulate``: every client makes progress, no transaction is charged more than once (one retry is
    always enough), and the slowest transaction is faster than when younger ones may take a key an older
    one has a place for (refusals turned into places), and than with no-wait, where some run out."""
    worst, longest, clients = _simulate(gate)
    assert worst <= 1, clients
    assert all(cl["done"] > 0 for cl in clients), clients

    def no_refusals(*args: object, **kw: object) -> str:
        verdict = gate(*args, **kw)  # type: ignore[arg-type]
        return "queue" if verdict == "refuse" else verdict

    assert longest < _simulate(no_refusals)[1]
    assert _simulate(lambda *args, **kw: "go")[0] > 1  # no-wait: charged again and again


# -- the edge: TxnService.gate_prepare at a shard's leader (no I/O: a fake replica) ---------------------

class _Replica:
    def __init__(self) -> None:
        from raftkv.txn import TxnTable

        self.state = type("S", (), {})()
        self.state.txns = TxnTable()

    def is_leader(self) -> bool:
        return True

    def log_now_ms(self) -> int:
        return 5000


def _edge(wait_die: bool = True) -> tuple:
    from raftkv.server.api import Timing
    from raftkv.server.coordinator import TxnService

    node = type("N", (), {})()
    node.timing = Timing(txn_wait_die=wait_die)
    node.replicas = {0: _Replica()}
    return TxnService(node), node.replicas[0]


def _prepare(txid: str, key: bytes = b"hot") -> tuple:
    return ("tx_prepare", txid, 0, (), (("put", key, b"v"),), (), 123)


def _lock(replica: _Replica, key: bytes, txid: str) -> None:
    from raftkv.results import Locked

    replica.state.txns.locks[key] = Locked(key, txid, 0, 5000)


def test_edge_queues_a_loser_and_refuses_younger_ones_the_key() -> None:
    from raftkv.replica import APPLIED

    edge, replica = _edge()
    old, young, holder = new_priority(1, "a"), new_priority(5, "b"), new_priority(9, "c")
    _lock(replica, b"hot", attempt_txid(holder, 0))
    # the older one, after a first loss, queues behind the younger holder; it is proposed (and loses)
    sent, claim = edge.gate_prepare(0, _prepare(attempt_txid(old, 1)))
    assert sent[0] == "tx_prepare"
    vote = edge.ungate(claim, APPLIED, ("no", "conflict", (b"hot", attempt_txid(holder, 0), 0, 5000)))
    assert vote[3] == "queued"  # its loop does not count this loss
    # the holder lets go; a younger newcomer finds the key free but may not take it ahead of the queued one
    del replica.state.txns.locks[b"hot"]
    sent, claim = edge.gate_prepare(0, _prepare(attempt_txid(young, 0)))
    assert sent == ("tx_refuse", attempt_txid(young, 0), 0, 123)  # the refusal recovery sends
    vote = edge.ungate(claim, APPLIED, ("no", "refused", None))
    assert vote[:2] == ("no", "conflict") and vote[2][1] == attempt_txid(old, 1)  # a die, naming the older
    assert not conflict_charged(attempt_txid(young, 0), vote[2][1])
    # the queued one comes back and gets the key; its place ends
    sent, claim = edge.gate_prepare(0, _prepare(attempt_txid(old, 2)))
    assert sent[0] == "tx_prepare"
    edge.ungate(claim, APPLIED, ("yes", True, (True,), ()))
    sent, _ = edge.gate_prepare(0, _prepare(attempt_txid(young, 1), b"other"))
    assert sent[0] == "tx_prepare"


def test_edge_first_attempts_and_plain_ids_are_no_wait() -> None:
    from raftkv.replica import APPLIED

    edge, replica = _edge()
    _lock(replica, b"hot", attempt_txid(YOUNG, 0))
    for txid in (attempt_txid(OLD, 0), uuid.uuid4().hex):  # a first attempt; an id without priority
        sent, claim = edge.gate_prepare(0, _prepare(txid))
        assert sent[0] == "tx_prepare"
        assert len(edge.ungate(claim, APPLIED, ("no", "conflict", (b"hot", "x", 0, 1)))) == 3  # not queued
    assert not edge.gate._queued.get(0)


def test_edge_a_prepare_on_its_way_in_counts_as_a_holder() -> None:
    edge, _ = _edge()
    sent, first = edge.gate_prepare(0, _prepare(attempt_txid(MID, 0)))  # proposed, not applied yet
    assert sent[0] == "tx_prepare"
    assert edge.gate_prepare(0, _prepare(attempt_txid(YOUNG, 0)))[0][0] == "tx_refuse"  # an older one is coming
    sent, claim = edge.gate_prepare(0, _prepare(attempt_txid(OLD, 1)))  # a younger one is coming: queue
    assert sent[0] == "tx_prepare" and claim[4] is True
    edge.ungate(first)
    edge.ungate(claim)
    assert not edge.gate._claims.get(0)


def test_edge_off_changes_nothing() -> None:
    edge, replica = _edge(wait_die=False)
    _lock(replica, b"hot", attempt_txid(YOUNG, 0))
    cmd = _prepare(attempt_txid(OLD, 3))
    assert edge.gate_prepare(0, cmd) == (cmd, None)

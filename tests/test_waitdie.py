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
    assert gate(MID, [YOUNG]) == "wait"
    assert gate(MID, [OLD]) == "go"  # it dies: the state machine votes NO
    assert gate(MID, [YOUNG, OLD]) == "go"
    assert gate(MID, [], claims=[YOUNG]) == "wait"  # see whether the younger one locks or dies first
    assert gate(MID, [OLD], claims=[YOUNG]) == "wait"
    assert gate(MID, [], claims=[OLD]) == "refuse"  # an older PREPARE is on its way in: do not overtake it
    assert gate(MID, [], queued=[OLD]) == "refuse"  # an older one waits for the key: do not take it first
    assert gate(MID, [YOUNG], queued=[YOUNG]) == "wait"
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
    PREPAREs on their way in, and have PREPAREs held back, and each asks the gate about a set of keys.
    Every wait the gate allows goes from a transaction to a strictly younger one or to one without a
    priority, which never waits: so the waits-for graph (over every edge of the cluster: the same rule
    holds at each) has no cycle, and nothing deadlocks."""
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
        if verdict != "wait":
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
        assert verdict == "wait"


def test_hot_key_simulation_every_transaction_commits_oldest_first() -> None:
    """One hot key at one edge, 8 clients each running transactions back to back: every PREPARE is judged
    by ``gate``; a NO vote is a die (same priority next attempt), a refusal likewise.  Every transaction
    commits, and none loses to a younger one (so none is charged against a budget)."""
    import random

    rnd = random.Random(7)
    clock = 0
    clients = [{"prio": new_priority(0, f"{i:02x}"), "dies": 0, "done": 0} for i in range(8)]
    lock: tuple | None = None  # (priority, client) of the holder
    claims: list[tuple] = []  # PREPAREs on their way in, in log order
    held: list[int] = []
    charged = 0
    for _step in range(4000):
        clock += 1
        event = rnd.random()
        if event < 0.3 and claims:  # the next PREPARE in the log applies
            prio, c = claims.pop(0)
            if lock is None:
                lock = (prio, c)
            else:
                if not conflict_charged(attempt_txid(prio, 0), attempt_txid(lock[0], 0)):
                    clients[c]["dies"] += 1
                else:
                    charged += 1
                clients[c]["prio"] = prio  # retried with the same priority
                clients[c]["retry"] = True
        elif event < 0.45 and lock is not None:  # the holder commits and releases
            c = lock[1]
            clients[c]["done"] += 1
            clients[c]["prio"] = new_priority(clock, f"{c:02x}")  # its next transaction is a new one
            clients[c]["busy"] = False
            lock = None
        elif event < 0.6:  # held PREPAREs are re-judged, oldest first
            for c in sorted(held, key=lambda c: clients[c]["prio"]):
                verdict = gate(clients[c]["prio"], [] if lock is None else [lock[0]],
                               [p for p, _ in claims], [clients[h]["prio"] for h in held if h != c
                                                         and clients[h]["prio"] < clients[c]["prio"]])
                if verdict != "wait":
                    held.remove(c)
                    if verdict == "go":
                        claims.append((clients[c]["prio"], c))
                    else:
                        clients[c]["dies"] += 1
                        clients[c]["busy"] = False
        else:  # an idle client sends a PREPARE
            idle = [i for i, cl in enumerate(clients) if not cl.get("busy")]
            if not idle:
                continue
            c = rnd.choice(idle)
            clients[c]["busy"] = True
            prio = clients[c]["prio"]
            verdict = gate(prio, [] if lock is None else [lock[0]], [p for p, _ in claims],
                           [clients[h]["prio"] for h in held])
            if verdict == "wait":
                held.append(c)
            elif verdict == "go":
                claims.append((prio, c))
            else:
                clients[c]["dies"] += 1
                clients[c]["busy"] = False
        for cl in clients:  # a client whose PREPARE died is idle again
            if cl.pop("retry", False):
                cl["busy"] = False
    assert charged == 0
    assert all(cl["done"] > 0 for cl in clients), clients

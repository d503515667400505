"""The set checker (`jepsen_like.sets`): a hand-made history for every verdict, and on small random histories
agreement with two independent judges of each element's linearizability (a brute force over orders, and the
WGL checker on the element's history as a register), plus soundness against a brute force over the whole set.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jepsen_like.checker import LINEARIZABLE, check
from jepsen_like.history import UNKNOWN, Event, Op, ops_from_events
from jepsen_like.models import get_model
from jepsen_like.sets import INVALID, UNKNOWN_VERDICT, VALID, SetHistoryError, check_set

from .conftest import examples

# (process, f, value, call, ret, status): value is the element of an add, the list read by a read; ret None =
# an indeterminate op that never completes.
Spec = tuple[Any, str, Any, float, float | None, str]


def history(*specs: Spec) -> list[Op]:
    events = []
    for p, f, value, call, ret, status in specs:
        events.append(Event(p, "invoke", f, None, value if f == "add" else None, call))
        if ret is not None:
            events.append(Event(p, status, f, None, value if f == "read" else None, ret))
    events.sort(key=lambda e: (e.time, e.type != "invoke"))
    return ops_from_events(events)


def add(p: Any, e: str, call: float, ret: float | None, status: str = "ok") -> Spec:
    return (p, "add", e, call, ret, status)


def read(p: Any, seen: list[str], call: float, ret: float) -> Spec:
    return (p, "read", seen, call, ret, "ok")


# -- one hand-made history per verdict --------------------------------------------------------------------

def test_every_acknowledged_add_read_back_is_valid() -> None:
    r = check_set(history(add(0, "a", 0, 1), add(1, "b", 0, 2, "info"), read(2, ["a"], 3, 4),
                          read("final", ["a", "b"], 5, 6)))
    assert r.verdict == VALID and r.ok is True
    assert r.stable == 2 and r.recovered == ["b"] and not (r.lost or r.stale or r.unexpected)


def test_an_acknowledged_add_missing_from_the_final_read_is_lost() -> None:
    r = check_set(history(add(0, "a", 0, 1), add(1, "b", 0, 1), read("final", ["b"], 2, 3)))
    assert r.verdict == INVALID and list(r.lost) == ["a"] and r.anomalies == {"lost": 1}
    assert "missing from" in r.lost["a"] and r.to_dict()["anomaly_types"] == ["lost"]


def test_an_element_seen_and_then_gone_is_lost_even_if_its_add_was_indeterminate() -> None:
    r = check_set(history(add(0, "a", 0, None, "info"), add(1, "b", 0, 1), read(2, ["a", "b"], 1, 2),
                          read("final", ["b"], 3, 4)))
    assert r.verdict == INVALID and list(r.lost) == ["a"]


def test_a_read_missing_an_element_that_comes_back_later_is_stale() -> None:
    h = history(add(0, "a", 0, 1), read(1, [], 2, 3), read("final", ["a"], 4, 5))
    strict = check_set(h)
    assert strict.verdict == INVALID and list(strict.stale) == ["a"] and strict.anomalies == {"stale": 1}
    assert strict.stale_latency_s_max == 1.0  # the read began 1 s after the add was acknowledged
    relaxed = check_set(h, linearizable=False)  # Jepsen's set-full without :linearizable?: stale is allowed
    assert relaxed.verdict == VALID and list(relaxed.stale) == ["a"] and relaxed.anomalies == {}


def test_an_element_known_from_a_read_must_be_in_every_later_read() -> None:
    r = check_set(history(add(0, "a", 0, 10), read(1, ["a"], 1, 2), read(2, [], 3, 4), read(3, ["a"], 5, 6)))
    assert r.verdict == INVALID and list(r.stale) == ["a"]  # not acknowledged yet, but already seen


def test_reads_concurrent_with_the_add_may_miss_it() -> None:
    r = check_set(history(add(0, "a", 0, 3), read(1, [], 1, 2), read(2, ["a"], 1, 2), read(3, [], 2, 5),
                          read("final", ["a"], 6, 7)))
    assert r.verdict == VALID and not r.stale


def test_a_read_invoked_the_instant_the_add_returns_is_concurrent_with_it() -> None:
    assert check_set(history(add(0, "a", 0, 1), read(1, [], 1, 2), read("final", ["a"], 3, 4))).verdict == VALID


@pytest.mark.parametrize("specs, why", [
    ([read(1, ["zz"], 0, 1)], "nobody tried to add it"),
    ([add(0, "a", 0, 1, "fail"), read(1, ["a"], 2, 3)], "its add failed"),
    ([read(1, ["a"], 0, 1), add(0, "a", 2, 3)], "before its add was invoked"),
])
def test_an_element_nobody_can_have_added_is_unexpected(specs: list[Spec], why: str) -> None:
    r = check_set(history(*specs, add(5, "b", 0, 1), read("final", ["b"], 4, 5)))
    assert r.verdict == INVALID and len(r.unexpected) == 1 and why in next(iter(r.unexpected.values()))


def test_an_element_read_twice_in_one_read_is_duplicated() -> None:
    r = check_set(history(add(0, "a", 0, 1), read("final", ["a", "a"], 2, 3)))
    assert r.verdict == INVALID and r.duplicated == {"a": 2}


def test_indeterminate_adds_nobody_saw_are_never_read_and_fine() -> None:
    r = check_set(history(add(0, "a", 0, None, "info"), add(1, "b", 0, 1), read("final", ["b"], 2, 3)))
    assert r.verdict == VALID and r.never_read == ["a"] and r.recovered == []


@pytest.mark.parametrize("specs", [
    [add(0, "a", 0, 1)],  # never read
    [add(0, "a", 0, 1, "fail"), read(1, [], 2, 3)],  # read, but nothing was ever in the set
])
def test_a_history_that_checks_nothing_is_unknown(specs: list[Spec]) -> None:
    r = check_set(history(*specs))
    assert r.verdict == UNKNOWN_VERDICT and r.ok is None and r.reason


def test_the_last_read_stands_for_the_final_read_when_no_final_process_read() -> None:
    r = check_set(history(add(0, "a", 0, 5, "info"), read(1, [], 1, 2), read(2, ["a"], 6, 7)))
    assert r.final_reads == 1 and r.recovered == ["a"] and r.verdict == VALID


def test_a_history_that_is_not_a_set_history_is_refused() -> None:
    with pytest.raises(SetHistoryError, match="added twice"):
        check_set(history(add(0, "a", 0, 1), add(1, "a", 0, 1)))
    with pytest.raises(SetHistoryError, match="add and read operations only"):
        check_set(history((0, "put", "a", 0, 1, "ok")))


# -- random small histories against independent judges ----------------------------------------------------

ELEMENTS = ("e0", "e1", "e2")


@st.composite
def set_histories(draw: st.DrawFn) -> list[Op]:
    """Up to 3 adds (ok / info / fail) and 1-4 ok reads (the first maybe of process "final") with integer
    times (ties are common).  A read shows the adds (not failed) invoked before it began, or any subset of
    those invoked before it returned (the lost and stale cases), and now and then another element (one
    nobody added, a failed add's, one added later)."""
    specs: list[Spec] = []
    calls: dict[str, float] = {}
    for i, e in enumerate(draw(st.lists(st.sampled_from(ELEMENTS), max_size=3, unique=True))):
        call = draw(st.integers(0, 8))
        status = draw(st.sampled_from(["ok", "ok", "info", "fail"]))
        if status != "fail":
            calls[e] = call
        ret = None if status == "info" else call + draw(st.integers(0, 4))
        specs.append(add(f"a{i}", e, call, ret, status))
    for i in range(draw(st.integers(1, 4))):
        call = draw(st.integers(0, 10))
        ret = call + draw(st.integers(0, 4))
        if draw(st.booleans()):
            seen = [e for e, c in calls.items() if c < call]
        else:
            seen = [e for e, c in calls.items() if c <= ret and draw(st.booleans())]
        if draw(st.integers(0, 9)) == 0:
            seen.append(draw(st.sampled_from([e for e in (*ELEMENTS, "zz") if e not in seen])))
        specs.append(read("final" if i == 0 and draw(st.booleans()) else f"r{i}", seen, call, ret))
    return history(*specs)


def _projection(ops: list[Op], e: str) -> list[Op]:
    """The element's history as a register: its add a put of 1, each ok read a get of 1 (shown) or None."""
    out = []
    for op in ops:
        if op.f == "add" and op.input == e:
            out.append(Op(len(out), op.client, "put", e, "1", None if op.status == "ok" else UNKNOWN, op.call,
                          op.ret, op.status))
        elif op.f == "read" and op.status == "ok":
            out.append(Op(len(out), op.client, "get", e, None, "1" if e in op.output else None, op.call, op.ret,
                          "ok"))
    return out


def _before(x: Op, y: Op) -> bool:
    """x returned before y was invoked (closed intervals: equal times are concurrent)."""
    return x.ret < y.call


def brute_force_element(ops: list[Op], e: str) -> bool:
    """True if some order of the element's add (skipped if it failed, optional if indeterminate) and the ok
    reads respects real time and has every read see the element exactly when the add came before it."""
    adds = [op for op in ops if op.f == "add" and op.input == e and op.status != "fail"]
    reads = [op for op in ops if op.f == "read" and op.status == "ok"]
    choices = [adds] if adds and adds[0].status == "ok" else [adds, []]
    for chosen in choices:
        for order in itertools.permutations(chosen + reads):
            if any(_before(order[j], order[i]) for i in range(len(order)) for j in range(i + 1, len(order))):
                continue
            present = False
            for op in order:
                if op.f == "add":
                    present = True
                elif (e in op.output) != present:
                    break
            else:
                return True
    return False


def brute_force_set(ops: list[Op]) -> bool:
    """True if the whole set history is linearizable: one order of the ok adds, any of the info adds and
    the ok reads, respecting real time, in which every read returns exactly the set added so far."""
    live = [op for op in ops if op.status != "fail" and (op.f == "add" or op.status == "ok")]
    n = len(live)

    def search(done: frozenset[int], added: frozenset[str], seen: set[frozenset[int]]) -> bool:
        if all(i in done or live[i].status == "info" for i in range(n)):
            return True
        if done in seen:
            return False
        seen.add(done)
        for i in range(n):
            if i in done or any(j not in done and _before(live[j], live[i]) for j in range(n)):
                continue
            op = live[i]
            if op.f == "add":
                if search(done | {i}, added | {op.input}, seen):
                    return True
            elif set(op.output) == added and search(done | {i}, added, seen):
                return True
        return False

    # An info add never returns, so it precedes nothing in real time: leaving it out of the order is
    # the add that never took effect.  The set added so far is a function of ``done``: memo on it.
    return search(frozenset(), frozenset(), set())


def _elements(ops: list[Op]) -> set[str]:
    found = {op.input for op in ops if op.f == "add"}
    for op in ops:
        if op.f == "read" and op.status == "ok":
            found |= set(op.output)
    return found


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(set_histories())
def test_each_violation_is_exactly_an_element_whose_own_history_is_not_linearizable(ops: list[Op]) -> None:
    r = check_set(ops)
    flagged = set(r.lost) | set(r.stale) | set(r.unexpected)
    assert not set(r.lost) & set(r.stale)
    kv = get_model("kv")
    for e in _elements(ops):
        by_search = brute_force_element(ops, e)
        assert by_search == (check(_projection(ops, e), kv).verdict == LINEARIZABLE), e
        assert (e not in flagged) == by_search, (e, r.summary(), [op.describe() for op in ops])
    assert (r.verdict == INVALID) == bool(flagged)
    relaxed = check_set(ops, linearizable=False)
    assert (relaxed.verdict == INVALID) == bool(r.lost or r.unexpected)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(set_histories())
def test_a_linearizable_set_history_is_never_reported_invalid(ops: list[Op]) -> None:
    if brute_force_set(ops):
        assert check_set(ops).verdict != INVALID, [op.describe() for op in ops]


@settings(max_examples=examples(300), deadline=None)
@given(set_histories())
def test_acknowledged_adds_missing_from_a_last_read_after_every_add_are_lost(ops: list[Op]) -> None:
    """Jepsen's plain set check, on the histories where it applies: the last read began after every add
    returned and no read began after it."""
    reads = [op for op in ops if op.f == "read" and op.status == "ok"]
    adds = [op for op in ops if op.f == "add"]
    last = max(reads, key=lambda r: r.call)
    if any(r is not last and r.call >= last.call for r in reads) or any(a.ret >= last.call for a in adds
                                                                         if a.ret != math.inf):
        return
    r = check_set(ops)
    missing = {a.input for a in adds if a.status == "ok"} - set(last.output)
    assert missing - set(r.unexpected) <= set(r.lost)  # unless an earlier read already showed it too early

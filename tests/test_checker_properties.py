"""Linearizability checker: properties against a brute-force checker, model and semantics unit tests, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jepsen_like.checker import LINEARIZABLE, NOT_LINEARIZABLE, UNKNOWN_VERDICT, check
from jepsen_like.cli import main
from jepsen_like.history import (
    UNKNOWN,
    Event,
    HistoryError,
    Op,
    detect_format,
    ops_from_events,
    parse_jepsen_log,
    parse_jsonl,
    parse_porcupine_kv,
    to_jsonl,
)
from jepsen_like.models import ILLEGAL, KVModel, TxnModel, get_model
from jepsen_like.timeline import render_timeline

from .conftest import examples

INF = math.inf


def mk(i: int, f: str, key, inp, out, call: float, ret: float, status: str = "ok", client=None) -> Op:
    if status == "info":
        out, ret = UNKNOWN, INF
    return Op(i, i if client is None else client, f, key, inp, out, call, ret, status)


# ---------------------------------------------------------------- brute force reference


def brute_force(ops: list[Op], model, keyed: bool) -> bool:
    """Try every order consistent with real time; info ops may be left out (= never took effect)."""
    enc = [(op, model.encode(op)) for op in ops if op.status != "fail"]
    enc = [(op, io) for op, io in enc if io is not None]
    n = len(enc)
    must = sum(1 << i for i, (op, _) in enumerate(enc) if op.status == "ok")

    def dfs(done: int, states: dict) -> bool:
        if done & must == must:
            return True
        for i, (op, io) in enumerate(enc):
            if done >> i & 1:
                continue
            if any(not done >> j & 1 and enc[j][0].ret < op.call for j in range(n)):
                continue  # some op that finished before this one started is still pending
            k = op.key if keyed else None
            ok, ns = model.step(states.get(k, model.init()), *io)
            if ok and dfs(done | 1 << i, {**states, k: ns}):
                return True
        return False

    return dfs(0, {})


# ---------------------------------------------------------------- generators

VALUES = st.sampled_from([None, 0, 1, 2])
STATUS = st.sampled_from(["ok", "ok", "ok", "ok", "info", "fail"])


@st.composite
def kv_histories(draw, max_ops: int = 7, keys=("a", "b")):
    """A history from a sequential run: op i takes effect at 10*i+5, inside [call, ret]."""
    n = draw(st.integers(1, max_ops))
    store: dict = {}
    ops = []
    for i in range(n):
        f = draw(st.sampled_from(["get", "get", "put", "cas", "delete"]))
        key = draw(st.sampled_from(keys))
        status = draw(STATUS)
        if f == "get" and status == "fail":
            status = "ok"
        applies = status == "ok" or (status == "info" and draw(st.booleans()))
        lin = 10 * i + 5
        call, ret = lin - draw(st.integers(0, 30)), lin + draw(st.integers(0, 30))
        cur = store.get(key)
        if f == "get":
            inp, out = None, cur
        elif f == "put":
            v = draw(st.integers(0, 2))
            inp, out = v, v
            if applies:
                store[key] = v
        elif f == "cas":
            exp, new = draw(VALUES), draw(st.integers(0, 2))
            inp, out = [exp, new], cur == exp
            if status == "fail":
                out = False
            if applies and cur == exp:
                store[key] = new
        else:
            inp, out = None, None
            if applies:
                store.pop(key, None)
        ops.append(mk(i, f, key, inp, out, call, ret, status))
    return ops


@st.composite
def mutated(draw, base):
    ops = list(draw(base))
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(ops) - 1))
        op = ops[i]
        how = draw(st.sampled_from(["output", "interval", "status"]))
        if how == "output" and op.status == "ok" and op.f in ("get", "cas"):
            out = draw(VALUES) if op.f == "get" else not op.output
            op = mk(op.index, op.f, op.key, op.input, out, op.call, op.ret)
        elif how == "interval" and op.status != "info":
            a, b = sorted((draw(st.integers(0, 80)), draw(st.integers(0, 80))))
            op = mk(op.index, op.f, op.key, op.input, op.output, a, b, op.status)
        elif how == "status":
            st_ = draw(st.sampled_from(["ok", "info", "fail"]))
            out = op.output if op.output is not UNKNOWN else (None if op.f != "cas" else True)
            ret = op.ret if op.ret != INF else op.call + 10
            op = mk(op.index, op.f, op.key, op.input, out, op.call, ret, st_)
        ops[i] = op
    return ops


@st.composite
def txn_histories(draw, max_ops: int = 6):
    """Multi-key transactions from a sequential run (reads see the txn's own writes)."""
    n = draw(st.integers(1, max_ops))
    store: dict = {}
    ops = []
    keys = st.sampled_from(["a", "b", "c"])
    for i in range(n):
        status = draw(st.sampled_from(["ok", "ok", "ok", "info"]))
        applies = status == "ok" or draw(st.booleans())
        view = dict(store)
        lin = 10 * i + 5
        call, ret = lin - draw(st.integers(0, 30)), lin + draw(st.integers(0, 30))

        def run(micro, view=view):
            done = []
            for kind, k, v in micro:
                if kind == "r":
                    done.append(["r", k, view.get(k)])
                else:
                    if v is None:
                        view.pop(k, None)
                    else:
                        view[k] = v
                    done.append(["w", k, v])
            return done

        micro = st.lists(st.tuples(st.sampled_from(["r", "w"]), keys, st.sampled_from([None, 1, 2])), max_size=3)
        if draw(st.booleans()):
            inp = [[k, kk, None if k == "r" else v] for k, kk, v in draw(micro)]
            out = run(inp)
        else:
            cmps = [[draw(keys), draw(VALUES)]]
            then = [[k, kk, None if k == "r" else v] for k, kk, v in draw(micro)]
            els = [[k, kk, None if k == "r" else v] for k, kk, v in draw(micro)]
            holds = all(view.get(k) == v for k, v in cmps)
            inp = {"if": cmps, "then": then, "else": els}
            out = {"branch": "then" if holds else "else", "ops": run(then if holds else els)}
        if applies:
            store = view
        ops.append(mk(i, "txn", None, inp, out, call, ret, status))
    return ops


@st.composite
def txn_mutated(draw):
    ops = list(draw(txn_histories()))
    i = draw(st.integers(0, len(ops) - 1))
    op = ops[i]
    if op.status == "ok" and isinstance(op.input, list) and any(m[0] == "r" for m in op.output):
        out = [[m[0], m[1], draw(VALUES)] if m[0] == "r" else m for m in op.output]
        ops[i] = mk(op.index, op.f, None, op.input, out, op.call, op.ret)
    elif op.status == "ok" and isinstance(op.input, dict):
        out = dict(op.output, branch="else" if op.output["branch"] == "then" else "then", ops=None)
        ops[i] = mk(op.index, op.f, None, op.input, out, op.call, op.ret)
    else:
        a, b = sorted((draw(st.integers(0, 60)), draw(st.integers(0, 60))))
        ops[i] = mk(op.index, op.f, None, op.input, op.output, a, b, "ok" if op.status == "ok" else "info")
    return ops


FAST = settings(max_examples=examples(250), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(kv_histories())
def test_sequential_runs_are_linearizable(ops):
    assert check(ops, get_model("kv")).verdict == LINEARIZABLE
    assert brute_force(ops, get_model("kv"), keyed=True)


@FAST
@given(kv_histories(keys=("k",)))
def test_register_sequential_runs_are_linearizable(ops):
    assert check(ops, get_model("register")).verdict == LINEARIZABLE


@FAST
@given(mutated(kv_histories()))
def test_mutated_histories_agree_with_brute_force(ops):
    model = get_model("kv")
    expected = LINEARIZABLE if brute_force(ops, model, keyed=True) else NOT_LINEARIZABLE
    assert check(ops, model).verdict == expected


@FAST
@given(mutated(kv_histories(keys=("k",))))
def test_mutated_register_agrees_with_brute_force(ops):
    model = get_model("register")
    expected = LINEARIZABLE if brute_force(ops, model, keyed=False) else NOT_LINEARIZABLE
    res = check(ops, model)
    assert res.verdict == expected
    if expected == NOT_LINEARIZABLE:
        assert res.failing_ops
        assert len(res.longest_prefix) < len(res.failed_partition)


@FAST
@given(txn_histories())
def test_txn_sequential_runs_are_serializable(ops):
    assert check(ops, TxnModel()).verdict == LINEARIZABLE


@FAST
@given(txn_mutated())
def test_txn_mutated_agree_with_brute_force(ops):
    model = TxnModel()
    expected = LINEARIZABLE if brute_force(ops, model, keyed=False) else NOT_LINEARIZABLE
    assert check(ops, model).verdict == expected


@settings(max_examples=100, deadline=None)
@given(mutated(kv_histories()))
def test_jsonl_round_trip_keeps_verdict(ops):
    back = parse_jsonl(to_jsonl(ops))
    assert len(back) == len(ops)
    assert check(back, get_model("kv")).verdict == check(ops, get_model("kv")).verdict


# ---------------------------------------------------------------- models


def test_kv_model_steps():
    m = get_model("kv")
    s = m.init()
    assert s is None
    assert m.step(s, ("get",), None) == (True, None)
    assert m.step(s, ("get",), 1) == (False, None)
    assert m.step(s, ("put", 3), None) == (True, 3)
    assert m.step(3, ("cas", 3, 4), True) == (True, 4)
    assert m.step(2, ("cas", 3, 4), True) == (False, 2)
    assert m.step(2, ("cas", 3, 4), False) == (True, 2)
    assert m.step(3, ("cas", 3, 4), False) == (False, 3)
    assert m.step(3, ("cas", 3, 4), UNKNOWN) == (True, 4)
    assert m.step(2, ("cas", 3, 4), UNKNOWN) == (True, 2)
    assert m.step(3, ("delete",), None) == (True, None)
    assert m.compile(("get",), 5)(4) is ILLEGAL


def test_append_model_and_encoding():
    m = get_model("kv-append")
    assert m.init() == ""
    assert m.step("x", ("append", "y"), None) == (True, "xy")
    assert m.encode(mk(0, "get", "k", None, "", 0, 1)) == (("get",), "")
    assert m.encode(mk(0, "get", "k", None, None, 0, 1, "info")) is None  # indeterminate read: no constraint
    assert m.encode(mk(0, "put", "k", "v", None, 0, 1, "fail")) is None
    ops = [mk(0, "put", "a", "1", None, 0, 1), mk(1, "get", "b", None, "", 0, 1), mk(2, "get", "a", None, "1", 2, 3)]
    assert sorted(len(p) for p in m.partition(ops)) == [1, 2]


def test_etcd_model_read_nil_only_before_first_write():
    m = get_model("etcd")
    assert m.partition([mk(0, "read", None, None, None, 0, 1), mk(1, "write", None, 1, 1, 2, 3)])[0]
    inp, out = m.encode(mk(0, "cas", None, [1, 2], [1, 2], 0, 1))
    assert m.step(1, inp, out) == (True, 2)
    assert m.step(None, *m.encode(mk(0, "read", None, None, None, 0, 1))) == (True, None)
    assert m.step(0, *m.encode(mk(0, "read", None, None, None, 0, 1)))[0] is False


def test_txn_model_steps_and_partition():
    m = TxnModel()
    op = mk(0, "txn", None, [["r", "a", None], ["w", "b", "1"], ["r", "b", None]],
            [["r", "a", None], ["w", "b", "1"], ["r", "b", "1"]], 0, 1)
    ok, s = m.step(m.init(), *m.encode(op))
    assert ok and s == (("b", "1"),)
    bad = mk(0, "txn", None, op.input, [["r", "a", "9"], ["w", "b", "1"], ["r", "b", "1"]], 0, 1)
    assert m.step(m.init(), *m.encode(bad))[0] is False
    cond = {"if": [["b", "1"]], "then": [["w", "c", "x"]], "else": [["w", "c", "y"]]}
    ok, s2 = m.step(s, *m.encode(mk(1, "txn", None, cond, {"branch": "then"}, 2, 3)))
    assert ok and dict(s2) == {"b": "1", "c": "x"}
    assert m.step(s, *m.encode(mk(1, "txn", None, cond, {"branch": "else"}, 2, 3)))[0] is False
    assert m.step(s, *m.encode(mk(1, "txn", None, cond, None, 2, 3, "info"))) == (True, s2)
    ops = [op, mk(1, "txn", None, [["w", "c", "1"], ["w", "d", "1"]], None, 0, 1),
           mk(2, "txn", None, [["r", "e", None]], [["r", "e", None]], 0, 1),
           mk(3, "put", "d", "2", None, 2, 3)]
    assert sorted(len(p) for p in m.partition(ops)) == [1, 1, 2]


def test_unknown_model_name():
    with pytest.raises(ValueError):
        get_model("nope")


# ---------------------------------------------------------------- info / fail / timing semantics

KV = KVModel()


def verdict(ops, model=KV):
    return check(ops, model).verdict


def test_info_write_may_take_effect_later():
    ops = [mk(0, "put", "k", 1, None, 0, 1, "info"), mk(1, "get", "k", None, 1, 5, 6)]
    assert verdict(ops) == LINEARIZABLE


def test_info_write_may_never_take_effect():
    ops = [mk(0, "put", "k", 1, None, 0, 1, "info"), mk(1, "get", "k", None, None, 5, 6)]
    assert verdict(ops) == LINEARIZABLE


def test_info_write_cannot_take_effect_before_invocation():
    ops = [mk(0, "get", "k", None, 1, 0, 1), mk(1, "put", "k", 1, None, 5, 6, "info")]
    assert verdict(ops) == NOT_LINEARIZABLE


def test_info_write_cannot_come_and_go():
    ops = [mk(0, "put", "k", 1, None, 0, 1, "info"), mk(1, "get", "k", None, 1, 5, 6),
           mk(2, "get", "k", None, None, 7, 8)]
    assert verdict(ops) == NOT_LINEARIZABLE


def test_failed_write_has_no_effect():
    ops = [mk(0, "put", "k", 1, None, 0, 1, "fail"), mk(1, "get", "k", None, 1, 5, 6)]
    assert verdict(ops) == NOT_LINEARIZABLE


def test_timed_out_read_constrains_nothing():
    log = "\n".join([
        "INFO  jepsen.util - 0\t:invoke\t:write\t1",
        "INFO  jepsen.util - 0\t:ok\t:write\t1",
        "INFO  jepsen.util - 1   :invoke :read   nil",
        "INFO  jepsen.util - 1   :fail   :read   :timed-out",
        "INFO  jepsen.util - 2\t:invoke\t:cas\t[3 0]",
        "INFO  jepsen.util - 2\t:fail\t:cas\t[3 0]",
        "INFO  jepsen.util - 3\t:invoke\t:read\tnil",
        "INFO  jepsen.util - 3\t:ok\t:read\t1",
    ])
    ops = parse_jepsen_log(log)
    assert [op.status for op in ops] == ["ok", "fail", "fail", "ok"]
    assert ops[3].output == 1 and ops[2].input == [3, 0]
    assert verdict(ops, get_model("etcd")) == LINEARIZABLE


def test_closed_intervals_and_strict_order():
    # ret == call: concurrent (closed intervals), so the read may go first
    touching = [mk(0, "put", "k", 1, None, 0, 5), mk(1, "get", "k", None, None, 5, 6)]
    assert verdict(touching) == LINEARIZABLE
    # ret < call: the put is over before the read starts
    apart = [mk(0, "put", "k", 1, None, 0, 4.9), mk(1, "get", "k", None, None, 5, 6)]
    assert verdict(apart) == NOT_LINEARIZABLE


def test_line_order_is_the_clock_without_times():
    evs = [Event(0, "invoke", "put", "k", 1), Event(0, "ok", "put", "k", 1),
           Event(1, "invoke", "get", "k"), Event(1, "ok", "get", "k", None)]
    assert verdict(ops_from_events(evs)) == NOT_LINEARIZABLE
    timed = [Event(0, "invoke", "put", "k", 1, 0.0), Event(1, "invoke", "get", "k", None, 0.5),
             Event(0, "ok", "put", "k", 1, 1.0), Event(1, "ok", "get", "k", None, 1.5)]
    assert verdict(ops_from_events(timed)) == LINEARIZABLE


def test_open_invocation_at_end_is_indeterminate():
    ops = ops_from_events([Event(0, "invoke", "put", "k", 1), Event(1, "invoke", "get", "k"),
                           Event(1, "ok", "get", "k", 1)])
    assert ops[0].status == "info" and ops[0].ret == INF
    assert verdict(ops) == LINEARIZABLE


def test_history_errors():
    with pytest.raises(HistoryError):
        ops_from_events([Event(0, "ok", "get", "k", 1)])
    with pytest.raises(HistoryError):
        ops_from_events([Event(0, "invoke", "get", "k"), Event(0, "invoke", "get", "k")])
    with pytest.raises(HistoryError):
        parse_jsonl("{not json}\n")


def test_parsers_and_detection():
    edn = '{:process 0, :type :invoke, :f :get, :key "5", :value nil}\n{:process 0, :type :ok, :f :get, :key "5", :value "x 0 1 y"}\n'
    (op,) = parse_porcupine_kv(edn)
    assert (op.f, op.key, op.input, op.output) == ("get", "5", None, "x 0 1 y")
    assert detect_format(edn) == "porcupine-kv"
    assert detect_format("INFO  jepsen.util - 0\t:invoke\t:read\tnil\n") == "jepsen-log"
    assert detect_format('{"process": 1}\n') == "jsonl"
    assert detect_format("", "h.log") == "jepsen-log"


# ---------------------------------------------------------------- limits


def hard_history(n: int = 16) -> list[Op]:
    """n concurrent writes of distinct values, then a read of a value never written: 2^n subsets to refute."""
    ops = [mk(i, "put", "k", i, None, 0, 100) for i in range(n)]
    ops.append(mk(n, "get", "k", None, 999, 101, 102))
    return ops


def test_unknown_on_state_limit():
    res = check(hard_history(), KV, max_states=1000)
    assert res.verdict == UNKNOWN_VERDICT
    assert "state" in res.reason and not res.ok


def test_unknown_on_timeout():
    res = check(hard_history(22), KV, timeout_s=0.01)
    assert res.verdict == UNKNOWN_VERDICT
    assert "time" in res.reason and not res.ok


def test_small_hard_history_is_refuted():
    res = check(hard_history(8), KV)
    assert res.verdict == NOT_LINEARIZABLE
    assert [op.index for op in res.failing_ops] == [8]
    assert len(res.longest_prefix) == 8


# ---------------------------------------------------------------- CLI and timeline


def write_jsonl(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


GOOD = [
    {"process": 0, "type": "invoke", "f": "put", "key": "a", "value": "1"},
    {"process": 1, "type": "invoke", "f": "get", "key": "a", "value": None},
    {"process": 0, "type": "ok", "f": "put", "key": "a", "value": "1"},
    {"process": 1, "type": "ok", "f": "get", "key": "a", "value": "1"},
]
BAD = GOOD[:3] + [
    {"process": 1, "type": "ok", "f": "get", "key": "a", "value": "1"},
    {"process": 2, "type": "invoke", "f": "get", "key": "a", "value": None},
    {"process": 2, "type": "ok", "f": "get", "key": "a", "value": None},
]


def test_cli_linearizable(tmp_path):
    h = write_jsonl(tmp_path / "good.jsonl", GOOD)
    r = CliRunner().invoke(main, ["check", str(h)])
    assert r.exit_code == 0, r.output
    assert "LINEARIZABLE" in r.output
    assert not (tmp_path / "good.jsonl.timeline.html").exists()


def test_cli_violation_writes_timeline(tmp_path):
    h = write_jsonl(tmp_path / "bad.jsonl", BAD)
    r = CliRunner().invoke(main, ["check", str(h), "--model", "kv"])
    assert r.exit_code == 1, r.output
    assert "NOT LINEARIZABLE" in r.output and "#2 p2 get 'a'" in r.output
    page = (tmp_path / "bad.jsonl.timeline.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "class='op bad'" in page and "<script" not in page
    out = tmp_path / "x.html"
    r = CliRunner().invoke(main, ["check", str(h), "--html", str(out), "--format", "jsonl"])
    assert r.exit_code == 1 and out.exists()


def test_cli_unknown_and_bad_input(tmp_path):
    h = tmp_path / "hard.jsonl"
    h.write_text(to_jsonl(hard_history()))
    r = CliRunner().invoke(main, ["check", str(h), "--max-states", "100"])
    assert r.exit_code == 2, r.output
    assert "UNKNOWN" in r.output
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{nope\n")
    assert CliRunner().invoke(main, ["check", str(junk)]).exit_code == 3


def test_timeline_marks_info_and_failing_ops():
    ops = [mk(0, "put", "k", 1, None, 0, 1, "info"), mk(1, "get", "k", None, 7, 2, 3),
           mk(2, "put", "j", 2, None, 0, 1, "fail")]
    page = render_timeline(ops, failing_ops=[ops[1]], title="t <x>")
    assert "t &lt;x&gt;" in page
    assert page.count("class='op info' style='left") == 1 and page.count("class='op bad' style='left") == 1
    assert page.count("class='op fail' style='left") == 1 and "key &#x27;j&#x27;" in page


# ---------------------------------------------------------------- mutex (the lock workload)


@st.composite
def mutex_histories(draw, max_ops: int = 7):
    """Random acquire / release ops of three processes on two locks, any intervals and outcomes."""
    ops = []
    for i in range(draw(st.integers(1, max_ops))):
        call = draw(st.integers(0, 20))
        ops.append(mk(i, draw(st.sampled_from(["acquire", "release"])), draw(st.sampled_from(["L", "M"])), None,
                      True, call, call + draw(st.integers(0, 10)), draw(STATUS), client=draw(st.integers(0, 2))))
    return ops


@FAST
@given(mutex_histories())
def test_mutex_model_agrees_with_brute_force(ops):
    model = get_model("mutex")
    expected = LINEARIZABLE if brute_force(ops, model, keyed=True) else NOT_LINEARIZABLE
    assert check(ops, model).verdict == expected


# ---------------------------------------------------------------- registers with expiry (register --ttl-ops)

SHORT, LONG = 200, 86_400_000  # ms: may vanish during a run / never does (the model's forever_ms is an hour)


def brute_force_expiry(ops: list[Op]) -> bool:
    """The reference for ``kv-expiry``, written without its set of states: every order consistent with real
    time and, before each op, both choices for a value put with a short ttl (still there, or gone for good)."""
    enc = [op for op in ops if op.status != "fail" and not (op.f == "get" and op.status == "info")]
    n = len(enc)
    must = sum(1 << i for i, op in enumerate(enc) if op.status == "ok")

    def apply(op: Op, cur: tuple) -> tuple | None:
        """The concrete register (value, may_vanish) after ``op``, or None if ``op``'s output is impossible."""
        v, known = cur[0], op.status == "ok"
        if op.f == "get":
            return cur if op.output == v else None
        if op.f == "put":
            return op.input, False
        if op.f == "put-ttl":
            return op.input[0], op.input[1] < 3_600_000
        if op.f == "delete":
            return None, False
        exp, new = op.input
        if not known:
            return (new, False) if v == exp else cur
        if op.output:
            return (new, False) if v == exp else None
        return cur if v != exp else None

    def dfs(done: int, states: dict) -> bool:
        if done & must == must:
            return True
        for i, op in enumerate(enc):
            if done >> i & 1 or any(not done >> j & 1 and enc[j].ret < op.call for j in range(n)):
                continue
            cur = states.get(op.key, (None, False))
            for before in [cur, (None, False)] if cur[1] else [cur]:
                after = apply(op, before)
                if after is not None and dfs(done | 1 << i, {**states, op.key: after}):
                    return True
        return False

    return dfs(0, {})


@st.composite
def expiring_histories(draw, max_ops: int = 7, keys=("a", "b")):
    """A sequential run (op i takes effect at 10*i+5) where a value put with a short ttl may vanish
    before any later op, as the store's expiry would make it."""
    store: dict = {}
    ops = []
    for i in range(draw(st.integers(1, max_ops))):
        f = draw(st.sampled_from(["get", "get", "put", "put-ttl", "put-ttl", "cas", "delete"]))
        key = draw(st.sampled_from(keys))
        status = "ok" if f == "get" else draw(STATUS)
        applies = status == "ok" or (status == "info" and draw(st.booleans()))
        lin = 10 * i + 5
        call, ret = lin - draw(st.integers(0, 30)), lin + draw(st.integers(0, 30))
        v, may_vanish = store.get(key, (None, False))
        if may_vanish and draw(st.booleans()):
            v, may_vanish = store[key] = (None, False)
        if f == "get":
            inp, out = None, v
        elif f in ("put", "put-ttl"):
            new = draw(st.integers(0, 2))
            ttl = draw(st.sampled_from([SHORT, LONG]))
            inp, out = (new, None) if f == "put" else ([new, ttl], None)
            if applies:
                store[key] = (new, f == "put-ttl" and ttl == SHORT)
        elif f == "cas":
            exp, new = draw(VALUES), draw(st.integers(0, 2))
            inp, out = [exp, new], status != "fail" and v == exp
            if applies and v == exp:
                store[key] = (new, False)
        else:
            inp, out = None, None
            if applies:
                store[key] = (None, False)
        ops.append(mk(i, f, key, inp, out, call, ret, status))
    return ops


@FAST
@given(expiring_histories())
def test_runs_with_expiry_are_linearizable(ops):
    assert check(ops, get_model("kv-expiry")).verdict == LINEARIZABLE
    assert brute_force_expiry(ops)


@FAST
@given(mutated(expiring_histories()))
def test_mutated_runs_with_expiry_agree_with_the_explicit_reference(ops):
    model = get_model("kv-expiry")
    expected = LINEARIZABLE if brute_force_expiry(ops) else NOT_LINEARIZABLE
    assert check(ops, model).verdict == expected
    assert brute_force(ops, model, keyed=True) == (expected == LINEARIZABLE)


def in_order(*steps: tuple) -> list[Op]:
    """Ops one after the other (no overlap): (f, input, output) each, on one key."""
    return [mk(i, f, "k", inp, out, 10 * i, 10 * i + 1) for i, (f, inp, out) in enumerate(steps)]


@pytest.mark.parametrize("steps, verdict_", [
    # A short ttl: the value may be read, then be gone; once gone it stays gone until the next write.
    ([("put-ttl", [1, SHORT], None), ("get", None, 1), ("get", None, None)], LINEARIZABLE),
    ([("put-ttl", [1, SHORT], None), ("get", None, None), ("get", None, 1)], NOT_LINEARIZABLE),
    ([("put-ttl", [1, SHORT], None), ("get", None, None), ("put", 2, None), ("get", None, 2)], LINEARIZABLE),
    # No ttl, or one far longer than the run: never vanishes.
    ([("put", 1, None), ("get", None, None)], NOT_LINEARIZABLE),
    ([("put-ttl", [1, LONG], None), ("get", None, None)], NOT_LINEARIZABLE),
    # A cas compares against the vanished key as against an absent one.
    ([("put-ttl", [1, SHORT], None), ("cas", [None, 2], True), ("get", None, 2)], LINEARIZABLE),
    ([("put-ttl", [1, SHORT], None), ("get", None, None), ("cas", [1, 2], True)], NOT_LINEARIZABLE),
    ([("put-ttl", [1, SHORT], None), ("cas", [1, 2], False), ("get", None, 1)], NOT_LINEARIZABLE),
    ([("put-ttl", [1, SHORT], None), ("cas", [1, 2], False), ("get", None, None)], LINEARIZABLE),
    # A successful cas writes without a ttl (as SET does): the new value never vanishes.
    ([("put-ttl", [1, SHORT], None), ("cas", [1, 2], True), ("get", None, None)], NOT_LINEARIZABLE),
])
def test_expiry_model_semantics(steps: list[tuple], verdict_: str) -> None:
    ops = in_order(*steps)
    assert check(ops, get_model("kv-expiry")).verdict == verdict_
    assert brute_force_expiry(ops) == (verdict_ == LINEARIZABLE)


def test_expiry_model_keeps_both_outcomes_of_an_indeterminate_cas() -> None:
    m = get_model("kv-expiry")
    s = m.step(m.init(), *m.encode(mk(0, "put-ttl", "k", [1, SHORT], None, 0, 1)))[1]
    assert s == frozenset({(1, True)}) and m.describe_state(s) == "1 (may vanish)"
    ok, s2 = m.step(s, *m.encode(mk(1, "cas", "k", [1, 2], None, 2, 3, "info")))
    assert ok and s2 == frozenset({(2, False), (None, False)})  # applied, or the value vanished first
    assert m.step(s2, ("get",), None)[1] == frozenset({(None, False)})
    assert m.step(s2, ("get",), 2)[1] == frozenset({(2, False)})
    assert m.step(s2, ("get",), 1)[0] is False

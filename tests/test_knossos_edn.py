"""Knossos EDN histories: the EDN reader/writer, Knossos's models and semantics, and our export.

Knossos semantics, as specified for ``raftkv-jepsen check --format knossos-edn``: a register starts at 0
(``--initial`` changes it), an ``ok`` read of ``nil`` constrains nothing, a ``fail`` op had no effect,
an ``info`` op may or may not have taken effect, ops of non-integer processes (the nemesis) are ignored.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jepsen_like import edn
from jepsen_like.checker import LINEARIZABLE, NOT_LINEARIZABLE, check
from jepsen_like.cli import main
from jepsen_like.edn import EdnError, Keyword, Vector
from jepsen_like.history import HistoryError, detect_format, parse_jepsen_log, parse_knossos_edn
from jepsen_like.knossos import export_history, to_knossos_edn
from jepsen_like.models import CASRegister, MultiRegister, get_model, knossos_model

from .test_checker_corpus import ETCD_CASES, JEPSEN, needs_corpus
from .test_checker_properties import brute_force, kv_histories, mk, mutated

# 60 examples each keep this file near 10 s in `make test`.
SOME = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- EDN reader / writer

NAMES = st.from_regex(r"[a-z][a-z0-9\-?!]{0,8}(/[a-z][a-z0-9\-]{0,5})?", fullmatch=True)
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | NAMES.map(Keyword))


def hashable(children):
    return (st.lists(children, max_size=3).map(lambda xs: Vector(xs)) | st.lists(children, max_size=3).map(tuple)
            | st.frozensets(children, max_size=3))


HASHABLE = st.recursive(SCALARS, hashable, max_leaves=8)
VALUES = st.recursive(
    SCALARS,
    lambda c: (st.lists(c, max_size=4) | st.lists(c, max_size=3).map(tuple)
               | st.dictionaries(HASHABLE, c, max_size=3) | st.frozensets(HASHABLE, max_size=3)),
    max_leaves=16,
)


def same(a, b) -> bool:
    """Equal with the same types all the way down (True is not 1, a Keyword is not a str, [] is not ())."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return len(a) == len(b) and all(any(same(k, k2) and same(v, b[k2]) for k2 in b) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, frozenset):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


@SOME
@given(st.lists(VALUES, min_size=1, max_size=3))
def test_edn_round_trip_is_identity(values):
    """write -> read is the identity, types included, for one value and for values one after another."""
    for value in values:
        text = edn.dumps(value)
        assert same(edn.loads(text), value), text
        assert edn.dumps(edn.loads(text)) == text
    text = "\n".join(edn.dumps(v) for v in values)
    assert all(same(a, b) for a, b in zip(edn.loads_all(text), values, strict=True))


def test_edn_reads_what_histories_use():
    text = """; a comment
    [{:process 0, :type :invoke, :f :txn, :value [[:r :x nil] [:w 1 -2N]]}  ; trailing
     #_ {:ignored true}
     #jepsen.history.Op{:index 3, :time 12, :f :read, :error "a \\"quoted\\" \\u00e9\\n"}
     #{1 :a "b"} (nil true false) 1.5 -2e3 2.5M #inst "2026-01-01T00:00:00Z"]"""
    v = edn.loads(text)
    assert v[0] == {"process": 0, "type": "invoke", "f": "txn", "value": [["r", "x", None], ["w", 1, -2]]}
    assert isinstance(v[0]["f"], Keyword) and isinstance(next(iter(v[0])), Keyword)
    assert v[1] == {"index": 3, "time": 12, "f": "read", "error": 'a "quoted" \u00e9\n'}
    assert v[2] == frozenset({1, "a", "b"}) and v[3] == (None, True, False)
    assert v[4:] == [1.5, -2000.0, 2.5, "2026-01-01T00:00:00Z"]
    assert edn.loads("{[1 2] :a}") == {Vector([1, 2]): "a"}


@pytest.mark.parametrize("text, why", [
    ("[1 2", "unclosed '['"),
    ("{:a 1 :b}", "even number"),
    ("{:a 1 :a 2}", "duplicate map key"),
    ("#{1 1}", "duplicate set element"),
    ("foo", "unsupported token 'foo'"),
    ("1/2", "unsupported token"),
    ("\\c", "characters"),
    ("##Inf", "##Inf"),
    ("#foo 1", "unsupported tagged value #foo"),
    ('"abc', "unterminated string"),
    ('"\\q"', "bad string escape"),
    ("]", "unmatched"),
    ("1 2", "more than one value"),
    ("", "unexpected end of input"),
    ("{{:a 1} 2}", "cannot be a map key"),
])
def test_edn_reader_is_strict(text, why):
    with pytest.raises(EdnError, match="EDN line 1, column") as e:
        edn.loads(text)
    assert why in str(e.value)


def test_edn_error_position():
    with pytest.raises(EdnError, match="line 3, column 4"):
        edn.loads("[1\n 2\n   bad]")


def test_edn_writer_refuses_what_it_cannot_write():
    for bad in (math.inf, object(), Keyword("has space")):
        with pytest.raises(EdnError):
            edn.dumps(bad)


# ---------------------------------------------------------------- hand-written Knossos histories


def history(*events) -> str:
    """Events ``(process, type, f, value)`` as a Knossos EDN history (a vector of maps)."""
    return "[" + "\n ".join(
        edn.dumps({Keyword("process"): p if isinstance(p, int) else Keyword(p), Keyword("type"): Keyword(t),
                   Keyword("f"): Keyword(f), Keyword("value"): v}) for p, t, f, v in events) + "]"


def verdict(text: str, model: str = "cas-register", initial=0) -> str:
    return check(parse_knossos_edn(text), knossos_model(model, initial)).verdict


R, W, CAS = "read", "write", "cas"
CASES = {
    # A register starts at 0: reading 0 first is fine, a cas from 0 succeeds.
    "initial-0": (LINEARIZABLE, [(0, "invoke", R, None), (0, "ok", R, 0), (1, "invoke", CAS, [0, 3]),
                                 (1, "ok", CAS, [0, 3]), (0, "invoke", R, None), (0, "ok", R, 3)]),
    # An ok read of nil constrains nothing, even after a write of 1.
    "nil-read": (LINEARIZABLE, [(0, "invoke", W, 1), (0, "ok", W, 1), (1, "invoke", R, None), (1, "ok", R, None)]),
    # A stale read: 1 was written and acknowledged before the read of 0 began.
    "stale-read": (NOT_LINEARIZABLE, [(0, "invoke", W, 1), (0, "ok", W, 1), (1, "invoke", R, None),
                                      (1, "ok", R, 0)]),
    # A failed write had no effect: reading its value is a violation.
    "failed-write": (NOT_LINEARIZABLE, [(0, "invoke", W, 5), (0, "fail", W, 5), (1, "invoke", R, None),
                                        (1, "ok", R, 5)]),
    # An info write may take effect after it timed out, even after later ops...
    "info-write-later": (LINEARIZABLE, [(0, "invoke", W, 5), (0, "info", W, 5), (1, "invoke", R, None),
                                        (1, "ok", R, 0), (1, "invoke", R, None), (1, "ok", R, 5)]),
    # ...but only once: 5 cannot come back after 0 was written over it.
    "info-write-once": (NOT_LINEARIZABLE, [(0, "invoke", W, 5), (0, "info", W, 5), (1, "invoke", R, None),
                                           (1, "ok", R, 5), (1, "invoke", W, 0), (1, "ok", W, 0),
                                           (1, "invoke", R, None), (1, "ok", R, 5)]),
    # A cas that succeeded needs its old value; the nemesis's ops are not client ops.
    "cas-wrong-old": (NOT_LINEARIZABLE, [("nemesis", "invoke", "start", None), ("nemesis", "info", "start", "x"),
                                         (0, "invoke", W, 1), (0, "ok", W, 1), (1, "invoke", CAS, [2, 3]),
                                         (1, "ok", CAS, [2, 3])]),
    # Reads concurrent with a write may see either value...
    "concurrent": (LINEARIZABLE, [(0, "invoke", W, 1), (1, "invoke", R, None), (2, "invoke", R, None),
                                  (1, "ok", R, 1), (2, "ok", R, 0), (0, "ok", W, 1)]),
    # ...but not the old one after another read returned the new one (new-old inversion).
    "new-old-inversion": (NOT_LINEARIZABLE, [(0, "invoke", W, 1), (1, "invoke", R, None), (1, "ok", R, 1),
                                             (2, "invoke", R, None), (2, "ok", R, 0), (0, "ok", W, 1)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cas_register_histories(name):
    expected, events = CASES[name]
    assert verdict(history(*events)) == expected


def test_initial_value_is_a_parameter():
    text = history((0, "invoke", R, None), (0, "ok", R, 0))
    assert verdict(text, initial=0) == LINEARIZABLE
    assert verdict(text, initial=None) == NOT_LINEARIZABLE  # Knossos's CLI: (cas-register) starts at nil


def test_knossos_mutex_has_no_owners():
    acq, rel = "acquire", "release"
    other_releases = history((0, "invoke", acq, None), (0, "ok", acq, None), (1, "invoke", rel, None),
                             (1, "ok", rel, None), (2, "invoke", acq, None), (2, "ok", acq, None))
    assert verdict(other_releases, "mutex") == LINEARIZABLE
    assert check(parse_knossos_edn(other_releases), get_model("mutex")).verdict == NOT_LINEARIZABLE  # ours has
    two_holders = history((0, "invoke", acq, None), (0, "ok", acq, None), (1, "invoke", acq, None),
                          (1, "ok", acq, None))
    assert verdict(two_holders, "mutex") == NOT_LINEARIZABLE
    free_release = history((0, "invoke", rel, None), (0, "ok", rel, None))
    assert verdict(free_release, "mutex") == NOT_LINEARIZABLE


def txn(*mops):
    return [[Keyword(f), k, v] for f, k, v in mops]


def test_multi_register_histories():
    write_both = txn(("write", "x", 1), ("write", "y", 1))
    ok = history((0, "invoke", "txn", write_both), (0, "ok", "txn", write_both),
                 (1, "invoke", "txn", txn(("read", "x", None), ("read", "y", None))),
                 (1, "ok", "txn", txn(("read", "x", 1), ("read", "y", 1))))
    assert verdict(ok, "multi-register") == LINEARIZABLE
    # Read skew: after the transaction wrote x and y, a read sees the new x and the initial y.
    skew = ok.replace('[:read "y" 1]', '[:read "y" 0]')
    assert skew != ok and verdict(skew, "multi-register") == NOT_LINEARIZABLE
    # A nil read constrains nothing; :r / :w are accepted too; an info txn's reads say nothing.
    loose = history((0, "invoke", "txn", txn(("w", "x", 2))), (0, "info", "txn", txn(("w", "x", 2))),
                    (1, "invoke", "txn", txn(("r", "x", None), ("r", "y", 0))),
                    (1, "ok", "txn", txn(("r", "x", None), ("r", "y", 0))),
                    (2, "invoke", "txn", txn(("r", "x", 7))), (2, "info", "txn", txn(("r", "x", 7))))
    assert verdict(loose, "multi-register") == LINEARIZABLE


def test_history_shapes_and_errors():
    one_per_line = "{:process 0 :type :invoke :f :read}\n{:process 0 :type :ok :f :read :value 0 :time 9}"
    ops = parse_knossos_edn(one_per_line)
    assert [(op.f, op.output, op.status) for op in ops] == [("read", 0, "ok")]
    assert detect_format(history((0, "invoke", R, None))) == "knossos-edn"
    for bad, why in [("[{:process 0 :f :read}]", "missing :type"), ("[1]", "expected an op map"),
                     ("[{:process 0 :type :done :f :read}]", ":type must be one of"),
                     ("[{:process 0 :type :ok :f :read}]", "without an invocation"), ("[{:a", "EDN line 1")]:
        with pytest.raises(HistoryError, match=why):
            parse_knossos_edn(bad)


def test_cli_checks_knossos_histories(tmp_path: Path):
    good, bad = tmp_path / "good.edn", tmp_path / "bad.edn"
    good.write_text(history(*CASES["initial-0"][1]))
    bad.write_text(history(*CASES["stale-read"][1]))
    runner = CliRunner()
    r = runner.invoke(main, ["check", str(good), "--format", "knossos-edn", "--model", "cas-register"])
    assert r.exit_code == 0 and "LINEARIZABLE" in r.output and "model cas-register" in r.output, r.output
    r = runner.invoke(main, ["check", str(bad), "--format", "knossos-edn"])
    assert r.exit_code == 1 and "NOT LINEARIZABLE" in r.output, r.output
    r = runner.invoke(main, ["check", str(good), "--initial", "nil"])  # detected; starts at nil
    assert r.exit_code == 1, r.output
    r = runner.invoke(main, ["check", str(good), "--format", "knossos-edn", "--model", "txn"])
    assert r.exit_code == 3 and "one of Knossos's models" in r.output, r.output


# ---------------------------------------------------------------- multi-register against brute force


@st.composite
def multi_register_histories(draw, max_ops: int = 6):
    """Transactions from a sequential run with Knossos's semantics (registers start at 0, some reads nil)."""
    n = draw(st.integers(1, max_ops))
    store: dict = {}
    ops = []
    for i in range(n):
        status = draw(st.sampled_from(["ok", "ok", "ok", "info", "fail"]))
        applies = status == "ok" or (status == "info" and draw(st.booleans()))
        view = dict(store)
        lin = 10 * i + 5
        call, ret = lin - draw(st.integers(0, 30)), lin + draw(st.integers(0, 30))
        inp, out = [], []
        for kind, k, v in draw(st.lists(st.tuples(st.sampled_from(["r", "w"]), st.sampled_from("xyz"),
                                                  st.integers(0, 2)), min_size=1, max_size=3)):
            if kind == "w":
                view[k] = v
                inp.append(["w", k, v])
                out.append(["w", k, v])
            else:
                inp.append(["r", k, None])
                out.append(["r", k, None if draw(st.integers(0, 4)) == 0 else view.get(k, 0)])
        if applies:
            store = view
        ops.append(mk(i, "txn", None, inp, out if status == "ok" else None, call, ret, status))
    return ops


@st.composite
def mutate_one(draw, ops):
    """``ops`` with one op changed: a read's value, or an op's interval (an info op becomes ok)."""
    ops = list(ops)
    i = draw(st.integers(0, len(ops) - 1))
    op = ops[i]
    if op.status == "ok" and any(m[0] == "r" for m in op.output) and draw(st.booleans()):
        out = [[m[0], m[1], draw(st.sampled_from([None, 0, 1, 2]))] if m[0] == "r" else m for m in op.output]
        ops[i] = mk(op.index, op.f, None, op.input, out, op.call, op.ret)
    else:
        a, b = sorted((draw(st.integers(0, 60)), draw(st.integers(0, 60))))
        out, status = (op.input, "ok") if op.status == "info" else (op.output, op.status)
        ops[i] = mk(op.index, op.f, None, op.input, out, a, b, status)
    return ops


@SOME
@given(st.data())
def test_multi_register_against_brute_force(data):
    """A sequential run is linearizable; with one op changed, the checker agrees with brute force."""
    model = MultiRegister()
    ops = data.draw(multi_register_histories())
    assert check(ops, model).verdict == LINEARIZABLE
    changed = data.draw(mutate_one(ops))
    assert check(changed, model).verdict == (LINEARIZABLE if brute_force(changed, model, keyed=False)
                                             else NOT_LINEARIZABLE)


@SOME
@given(mutated(kv_histories(keys=("a",))))
def test_cas_register_agrees_with_brute_force(ops):
    model = CASRegister(initial=None)
    ops = parse_knossos_edn(to_knossos_edn(ops, "cas-register"))
    expected = LINEARIZABLE if brute_force(ops, model, keyed=False) else NOT_LINEARIZABLE
    assert check(ops, model).verdict == expected


# ---------------------------------------------------------------- our histories written for Knossos


@SOME
@given(kv_histories(keys=("a",)))
def test_exported_register_runs_pass_knossos(ops):
    """A sequential run of our register, written as a Knossos history and read back, is linearizable
    under Knossos's cas-register starting at nil (what the export's header tells Knossos to use)."""
    text = to_knossos_edn(ops, "cas-register")
    back = parse_knossos_edn(text)
    assert len(back) == len(ops)
    assert check(back, CASRegister(initial=None)).verdict == LINEARIZABLE


def test_export_keeps_a_violation_and_the_order():
    ops = [mk(0, "put", "k", "1", None, 0, 1), mk(1, "get", "k", None, "2", 2, 3), mk(2, "cas", "k", ["1", "2"],
                                                                                       False, 2.5, 4),
           mk(3, "get", "k", None, "1", 5, 6, client="final")]
    text = to_knossos_edn(ops, "cas-register")
    assert ":type :fail, :f :cas" in text  # a cas whose compare failed had no effect
    back = parse_knossos_edn(text)
    assert [(op.f, op.status) for op in back] == [("write", "ok"), ("read", "ok"), ("cas", "fail"), ("read", "ok")]
    assert back[3].client == 3  # "final" became an integer process, or Knossos would drop its ops
    assert check(back, CASRegister(initial=None)).verdict == NOT_LINEARIZABLE  # read "2", never written


def test_export_history_files(tmp_path: Path):
    ops = [mk(0, "txn", None, [["w", "x", "1"], ["r", "y", None]], [["w", "x", "1"], ["r", "y", None]], 0, 1),
           mk(1, "get", "x", None, "1", 2, 3, client="final")]
    files = export_history(ops, "txn", tmp_path / "edn")
    assert [f.name for f in files] == ["txn.edn"]
    text = files[0].read_text()
    assert "--model multi-register --initial nil" in text.splitlines()[1]
    assert check(parse_knossos_edn(text), MultiRegister(initial=None)).verdict == LINEARIZABLE
    regs = export_history([mk(0, "put", "r0.1", "a", None, 0, 1), mk(1, "get", "r0/2", None, None, 0, 1)],
                          "register", tmp_path / "reg")
    assert sorted(f.name for f in regs) == ["r0.1.edn", "r0_2.edn"]
    with pytest.raises(ValueError, match="no Knossos model"):
        export_history(ops, "bank", tmp_path / "x")
    with pytest.raises(ValueError, match="has no 'put-ttl'"):
        to_knossos_edn([mk(0, "put-ttl", "k", ["v", 10], None, 0, 1)], "cas-register")


@needs_corpus
@pytest.mark.parametrize(("num", "expected"), ETCD_CASES[::4], ids=[f"etcd_{n:03d}" for n, _ in ETCD_CASES[::4]])
def test_corpus_histories_survive_the_edn_round_trip(num: int, expected: str) -> None:
    """etcd logs of the shared corpus, written as Knossos EDN and read back, keep their listed verdict
    under the etcd model (our semantics: the corpus's verdicts are not Knossos's nil-read semantics)."""
    ops = parse_jepsen_log((JEPSEN / f"etcd_{num:03d}.log").read_text())
    back = parse_knossos_edn(to_knossos_edn(ops, "cas-register"))
    assert check(back, get_model("etcd"), timeout_s=30).verdict == expected

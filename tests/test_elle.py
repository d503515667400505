"""The Elle checker on hand-made histories: every anomaly class is found and named, with its
cycle, its operations and the consistency models it rules out."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from jepsen_like.cli import main
from jepsen_like.elle import ElleError, check
from jepsen_like.history import Op, to_jsonl

Spec = tuple[Any, float, float, list[list[Any]], str]


def history(*specs: Spec) -> list[Op]:
    """Ops from ``(process, call, ret, micro-ops as completed, status)``; reads of info/fail ops unknown."""
    ops = []
    for i, (p, call, ret, mops, status) in enumerate(specs):
        inp = [[f, k, None if f == "r" else v] for f, k, v in mops]
        out = mops if status == "ok" else ("timeout" if status == "fail" else None)
        ops.append(Op(i, p, "txn", None, inp, out, call, math.inf if status == "info" else ret, status))
    return ops


def ok(p: Any, call: float, ret: float, *mops: list[Any]) -> Spec:
    return (p, call, ret, list(mops), "ok")


def r(k: str, v: Any) -> list[Any]:
    return ["r", k, v]


def w(k: str, v: Any) -> list[Any]:
    return ["w", k, v]


def a(k: str, v: Any) -> list[Any]:
    return ["append", k, v]


RW_CASES: dict[str, list[Spec]] = {
    "G1a": [(0, 0, 1, [w("x", 1)], "fail"), ok(1, 2, 3, r("x", 1))],
    "G1b": [ok(0, 0, 1, w("x", 1), w("x", 2)), ok(1, 0, 1, r("x", 1))],
    "G1c": [ok(0, 0, 1, w("x", 1), r("y", 2)), ok(1, 0, 1, w("y", 2), r("x", 1))],
    "G-single": [ok(0, 0, 1, w("x", 1), w("y", 1)), ok(1, 0, 1, r("x", None), r("y", 1))],
    "G2-item": [ok(0, 0, 1, r("x", None), w("y", 1)), ok(1, 0, 1, r("y", None), w("x", 1))],
    "lost-update": [ok(0, 0, 1, w("x", 1)), ok(1, 2, 3, r("x", 1), w("x", 2)), ok(2, 2, 3, r("x", 1), w("x", 3))],
    "internal": [ok(0, 0, 1, w("x", 1), r("x", 2)), ok(1, 0, 1, w("x", 2))],
    "garbage-read": [ok(0, 0, 1, r("x", 9))],
    "future-read": [ok(0, 0, 1, r("x", 1), w("x", 1))],
    "G-single-realtime": [ok(0, 0, 1, w("x", 1)), ok(1, 2, 3, r("x", None))],
    # p0 reads z = 5 and then writes x = 1; p1 read that x and wrote z = 5
    "G1c-process": [ok(0, 0, 1, r("z", 5)), ok(0, 2, 3, w("x", 1)), ok(1, 0, 9, r("x", 1), w("z", 5))],
}

APPEND_CASES: dict[str, list[Spec]] = {
    "G0": [ok(0, 0, 1, a("x", 1), a("y", 1)), ok(1, 0, 1, a("x", 2), a("y", 2)),
           ok(2, 2, 3, r("x", [1, 2]), r("y", [2, 1]))],
    "G1a": [(0, 0, 1, [a("x", 1)], "fail"), ok(1, 2, 3, r("x", [1]))],
    "G1b": [ok(0, 0, 1, a("x", 1), a("x", 2)), ok(1, 0, 1, r("x", [1]))],
    "G1c": [ok(0, 0, 1, a("x", 1), r("y", [1])), ok(1, 0, 1, a("y", 1), r("x", [1]))],
    "G-single": [ok(0, 0, 1, a("x", 1), a("y", 1)), ok(1, 0, 1, r("x", []), r("y", [1]))],
    "G2-item": [ok(0, 0, 1, r("x", []), a("y", 1)), ok(1, 0, 1, r("y", []), a("x", 1)),
                ok(2, 2, 3, r("x", [1]), r("y", [1]))],
    "lost-update": [ok(0, 0, 1, r("x", []), a("x", 1)), ok(1, 0, 1, r("x", []), a("x", 2)),
                    ok(2, 2, 3, r("x", [1, 2]))],
    "internal": [ok(0, 0, 1, r("x", []), a("x", 1), r("x", [2, 1])), ok(1, 0, 1, a("x", 2))],
    "duplicate-elements": [ok(0, 0, 1, a("x", 1)), ok(1, 2, 3, r("x", [1, 1]))],
    "incompatible-order": [ok(0, 0, 1, a("x", 1)), ok(1, 0, 1, a("x", 2)), ok(2, 2, 3, r("x", [1, 2])),
                           ok(3, 2, 3, r("x", [2, 1]))],
    "garbage-read": [ok(0, 0, 1, r("x", [7]))],
    # one transaction appended 1 then 2; a later read shows them the other way round (found by hypothesis)
    "incompatible-order-within-a-writer": [ok(0, 0, 1, a("y", 1), a("y", 2)),
                                           ok(1, 2, 3, a("y", 3), r("y", [2, 1, 3]))],
    "future-read": [ok(0, 0, 1, r("x", [1]), a("x", 1))],
    "G-single-realtime": [ok(0, 0, 1, a("x", 1)), ok(1, 2, 3, r("x", []))],
    # T0 missed T1's append, T1 missed T2's, and T2 had completed before T0 began
    "G2-item-realtime": [ok(0, 2, 3, r("x", [])), ok(1, 0, 9, a("x", 1), r("y", [])), ok(2, 0, 1, a("y", 1))],
}


@pytest.mark.parametrize("name", sorted(RW_CASES))
def test_rw_register_anomaly_is_named(name: str) -> None:
    res = check(history(*RW_CASES[name]), "rw-register")
    assert res.verdict == "invalid", res.summary()
    assert name in res.anomalies, res.summary()
    assert res.not_models and "strict-serializable" in res.not_models + res.also_not


@pytest.mark.parametrize("name", sorted(APPEND_CASES))
def test_list_append_anomaly_is_named(name: str) -> None:
    res = check(history(*APPEND_CASES[name]), "list-append")
    assert res.verdict == "invalid", res.summary()
    assert name.removesuffix("-within-a-writer") in res.anomalies, res.summary()


def test_cycle_report_names_edges_and_ops() -> None:
    res = check(history(*APPEND_CASES["G-single"]), "list-append")
    (case,) = res.anomalies["G-single"]
    assert sorted(s["type"] for s in case["cycle"]) == ["rw", "wr"]
    assert {s["key"] for s in case["cycle"]} == {"x", "y"}
    assert len(case["ops"]) == 2 and all(o.startswith("#") for o in case["ops"])
    assert any("read 'x' = [] before T0 wrote 1 (rw)" in s for s in case["steps"])
    # read skew: rules out consistent view and snapshot isolation, not read committed
    assert "snapshot-isolation" in res.also_not and "consistent-view" in res.not_models
    assert "read-committed" not in res.not_models + res.also_not


def test_write_skew_is_allowed_by_snapshot_isolation() -> None:
    res = check(history(*APPEND_CASES["G2-item"]), "list-append")
    assert res.not_models == ["repeatable-read"]
    assert "serializable" in res.also_not and "snapshot-isolation" not in res.also_not


def test_realtime_anomaly_rules_out_only_strict_serializability() -> None:
    ops = history(*APPEND_CASES["G-single-realtime"])
    assert check(ops, "list-append").not_models == ["strict-serializable"]
    assert check(ops, "list-append", models=["serializable"]).verdict == "valid"


@pytest.mark.parametrize("workload", ["rw-register", "list-append"])
def test_valid_history_passes(workload: str) -> None:
    if workload == "rw-register":
        ops = history(ok(0, 0, 1, w("x", 1), w("y", 1)), ok(1, 2, 3, r("x", 1), w("y", 2)),
                      ok(2, 2, 5, r("y", 1)), ok(3, 4, 6, r("x", 1), r("y", 2)))
    else:
        ops = history(ok(0, 0, 1, a("x", 1), a("y", 1)), ok(1, 2, 3, r("x", [1]), a("y", 2)),
                      ok(2, 2, 5, r("y", [1])), ok(3, 4, 6, r("x", [1]), r("y", [1, 2])))
    res = check(ops, workload)
    assert res.verdict == "valid" and not res.anomalies, res.summary()


def test_indeterminate_writes_may_be_read_or_not() -> None:
    # an info write that someone read happened; one nobody read may not have: both fine
    ops = history((0, 0, 1, [a("x", 1)], "info"), (1, 0, 1, [a("x", 2)], "info"), ok(2, 2, 3, r("x", [1])),
                  ok(3, 4, 5, r("x", [1])))
    assert check(ops, "list-append").verdict == "valid"
    ops = history((0, 0, 1, [w("x", 1)], "info"), ok(1, 2, 3, r("x", 1)), ok(2, 2, 3, r("y", None)))
    assert check(ops, "rw-register").verdict == "valid"
    # but a read of a failed write is G1a
    ops = history((0, 0, 1, [w("x", 1)], "fail"), ok(1, 2, 3, r("x", 1)))
    assert "G1a" in check(ops, "rw-register").anomalies


def test_info_op_gets_no_outgoing_process_or_realtime_edge() -> None:
    # p0's info write may land after its next op; reading nil later is no violation
    ops = history((0, 0, 1, [w("x", 1)], "info"), ok(0, 2, 3, r("y", None)), ok(1, 4, 5, r("x", None)))
    assert check(ops, "rw-register").verdict == "valid"


def test_wfr_keys_infers_more_and_catches_cyclic_versions() -> None:
    # x: 1 then 2 (T1 read 1 and wrote 2); T2 reads 2 then T3 (after T2) reads 1: stale
    ops = history(ok(0, 0, 1, w("x", 1)), ok(1, 2, 3, r("x", 1), w("x", 2)), ok(2, 4, 5, r("x", 2)),
                  ok(3, 6, 7, r("x", 1)))
    assert check(ops, "rw-register").verdict == "valid"  # nil < 1, nil < 2: 1 vs 2 unknown
    res = check(ops, "rw-register", wfr_keys=True)
    assert res.verdict == "invalid" and "G-single-realtime" in res.anomalies
    ops = history(ok(0, 0, 1, r("x", 1), w("x", 2)), ok(1, 0, 1, r("x", 2), w("x", 1)))
    assert "cyclic-versions" in check(ops, "rw-register", wfr_keys=True).anomalies


def test_budget_exhausted_is_unknown_never_a_pass() -> None:
    ops = history(*APPEND_CASES["G-single-realtime"])
    res = check(ops, "list-append", models=["serializable"], search_steps_max=1)
    assert res.verdict == "unknown" and "stopped" in res.reason
    assert "G-single-realtime" in res.anomalies  # still named by the fallback search


def test_unusable_histories_are_rejected() -> None:
    with pytest.raises(ElleError, match="written twice"):
        check(history(ok(0, 0, 1, w("x", 1)), ok(1, 0, 1, w("x", 1))), "rw-register")
    with pytest.raises(ElleError, match="appended twice"):
        check(history(ok(0, 0, 1, a("x", 1)), ok(1, 0, 1, a("x", 1))), "list-append")
    with pytest.raises(ElleError, match="micro-op"):
        check(history(ok(0, 0, 1, a("x", 1))), "rw-register")
    assert check([], "rw-register").verdict == "unknown"


def test_single_key_ops_are_one_op_transactions() -> None:
    ops = history(ok(0, 0, 1, w("x", 1)))
    ops.append(Op(1, "final", "get", "x", None, None, 2, 3, "ok"))
    res = check(ops, "rw-register")
    assert "G-single-realtime" in res.anomalies


def test_cli_check_elle(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text(to_jsonl(history(*APPEND_CASES["G-single"])))
    out = CliRunner().invoke(main, ["check", str(path), "--model", "elle-append"])
    assert out.exit_code == 1, out.output
    assert "G-single" in out.output and "not consistent-view" in out.output
    path.write_text(to_jsonl(history(ok(0, 0, 1, w("x", 1)), ok(1, 2, 3, r("x", 1)))))
    out = CliRunner().invoke(main, ["check", str(path), "--model", "elle-rw", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["verdict"] == "valid"


def test_txn_workload_reports_an_elle_check() -> None:
    from jepsen_like.report import check_to_dict
    from jepsen_like.workloads import TxnWorkload

    ops = history(ok(0, 0, 1, w("t0.0", "0.1"), w("t0.1", "0.2")), ok(1, 2, 3, r("t0.0", None), r("t0.1", "0.2")))
    ops.append(Op(2, "final", "get", "t0.0", None, "0.1", 4, 5, "ok"))
    checks = TxnWorkload(None, 0).check(ops, 10.0)
    assert checks["linearizable"].verdict == "not_linearizable"
    d = check_to_dict(checks["elle"])
    assert d["valid"] is False and "G-single" in d["anomaly_types"]  # T1 saw half of T0: read skew
    assert d["not"] == ["consistent-view", "repeatable-read"] and d["failing_ops"]
    json.dumps(d, default=str)
    dup = history(ok(0, 0, 1, w("x", 1)), ok(1, 0, 1, w("x", 1)))
    assert check_to_dict(TxnWorkload(None, 0).check(dup, 10.0)["elle"])["verdict"] == "unknown"

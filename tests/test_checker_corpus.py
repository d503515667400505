"""Every history of the shared lin-corpus gets the verdict its README states.

The corpus lives outside the repo (``../shared/lin-corpus``, or ``$RAFTKV_LIN_CORPUS``);
the tests skip when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jepsen_like.checker import LINEARIZABLE, NOT_LINEARIZABLE, check_file

CORPUS = Path(os.environ.get("RAFTKV_LIN_CORPUS") or Path(__file__).resolve().parents[1].parent / "shared" / "lin-corpus")
JEPSEN = CORPUS / "porcupine" / "jepsen"
KV = CORPUS / "porcupine" / "kv"

needs_corpus = pytest.mark.skipif(
    not JEPSEN.is_dir() or not KV.is_dir(),
    reason=f"lin-corpus not found at {CORPUS} (set RAFTKV_LIN_CORPUS to its directory)",
)

# From the corpus README: the linearizable etcd logs; every other number 000-102 except 095 is not.
LINEARIZABLE_ETCD = {2, 5, 7, 18, 25, 31, 38, 45, 48, 49, 51, 53, 56, 67, 75, 76, 80, 87, 92, 98, 100, 101, 102}
EMPTY_ETCD = 95

ETCD_CASES = [(n, LINEARIZABLE if n in LINEARIZABLE_ETCD else NOT_LINEARIZABLE) for n in range(103) if n != EMPTY_ETCD]
KV_CASES = [(f"c{c}-{v}", LINEARIZABLE if v == "ok" else NOT_LINEARIZABLE) for c in ("01", "10", "50") for v in ("ok", "bad")]


@needs_corpus
@pytest.mark.parametrize(("num", "expected"), ETCD_CASES, ids=[f"etcd_{n:03d}" for n, _ in ETCD_CASES])
def test_etcd_log_verdict(num: int, expected: str) -> None:
    res, ops, fmt = check_file(JEPSEN / f"etcd_{num:03d}.log", timeout_s=30)
    assert fmt == "jepsen-log"
    assert res.verdict == expected, res.summary()
    if expected == NOT_LINEARIZABLE:
        assert res.failing_ops, "a violation must name the operations that cannot be linearized"
        assert len(res.longest_prefix) < len(res.failed_partition)


@needs_corpus
def test_etcd_empty_log_does_not_crash() -> None:
    res, ops, _ = check_file(JEPSEN / f"etcd_{EMPTY_ETCD:03d}.log")
    assert ops == []
    assert res.verdict == LINEARIZABLE  # trivially: the README gives no verdict


@needs_corpus
@pytest.mark.parametrize(("name", "expected"), KV_CASES, ids=[n for n, _ in KV_CASES])
def test_kv_verdict(name: str, expected: str) -> None:
    res, ops, fmt = check_file(KV / f"{name}.txt", timeout_s=60)
    assert fmt == "porcupine-kv"
    assert res.verdict == expected, res.summary()


@needs_corpus
def test_c50_bad_stops_at_first_violation_quickly() -> None:
    # "Quickly" means it does not check the rest once one partition fails; how long that
    # takes is a benchmark figure (bench/checker_bench.py), not a test on a shared machine.
    res, _, _ = check_file(KV / "c50-bad.txt", timeout_s=60)
    assert res.verdict == NOT_LINEARIZABLE
    assert res.partitions_checked < res.partitions


@needs_corpus
def test_corpus_file_count() -> None:
    assert len(list(JEPSEN.glob("etcd_*.log"))) == 103
    assert len(list(KV.glob("c*.txt"))) == 6

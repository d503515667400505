"""Smoke test of the benchmark suite: one workload, 2 clients, 2 s, raftkv only; JSON written.  No speed checks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from raftkv.bench.cli import bench
from raftkv.bench.etcd_http import HttpReader
from raftkv.bench.hist import Hist


def test_hist_quantiles() -> None:
    h = Hist()
    for ms in range(1, 101):
        h.record(ms / 1000)
    assert h.n == 100
    assert abs(h.quantile(0.5) - 50) < 1.0
    assert abs(h.quantile(0.99) - 99) < 1.5
    h2 = Hist.from_dict(json.loads(json.dumps(h.to_dict())))
    h2.merge(h)
    assert h2.n == 200 and h2.quantile(0.5) == h.quantile(0.5)


def test_http_reader_chunked_and_length() -> None:
    r = HttpReader()
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert r.gets() == (200, b"{}")
    assert r.gets() is False
    r.feed(b"3\r\nabc\r\n0\r\n\r\n")
    assert r.gets() == (200, b"abc")


@pytest.mark.slow
def test_suite_end_to_end(tmp_path) -> None:
    out = tmp_path / "r.json"
    res = CliRunner().invoke(bench, ["--workload", "put", "--clients", "2", "--duration", "2", "--warmup", "0.5",
                                     "--peers", "none", "--no-redis-benchmark", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    (row,) = doc["results"]
    assert row["system"] == "raftkv" and row["workload"] == "put" and row["clients"] == 2
    assert row["ops"] > 0 and row["p50_ms"] is not None
    assert doc["generator"] and doc["machine"]["nproc"]


def test_cli_rejects_bad_options_and_misplaced_suite_options() -> None:
    runner = CliRunner()
    res = runner.invoke(bench, ["--workload", "nosuch"])
    assert res.exit_code == 2 and "unknown workload 'nosuch'" in res.output
    res = runner.invoke(bench, ["--clients", "1,x"])
    assert res.exit_code == 2 and "comma list of integers" in res.output
    res = runner.invoke(bench, ["--workload", "get", "scale", "--sizes", "10"])
    assert res.exit_code == 2 and "--workload belong to the suite" in res.output
    for args in (["--help"], ["failover", "--help"], ["scale", "--help"]):
        res = runner.invoke(bench, args)
        assert res.exit_code == 0 and "Usage:" in res.output

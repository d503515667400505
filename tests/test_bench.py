"""The benchmark's parts (histogram, HTTP parser, etcd's gRPC wire codec, ratios) and smoke tests of the
suite (put and incr, 2 clients, 2 s, raftkv only; JSON written) and of the watch benchmark (every acknowledged
put delivered to the watcher once).  No speed checks."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from raftkv.bench import etcd_grpc as eg
from raftkv.bench.cli import bench
from raftkv.bench.etcd_http import HttpReader, leader_index
from raftkv.bench.hist import Hist, nearest_rank, summary_ms
from raftkv.bench.report import add_ratios, merge_rounds, render_table
from raftkv.bench.scale import shards_table
from raftkv.bench.workloads import NOT_APPLICABLE, applicable


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


@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=300),
       st.floats(0.01, 1.0, allow_nan=False))
def test_nearest_rank_is_the_smallest_sample_with_q_of_the_samples_at_or_below_it(xs: list[float],
                                                                                   q: float) -> None:
    xs.sort()
    want = min(x for x in xs if sum(y <= x for y in xs) >= q * len(xs))
    assert nearest_rank(xs, q) == want


def test_summary_reads_p99_by_nearest_rank_so_a_small_sample_does_not_hide_its_slowest() -> None:
    # 50 samples: the lower-index formula (int(0.99 * 49) = 48) gave the second slowest; 0.99 of 50 is 49.5,
    # so the p99 is the slowest.
    got = summary_ms([0.001] * 48 + [0.002, 0.5])
    assert got == {"writes": 50, "p50_ms": 1.0, "p99_ms": 500.0, "max_ms": 500.0}
    assert summary_ms([]) == {"writes": 0}


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
    res = CliRunner().invoke(bench, ["--workload", "put,incr", "--clients", "2", "--duration", "1", "--warmup",
                                     "0.5", "--peers", "none", "--no-redis-benchmark", "--rounds", "2",
                                     "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert [(r["system"], r["workload"], r["clients"]) for r in doc["results"]] == [("raftkv", "put", 2),
                                                                                     ("raftkv", "incr", 2)]
    for row in doc["results"]:
        assert row["ops"] > 0 and row["p50_ms"] is not None and row["errors"] == 0
        assert len(row["rounds"]) == 2 and all(r["ops_s"] > 0 for r in row["rounds"])
    assert "(round 2 of 2)" in res.output
    assert doc["generator"] and doc["machine"]["nproc"]


@pytest.mark.slow
def test_watch_bench_delivers_every_acknowledged_put_once(tmp_path) -> None:
    """One watcher, 4 writers for 2 s: a report with every field, and as many events as acknowledged puts."""
    out = tmp_path / "w.json"
    res = CliRunner().invoke(bench, ["watch", "--writers", "4", "--duration", "2", "--warmup", "0.5",
                                     "--keyspace", "50", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    fields = {"put_ops_s", "put_p50_ms", "put_p99_ms", "events_s", "events_in_window", "delivery_p50_ms",
              "delivery_p99_ms", "delivery_p999_ms", "delivery_p99_over_put_p99", "events_total",
              "puts_acked_total", "maybe_applied", "duplicates", "every_event_once", "polls", "clock",
              "replay_events_s", "targets", "machine"}
    assert fields <= doc.keys()
    assert doc["puts_acked_total"] > 0 and doc["events_in_window"] > 0
    assert doc["maybe_applied"] == 0 and doc["duplicates"] == 0 and doc["unstamped"] == 0
    assert doc["events_total"] == doc["puts_acked_total"] == doc["replay_events"]
    assert doc["every_event_once"] is True


def test_incr_has_no_etcd_point_and_shows_a_dash() -> None:
    row = {"workload": "incr", "clients": 32, "p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 3.0, "errors": 0,
           "indeterminate": 0}
    assert not applicable("incr", "etcd") and not applicable("incr", "etcd-grpc") and applicable("incr", "redis")
    doc = {"results": [row | {"system": "raftkv", "ops_s": 3000.0}, row | {"system": "redis", "ops_s": 6000.0}],
           "not_applicable": {"incr": {s: NOT_APPLICABLE["incr"][s] for s in ("etcd", "etcd-grpc")}}}
    add_ratios(doc)
    table = render_table(doc)
    assert "| incr | 32 | raftkv | 3000 | 1.00 | 2.00 | 3.00 | 0 (0) | - | 0.50× |" in table
    assert "| incr | - | etcd | - (not applicable: etcd has no atomic increment" in table


def test_cli_rejects_bad_options_and_misplaced_suite_options() -> None:
    runner = CliRunner()
    res = runner.invoke(bench, ["--workload", "nosuch"])
    assert res.exit_code == 2 and "unknown workload 'nosuch'" in res.output
    res = runner.invoke(bench, ["--clients", "1,x"])
    assert res.exit_code == 2 and "comma list of integers" in res.output
    res = runner.invoke(bench, ["--workload", "get", "scale", "--sizes", "10"])
    assert res.exit_code == 2 and "--workload belong to the suite" in res.output
    for args in (["--help"], ["failover", "--help"], ["scale", "--help"], ["watch", "--help"]):
        res = runner.invoke(bench, args)
        assert res.exit_code == 0 and "Usage:" in res.output


# -- etcd's gRPC wire codec -----------------------------------------------------------------------
@given(st.integers(0, 2**64 - 1))
def test_varint_round_trip(n: int) -> None:
    assert list(eg.iter_fields(eg.varint(1 << 3) + eg.varint(n))) == [(1, n)]


def test_requests_encode_as_protobuf_does() -> None:
    # The bytes protoc's encoders give for the same messages (fields in number order, defaults left out).
    assert eg.put_request(b"foo", b"bar") == b"\n\x03foo\x12\x03bar"
    assert eg.range_request(b"foo") == b"\n\x03foo"
    assert eg.range_request(b"foo", serializable=True) == b"\n\x03foo8\x01"
    # Compare{result EQUAL (0: left out), target VALUE, key, value}: the oneof member is sent even empty.
    assert eg.compare_value(b"k", b"") == b"\x10\x03\x1a\x01k:\x00"
    assert eg.txn_request([], [(b"k", b"v")]) == b"\x12\x08\x12\x06\n\x01k\x12\x01v"
    assert eg.varint(300) == b"\xac\x02"


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_put_and_range_requests_round_trip(key: bytes, value: bytes) -> None:
    assert {1: b"", 2: b""} | dict(eg.iter_fields(eg.put_request(key, value))) == {1: key, 2: value}
    for ser in (False, True):
        assert {1: b"", 7: 0} | dict(eg.iter_fields(eg.range_request(key, ser))) == {1: key, 7: int(ser)}


@given(st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=200)), min_size=1, max_size=5),
       st.booleans())
def test_txn_request_round_trip(pairs: list[tuple[bytes, bytes]], compare: bool) -> None:
    req = eg.txn_request([eg.compare_value(k, v) for k, v in pairs] if compare else [], pairs)
    compares, puts = [], []
    for num, val in eg.iter_fields(req):
        assert isinstance(val, bytes) and num in (1, 2)
        if num == 1:
            c = {1: eg.EQUAL, 3: b""} | dict(eg.iter_fields(val))
            compares.append((c[1], c[2], c[3], c[7]))
        else:
            ((op, put),) = eg.iter_fields(val)  # RequestOp: one member of its oneof
            assert op == 2
            puts.append(tuple(({1: b"", 2: b""} | dict(eg.iter_fields(put))).values()))
    assert puts == pairs
    assert compares == ([(eg.EQUAL, eg.VALUE, k, v) for k, v in pairs] if compare else [])


def test_range_response_built_by_hand() -> None:
    header = b"\x0a\x08\x08\x01\x10\x02\x18\x07\x20\x03"  # ResponseHeader: cluster, member, revision, term
    kv1 = b"\x0a\x01a\x10\x05\x18\x07\x20\x02\x2a\x02xy\x30\x00"  # key, create/mod rev, version, value, lease
    kv2 = b"\x0a\x05key:1\x10\x01"  # a value left out: empty
    fixed = b"\x49" + bytes(8) + b"\x55" + bytes(4)  # unknown fixed64 and fixed32 fields are skipped
    resp = header + b"\x12" + bytes([len(kv1)]) + kv1 + b"\x12" + bytes([len(kv2)]) + kv2 + b"\x18\x01\x20\x02" + fixed
    assert eg.range_kvs(resp) == [(b"a", b"xy"), (b"key:1", b"")]
    assert eg.range_kvs(header) == []
    with pytest.raises(ValueError):
        eg.range_kvs(resp[:-3])
    with pytest.raises(ValueError):
        eg.range_kvs(b"\x0b")  # wire type 3 (groups) is not used by etcd


def test_txn_and_status_replies() -> None:
    header = b"\x0a\x04\x10\x2a\x18\x09"
    assert eg.txn_succeeded(header + b"\x10\x01") and not eg.txn_succeeded(header)
    assert eg.status_ids(header + b"\x12\x063.4.23" + b"\x20" + eg.varint(2**63 + 5)) == (42, 2**63 + 5)
    assert eg.status_ids(header) == (42, 0)
    assert leader_index([(7, 9), None, (9, 9)]) == 2
    assert leader_index([(7, 0), (9, 0)]) is None and leader_index([None, None]) is None


def test_ratio_against_the_faster_etcd_api() -> None:
    row = {"workload": "put", "clients": 32, "p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 3.0, "errors": 0,
           "indeterminate": 0}
    doc = {"results": [row | {"system": "raftkv", "ops_s": 3000.0}, row | {"system": "etcd", "ops_s": 1000.0},
                       row | {"system": "etcd-grpc", "ops_s": 2000.0}, row | {"system": "redis", "ops_s": 6000.0}]}
    add_ratios(doc)
    r = doc["results"][0]
    assert (r["x_etcd"], r["x_etcd_via"], r["x_redis"]) == (1.5, "etcd-grpc", 0.5) and "x_redis_via" not in r
    assert "| 1.50× (etcd-grpc) | 0.50× |" in render_table(doc)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("etcd") is None or importlib.util.find_spec("grpc") is None,
                    reason="needs etcd on PATH and grpcio")
def test_etcd_grpc_driver_against_etcd(tmp_path) -> None:
    from raftkv.bench.load import LoadParams, run_load
    from raftkv.bench.preload import preload
    from raftkv.bench.systems import EtcdGrpcSystem, EtcdSystem

    es = EtcdGrpcSystem(EtcdSystem(str(tmp_path)))
    try:
        assert es.spec()["kind"] == "etcd-grpc" and es.spec()["leader"] is not None
        preload(es, 200)
        for w in ("put", "get", "cas", "txn"):  # cas and txn count a failed compare as an error
            r = run_load(es, LoadParams(w, 4, duration=1.0, warmup=0.3, keyspace=200, procs=1))
            assert r.system == "etcd-grpc" and r.ops > 0 and r.errors == 0, r.row()
    finally:
        es.stop()


def test_a_memory_limit_holds_a_node_process_to_it() -> None:
    """``raftkv bench scale --memory-limit-mb``: a process placed in its node's cgroup is held to the limit (one
    that asks for more anonymous memory than the limit is killed), and the cgroups go away afterwards."""
    from raftkv.bench.memlimit import MemoryLimit, MemoryLimitError

    try:
        limit = MemoryLimit(64)
    except MemoryLimitError as e:
        pytest.skip(str(e))
    # each child allocates (and touches) its memory only once told to, after it was placed
    grab = "import sys; sys.stdin.readline(); x = bytearray(%d); x[::4096] = b'1' * len(x[::4096])"
    try:
        small = subprocess.Popen([sys.executable, "-c", grab % (8 << 20)], stdin=subprocess.PIPE)
        big = subprocess.Popen([sys.executable, "-c", grab % (256 << 20)], stdin=subprocess.PIPE)
        try:
            limit.place("n1", small.pid)
            limit.place("n2", big.pid)
        except (OSError, MemoryLimitError) as e:
            small.kill()
            big.kill()
            pytest.skip(f"cannot put a process into a memory cgroup here: {e}")
        small.communicate(b"go\n", timeout=30)
        big.communicate(b"go\n", timeout=30)
        assert big.returncode != 0  # killed by the cgroup's OOM killer
        assert small.returncode == 0
        assert limit.usage_mb("n1") is not None and limit.usage_mb("missing") is None
    finally:
        limit.close()
    assert not limit.dirs


def test_rounds_merge_to_medians_and_the_ratio_is_the_median_of_each_rounds_ratio() -> None:
    """Three rounds of one point: each figure is the median of the rounds, counts are summed, and raftkv's ratio
    pairs each round with the same round of the peer (not the ratio of the medians)."""
    def rows(system: str, ops: list[float], p50: list[float]) -> list[dict]:
        return [{"system": system, "workload": "put", "clients": 32, "ops": int(o * 5), "ops_s": o, "p50_ms": p,
                 "p99_ms": 2 * p, "p999_ms": 3 * p, "server_cpu": 1.0, "errors": 1, "indeterminate": 0}
                for o, p in zip(ops, p50, strict=True)]

    raftkv = merge_rounds(rows("raftkv", [3000.0, 1000.0, 2000.0], [1.0, 3.0, 2.0]))
    assert (raftkv["ops_s"], raftkv["p50_ms"], raftkv["p99_ms"]) == (2000.0, 2.0, 4.0)
    assert (raftkv["ops"], raftkv["errors"]) == (30_000, 3)
    assert [r["ops_s"] for r in raftkv["rounds"]] == [3000.0, 1000.0, 2000.0]
    # etcd's two APIs: the faster in each round counts
    etcd = merge_rounds(rows("etcd", [1000.0, 2000.0, 1000.0], [1.0, 1.0, 1.0]))
    grpc = merge_rounds(rows("etcd-grpc", [2000.0, 1000.0, 4000.0], [1.0, 1.0, 1.0]))
    doc = {"results": [raftkv, etcd, grpc]}
    add_ratios(doc)
    # rounds: 3000/2000 = 1.5, 1000/2000 = 0.5, 2000/4000 = 0.5 -> median 0.5 (the medians' ratio would say 1.0)
    assert raftkv["x_etcd_rounds"] == [1.5, 0.5, 0.5] and raftkv["x_etcd"] == 0.5
    assert raftkv["x_etcd_via"] == "etcd-grpc"
    assert "| 0.50× (etcd-grpc; rounds 1.50/0.50/0.50) |" in render_table(doc)
    one = rows("raftkv", [1234.0], [1.0])
    assert merge_rounds(one) is one[0] and "rounds" not in one[0]


def test_scale_rounds_give_medians_and_each_shard_count_against_the_first_round_by_round() -> None:
    def row(ns: int, w: str, ops: float) -> dict:
        return {"shards": ns, "system": "raftkv", "workload": w, "clients": 32, "ops": int(ops), "ops_s": ops,
                "p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 3.0, "server_cpu": 1.0, "errors": 0, "indeterminate": 0}

    rows = {(1, "put"): [row(1, "put", 3000), row(1, "put", 2000), row(1, "put", 2500)],
            (6, "put"): [row(6, "put", 2400), row(6, "put", 2400), row(6, "put", 2500)],
            (1, "get"): [row(1, "get", 5000)] * 3, (6, "get"): [row(6, "get", 4000)] * 3}
    table = shards_table(rows, (1, 6))
    assert [(r["shards"], r["workload"]) for r in table] == [(1, "put"), (1, "get"), (6, "put"), (6, "get")]
    six_put = table[2]
    assert six_put["ops_s"] == 2400 and six_put["x_first_rounds"] == [0.8, 1.2, 1.0] and six_put["x_first"] == 1.0
    assert table[0]["x_first"] == 1.0 and table[3]["x_first"] == 0.8

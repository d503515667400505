"""The node's engine on either store (LMDB, RocksDB) keeps the same promises.

* buffered commits of puts, deletions and range deletions leave exactly what a dict model says (hypothesis);
* a read view is one point in time: later commits are invisible to its gets and scans;
* a commit batch's ``delete_first`` / ``delete_range`` / ``put_many`` do what their names say, in call order;
* a data directory keeps the store it was made with, and naming another is refused with the fix;
* a process killed with SIGKILL keeps every commit ``sync()`` returned from (real process, real files);
* a cluster of nodes on RocksDB serves, and a killed node comes back with its data.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftkv.engine import Engine, EngineError, store_kind

KINDS = ["lmdb", "rocksdb"]
ROOT = Path(__file__).resolve().parents[1]

keys = st.binary(min_size=1, max_size=3).map(lambda b: b"k" + b)
ops = st.lists(st.one_of(
    st.tuples(st.just("put"), keys, st.binary(max_size=8)),
    st.tuples(st.just("del"), keys, st.just(b"")),
    st.tuples(st.just("range"), keys, keys),
    st.tuples(st.just("sync"), st.just(b""), st.just(b"")),
), max_size=60)


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path):
    """An engine on each store in turn, closed afterwards."""
    eng = Engine(str(tmp_path / "e"), kind=request.param)
    yield eng
    eng.close()


def _model_apply(model: dict[bytes, bytes], op: str, a: bytes, b: bytes) -> None:
    if op == "put":
        model[a] = b
    elif op == "del":
        model.pop(a, None)
    elif op == "range":
        for k in [k for k in model if a <= k < b]:
            del model[k]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_buffered_commits_leave_what_a_dict_model_says(tmp_path_factory: pytest.TempPathFactory, kind: str,
                                                        ops: list) -> None:
    engine = Engine(str(tmp_path_factory.mktemp(kind)), kind=kind)
    model: dict[bytes, bytes] = {}
    try:
        for op, a, b in ops:
            if op == "put":
                engine.put(a, b)
            elif op == "del":
                engine.delete(a)
            elif op == "range":
                engine.delete_range(a, b)
            else:
                engine.sync()
                assert dict(engine.scan(b"", b"\xff")) == model
            _model_apply(model, op, a, b)
        engine.sync()
        assert list(engine.scan(b"", b"\xff")) == sorted(model.items())
        for k in {a for op, a, _ in ops if op != "sync"}:
            assert engine.get(k) == model.get(k)
    finally:
        engine.close()


def test_a_read_view_is_one_point_in_time(engine: Engine) -> None:
    for i in range(100):
        engine.put(b"k%03d" % i, b"old")
    engine.sync()
    with engine.read_view() as view:
        engine.put(b"k000", b"new")
        engine.put(b"k0005", b"added")
        engine.delete_range(b"k050", b"k060")
        engine.sync()
        assert view.get(b"k000") == b"old" and view.get(b"k0005") is None and view.get(b"k055") == b"old"
        assert [k for k, _ in view.scan(b"k", b"l")] == [b"k%03d" % i for i in range(100)]
        assert list(view.keys(b"k050", b"k052")) == [b"k050", b"k051"]
        batches = list(view.scan_batches(b"k", b"l", 30))
        assert [len(b) for b in batches] == [30, 30, 30, 10] and all(v == b"old" for b in batches for _, v in b)
        # a point read in the middle of a scan (what a move's scan does) sees the same point in time
        walked = []
        for key in view.keys(b"k000", b"k003"):
            walked.append((key, view.get(key)))
        assert walked == [(b"k000", b"old"), (b"k001", b"old"), (b"k002", b"old")]
    assert engine.get(b"k000") == b"new" and engine.get(b"k055") is None


def test_a_commit_batch_applies_its_operations_in_call_order(engine: Engine) -> None:
    engine.commit_now(lambda wb: wb.put_many((b"a%02d" % i, b"v") for i in range(20)))

    def write(wb):
        first = wb.delete_first_sized(b"a", b"b", 5)  # a00..a04
        more = wb.delete_first(b"a", b"b", 5)  # a05..a09: the batch's own deletions are gone already
        wb.put(b"a50", b"x")
        wb.delete_range(b"a15", b"a99")  # the committed a15..a19 and a50, put by this very batch
        wb.put(b"a60", b"y")  # after the range deletion: stays
        return first, more

    assert engine.commit_now(write) == ((5, 5 * (3 + 1)), 5)
    assert list(engine.scan(b"a", b"b")) == [(b"a%02d" % i, b"v") for i in range(10, 15)] + [(b"a60", b"y")]
    assert engine.usage()["keys"] == 6


def test_a_data_directory_keeps_its_store_and_a_mismatch_says_how_to_start(tmp_path: Path) -> None:
    for kind, other in (("lmdb", "rocksdb"), ("rocksdb", "lmdb")):
        path = str(tmp_path / kind)
        Engine(path, kind=kind).close()
        assert store_kind(path) == kind
        with pytest.raises(EngineError, match=f"holds a {kind} store, not {other}: start the node with --engine {kind}"):
            Engine(path, kind=other)
        engine = Engine(path)  # no kind named: the directory's own
        assert engine.kind == kind
        engine.close()



def _map_flags(path: str) -> set[str]:
    """The kernel's VmFlags of this process's mapping of ``path`` (``/proc/self/smaps``)."""
    found = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 6:
                found = fields[-1] == path
            elif found and line.startswith("VmFlags:"):
                return set(fields[1:])
    raise AssertionError(f"{path} is not mapped")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_an_lmdb_engine_reads_pages_without_readahead_except_while_it_streams_a_range(tmp_path: Path) -> None:
    # Random gets and checkpoints fault single pages in; with the kernel's readahead each fault read 32 pages,
    # which a node whose data outgrew its memory could not afford. A whole-range stream reads ahead again.
    engine = Engine(str(tmp_path / "e"), kind="lmdb")
    try:
        engine.commit_now(lambda batch: [batch.put(b"k%05d" % i, b"v" * 100) for i in range(2_000)])
        data = os.path.realpath(str(tmp_path / "e" / "data.mdb"))
        assert "rr" in _map_flags(data)  # MADV_RANDOM: the faulting page only
        with engine.read_view() as one, engine.read_view() as two:
            first, second = one.scan_batches(b"k", b"l", 500), two.scan_batches(b"k", b"l", 500)
            assert len(next(first)) == 500 and "rr" not in _map_flags(data)
            assert len(next(second)) == 500
            assert sum(map(len, first)) == 1_500 and "rr" not in _map_flags(data)  # the other stream goes on
            assert sum(map(len, second)) == 1_500
            assert "rr" in _map_flags(data)  # both done: random again
            walk = one.keys(b"k", b"l")  # a walk of the keys (a move's scan) reads ahead too, until it ends
            assert next(walk) == b"k00000" and "rr" not in _map_flags(data)
            walk.close()
            assert "rr" in _map_flags(data)
            assert engine.get(b"k01999") == b"v" * 100
    finally:
        engine.close()

@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_process_keeps_every_commit_sync_returned_from(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "e"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from raftkv.engine import Engine
        e = Engine({str(path)!r}, kind={kind!r})
        i = 0
        while True:
            for j in range(20):
                e.put(b"b%06d-%02d" % (i, j), b"x" * 100)
            e.put(b"last", b"%06d" % i)
            e.sync()
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        acked = int(line)
        if acked >= 150:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    engine = Engine(str(path), kind=kind)
    try:
        last = int(engine.get(b"last") or b"-1")
        assert last >= acked
        assert sum(1 for _ in engine.scan(b"b", b"c")) == 20 * (last + 1)  # whole batches only
    finally:
        engine.close()


def test_a_cluster_on_rocksdb_serves_and_a_killed_node_comes_back_with_its_data(tmp_path: Path) -> None:
    from raftkv.client import Client
    from raftkv.cluster import LocalCluster

    lc = LocalCluster.create(tmp_path, nodes=3, shards=2, node_args=["--engine", "rocksdb"])
    lc.start()
    try:
        lc.wait_ready(60)
        with Client(cluster=lc.config) as c:
            for i in range(200):
                c.put(f"k{i}", f"v{i}")
            lc.kill_node("n2")
            for i in range(200, 300):
                c.put(f"k{i}", f"v{i}")
            lc.start_node("n2")
            lc.wait_ready(60)
            assert all(c.get(f"k{i}") == f"v{i}".encode() for i in range(300))
        kinds = {}
        deadline = time.monotonic() + 30
        while len(kinds) < 3 and time.monotonic() < deadline:
            for n in set(lc.map.nodes) - set(kinds):
                with contextlib.suppress(OSError):
                    kinds[n] = json.loads(lc.call(n, "RAFTKV.STATUS", timeout=5.0))["engine"]["kind"]
            time.sleep(0.1)
        assert kinds == {"n1": "rocksdb", "n2": "rocksdb", "n3": "rocksdb"}
    finally:
        lc.stop()

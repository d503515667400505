"""Bulk loading (raftkv.bulk, Client.put_many, `raftkv load`): keys grouped by shard into one-shard
transactions, each atomic and applied once, and every key written."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.bulk import batches, parse_lines
from raftkv.client import Client
from raftkv.replica import APPLIED, ShardReplica
from tests.conftest import examples

keys = st.binary(min_size=1, max_size=6)
items_st = st.lists(st.tuples(keys, st.binary(max_size=12)), max_size=200)


def _shard_of(key: bytes) -> int:
    return key[0] % 3


@settings(max_examples=examples(300))
@given(items_st, st.integers(1, 20), st.integers(1, 60))
def test_batches_are_one_shard_bounded_and_replay_to_the_same_map(items, keys_max, bytes_max) -> None:
    """Every batch holds keys of its shard only, within the limits (an oversize item alone), each key once;
    writing the batches in the order given leaves exactly what writing the items one by one leaves."""
    model: dict[bytes, bytes] = {}
    for k, v in items:
        model[k] = v
    got: dict[bytes, bytes] = {}
    for shard, batch in batches(items, _shard_of, keys_max, bytes_max):
        assert batch and all(_shard_of(k) == shard for k, _ in batch)
        assert len({k for k, _ in batch}) == len(batch)
        assert len(batch) <= keys_max
        size = sum(len(k) + len(v) for k, v in batch)
        assert size <= bytes_max or len(batch) == 1
        got.update(batch)
    assert got == model


def test_batches_keep_the_last_value_of_a_key_repeated_in_one_batch() -> None:
    out = list(batches([(b"a", b"1"), (b"d", b"x"), (b"a", b"2")], _shard_of, 10, 100))
    assert out == [(1, [(b"d", b"x"), (b"a", b"2")])]  # one shard (b"a"[0] % 3 == b"d"[0] % 3); last occurrences


def test_parse_lines_reads_tsv_and_jsonl_and_names_a_bad_line() -> None:
    assert list(parse_lines([b"k1\tv1\n", b"\n", b"k2\tv\twith tab\r\n"])) == [(b"k1", b"v1"), (b"k2", b"v\twith tab")]
    assert list(parse_lines([b'{"key": "k", "value": "\\u00e9"}\n'], "jsonl")) == [(b"k", "\u00e9".encode())]
    with pytest.raises(ValueError, match="line 2: expected KEY<TAB>VALUE"):
        list(parse_lines([b"k\tv\n", b"no tab here\n"]))
    with pytest.raises(ValueError, match="line 1: expected"):
        list(parse_lines([b"[1, 2]\n"], "jsonl"))
    with pytest.raises(ValueError, match="unknown format"):
        list(parse_lines([], "csv"))


@contextlib.contextmanager
def _lone_leader(tmp_path: Path) -> Iterator[ShardReplica]:
    """A one-member group of shard 0 in this process, once it leads; destroyed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = ShardReplica(0, f"127.0.0.1:{port}", [], str(tmp_path / "shard-0"))
    try:
        deadline = time.monotonic() + 30
        while not r.is_leader():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield r
    finally:
        r.destroy()


def _propose(r: ShardReplica, cmd: tuple) -> str:
    done = threading.Event()
    out: list[str] = []

    def cb(kind: str, _result: object) -> None:
        out.append(kind)
        done.set()

    r.propose([cmd], int(time.time() * 1000), cb)
    assert done.wait(30)
    return out[0]


def test_a_checkpoint_is_taken_by_keys_written_not_only_by_commands(tmp_path: Path, monkeypatch) -> None:
    """One command writing thousands of keys (a bulk batch) counts by its keys: the writes held in memory until
    a checkpoint stay bounded by the checkpoint interval."""
    monkeypatch.setattr("raftkv.replica.COMPACT_EVERY_CMDS", 2_000)
    with _lone_leader(tmp_path) as r:
        for batch in range(6):  # 6 commands of 1,000 keys: far below 2,000 commands
            puts = tuple(("put", b"k%06d" % (batch * 1000 + i), b"v") for i in range(1000))
            assert _propose(r, ("txn_once", f"t{batch}", (), puts, ())) == APPLIED
        deadline = time.monotonic() + 30
        while r.snapshots.stats["checkpoints"] < 2:
            assert time.monotonic() < deadline, r.snapshots.stats
            time.sleep(0.05)
        assert r.state.data.written() < 4_000


def test_put_many_and_the_load_command_write_every_key(cluster, tmp_path: Path) -> None:
    """5,000 keys through Client.put_many and 3,000 more through `raftkv load`: every one readable after."""
    with Client(cluster=cluster.map) as c:
        seen: list[int] = []
        n = c.put_many(((f"bulk:{i}", f"v{i}") for i in range(5_000)), progress=seen.append)
        assert n == 5_000 and seen[-1] == 5_000 and seen == sorted(seen)
        assert all(c.get(f"bulk:{i}") == f"v{i}".encode() for i in range(0, 5_000, 97))
        assert c.get("bulk:4999") == b"v4999"
        src = tmp_path / "load.tsv"
        src.write_bytes(b"".join(b"file:%d\tw%d\n" % (i, i) for i in range(3_000)))
        cli = [sys.executable, "-m", "raftkv", "load", str(src), "--cluster", str(cluster.config)]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "loaded 3,000 keys" in done.stdout
        assert all(c.get(f"file:{i}") == f"w{i}".encode() for i in range(0, 3_000, 101))
        bad = tmp_path / "bad.tsv"
        bad.write_bytes(b"ok:1\tx\nthis line has no tab\n")
        done = subprocess.run([*cli[:4], str(bad), *cli[5:]], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "line 2: expected KEY<TAB>VALUE" in done.stderr


def test_an_entry_slow_to_apply_is_logged_with_its_commands(tmp_path: Path, monkeypatch, caplog) -> None:
    """``event=slow_apply``: the driver thread applies every group's entries, so an entry slow to apply delays
    every group's heartbeats; the log names the shard and the commands (here every apply counts as slow)."""
    monkeypatch.setattr("raftkv.replica.SLOW_APPLY_S", 0.0)
    with _lone_leader(tmp_path) as r:
        caplog.set_level("WARNING", logger="raftkv.replica")
        puts = tuple(("put", b"k%03d" % i, b"v") for i in range(100))
        assert _propose(r, ("txn_once", "t1", (), puts, ())) == APPLIED
        lines = [rec.getMessage() for rec in caplog.records if "event=slow_apply" in rec.getMessage()]
        assert any("shard=0" in m and "cmds=txn_oncex1" in m for m in lines), lines

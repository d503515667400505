"""The change feed on live clusters: RAFTKV.WATCH over RESP, Client.watch, the CLI, and a leader kill."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest
import redis

from raftkv import Client, IndeterminateError, RaftKVError
from raftkv.aio import AsyncClient
from raftkv.client import CompactedError, WatchEvent
from raftkv.cluster import LocalCluster
from tests.conftest import redis_to


@pytest.fixture
def lc(cluster: LocalCluster) -> LocalCluster:
    return cluster  # the module's shared 3-node cluster (conftest)


def test_watch_a_key_over_redis_py(lc: LocalCluster) -> None:
    r = redis_to(lc, "n1")
    cursor, events = r.execute_command("RAFTKV.WATCH", "KEY", "wk", "FROM", "$")
    assert events == []
    r.set("wk", "1")
    r.set("wk-other", "x")  # same prefix, another key: not in a key watch
    r.delete("wk")
    cursor2, events = r.execute_command("RAFTKV.WATCH", "KEY", "wk", "FROM", cursor, "COUNT", "10")
    shard = lc.map.shard_for_key(b"wk")
    assert [(e[0], e[2], e[3], e[4]) for e in events] == [(shard, b"put", b"wk", b"1"), (shard, b"del", b"wk", None)]
    assert int(cursor) < events[0][1] < events[1][1] <= int(cursor2)
    # The same cursor again, on another node: the same answer (every replica keeps the same log).
    again = redis_to(lc, "n3").execute_command("RAFTKV.WATCH", "KEY", "wk", "FROM", cursor, "COUNT", "10")
    assert again[1] == events
    # COUNT cuts the answer, and the cursor then stops at the last event handed out.
    cut, first = r.execute_command("RAFTKV.WATCH", "KEY", "wk", "FROM", cursor, "COUNT", "1")
    assert first == events[:1] and int(cut) == events[0][1]
    with pytest.raises(redis.ResponseError, match="ahead of the shard"):
        r.execute_command("RAFTKV.WATCH", "KEY", "wk", "FROM", str(int(cursor2) + 10**6))
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("RAFTKV.WATCH", "KEY", "wk", "SINCE", "0")
    with pytest.raises(redis.ResponseError, match="one revision per shard"):
        r.execute_command("RAFTKV.WATCH", "PREFIX", "wk", "FROM", "0=1")


def test_a_blocking_watch_returns_the_change_that_ends_it(lc: LocalCluster) -> None:
    r = redis_to(lc, "n2")
    cursor, _ = r.execute_command("RAFTKV.WATCH", "KEY", "wblock", "FROM", "$")
    got: list = []
    poller = threading.Thread(target=lambda: got.append(redis_to(lc, "n2").execute_command(
        "RAFTKV.WATCH", "KEY", "wblock", "FROM", cursor, "BLOCK", "60000")))
    poller.start()
    r.set("wblock", "v")  # whenever the poll is waiting (or not yet sent), it ends with this change
    poller.join(timeout=60)
    assert not poller.is_alive()
    assert [e[4] for e in got[0][1]] == [b"v"]
    # Nothing changes: a short block ends empty, the cursor where it was.
    assert r.execute_command("RAFTKV.WATCH", "KEY", "wblock", "FROM", got[0][0], "BLOCK", "50") == [got[0][0], []]


def test_a_prefix_watch_spans_shards_in_order_per_shard(lc: LocalCluster) -> None:
    with Client(cluster=lc.config) as c:
        w = c.watch("pw:", prefix=True)
        assert w.poll(block=False) == [] and sorted(w.cursors) == [0, 1, 2]
        ops = []
        for i in range(30):
            c.put(f"pw:{i}", str(i))
            ops.append((f"pw:{i}".encode(), str(i).encode()))
            if i % 3 == 0:
                c.delete(f"pw:{i}")
                ops.append((f"pw:{i}".encode(), None))
        c.put("pwx", "not under the prefix")
        seen: list[WatchEvent] = []
        for e in w:
            seen.append(e)
            if len(seen) == len(ops):
                break
    assert {e.shard for e in seen} == {0, 1, 2}
    for shard in (0, 1, 2):
        revs = [e.revision for e in seen if e.shard == shard]
        assert revs == sorted(revs) and len(set(revs)) == len(revs)
    for key in {k for k, _ in ops}:  # per key: exactly its changes, in the order they were made
        assert [e.value for e in seen if e.key == key] == [v for k, v in ops if k == key]
    assert w.poll(block=False) == []  # nothing left over, nothing repeated


def test_async_watch_long_polls_beside_the_shared_connections(lc: LocalCluster) -> None:
    async def main() -> list[WatchEvent]:
        async with AsyncClient(cluster=lc.config) as c:
            w = c.watch("aw:", prefix=True, block=30.0)
            assert await w.apoll(block=False) == []
            seen: list[WatchEvent] = []

            async def follow() -> None:
                async for e in w:
                    seen.append(e)
                    if len(seen) == 6:
                        return
            follower = asyncio.create_task(follow())
            for i in range(3):  # while the watch waits on its own connection, these are answered
                await c.put(f"aw:{i}", str(i))
                await c.delete(f"aw:{i}")
            await asyncio.wait_for(follower, 60)
            await w.aclose()
            return seen
    seen = asyncio.run(main())
    assert [(e.key, e.value) for e in sorted(seen, key=lambda e: (e.key, e.revision))] == [
        (f"aw:{i}".encode(), v) for i in range(3) for v in (str(i).encode(), None)]


def test_range_get_prefix_and_an_exact_dbsize(lc: LocalCluster) -> None:
    r = redis_to(lc, "n1")
    before = r.dbsize()
    names = [f"rg:{i:02d}" for i in range(25)]
    for k in names:
        r.set(k, k.upper())
    r.set("rg;", "just past the prefix")
    r.set("rg:gone", "x", px=1)
    while r.pttl("rg:gone") != -2:  # wait until the shard's log time passed its deadline
        time.sleep(0.01)
    assert r.dbsize() == before + len(names) + 1  # expired keys and the cluster's own are not counted
    flat = r.execute_command("RAFTKV.RANGE", "rg:", "rg;")
    assert flat[0::2] == [k.encode() for k in names] and flat[1::2] == [k.upper().encode() for k in names]
    assert r.execute_command("RAFTKV.RANGE", "rg:05", "rg:08", "LIMIT", "2") == [b"rg:05", b"RG:05", b"rg:06", b"RG:06"]
    with Client(cluster=lc.config) as c:
        assert [k for k, _ in c.get_prefix("rg:")] == [k.encode() for k in names]
        assert [k for k, _ in c.range("rg:1", "rg:2", page=3)] == [k.encode() for k in names[10:20]]
        assert len(list(c.range("rg:", limit=7, page=3))) == 7
    with pytest.raises(redis.ResponseError, match="LIMIT"):
        r.execute_command("RAFTKV.RANGE", "a", "b", "LIMIT", "0")


def test_cli_watch_prints_changes_from_a_revision(lc: LocalCluster) -> None:
    with Client(cluster=lc.config) as c:
        w = c.watch("cliw")
        w.poll(block=False)
        start = w.cursors
        c.put("cliw", "one")
        c.delete("cliw")
        c.put("cliw", "two")
    (shard, rev), = start.items()
    env = dict(os.environ, RAFTKV_CLUSTER=str(lc.config))
    out = subprocess.run([sys.executable, "-m", "raftkv", "watch", "cliw", "--rev", str(rev), "--count", "3"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [ln.split(" ", 1)[1] for ln in lines] == ["PUT cliw one", "DEL cliw", "PUT cliw two"]
    assert all(ln.startswith(f"{shard}:") for ln in lines)
    got = subprocess.run([sys.executable, "-m", "raftkv", "get", "--prefix", "cliw"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert (got.returncode, got.stdout) == (0, "cliw two\n")


# -- a leader dies mid-stream ---------------------------------------------------------------------

class KeyWriter(threading.Thread):
    """Changes one key, one operation after another (put i, put i+1, put i+2, delete, ...), and records
    each operation's outcome: "acked", "unknown" (may have happened) or "failed" (did not)."""

    def __init__(self, cluster_file: os.PathLike, key: str) -> None:
        super().__init__(daemon=True)
        self.client, self.key = Client(cluster=cluster_file, timeout=10.0), key
        self.ops: list[tuple[bytes | None, str]] = []  # (value put, or None: delete; outcome)
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            value = None if i % 4 == 3 else str(i).encode()
            try:
                if value is None:
                    self.client.delete(self.key)
                else:
                    self.client.put(self.key, value)
                self.ops.append((value, "acked"))
            except IndeterminateError:
                self.ops.append((value, "unknown"))
            except RaftKVError:
                self.ops.append((value, "failed"))
            i += 1

    def acked(self) -> int:
        return sum(1 for _, outcome in self.ops if outcome == "acked")


def check_feed(ops: list[tuple[bytes | None, str]], seen: list[bytes | None]) -> None:
    """``seen`` (values, None for a deletion) is what applying ``ops`` in order gives: every acknowledged
    change once, no failed one, unknown ones at most once, nothing else, nothing twice."""
    pos, exists = 0, False
    for value, outcome in ops:
        changes = value is not None or exists  # deleting a missing key changes nothing
        if changes and outcome != "failed" and pos < len(seen) and seen[pos] == value:
            pos, exists = pos + 1, value is not None
        else:
            assert not (changes and outcome == "acked"), f"acknowledged change {value!r} missing at event {pos}"
    assert pos == len(seen), f"events not explained by the writes (duplicates?): {seen[pos:pos + 5]}"


def test_a_watcher_sees_every_change_once_across_a_leader_kill(fresh_cluster: LocalCluster) -> None:
    lc, key = fresh_cluster, "watched"
    shard = lc.map.shard_for_key(key.encode())
    watcher_client = Client(cluster=lc.config, timeout=30.0)
    w = watcher_client.watch(key)
    w.poll(block=False)
    seen: list[WatchEvent] = []
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            for e in w:
                if e.value == b"end":
                    return
                seen.append(e)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    writer = KeyWriter(lc.config, key)
    writer.start()
    deadline = time.monotonic() + 120
    while writer.acked() < 20 and not errors:
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.05)
    while len(seen) < 10 and not errors:  # the watcher is mid-stream when its shard's leader dies
        assert time.monotonic() < deadline, "the watcher saw nothing"
        time.sleep(0.05)
    victim = lc.leader_of(shard)
    assert victim is not None
    lc.kill_node(victim)
    acked_at_kill = writer.acked()
    while writer.acked() < acked_at_kill + 20 and not errors:
        assert time.monotonic() < deadline, "no writes acknowledged after the leader was killed"
        time.sleep(0.05)
    writer.stop.set()
    writer.join(timeout=60)
    with Client(cluster=lc.config, timeout=30.0) as c:
        c.put(key, "end")
    watcher.join(timeout=60)
    assert not watcher.is_alive() and errors == [], errors
    revisions = [e.revision for e in seen]
    assert revisions == sorted(set(revisions)), "revisions repeat or go back"
    check_feed(writer.ops, [e.value for e in seen])
    print(f"leader {victim} killed: {len(seen)} changes seen, ops {len(writer.ops)} "
          f"({sum(1 for _, o in writer.ops if o != 'acked')} not acknowledged)")


def test_a_compacted_cursor_names_the_oldest_revision() -> None:
    err = CompactedError("oldest=42 shard=1: changes after revision 3 are no longer retained")
    assert (err.code, err.oldest, err.shard) == ("COMPACTED", 42, 1)

"""The deliberately broken build flags the fault harness must catch (negative controls, issue 13).

``raftkv serve --unsafe-skip-locks``: one-shard writes ignore the locks of prepared
cross-shard transactions.  ``raftkv serve --unsafe-watch-miss``: EXEC misses a
write to a watched key made after WATCH.  Here: each flag changes what the store
does, at the state-machine level (and, for WATCH, through a real node), and the
correct build does not.  ``tests/test_jepsen_harness.py`` shows the harness
catching each of them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis

from raftkv.replica import ShardReplica
from raftkv.state import KVState, Locked
from raftkv.txn import (
    COMMITTED,
    TxnResult,
    single_shard_cmd,
    watch_compare,
    watch_compare_missing_writes,
    watch_read,
)

from .conftest import start_cluster

T0 = 1_000_000
LEN_MAX = 1 << 20


def _state(unsafe_skip_locks: bool) -> KVState:
    s = KVState(unsafe_skip_locks=unsafe_skip_locks)
    s.apply(("set", b"a", b"1,"), T0)
    s.apply(("set", b"n", b"5"), T0)
    return s


def _prepare_append(s: KVState, txid: str = "t") -> tuple:
    """A cross-shard transaction's participant: reads ``a`` and appends to it, prepared (locked), not finished."""
    return s.apply(("tx_prepare", txid, 0, (), (("get", b"a"), ("append", b"a", b"2,", LEN_MAX)), ()), T0 + 1)


ONE_SHARD_WRITES = {
    "set": ("set", b"a", b"x,"),
    "append": ("append", b"a", b"x,", LEN_MAX),
    "del": ("del", [b"a"]),
    "cas": ("cas", b"a", b"1,", b"x,"),
    "one-shard txn": single_shard_cmd("one", [], [("append", b"a", b"x,", LEN_MAX)], []),
    "session": ("session", b"client", 1, ("append", b"a", b"x,", LEN_MAX)),
}


@pytest.mark.parametrize("cmd", ONE_SHARD_WRITES.values(), ids=ONE_SHARD_WRITES.keys())
def test_a_one_shard_write_waits_for_a_prepared_lock_and_goes_through_it_only_with_unsafe_skip_locks(
        cmd: tuple) -> None:
    safe, unsafe = _state(False), _state(True)
    for s in (safe, unsafe):
        assert _prepare_append(s)[:2] == ("yes", True)
    assert isinstance(safe.apply(cmd, T0 + 2), Locked)
    assert safe.peek(b"a")[0] == b"1,"  # nothing written under the lock
    assert not isinstance(unsafe.apply(cmd, T0 + 2), Locked)
    assert unsafe.peek(b"a") is None or unsafe.peek(b"a")[0] != b"1,"  # written under the lock


def test_unsafe_skip_locks_loses_what_the_prepared_transaction_read() -> None:
    """The anomaly the harness's Elle check names: the transaction read ``1,`` and appended ``2,``
    at PREPARE, a one-shard append ``x,`` slipped in between, and COMMIT appends on top of it:
    ``1,x,2,``, a history no serial order explains (G-single)."""
    s = _state(True)
    assert _prepare_append(s) == ("yes", True, (b"1,", 4), ())
    assert s.apply(("append", b"a", b"x,", LEN_MAX), T0 + 2) == 4
    assert s.apply(("tx_finish", "t", COMMITTED, True), T0 + 3) == COMMITTED
    assert s.peek(b"a")[0] == b"1,x,2,"


def test_unsafe_skip_locks_leaves_reads_and_transactions_as_they_were() -> None:
    s = _state(True)
    _prepare_append(s)
    assert isinstance(s.apply(("get", b"a"), T0 + 2), Locked)  # reads still meet the lock
    assert isinstance(s.read(("get", b"a")), Locked)
    vote = s.apply(("tx_prepare", "u", 0, (), (("put", b"a", b"y"),), ()), T0 + 2)
    assert vote[:2] == ("no", "conflict")  # and so does another transaction's PREPARE
    assert s.apply(("incrby", b"n", 1), T0 + 2) == 6  # unlocked keys: as always
    assert s.txns.blind is False  # the blind view lasts one command


def test_unsafe_skip_locks_is_a_node_setting_that_no_snapshot_carries() -> None:
    """Every replica must apply the same way: the setting comes from the node (all nodes of a
    harness run get the flag), and a replica puts it on every state it installs."""
    s = _state(True)
    _prepare_append(s)
    restored = KVState.restore(s.snapshot())
    assert restored.unsafe_skip_locks is False and restored.txns.locks == s.txns.locks
    assert isinstance(restored.apply(("set", b"a", b"x"), T0 + 2), Locked)
    replica = SimpleNamespace(unsafe_skip_locks=True, state=None)
    ShardReplica._set_state(replica, restored)  # type: ignore[arg-type]
    assert replica.state is restored and restored.unsafe_skip_locks is True
    assert restored.apply(("set", b"a", b"x"), T0 + 2) == restored.revision


def test_unsafe_watch_miss_compare_misses_a_write_after_watch() -> None:
    s = _state(False)
    seen = s.read(watch_read(b"a"))
    s.apply(("set", b"a", b"changed"), T0 + 1)
    exec_ops = [("put", b"a", b"mine")]
    assert s.apply(("txn", [watch_compare(b"a", seen)], exec_ops, []), T0 + 2) == TxnResult(False, ())
    assert s.apply(("txn", [watch_compare_missing_writes(b"a", seen)], exec_ops, []), T0 + 2).succeeded
    assert s.peek(b"a")[0] == b"mine"  # the write after WATCH is lost
    # A key WATCH saw missing is checked as usual.
    gone = s.read(watch_read(b"z"))
    s.apply(("set", b"z", b"new"), T0 + 3)
    assert watch_compare_missing_writes(b"z", gone) == watch_compare(b"z", gone)


@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "unsafe-watch-miss"])
def test_exec_after_a_write_to_a_watched_key(tmp_path, unsafe: bool) -> None:
    """Through a real node: EXEC answers nil when a watched key was written after WATCH; a node
    started with ``--unsafe-watch-miss`` runs it anyway and the other write is lost."""
    lc = start_cluster(str(tmp_path / "c"), nodes=1, shards=1, node_args=["--unsafe-watch-miss"] if unsafe else None)
    try:
        node = lc.map.nodes["n1"]
        mine = redis.Redis(host=node.host, port=node.client_port, protocol=2, socket_timeout=10)
        other = redis.Redis(host=node.host, port=node.client_port, protocol=2, socket_timeout=10)
        mine.set("counter", "1")
        assert mine.execute_command("WATCH", "counter") in (True, b"OK")
        assert mine.get("counter") == b"1"
        other.set("counter", "2")  # between WATCH and EXEC
        assert mine.execute_command("MULTI") in (True, b"OK")
        mine.execute_command("SET", "counter", "2")  # 1 + 1, as read under WATCH
        got = mine.execute_command("EXEC")
        assert got == ([b"OK"] if unsafe else None)  # unsafe: two increments from 1, the counter says 2
    finally:
        lc.stop()

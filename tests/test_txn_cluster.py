"""Cross-shard transactions against real node processes (3 nodes x 3 shards).

Fault tests arm the nodes' fault points when they start them (``raftkv serve --fault
txn.after_prepare:SECONDS:1:TXID``, see raftkv.server.api) to stop a coordinator at a
chosen point, then ``kill -9`` it.  Assertions are on outcomes
(all-or-nothing, no lock left), never on timings.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from raftkv.client import Client, IndeterminateError, RaftKVError, UnavailableError
from raftkv.cluster import LocalCluster, call
from raftkv.txnclient import Txn
from tests.conftest import running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    faults = ["--fault", "txn.after_prepare:60:1:pause-k1", "--fault", "txn.after_decide:60:1:pause-k2",
              "--fault", "txn.after_prepare:0.5:1:pause-k3", "--fault", "txn.after_prepare:2:0:hold-w",
              "--fault", "txn.partial_prepare:60:1:pause-k4"]
    with running(LocalCluster.create(str(tmp_path_factory.mktemp("txn")), nodes=3, shards=3, node_args=faults)) as c:
        yield c


@pytest.fixture(scope="module")
def client(lc: LocalCluster) -> Iterator[Client]:
    with Client(cluster=lc.config, timeout=20.0) as c:
        yield c


def keys_on(lc: LocalCluster, shard: int, n: int, prefix: str) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        k = f"{prefix}{i}"
        if lc.map.shard_for_key(k.encode()) == shard:
            out.append(k)
        i += 1
    return out


def redis_on(lc: LocalCluster, node: str, protocol: int = 3) -> redis.Redis:
    host, port = lc.map.nodes[node].client_addr
    return redis.Redis(host=host, port=port, protocol=protocol, socket_timeout=20)


def txstats(lc: LocalCluster) -> dict[str, list]:
    out = {}
    for name, info in lc.map.nodes.items():
        if lc.pid(name) is not None:
            try:
                out[name] = call(info.client_addr, "RAFTKV.TXSTATS", timeout=3.0)
            except (OSError, ConnectionError):  # starting up: not serving yet
                out[name] = [[-1, b"starting", 1, 0, 0, 0, 0]]
    return out


def wait_no_txn_state(lc: LocalCluster, timeout: float = 30.0) -> None:
    """Every running replica: no lock, nothing prepared, no open record."""
    deadline = time.monotonic() + timeout
    while True:
        stats = txstats(lc)
        busy = {n: rows for n, rows in stats.items() if any(r[2] or r[3] or r[4] for r in rows)}
        if not busy:
            return
        assert time.monotonic() < deadline, f"transaction state left behind: {busy}"
        time.sleep(0.2)


def restart(lc: LocalCluster, node: str) -> None:
    lc.start_node(node)
    lc.wait_ready(60)


def wait_log(lc: LocalCluster, node: str, needle: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in lc.log_file(node).read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{needle!r} never logged by {node}"
        time.sleep(0.05)


def place_leaders(lc: LocalCluster, wanted: dict[int, str]) -> None:
    """Best effort: move shard leaders (RAFTKV.TRANSFER) until ``wanted`` holds."""
    for _ in range(50):
        leaders = lc.leaders()
        if all(leaders[s] == n for s, n in wanted.items()):
            return
        for s, n in wanted.items():
            if leaders[s] != n and leaders[s] is not None:
                try:
                    call(lc.map.nodes[leaders[s]].client_addr, "RAFTKV.TRANSFER", str(s), n, timeout=3.0)
                except (OSError, ConnectionError):
                    pass
        time.sleep(0.3)
    pytest.skip(f"could not place leaders as {wanted}: {lc.leaders()}")


# -- happy paths ---------------------------------------------------------------------------

def test_mset_across_three_shards_redis_py(lc: LocalCluster) -> None:
    keys = [k for s in range(3) for k in keys_on(lc, s, 2, "ms")]
    for node in lc.map.nodes:  # any node accepts it (forwards to the home leader)
        r = redis_on(lc, node)
        assert r.mset({k: f"{node}-{k}" for k in keys}) is True
        assert r.mget(keys) == [f"{node}-{k}".encode() for k in keys]
    r2 = redis_on(lc, "n1", protocol=2)
    assert r2.mset({k: "p2" for k in keys}) is True and r2.mget(keys) == [b"p2"] * len(keys)


def test_conditional_txn_redis_py_both_branches(lc: LocalCluster) -> None:
    a, b, c = keys_on(lc, 0, 1, "ca")[0], keys_on(lc, 1, 1, "cb")[0], keys_on(lc, 2, 1, "cc")[0]
    r = redis_on(lc, "n2")
    r.mset({a: "1", b: "x", c: "y"})
    rev_b = r.execute_command("RAFTKV.TXN", 0, 1, "GET", b, 0)
    assert rev_b == [1, [b"x"]]
    got = r.execute_command("RAFTKV.TXN", 2, a, "VALUE", "1", c, "EXISTS", 3, "PUT", a, "2", "PUT", b, "3",
                            "GET", c, 1, "GET", a)
    assert got == [1, [b"OK", b"OK", b"y"]]
    got = r.execute_command("RAFTKV.TXN", 1, a, "VALUE", "1", 1, "PUT", b, "no", 2, "GET", a, "DEL", c)
    assert got == [0, [b"2", 1]]
    assert r.mget([a, b, c]) == [b"2", b"3", None]
    with pytest.raises(redis.ResponseError, match="syntax"):
        r.execute_command("RAFTKV.TXN", 1, a, "BOGUS", 0, 0)


def test_client_txn_builder_and_mset(lc: LocalCluster, client: Client) -> None:
    a, b, c = keys_on(lc, 0, 1, "la")[0], keys_on(lc, 1, 1, "lb")[0], keys_on(lc, 2, 1, "lc")[0]
    client.mset({a: "1", b: "2", c: "3"})
    assert [client.get(k) for k in (a, b, c)] == [b"1", b"2", b"3"]
    r = client.txn().if_value(a, "1").if_exists(c).then_put(a, "2").then_put(b, "3").then_get(c).commit()
    assert r.succeeded and r.results == [True, True, b"3"]
    r = client.txn().if_value(a, "1").then_put(a, "x").else_get(a).else_delete(c).commit()
    assert not r.succeeded and r.results == [b"2", 1]
    assert client.txn().if_missing(c).then_put(c, "back").commit().succeeded
    assert [client.get(k) for k in (a, b, c)] == [b"2", b"3", b"back"]


def test_a_transaction_planned_under_another_ring_is_refused_and_runs_nowhere(lc: LocalCluster,
                                                                            client: Client) -> None:
    """A transaction's record lives on the home shard its ring gives its first key: the same id planned under
    another ring (after ``raftkv shard add|remove``) would find no record and could run a second time (seen in
    the harness: a resend after an unknown outcome committed twice, with reads of the second run). ``RING`` names
    the ring the client planned under; a node with another one refuses (-RINGCHANGED), on the node the client
    chose and on the home leader it hands over to. The client sends it."""
    a, b = keys_on(lc, 0, 1, "ring-a")[0], keys_on(lc, 1, 1, "ring-b")[0]
    tag = client.map.ring_tag
    assert tag == "3.0"
    r = redis_on(lc, "n3")
    for node in ("n1", "n2", "n3"):  # whichever node gets it: the node itself, or the home leader it hands to
        with pytest.raises(redis.ResponseError, match=r"RINGCHANGED 3\.0 .* not 4\.7"):
            redis_on(lc, node).execute_command("RAFTKV.TXN", "ID", f"t-{node}", "RING", "4.7", 0, 2, "PUT", a, "x",
                                               "PUT", b, "y", 0)
    assert r.mget([a, b]) == [None, None]  # run nowhere
    assert r.execute_command("RAFTKV.TXN", "ID", "t-ok", "RING", tag, 0, 2, "PUT", a, "1", "PUT", b, "2", 0) == \
        [1, [b"OK", b"OK"]]
    assert client.txn().then_get(a).then_get(b).then_put(a, "3").commit().results == [b"1", b"2", True]
    sent: list[list[bytes]] = []
    t = client.txn().then_put(a, "4")
    t._request = lambda shard, args: sent.append(args) or [1, [b"OK"]]  # type: ignore[method-assign]
    t.commit()
    assert sent[0][3:5] == [b"RING", tag.encode()]


def test_a_resend_refused_for_another_ring_after_an_unknown_outcome_is_unknown() -> None:
    """The first send of a transaction timed out (it may have run), the resend of the same id meets a ring
    change: that first send may have committed under the old ring, so the answer is unknown, not a retry
    under a new id (which could run it twice)."""

    from raftkv.protocol import ReplyError
    from shards.shardmap import local_cluster

    m = local_cluster(3, 3, base_port=17001)
    c = Client(cluster=m, timeout=2.0)
    replies: list[BaseException] = [TimeoutError("timed out"),
                                    ReplyError("RINGCHANGED 4.9 the cluster's ring is 4.9, not 3.0: not run")]

    def call_node(addr: tuple[str, int], args: list[bytes], timeout: float) -> None:
        if args[0] in (b"RAFTKV.SHARDS", b"RAFTKV.CLUSTER"):
            raise ConnectionRefusedError("no node here")
        raise replies.pop(0)

    c._call_node = call_node  # type: ignore[method-assign]
    c._leaders = {s: "n1" for s in range(3)}
    with pytest.raises(IndeterminateError, match="before the ring changed"):
        c.txn().then_put("k", "v").commit()
    assert replies == []


def test_single_shard_txn_is_one_entry(lc: LocalCluster, client: Client) -> None:
    k1, k2 = keys_on(lc, 1, 2, "one")

    def records_of_shard1() -> int:
        return sum(r[5] for rows in txstats(lc).values() for r in rows if r[0] == 1)
    before = records_of_shard1()
    assert client.txn().if_missing(k1).then_put(k1, "a").then_put(k2, "b").commit().succeeded
    assert client.get(k1) == b"a" and client.get(k2) == b"b"
    assert records_of_shard1() == before  # no 2PC record: one Raft entry


def test_watch_multi_exec(lc: LocalCluster) -> None:
    a, b = keys_on(lc, 0, 1, "wa")[0], keys_on(lc, 2, 1, "wb")[0]
    r = redis_on(lc, "n3")
    r.mset({a: "1", b: "1"})
    with r.pipeline() as p:
        p.watch(a, b)
        p.multi()
        p.set(a, "2")
        p.get(b)
        p.delete(b)
        assert p.execute() == [True, b"1", 1]
    assert r.mget([a, b]) == [b"2", None]
    # A watched key changed by someone else: EXEC returns nil (WatchError in redis-py).
    other = redis_on(lc, "n1")
    with r.pipeline() as p:
        p.watch(a)
        other.set(a, "changed")
        p.multi()
        p.set(a, "mine")
        p.set(b, "mine")
        with pytest.raises(redis.WatchError):
            p.execute()
    assert r.mget([a, b]) == [b"changed", None]
    # DISCARD and errors inside MULTI.
    with r.pipeline() as p:
        p.multi()
        p.set(a, "discarded")
        p.reset()
    assert r.get(a) == b"changed"
    with pytest.raises(redis.ResponseError, match="without MULTI"):
        r.execute_command("EXEC")
    assert r.execute_command("MULTI") == b"OK"
    with pytest.raises(redis.ResponseError, match="not supported inside MULTI"):
        r.execute_command("INCR", a)  # refused while queueing: EXEC aborts
    with pytest.raises(redis.ResponseError, match="discarded because of previous errors"):
        r.execute_command("EXEC")


def test_watch_answers_after_reading_a_locked_key(lc: LocalCluster) -> None:
    """Issue 12, item 1: WATCH of a key locked by a paused transaction answers only once it has
    read the key's revision, so a write acknowledged after WATCH answered aborts the EXEC of the
    standard WATCH/GET/MULTI/EXEC check-and-set loop instead of being overwritten."""
    names = list(lc.map.nodes)
    host, port = lc.map.nodes[names[0]].client_addr
    a = redis.Redis(host=host, port=port, socket_timeout=20, single_connection_client=True)  # WATCH is per connection
    b, c = redis_on(lc, names[1]), redis_on(lc, names[2])
    for i in range(3):
        k, other = keys_on(lc, 0, 1, f"wl{i}-")[0], keys_on(lc, 1, 1, f"wl{i}-")[0]
        a.set(k, "1")
        # Paused 2 s after prepare (fault txn.after_prepare:2:0:hold-w): k stays locked.
        def hold(i: int = i, k: str = k, other: str = other) -> None:
            with contextlib.suppress(redis.RedisError):  # commits, or is aborted by the lock resolver
                c.execute_command("RAFTKV.TXN", "ID", f"hold-w{i}", "0", "2", "PUT", k, "10", "PUT", other, "20", "0")
        holder = threading.Thread(target=hold)
        holder.start()
        deadline = time.monotonic() + 10
        while not any(r[2] for rows in txstats(lc).values() for r in rows if r[0] == 0):
            assert time.monotonic() < deadline, "the holding transaction never locked"
            time.sleep(0.02)
        assert a.execute_command("WATCH", k) is True
        leader = lc.leader_of(0)
        locks_now = [r[2] for r in txstats(lc)[leader] if r[0] == 0]
        assert locks_now == [0], f"WATCH answered while {k} was still locked"
        writer = threading.Thread(target=b.set, args=(k, f"v2-{i}"))
        writer.start()
        seen = a.get(k)
        writer.join()  # B's write is acknowledged now, after WATCH answered
        assert a.execute_command("MULTI") in (True, b"OK")
        a.execute_command("SET", k, (seen or b"") + b"+1")
        assert a.execute_command("EXEC") is None, "EXEC committed over a write made after WATCH"
        assert a.get(k) == f"v2-{i}".encode()
        holder.join()


def test_concurrent_conflicting_txns_never_both_commit(lc: LocalCluster) -> None:
    a, b = keys_on(lc, 0, 1, "ra")[0], keys_on(lc, 1, 1, "rb")[0]
    with Client(cluster=lc.config, timeout=20.0) as c:
        c.mset({a: "free", b: "free"})
    winners: list[int] = []
    errors: list[Exception] = []

    def racer(i: int) -> None:
        with Client(cluster=lc.config, timeout=20.0) as c:
            try:
                r = c.txn().if_value(a, "free").then_put(a, f"owner{i}").then_put(b, f"owner{i}").commit(
                    retries=50)
            except RaftKVError as e:
                errors.append(e)
                return
            if r.succeeded:
                winners.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(winners) == 1, winners
    with Client(cluster=lc.config) as c:
        assert c.get(a) == c.get(b) == f"owner{winners[0]}".encode()
    wait_no_txn_state(lc)


def test_hot_key_every_transaction_commits_with_a_small_retry_budget(lc: LocalCluster) -> None:
    """Issue 12: 8 clients append to one hot key through cross-shard transactions (the hot key and a key of
    their own on another shard), each allowed one conflict retry.  With no-wait alone some run out of
    budget; with wait-die (the default) older transactions wait for younger holders and the losers keep
    their priority, so every transaction commits and the hot key holds exactly one mark per commit."""
    hot = keys_on(lc, 0, 1, "hot")[0]
    mine = keys_on(lc, 1, 8, "hotside")
    rounds = 6
    acked: list[str] = []
    exhausted: list[Exception] = []
    unknown: list[Exception] = []

    def worker(i: int) -> None:
        with Client(cluster=lc.config, timeout=20.0) as c:
            for n in range(rounds):
                try:
                    c.txn().then_append(hot, "x").then_put(mine[i], str(n)).commit(retries=1)
                except IndeterminateError as e:
                    unknown.append(e)
                except RaftKVError as e:
                    exhausted.append(e)
                else:
                    acked.append(f"{i}.{n}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Client(cluster=lc.config, timeout=20.0) as c:
        final = c.get(hot) or b""
    assert not exhausted, f"{len(exhausted)} of {8 * rounds} transactions ran out of retries: {exhausted[:3]}"
    assert not unknown, unknown
    assert len(acked) == 8 * rounds
    assert final == b"x" * len(acked)
    wait_no_txn_state(lc)


def test_hot_key_exec_retried_by_the_node_with_one_priority(lc: LocalCluster) -> None:
    """The same hot key through Redis MULTI/APPEND/SET/EXEC from 8 plain Redis clients, on every node: the
    node retries the conflicts itself (``with_conflict_retries``), every attempt with the first one's
    priority; every EXEC succeeds and the key holds one mark per EXEC."""
    hot = keys_on(lc, 0, 1, "hotexec")[0]
    mine = keys_on(lc, 2, 8, "hotexecside")
    nodes = sorted(lc.map.nodes)
    failed: list[Exception] = []
    done = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        r = redis_on(lc, nodes[i % len(nodes)], protocol=2)
        for n in range(3):
            try:
                with r.pipeline(transaction=True) as p:
                    p.append(hot, "x")
                    p.set(mine[i], str(n))
                    p.execute()
            except redis.RedisError as e:
                failed.append(e)
            else:
                with lock:
                    done[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed, failed[:3]
    with Client(cluster=lc.config, timeout=20.0) as c:
        assert c.get(hot) == b"x" * done[0] == b"x" * 24
    wait_no_txn_state(lc)


def test_append_inside_transactions_across_shards(lc: LocalCluster, client: Client) -> None:
    """APPEND in RAFTKV.TXN, Client.txn() and MULTI/EXEC answers the new length; concurrent
    cross-shard appends to the same two keys leave both lists with the same elements in the
    same order (each append ran under its transaction's locks, all or nothing)."""
    a, b, c = keys_on(lc, 0, 1, "apa")[0], keys_on(lc, 1, 1, "apb")[0], keys_on(lc, 2, 1, "apc")[0]
    r = redis_on(lc, "n2")
    assert r.execute_command("RAFTKV.TXN", 0, 3, "APPEND", a, "x,", "APPEND", b, "yy,", "APPEND", a, "z,", 0) == \
        [1, [2, 3, 4]]
    got = client.txn().if_missing(c).then_append(c, "1,").then_get(a).else_get(c).commit()
    assert got.succeeded and got.results == [2, b"x,z,"]
    with r.pipeline() as p:
        p.watch(c)
        p.multi()
        p.append(c, "2,")
        p.append(b, "w,")
        p.get(c)
        assert p.execute() == [4, 5, b"1,2,"]
    with pytest.raises(redis.ResponseError, match="TOOBIG"):
        r.execute_command("RAFTKV.TXN", 0, 2, "APPEND", a, "q", "APPEND", b, "v" * (1 << 20), 0)
    assert r.mget([a, b, c]) == [b"x,z,", b"yy,w,", b"1,2,"]  # the refused one applied nothing

    acked: list[str] = []
    errors: list[Exception] = []

    def appender(i: int) -> None:
        with Client(cluster=lc.config, timeout=20.0) as cl:
            for n in range(6):
                e = f"{i}.{n},"
                try:
                    cl.txn().then_append(a, e).then_append(b, e).commit(retries=50)
                except RaftKVError as err:
                    errors.append(err)
                    continue
                acked.append(e[:-1])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(appender, range(4)))
    assert not errors, errors
    la, lb = (client.get(k).decode().split(",")[:-1] for k in (a, b))
    assert la[:2] == ["x", "z"] and lb[:2] == ["yy", "w"]
    assert la[2:] == lb[2:] and sorted(la[2:]) == sorted(acked) and len(acked) == 24
    wait_no_txn_state(lc)


# -- faults --------------------------------------------------------------------------------

def _paused_txn(lc: LocalCluster, node: str, txid: str, a: str, b: str, value: str, out: dict) -> threading.Thread:
    """Send a cross-shard MSET-like transaction with a pause id straight to ``node``."""
    def run() -> None:
        try:
            out["reply"] = redis_on(lc, node).execute_command("RAFTKV.TXN", "ID", txid, 0, 2, "PUT", a, value,
                                                              "PUT", b, value, 0)
        except (redis.RedisError, OSError) as e:
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _paused_on_n1(lc: LocalCluster, tag: str, point: str) -> tuple[str, str, threading.Thread, dict]:
    """Keys ``a`` (shard 0, led by n1) and ``b`` (shard 1, led by n2) set to "old"; a transaction
    ``pause-<tag>`` writing "new" to both, coordinated by n1, is now paused at fault ``point``."""
    a, b = keys_on(lc, 0, 1, f"{tag}a")[0], keys_on(lc, 1, 1, f"{tag}b")[0]
    with Client(cluster=lc.config, timeout=20.0) as c:
        c.mset({a: "old", b: "old"})
    place_leaders(lc, {0: "n1", 1: "n2"})
    out: dict = {}
    t = _paused_txn(lc, "n1", f"pause-{tag}", a, b, "new", out)
    wait_log(lc, "n1", f"point={point} txid=pause-{tag}")
    return a, b, t, out


def _read_pair(lc: LocalCluster, a: str, b: str) -> tuple:
    with Client(cluster=lc.config, timeout=30.0) as c:
        return c.get(a), c.get(b)


def test_kill_coordinator_between_prepare_and_decision(lc: LocalCluster) -> None:
    """Parallel commits: once the STAGING record and both PREPAREs are durable the transaction is
    committed, and the client is told so before the decision is written.  The coordinator dies
    there; a later reader meets the lock and settles the record (every participant holds its
    PREPARE, so it commits), or the new home leader does."""
    a, b = keys_on(lc, 0, 1, "k1a")[0], keys_on(lc, 1, 1, "k1b")[0]
    with Client(cluster=lc.config, timeout=20.0) as c:
        c.mset({a: "old", b: "old"})
    home = lc.leader_of(0)
    out: dict = {}
    t = _paused_txn(lc, home, "pause-k1", a, b, "new", out)
    wait_log(lc, home, "point=txn.after_prepare txid=pause-k1")
    t.join(10)
    assert out.get("reply") == [1, [b"OK", b"OK"]], out  # answered in one round, before the decision
    lc.kill_node(home)
    lc.wait_ready(60, nodes=[n for n in lc.map.nodes if n != home])
    assert _read_pair(lc, a, b) == (b"new", b"new")  # STAGING + every PREPARE -> committed
    wait_no_txn_state(lc)
    # A client that missed the answer resends the same ID: it finds the commit, applies nothing again.
    survivor = next(n for n in lc.map.nodes if n != home)
    with Client(cluster=lc.config, timeout=20.0) as c:
        c.put(a, "later")
    again = redis_on(lc, survivor).execute_command("RAFTKV.TXN", "ID", "pause-k1", 0, 2, "PUT", a, "new", "PUT", b,
                                                   "new", 0)
    assert again == [1, [b"OK", b"OK"]]
    assert _read_pair(lc, a, b) == (b"later", b"new")
    restart(lc, home)
    wait_no_txn_state(lc)
    with Client(cluster=lc.config, timeout=20.0) as c:  # still serving, and the keys are writable
        c.mset({a: "after", b: "after"})
        assert (c.get(a), c.get(b)) == (b"after", b"after")


def test_kill_coordinator_after_the_record_before_a_participants_prepare(lc: LocalCluster) -> None:
    """The coordinator wrote the STAGING record and the home shard's PREPARE, then died before the
    other PREPARE (fault txn.partial_prepare).  The client heard nothing.  A reader of the locked
    home key settles the record: the other participant refuses for good, so it aborts, and
    neither key changes."""
    a, b, t, out = _paused_on_n1(lc, "k4", "txn.partial_prepare")
    lc.kill_node("n1")
    t.join(10)
    assert "reply" not in out  # the client never heard an outcome
    with Client(cluster=lc.config, timeout=30.0) as c:
        assert c.get(b) == b"old"  # never locked: the PREPARE was not sent
        assert c.get(a) == b"old"  # locked; the reader's resolver aborts it (shard 1 refuses)
    wait_no_txn_state(lc)
    with pytest.raises(redis.ResponseError, match="aborted"):  # the same ID again: the abort stands
        redis_on(lc, "n2").execute_command("RAFTKV.TXN", "ID", "pause-k4", 0, 2, "PUT", a, "new", "PUT", b, "new", 0)
    assert _read_pair(lc, a, b) == (b"old", b"old")
    restart(lc, "n1")
    wait_no_txn_state(lc)
    with Client(cluster=lc.config, timeout=20.0) as c:
        c.mset({a: "after", b: "after"})
        assert (c.get(a), c.get(b)) == (b"after", b"after")


def test_kill_coordinator_after_decision_before_resolution(lc: LocalCluster) -> None:
    a, b = keys_on(lc, 0, 1, "k2a")[0], keys_on(lc, 2, 1, "k2b")[0]
    with Client(cluster=lc.config, timeout=20.0) as c:
        c.mset({a: "old", b: "old"})
    home = lc.leader_of(0)
    out: dict = {}
    t = _paused_txn(lc, home, "pause-k2", a, b, "new", out)
    wait_log(lc, home, "point=txn.after_decide txid=pause-k2")
    t.join(10)
    assert out.get("reply") == [1, [b"OK", b"OK"]]  # the client was told COMMITTED
    lc.kill_node(home)
    lc.wait_ready(60, nodes=[n for n in lc.map.nodes if n != home])
    assert _read_pair(lc, a, b) == (b"new", b"new")  # the new leader re-sends COMMIT
    wait_no_txn_state(lc)
    restart(lc, home)
    wait_no_txn_state(lc)


def test_kill_participant_leader_after_it_voted(lc: LocalCluster) -> None:
    a, b, t, out = _paused_on_n1(lc, "k3", "txn.after_prepare")
    lc.kill_node("n2")  # the participant leader of shard 1, which voted YES
    t.join(60)
    # The prepare was replicated, so COMMIT lands on shard 1's new leader.  (Only if the
    # coordinator stalled past the pending timeout may a resolver abort it instead; then
    # the client hears TRYAGAIN and nothing is applied.  Either way: all or nothing.)
    if "reply" in out:
        assert out["reply"] == [1, [b"OK", b"OK"]], out
        assert _read_pair(lc, a, b) == (b"new", b"new")
    else:
        assert "aborted" in str(out.get("error")), out
        assert _read_pair(lc, a, b) == (b"old", b"old")
    wait_no_txn_state(lc)
    restart(lc, "n2")
    wait_no_txn_state(lc)


# -- the bank --------------------------------------------------------------------------------

#: Transfers that must commit, and reads of every account (each checks the total) that must succeed, in each
#: phase of the bank test: before each kill, while the killed node is down (every transfer touches two of the
#: three shards, so most need the failed-over leader), after the last restart. Five phases: at least 75
#: transfers and 10 checked reads (a 12 s run of fixed sleeps did ~290 and ~14 here).
PHASE_TRANSFERS, PHASE_READS = 15, 2


def test_bank_transfers_while_leaders_are_killed(lc: LocalCluster) -> None:
    accounts = [k for s in range(3) for k in keys_on(lc, s, 3, "acct")]
    start, total = 100, 100 * len(accounts)
    with Client(cluster=lc.config, timeout=20.0) as c:
        c.mset({k: str(start) for k in accounts})
    stop = threading.Event()
    problems: list[str] = []
    stats = {"transfers": 0, "reads": 0, "aborted": 0, "unknown": 0}

    def read_all(c: Client) -> list[int]:
        t: Txn = c.txn()
        for k in accounts:
            t.then_get(k)
        # A read of every account takes no locks, but its two rounds must agree: while transfers keep changing
        # the accounts, it may need many attempts.
        r = t.commit(retries=60)
        return [int(v) for v in r.results]

    def transferer(seed: int) -> None:
        rng = random.Random(seed)
        with Client(cluster=lc.config, timeout=15.0) as c:
            while not stop.is_set():
                a, b = rng.sample(accounts, 2)
                try:
                    r = c.txn().then_get(a).then_get(b).commit(retries=5)
                    va, vb = (int(x) for x in r.results)
                    amount = rng.randint(1, 30)
                    if va < amount:
                        continue
                    r = (c.txn().if_value(a, str(va)).if_value(b, str(vb))
                         .then_put(a, str(va - amount)).then_put(b, str(vb + amount)).commit(retries=5))
                    stats["transfers" if r.succeeded else "aborted"] += 1
                except IndeterminateError:
                    stats["unknown"] += 1
                except (UnavailableError, RaftKVError):
                    stats["aborted"] += 1

    def reader() -> None:
        with Client(cluster=lc.config, timeout=15.0) as c:
            while not stop.is_set():
                try:
                    balances = read_all(c)
                except RaftKVError:
                    continue
                stats["reads"] += 1
                if sum(balances) != total or min(balances) < 0:
                    problems.append(f"read {balances} (sum {sum(balances)})")

    threads = [threading.Thread(target=transferer, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()

    def committed(when: str, timeout: float = 60.0) -> None:
        """Until PHASE_TRANSFERS more transfers commit and PHASE_READS more reads of every account check the
        total (each phase is measured in work done, not in seconds)."""
        want = (stats["transfers"] + PHASE_TRANSFERS, stats["reads"] + PHASE_READS)
        deadline = time.monotonic() + timeout
        while stats["transfers"] < want[0] or stats["reads"] < want[1]:
            assert not problems, problems[:5]
            assert time.monotonic() < deadline, (f"fewer than {PHASE_TRANSFERS} transfers and {PHASE_READS} reads "
                                                 f"in {timeout:g} s {when}: {stats}")
            time.sleep(0.05)

    try:
        for _ in range(2):  # kill the leader of a shard, let the rest run, bring it back
            committed("before a kill")
            victim = lc.leader_of(random.randrange(3)) or "n1"
            lc.kill_node(victim)
            committed(f"while {victim} was down")  # the other two carried on
            lc.start_node(victim)
        committed("after the last restart")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    lc.wait_ready(60)
    with Client(cluster=lc.config, timeout=30.0) as c:
        final = read_all(c)
    assert not problems, problems[:5]
    assert sum(final) == total and min(final) >= 0, final
    assert stats["transfers"] > 0 and stats["reads"] > 0, stats
    wait_no_txn_state(lc)
    print("bank:", stats)


def test_cli_mset_and_txn(lc: LocalCluster) -> None:
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raftkv", *args, "--cluster", str(lc.config)],
                              capture_output=True, text=True, input=stdin, timeout=60,
                              env=dict(os.environ, PYTHONPATH=root))

    a, b = keys_on(lc, 0, 1, "cli_a")[0], keys_on(lc, 2, 1, "cli_b")[0]
    assert cli("mset", a, "1", b, "2").stdout.strip() == "OK"
    p = cli("txn", "--if", f"{a} = 1", "--then", f"put {a} 10", "--then", f"get {b}", "--else", f"get {a}")
    assert (p.returncode, p.stdout.split()) == (0, ["SUCCEEDED", "OK", "2"]), p.stderr
    doc = json.dumps({"if": [f"{a} = 1"], "then": [f"put {a} 11"], "else": [f"get {a}", f"del {b}"]})
    p = cli("txn", "--file", "-", stdin=doc)
    assert (p.returncode, p.stdout.split()) == (1, ["FAILED", "10", "1"]), p.stderr
    p = cli("txn", "--if", f"{a} bogus")
    assert p.returncode == 2 and "bad compare" in p.stderr


def test_a_moved_key_is_sent_straight_to_the_shard_the_refusal_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """``-WRONGSHARD epoch shard``: the key now lives on ``shard``; the client's next attempt goes to that
    shard's leader at once, without the backoff meant for a busy one (a third of a writer's keys during a
    shard removal met it)."""
    import raftkv.client as client_mod
    from raftkv.protocol import ReplyError
    from shards.shardmap import local_cluster

    c = Client(cluster=local_cluster(3, 3, base_port=17101), timeout=2.0)
    c._leaders = {0: "n1", 1: "n2", 2: "n3"}
    sent: list[tuple[str, int]] = []

    def call_node(addr: tuple[str, int], args: list[bytes], timeout: float) -> bytes:
        if args[0] in (b"RAFTKV.SHARDS", b"RAFTKV.CLUSTER"):
            raise ConnectionRefusedError("no node here")
        sent.append(addr)
        if len(sent) == 1:
            raise ReplyError("WRONGSHARD 5 1 the key now belongs to shard 1 (map epoch 5); refresh the map")
        return b"OK"

    slept: list[float] = []
    monkeypatch.setattr(client_mod.time, "sleep", slept.append)
    c._call_node = call_node  # type: ignore[method-assign]
    assert c._request(2, [b"SET", b"k", b"v"], write=True) == b"OK"
    assert sent == [c.map.nodes["n3"].client_addr, c.map.nodes["n2"].client_addr] and slept == []
    assert client_mod._wrongshard_owner("5 shard 9 ...") is None

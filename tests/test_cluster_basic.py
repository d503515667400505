"""A real 3-node, 3-shard cluster: CLI, raftkv.Client, redis-py, and bad input."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import redis

from raftkv import Client, RaftKVError
from raftkv.cluster import LocalCluster

from .conftest import PutWriter, start_cluster


def _cli(lc: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAFTKV_CLUSTER=str(lc.config))
    return subprocess.run([sys.executable, "-m", "raftkv", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def _non_leader(lc: LocalCluster, shard: int) -> str:
    leader = lc.leader_of(shard)
    return next(n for n in lc.map.nodes if n != leader)


def test_cli_put_get_del_cas(cluster: LocalCluster) -> None:
    assert _cli(cluster, "put", "cli-key", "v1").stdout.strip() == "OK"
    got = _cli(cluster, "get", "cli-key")
    assert (got.returncode, got.stdout) == (0, "v1\n")
    swapped = _cli(cluster, "cas", "cli-key", "v1", "v2")
    assert swapped.returncode == 0
    refused = _cli(cluster, "cas", "cli-key", "v1", "v3")
    assert refused.returncode == 1 and "NOT SWAPPED" in refused.stdout
    assert _cli(cluster, "get", "cli-key").stdout == "v2\n"
    assert _cli(cluster, "del", "cli-key").returncode == 0
    missing = _cli(cluster, "get", "cli-key")
    assert missing.returncode == 1 and missing.stdout == "" and "not found" in missing.stderr


def test_cli_status_json_names_a_leader_per_shard(cluster: LocalCluster) -> None:
    import json

    out = _cli(cluster, "status", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["verdict"] == "ok"
    for sh in report["shards"]:
        assert sh["leader"] in cluster.map.nodes
        assert sorted(sh["up"]) == ["n1", "n2", "n3"]
        assert sh["term"] >= 1 and sh["commit_idx"] >= 1


def test_client_get_put_delete_cas(cluster: LocalCluster) -> None:
    with Client(cluster=cluster.config) as c:
        keys = [f"client-{i}" for i in range(30)]  # spread over all shards
        assert {cluster.map.shard_for_key(k) for k in keys} == {0, 1, 2}
        for k in keys:
            c.put(k, k.upper())
        for k in keys:
            assert c.get(k) == k.upper().encode()
        assert c.cas(keys[0], keys[0].upper(), "new")
        assert not c.cas(keys[0], "wrong", "newer")
        assert c.get(keys[0]) == b"new"
        assert c.cas("client-absent", None, "created")
        assert not c.cas("client-absent", None, "again")
        assert c.delete(keys[1]) and not c.delete(keys[1])
        assert c.get(keys[1]) is None
        assert c.mget([keys[0], keys[1], keys[2]]) == [b"new", None, keys[2].upper().encode()]


def test_client_from_node_addresses_fetches_the_map(cluster: LocalCluster) -> None:
    addrs = [f"{n.host}:{n.client_port}" for n in cluster.map.nodes.values()]
    with Client(nodes=addrs[:1]) as c:
        c.put("addr-key", "x")
        assert c.get("addr-key") == b"x"


def test_client_is_thread_safe(cluster: LocalCluster) -> None:
    c = Client(cluster=cluster.config)
    errors: list[Exception] = []

    def worker(t: int) -> None:
        try:
            for i in range(20):
                c.put(f"t{t}-{i}", str(i))
                assert c.get(f"t{t}-{i}") == str(i).encode()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_against_a_non_leader_node(cluster: LocalCluster, protocol: int) -> None:
    key = f"redis-py-{protocol}"
    shard = cluster.map.shard_for_key(key)
    node = cluster.map.nodes[_non_leader(cluster, shard)]
    r = redis.Redis(host=node.host, port=node.client_port, protocol=protocol)
    assert r.ping()
    assert r.set(key, "hello") is True
    assert r.get(key) == b"hello"
    assert r.exists(key, "redis-py-missing") == 1
    assert r.mget([key, "redis-py-missing"]) == [b"hello", None]
    assert r.execute_command("CAS", key, "hello", "world") == 1
    assert r.execute_command("CAS", key, "hello", "again") == 0
    assert r.get(key) == b"world"
    assert r.delete(key, "redis-py-missing") == 1
    assert r.get(key) is None
    assert "raftkv_node" in r.info()
    with pytest.raises(redis.ResponseError, match="unknown command"):
        r.execute_command("FLUSHALL")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        r.execute_command("GET")
    r.close()


def _get_or_error(r: redis.Redis, key: str) -> object:
    """The reply to GET, or the error (a timeout included) instead of a value."""
    try:
        return r.get(key)
    except (redis.ResponseError, redis.TimeoutError, redis.ConnectionError) as e:
        return e


@pytest.mark.parametrize("unsafe", [False, True], ids=["safe", "unsafe-local-reads"])
def test_stale_reads_only_when_asked(tmp_path, unsafe: bool) -> None:
    """A node cut off from every other node (they are paused) still answers a READONLY read
    from its local copy, and never answers a read that did not ask for that: without a
    quorum it cannot know its copy is current, so the plain GET gets an error or no reply.

    The ``unsafe-local-reads`` case is the negative control: nodes that answer every read
    from their local copy, which the same plain GET catches returning a value.
    """
    lc = start_cluster(str(tmp_path / "c"), node_args=["--unsafe-local-reads"] if unsafe else None)
    key = "stale-key"
    try:
        leader = lc.leader_of(lc.map.shard_for_key(key))
        follower = next(n for n in lc.map.nodes if n != leader)
        node = lc.map.nodes[follower]
        readonly = redis.Redis(host=node.host, port=node.client_port, protocol=2, socket_timeout=10)
        plain = redis.Redis(host=node.host, port=node.client_port, protocol=2, socket_timeout=5)
        assert readonly.execute_command("READONLY") in (True, b"OK")
        with Client(cluster=lc.config) as c:
            c.put(key, "v1")
        deadline = time.monotonic() + 30
        while readonly.get(key) != b"v1":  # the follower applies v1 in its own time
            assert time.monotonic() < deadline, f"{follower} never applied v1"
            time.sleep(0.05)
        others = [n for n in lc.map.nodes if n != follower]
        try:
            for n in others:  # the follower alone: no leader, no quorum to confirm a read
                lc.pause_node(n)
            assert readonly.get(key) == b"v1"  # asked for: the local copy
            got = _get_or_error(plain, key)
            if unsafe:
                assert got == b"v1"  # the broken build answers it unasked
            else:
                assert isinstance(got, Exception), f"a read that did not ask for stale data got {got!r}"
        finally:
            for n in others:
                lc.resume_node(n)
        deadline = time.monotonic() + 60
        while (got := _get_or_error(plain, key)) != b"v1":  # once the others are back, it reads again
            assert time.monotonic() < deadline, f"{follower} still answers {got!r} after the others resumed"
            time.sleep(0.1)
    finally:
        lc.stop()


# -- bad input: clear errors, and the node keeps serving everyone else ---------------

def _raw(node, payload: bytes, shutdown_write: bool = False, read_timeout: float = 10.0,
         until_closed: bool = True) -> tuple[bytes, bool]:
    """Send ``payload``; read until the node closes the connection (or, with ``until_closed``
    False, until one full reply line). Returns the bytes read and whether the node closed."""
    with socket.create_connection((node.host, node.client_port), timeout=read_timeout) as s:
        s.sendall(payload)
        if shutdown_write:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    return out, True
                out += data
                if not until_closed and out.endswith(b"\r\n"):
                    return out, False
        except TimeoutError:
            return out, False


def _still_serving(lc: LocalCluster) -> None:
    with Client(cluster=lc.config) as c:
        c.put("alive", "yes")
        assert c.get("alive") == b"yes"


def test_malformed_frame_gets_an_error_and_the_connection_closes(cluster: LocalCluster) -> None:
    node = cluster.map.nodes["n1"]
    # The write side stays open: only the node can end this connection.
    out, closed = _raw(node, b"*1\r\n$4\r\nPING\r\n!garbage\r\n")
    assert out.startswith(b"+PONG\r\n-PROTO Protocol error")
    assert closed, "the node kept the connection open after a protocol error"
    _still_serving(cluster)


def test_oversize_key_value_and_request(cluster: LocalCluster) -> None:
    node = cluster.map.nodes["n2"]
    r = redis.Redis(host=node.host, port=node.client_port, protocol=2)
    with pytest.raises(redis.ResponseError, match="TOOBIG key of 65537 bytes"):
        r.set(b"k" * 65537, "v")
    with pytest.raises(redis.ResponseError, match="TOOBIG value of"):
        r.set("big-value", b"v" * (1024 * 1024 + 1))
    # A request over request_bytes_max is refused before it is buffered whole.
    big = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % (4 * 1024 * 1024)
    out, _ = _raw(node, big + b"x" * (2 * 1024 * 1024), until_closed=False)
    assert out.startswith(b"-TOOBIG request exceeds")
    _still_serving(cluster)


def test_half_closed_connection_still_gets_its_replies(cluster: LocalCluster) -> None:
    node = cluster.map.nodes["n3"]
    cmds = b"".join(b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$1\r\n%d\r\n" % i for i in range(5))
    out, closed = _raw(node, cmds + b"*2\r\n$3\r\nGET\r\n$4\r\nhalf\r\n", shutdown_write=True)
    assert out == b"+OK\r\n" * 5 + b"$1\r\n4\r\n"
    assert closed, "the node did not close the connection after the client's EOF and the last reply"


def test_a_flooding_client_does_not_starve_others(cluster: LocalCluster) -> None:
    """A client that pipelines without reading is throttled by TCP back-pressure, and the same
    node keeps answering other clients: commands it leads, and commands it forwards."""
    flooded = "n1"
    node = cluster.map.nodes[flooded]
    stop, throttled = threading.Event(), threading.Event()
    sent = [0]

    def flood() -> None:
        with socket.create_connection((node.host, node.client_port)) as s:
            s.settimeout(0.2)
            chunk = b"*1\r\n$4\r\nPING\r\n" * 2000
            while not stop.is_set():
                try:
                    s.sendall(chunk)  # never reads its replies: back-pressure, not memory growth
                    sent[0] += len(chunk)
                except (TimeoutError, OSError):
                    throttled.set()  # the node stopped reading from it: the flood is at its worst

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        assert throttled.wait(60), f"the flood was never throttled ({sent[0]} bytes sent)"
        leaders = cluster.leaders()
        led = [k for k in (f"flood-{i}" for i in range(100))
               if leaders[cluster.map.shard_for_key(k)] == flooded][:1]
        forwarded = [k for k in (f"flood-{i}" for i in range(100))
                     if leaders[cluster.map.shard_for_key(k)] not in (flooded, None)][:1]
        other = redis.Redis(host=node.host, port=node.client_port, protocol=2, socket_timeout=20)
        assert other.ping()
        for k in led + forwarded:  # through the flooded node itself, not the Client's shard leaders
            assert other.set(k, "yes") and other.get(k) == b"yes"
        assert led or forwarded
        _still_serving(cluster)
    finally:
        stop.set()
        t.join(5)


def test_errors_are_typed_in_the_client(cluster: LocalCluster) -> None:
    with Client(cluster=cluster.config) as c, pytest.raises(RaftKVError) as e:
        c.put("k" * 70000, "v")
    assert e.value.code == "TOOBIG"


def test_put_writer_check_catches_a_failed_write_that_was_applied(cluster: LocalCluster) -> None:
    """``PutWriter.check`` holds ``failed`` to "definitely not applied". Against a broken client
    that reports some applied writes as failed, it must raise; against one whose failures
    happen before sending, it passes and counts them."""
    def before_sending(key: str, value: str) -> None:
        raise RaftKVError("UNAVAILABLE", "refused before sending")

    honest = PutWriter(cluster.config, [f"pw-honest-{i}" for i in range(6)])
    real_put = honest.client.put
    honest.client.put = lambda k, v: before_sending(k, v) if k.endswith(("1", "4")) else real_put(k, v)
    honest.run()
    assert honest.failed == ["pw-honest-1", "pw-honest-4"] and len(honest.acked) == 4
    assert honest.check(cluster.config).startswith("4 acked (none lost), 2 failed (none applied)")

    def applied_then_failed(key: str, value: str) -> None:
        broken_put(key, value)
        raise RaftKVError("ERR", "reported failed after it was applied")

    broken = PutWriter(cluster.config, [f"pw-broken-{i}" for i in range(6)])
    broken_put = broken.client.put
    broken.client.put = lambda k, v: applied_then_failed(k, v) if k.endswith("2") else broken_put(k, v)
    broken.run()
    assert broken.failed == ["pw-broken-2"]
    with pytest.raises(AssertionError, match="1 writes reported failed were applied"):
        broken.check(cluster.config)


def test_free_base_port_stays_below_the_ephemeral_range() -> None:
    """A node's port inside the kernel's ephemeral range can be taken by any outgoing connection between the
    check and the node's bind (a test cluster's node once failed to start so)."""
    from raftkv.cluster import _ephemeral_range, free_base_port

    lo = _ephemeral_range()[0]
    for _ in range(20):
        base = free_base_port(3, 3)
        assert base + 1000 + 2 * 100 + 3 < lo or lo < 13_000


def test_a_node_stopped_with_clients_connected_logs_no_error(tmp_path) -> None:
    """SIGTERM with client connections open: the node stops cleanly, and its log holds no ERROR (Python 3.11's
    stream protocol used to log each cancelled connection as 'Exception in callback ... CancelledError')."""
    lc = start_cluster(str(tmp_path / "c"), nodes=1, shards=1)
    try:
        node = lc.map.nodes["n1"]
        socks = [socket.create_connection((node.host, node.client_port), timeout=5) for _ in range(3)]
        socks[0].sendall(b"*1\r\n$4\r\nPING\r\n")
        assert socks[0].recv(64) == b"+PONG\r\n"
        lc.stop_node("n1")
        for s in socks:
            s.close()
        errors = [line for line in lc.log_file("n1").read_text().splitlines() if "level=ERROR" in line]
        assert errors == []
    finally:
        lc.stop()

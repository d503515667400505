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


def test_stale_reads_only_when_asked(cluster: LocalCluster) -> None:
    with Client(cluster=cluster.config) as c:
        c.put("stale-key", "v")
        deadline = time.monotonic() + 10
        while c.stale_get("stale-key") != b"v":  # a follower may lag a moment
            assert time.monotonic() < deadline
            time.sleep(0.05)
    node = cluster.map.nodes["n1"]
    r = redis.Redis(host=node.host, port=node.client_port, protocol=2)
    assert r.execute_command("READONLY") in (True, b"OK")
    assert r.get("stale-key") == b"v"


# -- bad input: clear errors, and the node keeps serving everyone else ---------------

def _raw(node, payload: bytes, shutdown_write: bool = False, read_timeout: float = 5.0) -> bytes:
    with socket.create_connection((node.host, node.client_port), timeout=read_timeout) as s:
        s.sendall(payload)
        if shutdown_write:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                out += data
                if not shutdown_write and out.endswith(b"\r\n"):
                    break
        except TimeoutError:
            pass
        return out


def _still_serving(lc: LocalCluster) -> None:
    with Client(cluster=lc.config) as c:
        c.put("alive", "yes")
        assert c.get("alive") == b"yes"


def test_malformed_frame_gets_an_error_and_the_connection_closes(cluster: LocalCluster) -> None:
    node = cluster.map.nodes["n1"]
    out = _raw(node, b"*1\r\n$4\r\nPING\r\n!garbage\r\n", shutdown_write=True)
    assert out.startswith(b"+PONG\r\n-PROTO Protocol error")
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
    out = _raw(node, big + b"x" * (2 * 1024 * 1024))
    assert out.startswith(b"-TOOBIG request exceeds")
    _still_serving(cluster)


def test_half_closed_connection_still_gets_its_replies(cluster: LocalCluster) -> None:
    node = cluster.map.nodes["n3"]
    cmds = b"".join(b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$1\r\n%d\r\n" % i for i in range(5))
    out = _raw(node, cmds + b"*2\r\n$3\r\nGET\r\n$4\r\nhalf\r\n", shutdown_write=True)
    assert out == b"+OK\r\n" * 5 + b"$1\r\n4\r\n"


def test_a_flooding_client_does_not_starve_others(cluster: LocalCluster) -> None:
    node = cluster.map.nodes["n1"]
    stop = threading.Event()

    def flood() -> None:
        with socket.create_connection((node.host, node.client_port)) as s:
            s.settimeout(0.2)
            chunk = b"*1\r\n$4\r\nPING\r\n" * 2000
            while not stop.is_set():
                try:
                    s.sendall(chunk)  # never reads its replies: back-pressure, not memory growth
                except (TimeoutError, OSError):
                    pass

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        time.sleep(0.5)
        _still_serving(cluster)
    finally:
        stop.set()
        t.join(5)


def test_errors_are_typed_in_the_client(cluster: LocalCluster) -> None:
    with Client(cluster=cluster.config) as c, pytest.raises(RaftKVError) as e:
        c.put("k" * 70000, "v")
    assert e.value.code == "TOOBIG"

"""Locking the doors: AUTH, the Raft secret, TLS, the loopback rule, and protective limits."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from raftkv import Client, RaftKVError
from raftkv.cluster import LocalCluster, free_base_port
from raftkv.security import InsecureBindError, Security, check_bind
from shards.shardmap import local_cluster

from .conftest import dump_logs, no_retry


def _start(directory: Path, security: dict, node_args: list[str] | None = None, nodes: int = 3) -> LocalCluster:
    m = local_cluster(nodes, 3, base_port=free_base_port(nodes, 3), data_dir=str(directory / "data"))
    lc = LocalCluster(directory, dataclasses.replace(m, security=security), node_args=node_args)
    lc.start()
    try:
        lc.wait_ready(60)
    except Exception:
        dump_logs(lc)
        lc.stop()
        raise
    return lc


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    lc = _start(tmp_path_factory.mktemp("secured"),
                {"secret": "raft-secret", "password": "s3cret", "users": {"alice": "wonderland"}})
    yield lc
    lc.stop()


def test_auth_is_required_and_checked(secured: LocalCluster) -> None:
    node = secured.map.nodes["n1"]
    anon = redis.Redis(host=node.host, port=node.client_port, protocol=2, retry=no_retry())
    with pytest.raises(redis.AuthenticationError, match="Authentication required"):  # -NOAUTH
        anon.get("k")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=node.host, port=node.client_port, protocol=2, password="wrong", retry=no_retry()).get("k")
    with socket.create_connection((node.host, node.client_port), timeout=5) as raw:
        raw.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$3\r\nbad\r\n"
                    b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n*2\r\n$3\r\nGET\r\n$6\r\nauth-k\r\n")
        out = _read_all(raw, 4)
    assert out.split(b"\r\n")[:3] == [b"-NOAUTH Authentication required.",
                                       b"-WRONGPASS invalid username-password pair or user is disabled.", b"+OK"]
    # requirepass style, RESP3 (HELLO 3 AUTH default ...) and ACL style
    assert redis.Redis(host=node.host, port=node.client_port, password="s3cret").set("auth-k", "1")
    alice = redis.Redis(host=node.host, port=node.client_port, protocol=2, username="alice",
                        password="wonderland")
    assert alice.get("auth-k") == b"1"


def test_authenticated_requests_are_forwarded_between_nodes(secured: LocalCluster) -> None:
    key = "fwd-auth"
    shard = secured.map.shard_for_key(key)
    leader = secured.leader_of(shard)
    other = secured.map.nodes[next(n for n in secured.map.nodes if n != leader)]
    r = redis.Redis(host=other.host, port=other.client_port, protocol=2, password="s3cret")
    assert r.set(key, "via-follower") and r.get(key) == b"via-follower"


def test_client_and_cli_take_the_password_from_the_cluster_file_or_env(secured: LocalCluster) -> None:
    with Client(cluster=secured.config) as c:  # [security] password in the cluster file
        c.put("client-auth", "ok")
        assert c.get("client-auth") == b"ok"
    with pytest.raises(RaftKVError) as e, Client(cluster=secured.config, password="wrong") as c:
        c.get("client-auth")
    assert e.value.code == "WRONGPASS"
    env = dict(os.environ, RAFTKV_CLUSTER=str(secured.config), RAFTKV_PASSWORD="wrong")
    out = subprocess.run([sys.executable, "-m", "raftkv", "get", "client-auth"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 2 and "WRONGPASS" in out.stderr
    out = subprocess.run([sys.executable, "-m", "raftkv", "--password", "s3cret", "get", "client-auth"],
                         capture_output=True, text=True, env=dict(env, RAFTKV_PASSWORD=""), timeout=60)
    assert out.stdout == "ok\n"


def test_the_cluster_map_sent_to_clients_carries_no_secrets(secured: LocalCluster) -> None:
    text = secured.call("n2", "RAFTKV.CLUSTER").decode()
    assert "[nodes.n1]" in text
    assert "s3cret" not in text and "raft-secret" not in text and "wonderland" not in text


def _raft_accepts(lc: LocalCluster, node: str, key: str | None) -> bool:
    """Does ``node``'s Raft port complete the handshake for a peer holding ``key`` (None: the key derived
    from the cluster file, as a node of this cluster would)?"""
    from raftkv.raftnet import probe

    sec = Security.from_config(lc.map.security, env={})
    info = lc.map.nodes[node]
    raw = sec.raft_key(lc.map.name) if key is None else key.encode()
    return probe(f"{info.host}:{info.raft_port}", cluster=lc.map.name, key=raw, encrypt=sec.raft_key_is_secret)


def test_raft_traffic_needs_the_secret(secured: LocalCluster) -> None:
    # The cluster above runs with an authenticated, encrypted Raft network (raftkv.raftnet). A peer
    # without the secret, or with a wrong one, is dropped in the handshake, before any Raft message is
    # read; one with the secret completes it and reads a record sealed under the derived key.
    assert not _raft_accepts(secured, "n1", "")
    assert not _raft_accepts(secured, "n1", "not-the-secret")
    assert _raft_accepts(secured, "n1", "raft-secret")
    with Client(cluster=secured.config) as c:  # and the cluster is still healthy
        c.put("after-raw", "1")


def test_non_loopback_listen_without_secret_is_refused(tmp_path: Path) -> None:
    m = local_cluster(1, 1, base_port=free_base_port(1, 1), data_dir=str(tmp_path / "data"))
    exposed = dataclasses.replace(m, nodes={"n1": dataclasses.replace(m.nodes["n1"], host="0.0.0.0")})
    exposed.save(tmp_path / "cluster.toml")
    out = subprocess.run([sys.executable, "-m", "raftkv", "serve", "--config", str(tmp_path / "cluster.toml"),
                          "--node", "n1"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "refusing to listen on 0.0.0.0 without a cluster secret" in out.stderr
    with pytest.raises(InsecureBindError):
        check_bind(["10.1.2.3"], Security(), insecure=False)
    check_bind(["10.1.2.3"], Security(secret="s"), insecure=False)
    check_bind(["10.1.2.3"], Security(node_key="k"), insecure=False)  # the node key authenticates Raft too
    check_bind(["10.1.2.3"], Security(), insecure=True)
    check_bind(["127.0.0.1", "127.0.0.7", "localhost"], Security(), insecure=False)


def _self_signed(directory: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raftkv-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_client_port_with_redis_py_and_client(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    lc = _start(tmp_path / "c", {"tls_cert": cert, "tls_key": key})
    try:
        key_name = "tls-key"
        shard = lc.map.shard_for_key(key_name)
        follower = next(n for n in lc.map.nodes if n != lc.leader_of(shard))
        node = lc.map.nodes[follower]  # forwarded to the leader over TLS too
        r = redis.Redis(host=node.host, port=node.client_port, ssl=True, ssl_cert_reqs=None)
        assert r.set(key_name, "secure") and r.get(key_name) == b"secure"
        with Client(cluster=lc.config, tls=True) as c:
            assert c.get(key_name) == b"secure"
        plain = redis.Redis(host=node.host, port=node.client_port, protocol=2, socket_timeout=2, retry=no_retry())
        with pytest.raises(redis.ConnectionError):
            plain.get(key_name)
    finally:
        lc.stop()


# -- limits ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory):
    lc = _start(tmp_path_factory.mktemp("limited"), {},
                node_args=["--max-clients", "6", "--pipeline-depth", "4", "--idle-timeout", "1.0"])
    yield lc
    lc.stop()


def _read_all(s: socket.socket, want: int, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while out.count(b"\r\n") < want and time.monotonic() < deadline:
        data = s.recv(65536)
        if not data:
            break
        out += data
    return out


def test_max_clients(limited: LocalCluster) -> None:
    # Other nodes' forwarding links count as clients too, so open connections
    # until the limit answers instead of assuming how many slots are free.
    node = limited.map.nodes["n1"]
    held, replies = [], []
    try:
        for _ in range(8):
            s = socket.create_connection((node.host, node.client_port))
            held.append(s)
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            replies.append(_read_all(s, 1))
            if replies[-1].startswith(b"-BUSY"):
                break
    finally:
        for s in held:
            s.close()
    assert replies[-1].startswith(b"-BUSY max number of clients reached (6)"), replies
    assert all(r == b"+PONG\r\n" for r in replies[:-1]) and len(replies) <= 7


def _wait_accepting(node, timeout: float = 10.0) -> None:
    """Until the node takes a new client (max_clients: earlier tests' connections may still count)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((node.host, node.client_port), timeout=2) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                if _read_all(s, 1, timeout=2) == b"+PONG\r\n":
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "node does not accept clients"
        time.sleep(0.1)


def test_pipeline_depth(limited: LocalCluster) -> None:
    node = limited.map.nodes["n3"]
    _wait_accepting(node)
    with socket.create_connection((node.host, node.client_port)) as s:
        s.sendall(b"*2\r\n$3\r\nGET\r\n$4\r\npipe\r\n" * 50)
        out = _read_all(s, 50)
    assert b"-BUSY more than 4 commands in flight" in out
    assert out.count(b"\r\n") == 50  # every command got an answer, in order


def test_idle_timeout(limited: LocalCluster) -> None:
    node = limited.map.nodes["n2"]
    _wait_accepting(node)
    with socket.create_connection((node.host, node.client_port)) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert _read_all(s, 1) == b"+PONG\r\n"
        out = _read_all(s, 1, timeout=10)
    assert out.startswith(b"-ERR idle for more than 1 s (idle_timeout_s); closing")


def test_raft_probe_with_the_cluster_key_is_answered_without_a_secret(limited: LocalCluster) -> None:
    # Negative control for the test above: without a secret the cluster file's node key keys the Raft
    # handshake, and the same probe holding it is answered, so a probe that always failed would fail here.
    assert _raft_accepts(limited, "n1", None)
    assert not _raft_accepts(limited, "n1", "not-the-node-key")

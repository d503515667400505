"""Internal commands run only for nodes of this cluster: a client gets -NOPERM and nothing runs.

The positive control is in every test: the same message on a connection that
answered the challenge with the cluster's node key does run, so a -NOPERM seen
here is the identity check at work, not a broken message.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from raftkv.cluster import LocalCluster
from raftkv.protocol import ReplyError, encode_command, reply_reader
from raftkv.security import Security
from raftkv.server import rpc
from tests.conftest import start_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(str(tmp_path_factory.mktemp("ident")))
    yield c
    c.stop()


class Raw:
    """One plain RESP connection, as any client (or attacker) would open."""

    def __init__(self, lc: LocalCluster, node: str) -> None:
        self.sock = socket.create_connection(lc.map.nodes[node].client_addr, timeout=10)
        self.reader = reply_reader()

    def call(self, *args: bytes | str) -> object:
        self.sock.sendall(encode_command(*args))
        while (reply := self.reader.gets()) is False:
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.reader.feed(data)
        return reply

    def prove(self, lc: LocalCluster, name: str, key: str | None = None) -> object:
        nonce = self.call("RAFTKV.CHALLENGE")
        assert isinstance(nonce, bytes)
        sec = Security.from_config(lc.map.security) if key is None else Security(node_key=key)
        return self.call("RAFTKV.NODEAUTH", name, sec.node_mac(lc.map.name, nonce, name))

    def close(self) -> None:
        self.sock.close()


def leader_and_key(lc: LocalCluster, shard: int = 0) -> tuple[str, str]:
    i = 0
    while lc.map.shard_for_key(f"ident-{i}".encode()) != shard:
        i += 1
    return lc.leader_of(shard) or "n1", f"ident-{i}"


def exec_message(shard: int, cmd: tuple) -> bytes:
    return rpc.encode(("exec", shard, cmd, False, True, 1, 2.0))


def test_a_client_sending_the_internal_rpc_gets_noperm_and_nothing_runs(lc: LocalCluster) -> None:
    node, key = leader_and_key(lc)
    msg = exec_message(0, ("set", key.encode(), b"forged"))
    client = Raw(lc, node)
    try:
        reply = client.call("RAFTKV.RPC", msg)
        assert isinstance(reply, ReplyError) and reply.code == "NOPERM", reply
        assert client.call("GET", key) is None  # nothing ran
        # A wrong key or an unknown node name proves nothing ...
        assert isinstance(client.prove(lc, node, key="0" * 64), ReplyError)
        assert isinstance(client.prove(lc, "intruder"), ReplyError)
        reply = client.call("RAFTKV.RPC", msg)
        assert isinstance(reply, ReplyError) and reply.code == "NOPERM", reply
        assert client.call("GET", key) is None
        # ... a replayed answer to an old challenge neither (one answer per challenge).
        assert isinstance(client.call("RAFTKV.NODEAUTH", node, b"00" * 32), ReplyError)
    finally:
        client.close()
    # Positive control: a connection that proved it is a node runs the very same message.
    peer = Raw(lc, node)
    try:
        assert peer.prove(lc, "n2") == b"OK"
        assert isinstance(rpc.decode(peer.call("RAFTKV.RPC", msg)), int)  # the revision of the write
        assert peer.call("GET", key) == b"forged"
    finally:
        peer.close()


def test_a_forged_tx_finish_cannot_change_a_transactions_outcome(lc: LocalCluster) -> None:
    """A client that could send 2PC messages could abort a committed transaction's writes here."""
    node, key = leader_and_key(lc, 1)
    client = Raw(lc, node)
    try:
        assert client.call("RAFTKV.TXN", "ID", "tx-forge-1", "0", "1", "PUT", key, "committed", "0") == [1, [b"OK"]]
        forged = exec_message(1, ("tx_finish", "tx-forge-1", "ABORTED", None))
        reply = client.call("RAFTKV.RPC", forged)
        assert isinstance(reply, ReplyError) and reply.code == "NOPERM", reply
        assert client.call("GET", key) == b"committed"
    finally:
        client.close()


def test_forwarding_between_nodes_still_works_with_identity(lc: LocalCluster) -> None:
    node, key = leader_and_key(lc, 2)
    via = next(n for n in lc.map.nodes if n != node)
    assert lc.call(via, "SET", key, "through-a-peer") == b"OK"
    assert lc.call(via, "GET", key) == b"through-a-peer"
    assert lc.call(via, "RAFTKV.TRANSFER", "2", via, timeout=10) == b"OK"  # an operator command run on the leader


def test_refusals_are_audited(lc: LocalCluster) -> None:
    client = Raw(lc, "n1")
    try:
        client.call("RAFTKV.RPC", exec_message(0, ("noop",)))
    finally:
        client.close()
    log = lc.log_file("n1").read_text(errors="replace")
    assert "event=audit action=raftkv.rpc" in log and "outcome=denied" in log

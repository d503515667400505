"""``--read-routing``: which routing ``Client`` a register or set worker reads through; ``--attempt-timeout``:
how long one attempt of those clients may wait for a node.

No cluster is started: a ``Client`` built from a shard map connects only when it is used, and the calls a
worker makes are replaced by stand-ins that say which client was asked.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from jepsen_like.cli import run_cmd
from jepsen_like.runner import RunConfig
from jepsen_like.workloads import READ_ROUTINGS, RegisterWorkload, SetWorkload, make_workload
from jepsen_like.workloads.base import HarnessClient, NodeConn, attempt_budget
from raftkv.client import Client
from shards.shardmap import local_cluster


def _map(tmp_path: Path):
    return local_cluster(3, 3, base_port=7001, data_dir=str(tmp_path))


def _answer_as(client, name: str) -> None:
    """Make ``client.get`` answer with ``name`` (so a read's result says which client served it)."""
    client.get = lambda key: name.encode()


def test_own_routing_reads_through_a_second_client_with_its_own_leader_cache(tmp_path: Path) -> None:
    w = RegisterWorkload(_map(tmp_path), 1).worker(0, random.Random(0))  # "own" is the default
    try:
        assert w.reader is not w.client
        assert w.reader._leaders is not w.client._leaders  # a write's failure re-routes only the writes
        _answer_as(w.client, "write-client")
        _answer_as(w.reader, "read-client")
        assert w.invoke("get", "r0.0", None) == ("ok", "read-client")
        w.client.put = lambda key, value: None
        assert w.invoke("put", "r0.0", "0.1") == ("ok", None)
    finally:
        w.close()


def test_shared_routing_reads_through_the_write_client(tmp_path: Path) -> None:
    w = RegisterWorkload(_map(tmp_path), 1, read_routing="shared").worker(0, random.Random(0))
    try:
        assert w.reader is w.client
        _answer_as(w.client, "write-client")
        assert w.invoke("get", "r0.0", None) == ("ok", "write-client")
    finally:
        w.close()


def test_pinned_reads_go_to_the_node_whatever_the_routing(tmp_path: Path) -> None:
    w = RegisterWorkload(_map(tmp_path), 1, read_any_node=True).worker(1, random.Random(0))
    try:
        assert isinstance(w.node, NodeConn) and w.node_name == "n2"  # client i -> node i mod N
        w.node.call = lambda *args: b"node"
        _answer_as(w.reader, "read-client")
        assert w.invoke("get", "r0.0", None) == ("ok", "node")
    finally:
        w.close()


@pytest.mark.parametrize("routing", READ_ROUTINGS)
def test_set_reads_follow_the_routing_and_adds_the_write_client(tmp_path: Path, routing: str) -> None:
    wl = SetWorkload(_map(tmp_path), 1, keys_per_shard=1, read_routing=routing)
    w = wl.worker(0, random.Random(0))
    try:
        assert (w.reader is w.client) == (routing == "shared")
        _answer_as(w.reader, "e1,")
        assert w.invoke("read", None, None) == ("ok", ["e1"] * len(wl.keys))
        appended = []
        w.client.append = lambda key, suffix: appended.append(key) or 1
        assert w.invoke("add", wl.keys[0], "0.1") == ("ok", None) and appended == [wl.keys[0]]
    finally:
        w.close()


def test_an_unknown_routing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read routing"):
        make_workload("register", _map(tmp_path), 1, read_routing="sometimes")


def test_the_routing_and_attempt_timeout_round_trip_through_the_command_line() -> None:
    assert RunConfig().read_routing == "own" and RunConfig().attempt_timeout == 1.0
    argv = RunConfig(read_routing="shared", attempt_timeout=0).to_argv()
    assert argv[argv.index("--read-routing") + 1] == "shared"
    params = run_cmd.make_context("run", argv).params
    assert params["read_routing"] == "shared" and params["attempt_timeout"] == 0


def test_an_attempt_waits_at_most_the_attempt_timeout_and_never_past_the_operation() -> None:
    assert attempt_budget(4.0, 1.0) == 1.0
    assert attempt_budget(0.3, 1.0) == 0.3  # what is left of the operation's timeout
    assert attempt_budget(4.0, None) == 4.0 and attempt_budget(4.0, 0) == 4.0  # no bound


def test_workers_route_through_clients_that_bound_each_attempt(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    waits = []
    monkeypatch.setattr(Client, "_call_node", lambda self, addr, args, timeout: waits.append(timeout) or b"v")
    w = RegisterWorkload(_map(tmp_path), 1, op_timeout=4.0, attempt_timeout=0.5).worker(0, random.Random(0))
    try:
        assert isinstance(w.client, HarnessClient) and isinstance(w.reader, HarnessClient)
        w.client._leaders.update({s: "n1" for s in range(3)})  # no RAFTKV.SHARDS round trip first
        w.reader._leaders.update({s: "n1" for s in range(3)})
        assert w.invoke("get", "r0.0", None) == ("ok", "v")
        assert w.invoke("put", "r0.0", "0.1") == ("ok", None)
        assert waits == [0.5, 0.5]
    finally:
        w.close()
    unbounded = HarnessClient(cluster=_map(tmp_path), timeout=4.0, attempt_timeout=None)
    unbounded._call_node(("127.0.0.1", 1), [b"PING"], 3.5)
    assert waits[-1] == 3.5


def test_a_bound_client_sends_every_attempt_to_its_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--read-any-node (the default): a register client's writes go to its own node too, whichever node the
    routing client means to reach; that node forwards them (the session makes a forwarded retry apply once)."""
    m = _map(tmp_path)
    w = RegisterWorkload(m, 1, read_any_node=True).worker(2, random.Random(0))
    sent = []
    monkeypatch.setattr(Client, "_call_node", lambda self, addr, args, timeout: sent.append(addr) or b"OK")
    try:
        assert w.client.pin == m.nodes["n3"].client_addr  # client 2 -> node n3
        for addr in (m.nodes["n1"].client_addr, m.nodes["n2"].client_addr):
            w.client._call_node(addr, [b"PING"], 1.0)
        assert sent == [m.nodes["n3"].client_addr] * 2
    finally:
        w.close()
    unbound = RegisterWorkload(m, 1, read_any_node=False).worker(2, random.Random(0))
    try:
        assert unbound.client.pin is None and unbound.node is None
    finally:
        unbound.close()


def test_reading_any_node_is_the_default() -> None:
    assert RunConfig().read_any_node is True
    assert run_cmd.make_context("run", []).params["read_any_node"] is True

"""The cluster's shard map is replicated state: a compare-and-set register on its epoch, in shard 0's log.

Two operators who read the same map cannot both change it; a command starts from the cluster's map, not
from a stale file; a node that missed a push (or starts from an old file) installs the newest map anyway.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftkv.cluster import LocalCluster, call
from raftkv.mapregister import cas
from raftkv.membership import MembershipError, Operator
from raftkv.results import CmdError
from raftkv.security import Security
from raftkv.state import KVState

from .conftest import free_port, start_cluster

# -- pure -----------------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7), st.sampled_from("abc")), max_size=30))
def test_changes_form_one_chain_of_epochs(attempts: list[tuple[int, int, str]]) -> None:
    """Whatever operators send (each naming the epoch it read), the applied changes form one chain: each
    names the epoch of the one before it, epochs rise, and a refused change leaves the register as it was."""
    reg: tuple[int, str] | None = None
    chain: list[tuple[int, int, str]] = []
    for expected, bump, text in attempts:
        epoch = expected + bump
        before = reg
        reg, reply = cas(reg, expected, epoch, text)
        if isinstance(reply, CmdError):
            assert reg == before
            if epoch > expected:
                assert reply.code == "MAPCHANGED" and before is not None and before[0] != expected
                assert reply.message.split()[0] == str(before[0])  # the register's epoch comes first
        else:
            assert reply == epoch and reg == (epoch, text)
            if before != (epoch, text):  # not a retry of the change already applied
                chain.append((expected, epoch, text))
    for (_, e1, _), (x2, e2, _) in itertools.pairwise(chain):
        assert x2 == e1 and e2 > e1


def test_two_operators_that_read_the_same_epoch_cannot_both_change_it() -> None:
    reg, first = cas(None, 1, 2, "a")  # an empty register: the first change wins
    assert first == 2
    reg, second = cas(reg, 1, 2, "b")
    assert isinstance(second, CmdError) and second.code == "MAPCHANGED" and reg == (2, "a")
    reg, retry = cas(reg, 1, 2, "a")  # the winner's lost reply, resent: answered as the first time
    assert retry == 2 and reg == (2, "a")
    reg, bad = cas(reg, 2, 2, "c")
    assert isinstance(bad, CmdError) and bad.code == "ERR" and reg == (2, "a")


def test_the_register_is_replicated_state_of_the_shard() -> None:
    s = KVState()
    assert s.read(("map_get",)) is None
    assert s.apply(("map_cas", 1, 2, "text"), 0) == 2
    assert s.apply(("map_cas", 1, 3, "other"), 0).code == "MAPCHANGED"
    assert s.apply(("map_cas", "1", 3, "other"), 0).code == "ERR"  # malformed: refused on every replica
    for copy in (KVState.restore(s.snapshot()), KVState.from_meta(s.meta(), dict(s.data))):
        assert copy.read(("map_get",)) == (2, "text")
    assert KVState.restore(KVState().snapshot()).map_register is None


# -- real node processes ------------------------------------------------------------------------------


def _node_epoch(lc: LocalCluster, name: str) -> int | None:
    sec = Security.from_config(lc.map.security)
    try:
        st_ = json.loads(call(lc.map.nodes[name].client_addr, "RAFTKV.STATUS", auth=sec.peer_credentials()))
    except (OSError, ConnectionError):
        return None
    return st_["epoch"]


def _wait_epoch(lc: LocalCluster, name: str, epoch: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _node_epoch(lc, name) != epoch:
        assert time.monotonic() < deadline, f"{name} is at epoch {_node_epoch(lc, name)}, not {epoch}"
        time.sleep(0.2)


def test_a_node_with_no_replica_left_takes_a_removal_it_missed_from_the_register_not_from_a_push() -> None:
    """A node added --empty (no replica yet) that missed the map marking shard 2's removal: a pushed 2-shard map
    could be a wrong shrink (nothing on the node shows the removal done), but the register holds the smaller
    map only once the removal is over, so the poll installs it."""
    import asyncio
    import dataclasses
    from types import SimpleNamespace

    from raftkv.protocol import Error
    from raftkv.server.commands.member import _poll_map, cmd_map
    from shards.shardmap import local_cluster

    old = dataclasses.replace(local_cluster(4, 3, base_port=7001), placement={
        s: ("n1", "n2", "n3") for s in range(3)})
    removed = dataclasses.replace(local_cluster(4, 2, base_port=7001), epoch=3, placement={
        s: ("n1", "n2", "n3") for s in range(2)})
    installed: list[int] = []

    async def execute(shard: int, cmd: tuple, read: bool = False) -> tuple[int, str]:
        assert (shard, cmd, read) == (0, ("map_get",), True)
        return (removed.epoch, removed.to_toml())

    node = SimpleNamespace(name="n4", map=old, replicas={}, execute=execute,
                           install_map=lambda m: installed.append(m.epoch))
    refused = cmd_map(node, None, [b"RAFTKV.MAP", removed.to_toml().encode()])  # type: ignore[arg-type]
    assert isinstance(refused, Error) and "cannot shrink" in refused.message and installed == []
    asyncio.run(_poll_map(node))  # type: ignore[arg-type]
    assert installed == [3]


def test_the_cluster_map_is_changed_by_compare_and_set_and_learnt_by_every_node(tmp_path: Path) -> None:
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2)
    try:
        stale = tmp_path / "stale.toml"
        shutil.copy(lc.config, stale)  # the file as a second operator's machine still has it (epoch 1)
        first = stale.read_text()
        said: list[str] = []
        a = Operator(lc.config, timeout=20.0)
        b = Operator(lc.config, timeout=20.0)  # reads epoch 1 too
        a.add(f"127.0.0.1:{free_port()}", name="n4", start=False, join=False)
        assert a.map.epoch == 2
        with pytest.raises(MembershipError, match="at epoch 2, not 1: another command changed the cluster"):
            b.add(f"127.0.0.1:{free_port()}", name="n5", start=False, join=False)
        assert set(Operator(lc.config).map.nodes) == {"n1", "n2", "n3", "n4"}  # b's change went nowhere

        # A command run from the stale file starts from the cluster's map, and rewrites the file.
        c = Operator(stale, timeout=20.0, say=said.append)
        assert c.map.epoch == 2 and "n4" in c.map.nodes and any("using the cluster's" in s for s in said)
        assert Operator(stale).map.epoch == 2

        # n3 misses a change (stopped), then starts from a file that predates both changes: it polls the
        # register (its own replica of shard 0) and installs the newest map.
        lc.stop_node("n3")
        c.remove("n4", stop=False)  # epoch 3, pushed to n1 and n2 only
        for n in ("n1", "n2"):
            assert _node_epoch(lc, n) == 3
        Path(lc.config).write_text(first)  # the node's file predates both changes (epoch 1)
        lc.start_node("n3")
        _wait_epoch(lc, "n3", 3)

        # The register outlives a restart of every node (checkpoint + log replay).
        lc.stop()
        lc.start()
        _wait_epoch(lc, "n1", 3)
        assert Operator(stale).map.epoch == 3
    finally:
        lc.stop()

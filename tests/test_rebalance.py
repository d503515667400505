"""Online replica rebalancing (raftkv.rebalance): the pure decisions, then real node processes.

A 3-node, 4-shard cluster under a writing load grows to 4 nodes and rebalances, then drains n1 and
removes it: every step keeps a caught-up majority, the placement ends balanced with each shard on 3
nodes, the groups' members agree with the map, and every acknowledged write is readable through
every node afterwards.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from raftkv import Client
from raftkv.cluster import LocalCluster
from raftkv.connection import Connection
from raftkv.membership import Operator
from raftkv.rebalance import Rebalancer
from raftkv.security import Security
from shards.plan import ReplicaStep, reconcile_placement, step_blocker
from shards.shardmap import ShardMap

from .conftest import dump_logs, free_port, start_cluster, wait_for_writes, writers_running

NODES = [f"n{i}" for i in range(1, 7)]

# -- pure -------------------------------------------------------------------------------------


@given(st.sets(st.sampled_from(NODES), min_size=1), st.sets(st.sampled_from(NODES)),
       st.sampled_from(NODES), st.sampled_from(["add", "remove"]))
def test_a_step_may_start_only_if_the_group_after_it_has_a_caught_up_majority(
        members: set[str], caught: set[str], node: str, action: str) -> None:
    caught &= members
    step = ReplicaStep(0, action, node)  # type: ignore[arg-type]
    why = step_blocker(step, members, caught)
    if (action == "add") == (node in members):
        assert why is not None and "member" in why  # adding a member or removing a non-member: no such step
        return
    after = members | {node} if action == "add" else members - {node}
    ready = caught & after
    assert (why is None) == (len(ready) > len(after) // 2), why


def test_step_blocker_examples() -> None:
    add = ReplicaStep(0, "add", "n4")
    assert step_blocker(add, ["n1", "n2", "n3"], ["n1", "n2", "n3"]) is None
    # 3 -> 4 members needs 3 caught up: one lagging old member is enough to wait
    assert "2 of the 4 members" in (step_blocker(add, ["n1", "n2", "n3"], ["n1", "n2"]) or "")
    remove = ReplicaStep(0, "remove", "n1")
    # n4 still installing a snapshot: n2, n3, n4 would need n4 for a majority with n2 or n3 lagging
    assert step_blocker(remove, ["n1", "n2", "n3", "n4"], ["n1", "n2"]) is not None
    assert step_blocker(remove, ["n1", "n2", "n3", "n4"], ["n2", "n3"]) is None


def test_reconcile_placement_follows_the_groups() -> None:
    placement = {0: ("n1", "n2", "n3"), 1: ("n2", "n3", "n1"), 2: ("n3", "n1", "n2")}
    # shard 0: an add committed but the map was not saved; shard 1: a remove likewise; shard 2 agrees
    got = reconcile_placement(placement, {0: ["n4", "n3", "n2", "n1"], 1: ["n2", "n3"], 2: ["n1", "n2", "n3"]})
    assert got == {0: ("n1", "n2", "n3", "n4"), 1: ("n2", "n3"), 2: ("n3", "n1", "n2")}
    assert reconcile_placement(placement, {}) == placement


# -- real processes ---------------------------------------------------------------------------

def _assert_placed(op: Operator, shards: int, nodes: list[str]) -> None:
    """Each shard on 3 of ``nodes``, loads within one of the mean, and the groups agree with the map."""
    m = ShardMap.load(op.path)
    assert sorted(m.nodes) == sorted(nodes) or set(nodes) <= set(m.nodes)
    assert all(len(names) == 3 and set(names) <= set(nodes) for names in m.placement.values()), m.placement
    loads = [len(m.shards_on(n)) for n in nodes]
    assert max(loads) - min(loads) <= 1 and sum(loads) == 3 * shards, loads
    hosted = {name: {int(s) for s in st["shards"]} for name, st in op.statuses().items()}
    for s in range(shards):
        assert op.members(s) == sorted(m.nodes[n].raft_addr(s) for n in m.placement[s])
    for n in m.nodes:
        assert hosted[n] == set(m.shards_on(n)), (n, hosted[n])


def test_add_node_rebalance_then_drain_and_remove_under_writes(tmp_path: Path) -> None:
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=4)
    try:
        with writers_running(lc, 2) as writers:
            wait_for_writes(writers, 20, "before the node add")
            op = Operator(lc.config, timeout=30.0, say=print)
            assert op.add(f"127.0.0.1:{free_port()}", join=False) == "n4"  # in no shard group yet
            # A run that died after a membership change and before saving the map: n4 is a member of
            # shard 0's group, the map does not say so. The next run must notice and go on from there.
            op._member(0, "ADD", op.map.nodes["n4"].raft_addr(0))
            rb = Rebalancer(op, step_timeout=30.0, say=print)
            result = rb.run()
            # n4 needs 3 of the 12 replicas and has one: 2 copies, and 3 replicas removed
            assert result.plan.before[0] == ("n1", "n2", "n3", "n4")
            assert (result.plan.adds, len(result.plan.steps), len(result.step_seconds)) == (2, 5, 5)
            _assert_placed(op, 4, ["n1", "n2", "n3", "n4"])
            assert rb.run().plan.steps == ()  # balanced: a second run has nothing to do
            wait_for_writes(writers, 20, "after the rebalance")

            result = rb.run(drain=["n1"])
            assert result.plan.adds == 3 and len(result.plan.steps) == 6  # n1 held 3 of the 4 shards
            _assert_placed(op, 4, ["n2", "n3", "n4"])
            assert op.map.shards_on("n1") == []
            op.remove("n1")  # drained: it only leaves the map, and stops
            assert "n1" not in ShardMap.load(lc.config).nodes
            wait_for_writes(writers, 20, "after n1 was removed")
        for w in writers:
            print("rebalance under load:", w.check(lc.config))
        _assert_readable_through_every_node(lc, [k for w in writers for k, _, _ in w.acked])
    finally:
        LocalCluster(lc.dir).stop()  # the cluster file now names n2, n3, n4
        lc.stop()


def _assert_readable_through_every_node(lc: LocalCluster, keys: list[str]) -> None:
    m = ShardMap.load(lc.config)
    sec = Security.from_config(m.security)
    auth = sec.peer_credentials()
    for name, info in m.nodes.items():  # a node forwards a read of a shard it does not lead
        with Connection(info.host, info.client_port, 10.0, sec.peer_ssl(), auth[1:] if auth else None) as conn:
            got = [v for i in range(0, len(keys), 500)  # within the node's pipeline depth limit
                   for v in conn.pipeline([("GET", k) for k in keys[i:i + 500]])]
        wrong = [(k, v) for k, v in zip(keys, got, strict=True) if v != k.encode()]
        assert wrong == [], f"through {name}: {len(wrong)} acknowledged writes not read back, e.g. {wrong[:3]}"


def test_cli_node_add_then_rebalance_returns_to_three_replicas_per_shard(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from raftkv.cli import main

    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=3)
    try:
        with Client(cluster=lc.config, timeout=10.0) as c:
            for i in range(30):
                c.put(f"k{i}", f"v{i}")
        cfg = str(lc.config)
        r = CliRunner().invoke(main, ["node", "add", f"127.0.0.1:{free_port()}", "--cluster", cfg])
        assert r.exit_code == 0, r.output  # n4 joined every group: replication 4
        r = CliRunner().invoke(main, ["rebalance", "--cluster", cfg])
        assert r.exit_code == 0, r.output
        assert "replication 4 -> 3" in r.output and "step 3/3: shard 2: remove" in r.output
        m = ShardMap.load(cfg)
        assert m.replication == 3 and all(len(names) == 3 for names in m.placement.values())
        assert sorted(len(m.shards_on(n)) for n in m.nodes) == [2, 2, 2, 3]  # 9 replicas on 4 nodes
        with Client(cluster=cfg, timeout=10.0) as c:
            assert [c.get(f"k{i}") for i in range(30)] == [f"v{i}".encode() for i in range(30)]
        # node remove drains first: n4's replicas move to n1..n3, so every shard keeps 3 replicas
        held = len(m.shards_on("n4"))
        r = CliRunner().invoke(main, ["node", "remove", "n4", "--cluster", cfg])
        assert r.exit_code == 0, r.output
        assert "draining n4" in r.output and f"step {2 * held}/{2 * held}" in r.output
        m = ShardMap.load(cfg)
        assert "n4" not in m.nodes and m.replication == 3
        assert all(sorted(names) == ["n1", "n2", "n3"] for names in m.placement.values())
        with Client(cluster=cfg, timeout=10.0) as c:
            assert [c.get(f"k{i}") for i in range(30)] == [f"v{i}".encode() for i in range(30)]
    except Exception:
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        LocalCluster(lc.dir).stop()
        lc.stop()

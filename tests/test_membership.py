"""Membership changes and leader balancing: replace a killed node under load, spread leaders."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from raftkv.cluster import LocalCluster
from raftkv.membership import Operator, map_add, map_remove, map_replace, plan_balance
from shards.shardmap import NodeInfo, ShardMapError, local_cluster

from .conftest import dump_logs, free_port, start_cluster, wait_for_writes, writers_running

# -- pure -------------------------------------------------------------------------------------

def _spread(leaders: dict, moves: list) -> dict:
    led = dict(leaders)
    for s, src, dst in moves:
        assert led[s] == src
        led[s] = dst
    counts: dict = {}
    for n in led.values():
        counts[n] = counts.get(n, 0) + 1
    return counts


class _ScriptedOperator(Operator):
    """An Operator whose view of the nodes' RAFTKV.STATUS comes from ``views``, one per poll (the last repeats)."""

    def __init__(self, path: Path, views: list[dict]) -> None:
        super().__init__(path, timeout=0.5)
        self.views = views

    def statuses(self) -> dict[str, dict]:
        return self.views.pop(0) if len(self.views) > 1 else self.views[0]


def _status(role: str, commit: int, applied: int, term: int = 3) -> dict:
    return {"shards": {"0": {"role": role, "term": term, "commit_idx": commit, "last_applied": applied}}}


def test_removal_waits_until_a_majority_of_the_other_members_caught_up(tmp_path: Path) -> None:
    """Removing n1 leaves {n2, n3}: both must have applied what the leader had committed, or the new
    configuration's majority cannot commit (a replica still installing a snapshot does not count)."""
    path = tmp_path / "cluster.toml"
    local_cluster(3, 1, data_dir=str(tmp_path / "data")).save(path)
    installing = {"n1": _status("leader", 50, 50), "n2": _status("follower", 50, 50),
                  "n3": _status("follower", 0, 0)}
    caught = {**installing, "n3": _status("follower", 50, 50)}
    op = _ScriptedOperator(path, [installing, installing, caught])
    op.wait_others_caught_up("n1")  # returns once n3 caught up
    assert op.views == [caught]
    with pytest.raises(Exception, match="not removing n1: in shard.s. \\[0\\] fewer than a majority"):
        _ScriptedOperator(path, [installing]).wait_others_caught_up("n1")
    down = {k: v for k, v in installing.items() if k != "n3"}  # n3 unreachable: not caught up either
    with pytest.raises(Exception, match="not removing n1"):
        _ScriptedOperator(path, [down]).wait_others_caught_up("n1")


def test_plan_balance_spreads_leaders() -> None:
    full = {s: ("n1", "n2", "n3") for s in range(3)}
    moves = plan_balance({0: "n1", 1: "n1", 2: "n1"}, full, ["n1", "n2", "n3"])
    assert _spread({0: "n1", 1: "n1", 2: "n1"}, moves) == {"n1": 1, "n2": 1, "n3": 1}
    assert plan_balance({0: "n1", 1: "n2", 2: "n3"}, full, ["n1", "n2", "n3"]) == []
    # a dead node (not listed) receives nothing; 5 shards over 2 live nodes -> 3/2
    five = {s: ("n1", "n2", "n3") for s in range(5)}
    leaders = {s: "n1" for s in range(5)}
    counts = _spread(leaders, plan_balance(leaders, five, ["n1", "n2"]))
    assert sorted(counts.values()) == [2, 3] and "n3" not in counts
    # only replicas of a shard can lead it
    part = {0: ("n1", "n2"), 1: ("n1", "n2"), 2: ("n1", "n3")}
    moves = plan_balance({0: "n1", 1: "n1", 2: "n1"}, part, ["n1", "n2", "n3"])
    assert all(dst in part[s] for s, _src, dst in moves)
    assert max(_spread({0: "n1", 1: "n1", 2: "n1"}, moves).values()) == 1


def test_map_changes() -> None:
    m = local_cluster(3, 3, base_port=30000, data_dir="/tmp/x")
    n4 = NodeInfo("n4", "127.0.0.1", 30003, 31300)
    added = map_add(m, n4)
    assert added.epoch == 2 and added.replication == 4 and all("n4" in p for p in added.placement.values())
    removed = map_remove(added, "n2")
    assert removed.replication == 3 and "n2" not in removed.nodes and removed.epoch == 3
    swapped = map_replace(m, "n3", n4)
    assert swapped.placement[0] == ("n1", "n2", "n4") and "n3" not in swapped.nodes
    five = local_cluster(5, 3, base_port=30000, data_dir="/tmp/x")  # replication 3 of 5 nodes
    with pytest.raises(ShardMapError, match="node replace"):
        map_remove(five, "n1")


# -- real processes ---------------------------------------------------------------------------

def test_replace_killed_node_under_load_loses_no_acked_write(tmp_path: Path) -> None:
    lc = start_cluster(str(tmp_path / "c"))
    try:
        _replace_under_load(lc)
    finally:
        LocalCluster(lc.dir).stop()  # the cluster file now names n1, n2, n4
        lc.stop()


def _replace_under_load(lc: LocalCluster) -> None:
    with writers_running(lc, 3) as writers:
        wait_for_writes(writers, 20, "before the kill")
        lc.kill_node("n3")  # the machine dies
        wait_for_writes(writers, 20, "with n3 down")
        op = Operator(lc.config, timeout=30.0, say=print)
        new = op.replace("n3", f"127.0.0.1:{free_port()}")
        assert new == "n4"
        for s in range(lc.map.nshards):
            assert op.members(s) == sorted(op.map.nodes[n].raft_addr(s) for n in ("n1", "n2", "n4"))
        wait_for_writes(writers, 20, "after the replace")
        # n4 is a real voting member that holds the data: with n2 down too, n1 + n4 are the majority.
        # Every writer (their keys span all shards, including those n2 led) must get a write
        # acknowledged that it sent after n2 died: the failover must happen, however long it takes.
        lc.kill_node("n2")
        killed_at = time.monotonic()
        deadline = killed_at + 60
        while not all(any(sent > killed_at for _, sent, _ in w.acked) for w in writers):
            assert time.monotonic() < deadline, "no write succeeded within 60 s with n2 and n3 gone"
            time.sleep(0.05)
    assert sum(len(w.acked) for w in writers) > 50
    for w in writers:  # acked writes kept, failed ones absent
        print("replace under load:", w.check(lc.config))


def test_leaders_balance_and_balancer_after_failover(tmp_path: Path) -> None:
    lc = LocalCluster.create(tmp_path / "c", nodes=3, shards=3, node_args=["--balance-leaders", "--balance-period", "0.5"])
    lc.start()
    try:
        lc.wait_ready(60)
        # a failover piles leadership up: n2 restarts as a follower of everything
        lc.kill_node("n2")
        lc.wait_ready(60, nodes=["n1", "n3"])
        lc.start_node("n2")
        deadline = time.monotonic() + 45
        while sorted(x for x in lc.leaders().values() if x) != ["n1", "n2", "n3"]:
            assert time.monotonic() < deadline, f"leaders not spread by the balancer: {lc.leaders()}"
            time.sleep(0.3)
    except Exception:
        dump_logs(lc)
        raise
    finally:
        lc.stop()


def test_leaders_balance_command(cluster: LocalCluster) -> None:
    for s in range(cluster.map.nshards):
        cluster.transfer_leader(s, "n1", timeout=30)
    from click.testing import CliRunner

    from raftkv.cli import main

    r = CliRunner().invoke(main, ["leaders", "balance", "--cluster", str(cluster.config)])
    assert r.exit_code == 0, r.output
    assert "n1=1, n2=1, n3=1" in r.output
    assert sorted(cluster.leaders().values()) == ["n1", "n2", "n3"]

"""`raftkv rebalance --dry-run` and `raftkv shard plan`: plans printed from a cluster file, nothing changed.

No servers: the commands only read the cluster file (written here by ShardMap).
"""

from __future__ import annotations

import random
import re
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from raftkv.cli import main
from raftkv.membership import map_add
from shards.plan import plan_shard_add
from shards.shardmap import NodeInfo, ShardMap, local_cluster


def cluster_file(tmp_path: Path, m: ShardMap) -> str:
    path = tmp_path / "cluster.toml"
    m.save(path)
    return str(path)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _free_client_ports(n: int) -> int:
    """A base port whose next ``n`` ports nothing listens on now: "no node reachable" must hold whatever else
    runs on this machine (a local cluster on 7001-7003, say)."""
    for _ in range(100):
        base = random.randrange(20_000, 60_000)
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free run of ports")


@pytest.fixture
def four_nodes(tmp_path: Path) -> str:
    return cluster_file(tmp_path, local_cluster(4, 4, base_port=_free_client_ports(4),
                                                data_dir=str(tmp_path / "data")))


def test_rebalance_with_no_node_reachable_fails_and_changes_nothing(four_nodes: str) -> None:
    before = Path(four_nodes).read_text()
    r = run("rebalance", "--timeout", "1", "--cluster", four_nodes)
    assert r.exit_code == 2, r.output
    assert "shard 0: cannot read the group's members" in r.output
    assert Path(four_nodes).read_text() == before


def test_rebalance_dry_run_says_balanced_when_there_is_nothing_to_move(four_nodes: str) -> None:
    r = run("rebalance", "--dry-run", "--cluster", four_nodes)
    assert r.exit_code == 0, r.output
    assert "balanced: nothing to move (replicas per node: n1=3, n2=3, n3=3, n4=3)" in r.output
    assert "dry run: nothing was changed" in r.output


def test_rebalance_dry_run_after_node_add_plans_only_removes(tmp_path: Path) -> None:
    # Today's `raftkv node add` puts the new node in every shard group: replication 4 on 4 nodes.
    m = local_cluster(3, 3, data_dir=str(tmp_path / "data"))
    m = map_add(m, NodeInfo("n4", "127.0.0.1", 7004, 7401))
    path = cluster_file(tmp_path, m)
    before = Path(path).read_text()
    r = run("rebalance", "--dry-run", "--cluster", path)
    assert r.exit_code == 0, r.output
    assert "3 shard(s) on 4 node(s), replication 4 -> 3" in r.output
    removes = [line for line in r.output.splitlines() if ". remove replica of shard" in line]
    assert len(removes) == 3 and ". add replica" not in r.output
    assert "3 step(s): 0 replica(s) added, 3 removed; replicas per node after:" in r.output
    assert Path(path).read_text() == before, "a dry run writes nothing"


def test_rebalance_dry_run_drain_moves_every_replica_off_the_node_adding_first(four_nodes: str) -> None:
    r = run("rebalance", "--dry-run", "--drain", "n4", "--cluster", four_nodes)
    assert r.exit_code == 0, r.output
    assert "on 3 node(s), draining n4" in r.output
    steps = re.findall(r"^ +\d+\. (.*)$", r.output, re.MULTILINE)
    assert len(steps) == 6  # n4 holds 3 of the 4 shards; each: add on the missing node, remove from n4
    for add, remove in zip(steps[::2], steps[1::2], strict=True):
        assert add.startswith("add replica") and not add.endswith("n4")
        assert remove.startswith("remove replica") and remove.endswith("from n4")
    assert "replicas per node after: n1=4, n2=4, n3=4" in r.output


def test_rebalance_rejects_unknown_drain_and_impossible_replication(four_nodes: str) -> None:
    r = run("rebalance", "--dry-run", "--drain", "n9", "--cluster", four_nodes)
    assert r.exit_code == 2 and "--drain names unknown node(s) ['n9']" in r.output
    r = run("rebalance", "--dry-run", "--replication", "5", "--cluster", four_nodes)
    assert r.exit_code == 2 and "replication must be an int in 1..4" in r.output


def test_shard_plan_add_prints_the_arcs_going_to_the_next_shard(four_nodes: str) -> None:
    r = run("shard", "plan", "add", "--cluster", four_nodes)
    assert r.exit_code == 0, r.output
    movement = plan_shard_add(ShardMap.load(four_nodes).ring)
    assert "add shard 4: shards 0..3 -> 5 shard(s), 256 vnodes each" in r.output
    assert (f"{len(movement.arcs)} moving arc(s), {100 * movement.fraction:.2f}% of the ring "
            "(an even share: 1/5 = 20.00%)") in r.output
    for src in range(4):
        assert f"shard {src} -> shard 4: " in r.output
    assert "plan only: nothing was changed" in r.output


def test_shard_plan_add_count_plans_several_new_shards_at_once(four_nodes: str) -> None:
    r = run("shard", "plan", "add", "--count", "2", "--cluster", four_nodes)
    assert r.exit_code == 0, r.output
    assert "add shards 4, 5: shards 0..3 -> 6 shard(s)" in r.output
    assert "(an even share: 2/6 = 33.33%)" in r.output
    assert {f"shard {s} -> shard {d}: " in r.output for s in range(4) for d in (4, 5)} == {True}
    r = run("shard", "plan", "remove", "--count", "2", "--cluster", four_nodes)
    assert r.exit_code == 2 and "one shard at a time" in r.output


def test_shard_plan_remove_defaults_to_the_last_shard_and_can_list_arcs(four_nodes: str) -> None:
    r = run("shard", "plan", "remove", "--arcs", "--cluster", four_nodes)
    assert r.exit_code == 0, r.output
    assert "remove shard 3: shards 0..3 -> 3 shard(s)" in r.output
    assert {f"shard 3 -> shard {d}: " in r.output for d in range(3)} == {True}
    arcs = [line for line in r.output.splitlines() if line.startswith("    [0x")]
    assert arcs and all(line.rsplit(" ", 3)[1:] == ["3", "->", line[-1]] for line in arcs)
    assert f"{len(arcs)} moving arc(s)" in r.output


def test_shard_plan_refuses_impossible_changes(tmp_path: Path, four_nodes: str) -> None:
    r = run("shard", "plan", "remove", "7", "--cluster", four_nodes)
    assert r.exit_code == 2 and "cannot remove shard 7: shard 7 is not on the ring" in r.output
    r = run("shard", "plan", "add", "0", "--cluster", four_nodes)
    assert r.exit_code == 2 and "cannot add shard 0" in r.output
    one = cluster_file(tmp_path, local_cluster(1, 1, data_dir=str(tmp_path / "d1")))
    r = run("shard", "plan", "remove", "--cluster", one)
    assert r.exit_code == 2 and "cannot remove the last shard" in r.output
    r = run("shard", "plan", "add", "--cluster", str(tmp_path / "missing.toml"))
    assert r.exit_code != 0 and "no cluster file" in r.output


def test_rebalance_refuses_while_a_shard_is_being_added(tmp_path: Path) -> None:
    m = local_cluster(3, 2, data_dir=str(tmp_path / "data"))
    path = cluster_file(tmp_path, ShardMap(**{**{f.name: getattr(m, f.name) for f in m.__dataclass_fields__.values()
                                                 if f.init}, "adding": 2,
                                              "placement": {**m.placement, 2: ("n1", "n2", "n3")}}))
    r = run("rebalance", "--cluster", path)
    assert r.exit_code == 2 and "shard 2 is being added; finish that first ('raftkv shard add')" in r.output

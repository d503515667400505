"""The scale-out benchmarks' counting (``raftkv.bench.scaleout``): replicas and leaders per node, and when a
spread is even. Pure; the benchmark itself (bench/double_bench.py) is a measurement, not a test."""

from __future__ import annotations

from jepsen_like import netns
from raftkv.bench.scaleout import even, leaders_per_node, per_node
from shards.shardmap import local_cluster

THREE = ["n1", "n2", "n3"]
SIX = [f"n{i}" for i in range(1, 7)]


def test_three_nodes_six_shards_replication_three_puts_six_replicas_on_each_node():
    m = local_cluster(3, 6, per_node_hosts=True)
    assert per_node(m.placement, m.nodes) == {"n1": 6, "n2": 6, "n3": 6}
    assert {n: i.host for n, i in m.nodes.items()} == {"n1": "127.0.0.1", "n2": "127.0.0.2", "n3": "127.0.0.3"}


def test_empty_nodes_are_listed_with_zero_and_make_the_spread_uneven():
    placement = {s: THREE for s in range(6)}
    counts = per_node(placement, SIX)
    assert counts == {"n1": 6, "n2": 6, "n3": 6, "n4": 0, "n5": 0, "n6": 0}
    assert not even(counts)


def test_a_node_placed_on_but_not_listed_is_still_counted():
    assert per_node({0: ["n1", "n9"]}, ["n1"]) == {"n1": 1, "n9": 1}


def test_even_means_every_node_within_one_of_every_other():
    assert even({"n1": 3, "n2": 3, "n3": 3, "n4": 3, "n5": 3, "n6": 3})
    assert even({"n1": 4, "n2": 3, "n3": 3})
    assert not even({"n1": 4, "n2": 3, "n3": 2})
    assert even({})


def test_leaders_are_counted_per_node_and_a_shard_without_a_leader_is_not():
    leaders = {0: "n1", 1: "n2", 2: "n3", 3: "n1", 4: None, 5: "n2"}
    assert leaders_per_node(leaders, SIX) == {"n1": 2, "n2": 2, "n3": 1, "n4": 0, "n5": 0, "n6": 0}
    assert leaders_per_node({s: f"n{s + 1}" for s in range(6)}, SIX) == dict.fromkeys(SIX, 1)


def test_reexec_python_marks_the_namespace_and_runs_the_given_script():
    avail = netns.Availability(True, "", ("unshare", "-n"), "/sbin/iptables")
    cmd, env = netns.reexec_python(avail, ["bench/double_bench.py", "--keys", "10"])
    assert cmd[:3] == ["unshare", "-n", "--"] and cmd[-3:] == ["bench/double_bench.py", "--keys", "10"]
    assert env[netns.ENV_MARK] == "/sbin/iptables"
    cmd, _ = netns.reexec_command(avail, ["run"])
    assert cmd[-3:] == ["-m", "jepsen_like.cli", "run"]

"""The shard map (shards/shardmap.py): TOML round trips, defaults, queries and validation errors."""

from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.ring import DEFAULT_VNODES, Ring
from shards.shardmap import NodeInfo, ShardMap, ShardMapError, local_cluster


def base_dict() -> dict[str, Any]:
    """A valid parsed cluster file: 3 nodes, 3 shards, default placement."""
    return tomllib.loads(
        """
        [cluster]
        name = "raftkv"
        epoch = 1
        shards = 3
        data_dir = "/var/lib/raftkv"

        [nodes.n1]
        host = "127.0.0.1"
        client_port = 7001
        raft_port = 7101

        [nodes.n2]
        host = "127.0.0.1"
        client_port = 7002
        raft_port = 7201
        metrics_port = 7301

        [nodes.n3]
        host = "127.0.0.1"
        client_port = 7003
        raft_port = 7401
        """
    )


def roundtrip(m: ShardMap) -> ShardMap:
    return ShardMap.from_dict(tomllib.loads(m.to_toml()))


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_nodes", "n_shards", "per_node_hosts"), [(1, 1, False), (3, 3, False), (5, 8, True), (9, 64, True)]
)
def test_local_cluster_toml_roundtrip(n_nodes: int, n_shards: int, per_node_hosts: bool) -> None:
    m = local_cluster(n_nodes, n_shards, per_node_hosts=per_node_hosts)
    assert roundtrip(m) == m
    assert roundtrip(m).to_toml() == m.to_toml()


@settings(max_examples=40, deadline=None)
@given(
    name=st.text(min_size=1, max_size=20),
    data_dir=st.text(min_size=1, max_size=30).filter(lambda s: "\x00" not in s),
    epoch=st.integers(0, 2**63 - 1),
    n_nodes=st.integers(1, 7),
    n_shards=st.integers(1, 20),
    vnodes=st.integers(1, 300),
)
def test_roundtrip_any_strings_and_sizes(
    name: str, data_dir: str, epoch: int, n_nodes: int, n_shards: int, vnodes: int
) -> None:
    m = local_cluster(n_nodes, n_shards, data_dir=data_dir, name=name, epoch=epoch, vnodes=vnodes)
    assert roundtrip(m) == m


def test_roundtrip_explicit_placement_and_quoted_node_names() -> None:
    d = base_dict()
    d["nodes"]["db.east-1"] = d["nodes"].pop("n3")
    d["placement"] = {"0": ["n1", "n2"], "1": ["db.east-1", "n1"], "2": ["n2", "db.east-1"]}
    m = ShardMap.from_dict(d)
    assert m.replication == 2  # implied by the placement
    assert '[nodes."db.east-1"]' in m.to_toml()
    assert roundtrip(m) == m


def test_save_and_load(tmp_path: os.PathLike[str]) -> None:
    m = local_cluster(data_dir=os.path.join(os.fspath(tmp_path), "data"))
    path = os.path.join(os.fspath(tmp_path), "cluster.toml")
    m.save(path)
    assert ShardMap.load(path) == m
    assert os.listdir(tmp_path) == ["cluster.toml"]  # no temp file left behind
    m.with_epoch(2).save(path)  # overwrite in place
    assert ShardMap.load(path).epoch == 2


def test_load_resolves_relative_data_dir_against_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "cluster.toml")
    local_cluster(data_dir="data").save(path)
    loaded = ShardMap.load(path)
    assert loaded.data_dir == os.path.join(os.fspath(tmp_path), "data")
    assert loaded.node_data_dir("n2") == os.path.join(os.fspath(tmp_path), "data", "n2")
    assert ShardMap.from_dict(base_dict(), base_dir="/elsewhere").data_dir == "/var/lib/raftkv"


def test_load_errors_name_the_file(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(os.fspath(tmp_path), "nope.toml")
    with pytest.raises(ShardMapError, match=r"nope\.toml: cluster file not found"):
        ShardMap.load(missing)
    bad = os.path.join(os.fspath(tmp_path), "bad.toml")
    with open(bad, "w") as f:
        f.write("[cluster\n")
    with pytest.raises(ShardMapError, match=r"bad\.toml: not valid TOML"):
        ShardMap.load(bad)
    incomplete = os.path.join(os.fspath(tmp_path), "cluster.toml")
    with open(incomplete, "w") as f:
        f.write(local_cluster().to_toml().replace("client_port = 7002\n", ""))
    with pytest.raises(ShardMapError, match=r"cluster\.toml: nodes\.n2\.client_port missing"):
        ShardMap.load(incomplete)


# -- defaults and queries ---------------------------------------------------------


def test_defaults() -> None:
    m = ShardMap.from_dict(base_dict())
    assert (m.name, m.epoch, m.nshards, m.vnodes, m.replication) == ("raftkv", 1, 3, DEFAULT_VNODES, 3)
    assert dict(m.placement) == {0: ("n1", "n2", "n3"), 1: ("n2", "n3", "n1"), 2: ("n3", "n1", "n2")}
    d = base_dict()
    for key in ("name", "epoch"):
        del d["cluster"][key]
    assert (ShardMap.from_dict(d).name, ShardMap.from_dict(d).epoch) == ("raftkv", 1)


@pytest.mark.parametrize(("n_nodes", "replication"), [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_default_replication_is_min_3_nodes(n_nodes: int, replication: int) -> None:
    d = base_dict()
    d["nodes"] = {
        f"n{i}": {"host": "h", "client_port": 1 + i, "raft_port": 1000 + 10 * i} for i in range(n_nodes)
    }
    m = ShardMap.from_dict(d)
    assert m.replication == replication
    names = sorted(d["nodes"])
    for s in range(3):
        assert m.placement[s] == tuple(names[(s + i) % n_nodes] for i in range(replication))


def test_queries() -> None:
    m = ShardMap.from_dict(base_dict())
    assert [n.name for n in m.replicas(1)] == ["n2", "n3", "n1"]
    assert m.shards_on("n1") == [0, 1, 2]
    assert m.node_data_dir("n3") == "/var/lib/raftkv/n3"
    assert m.nodes["n2"].raft_addr(2) == "127.0.0.1:7203"
    assert m.nodes["n2"].client_addr == ("127.0.0.1", 7002)
    assert m.node_for_raft_addr("127.0.0.1:7203") == "n2"
    assert m.node_for_raft_addr("127.0.0.1:7101") == "n1"
    assert m.node_for_raft_addr("127.0.0.1:7104") is None  # beyond the 3 shards
    assert m.node_for_raft_addr("10.0.0.1:7101") is None
    ring = Ring(range(3))
    for key in (b"a", "b", b"user:42", ""):
        assert m.shard_for_key(key) == ring.shard_for(key)


def test_shards_on_with_partial_replication() -> None:
    m = local_cluster(n_nodes=5, n_shards=5, replication=3)
    assert m.shards_on("n1") == [0, 3, 4]
    assert sum(len(m.shards_on(n)) for n in m.nodes) == 5 * 3
    for s in range(5):
        assert len({n.name for n in m.replicas(s)}) == 3


def test_local_cluster_port_scheme() -> None:
    m = local_cluster(n_nodes=3, n_shards=64, base_port=7001, per_node_hosts=True)
    n1, n3 = m.nodes["n1"], m.nodes["n3"]
    assert (n1.host, n1.client_port, n1.raft_port, n1.metrics_port) == ("127.0.0.1", 7001, 8001, 7501)
    assert (n3.host, n3.client_port, n3.raft_port, n3.metrics_port) == ("127.0.0.3", 7003, 8201, 7503)
    assert local_cluster().nodes["n3"].host == "127.0.0.1"
    for node in m.nodes.values():
        for s in range(64):
            assert m.node_for_raft_addr(node.raft_addr(s)) == node.name


def test_unknown_lookups_raise() -> None:
    m = local_cluster()
    with pytest.raises(ShardMapError, match=r"unknown shard 3: shards are 0\.\.2"):
        m.replicas(3)
    with pytest.raises(ShardMapError, match="unknown node 'n9'"):
        m.shards_on("n9")
    with pytest.raises(ShardMapError, match="unknown node 'n9'"):
        m.node_data_dir("n9")


def test_epoch_only_goes_up_and_map_is_immutable() -> None:
    m = local_cluster()
    assert m.with_epoch(5).epoch == 5 and m.epoch == 1
    assert m.with_epoch(5) != m
    for bad in (1, 0, True):
        with pytest.raises(ShardMapError, match="new epoch"):
            m.with_epoch(bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.epoch = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.nodes["n4"] = m.nodes["n1"]  # type: ignore[index]
    assert m.ring == Ring(range(3), DEFAULT_VNODES)


# -- validation ---------------------------------------------------------------------


def _set(path: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value

    return mutate


def _del(path: str) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        del d[last]

    return mutate


ERRORS = [
    (_del("cluster"), r"\[cluster\] table missing"),
    (_del("nodes"), r"\[nodes\] table missing"),
    (_set("nodes", {}), "nodes is empty"),
    (_del("cluster.shards"), r"cluster\.shards missing"),
    (_del("cluster.data_dir"), r"cluster\.data_dir missing"),
    (_del("nodes.n2.client_port"), r"nodes\.n2\.client_port missing"),
    (_del("nodes.n1.host"), r"nodes\.n1\.host missing"),
    (_del("nodes.n3.raft_port"), r"nodes\.n3\.raft_port missing"),
    (_set("cluster.shards", 0), r"cluster\.shards must be in 1\.\.1024, got 0"),
    (_set("cluster.shards", "3"), r"cluster\.shards must be an integer"),
    (_set("cluster.epoch", -1), r"cluster\.epoch must be in"),
    (_set("cluster.vnodes", 0), r"cluster\.vnodes must be in"),
    (_set("cluster.name", ""), r"cluster\.name must be a non-empty string"),
    (_set("cluster.replication", 4), r"cluster\.replication = 4 but only 3 node\(s\)"),
    (_set("cluster.replication", 0), r"cluster\.replication must be in"),
    (_set("cluster.replicas", 3), r"unknown key cluster\.replicas"),
    (_set("nodes.n1.port", 3), r"unknown key nodes\.n1\.port"),
    (_set("extra", {}), r"unknown key \[extra\]"),
    (_set("nodes.n1.client_port", 70000), r"nodes\.n1\.client_port must be in 1\.\.65535"),
    (_set("nodes.n1.raft_port", True), r"nodes\.n1\.raft_port must be an integer"),
    (_set("nodes.n1.metrics_port", "x"), r"nodes\.n1\.metrics_port must be an integer"),
    (_set("nodes.n1.host", 5), r"nodes\.n1\.host must be a non-empty string"),
    (_set("nodes.n1", "x"), r"nodes\.n1 must be a table"),
    (
        _set("nodes.bad name", {"host": "h", "client_port": 1, "raft_port": 2}),
        "node name 'bad name' must match",
    ),
    (_set("nodes.n2.client_port", 7001), r"port 127\.0\.0\.1:7001 is used twice: by nodes\.n1\.client_port"),
    (_set("nodes.n2.raft_port", 7102), r"port 127\.0\.0\.1:7102 is used twice: by nodes\.n1\.raft_port \+ 1"),
    (
        _set("nodes.n2.metrics_port", 7002),
        r"port 127\.0\.0\.1:7002 is used twice: by nodes\.n2\.client_port and nodes\.n2\.metrics_port",
    ),
    (_set("nodes.n1.raft_port", 65534), r"nodes\.n1\.raft_port = 65534 leaves no room for 3 shards"),
    (
        _set("placement", {"0": ["n1", "n2", "n3"]}),
        r"placement must list every shard 0\.\.2.*missing: \[1, 2\]",
    ),
    (_set("placement", {"x": ["n1"]}), "placement key 'x' must be a shard id"),
    (_set("placement", {"0": "n1"}), r"placement\.0 must be a list of node names"),
    (
        _set("placement", {"0": ["n1", "n2", "n9"], "1": ["n1", "n2", "n3"], "2": ["n1", "n2", "n3"]}),
        r"placement\.0 names unknown node 'n9' \(nodes: n1, n2, n3\)",
    ),
    (
        _set("placement", {"0": ["n1", "n1", "n2"], "1": ["n1", "n2", "n3"], "2": ["n1", "n2", "n3"]}),
        r"placement\.0 lists a node twice",
    ),
    (
        _set("placement", {"0": [], "1": ["n1", "n2", "n3"], "2": ["n1", "n2", "n3"]}),
        r"placement\.0 is empty: every shard needs at least one replica",
    ),
    (
        _set("placement", {"0": ["n1"], "1": ["n1"], "2": ["n1"], "3": ["n2"]}),
        r"placement must list every shard.*unknown: \[3\]",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), ERRORS)
def test_invalid_cluster_files_are_rejected_with_field_names(mutate: Any, message: str) -> None:
    d = copy.deepcopy(base_dict())
    mutate(d)
    with pytest.raises(ShardMapError, match=r"^cluster\.toml: " + message):
        ShardMap.from_dict(d)


def test_shardmap_error_is_a_value_error_and_source_is_configurable() -> None:
    d = base_dict()
    del d["cluster"]["shards"]
    with pytest.raises(ValueError, match=r"^/etc/raftkv\.toml: cluster\.shards missing$"):
        ShardMap.from_dict(d, source="/etc/raftkv.toml")


def test_same_port_on_different_hosts_is_allowed() -> None:
    d = base_dict()
    for i, node in enumerate(d["nodes"].values(), start=1):
        node.update(host=f"127.0.0.{i}", client_port=7001, raft_port=7101)
        node.pop("metrics_port", None)
    m = ShardMap.from_dict(d)
    assert m.node_for_raft_addr("127.0.0.2:7102") == "n2"


def test_direct_construction_is_validated() -> None:
    m = local_cluster()
    with pytest.raises(ShardMapError, match="nodes\\['n1'\\] must be a NodeInfo named 'n1'"):
        dataclasses.replace(m, nodes={**m.nodes, "n1": m.nodes["n2"]})
    with pytest.raises(ShardMapError, match="no nodes"):
        dataclasses.replace(m, nodes={}, placement={})
    with pytest.raises(ShardMapError, match="port"):
        NodeInfo("n1", "h", 0, 1)


def test_local_cluster_argument_errors() -> None:
    with pytest.raises(ShardMapError, match="n_shards must be in 1..100"):
        local_cluster(n_shards=101)
    with pytest.raises(ShardMapError, match="n_nodes"):
        local_cluster(n_nodes=0)
    with pytest.raises(ShardMapError, match="replication = 4 but only 3"):
        local_cluster(replication=4)
    with pytest.raises(ShardMapError, match="base_port"):
        local_cluster(base_port=65000)


# -- a shard being added (raftkv shard add) ----------------------------------------------------


def test_a_map_adding_a_shard_hosts_its_group_but_keeps_it_off_the_ring() -> None:
    m = local_cluster(3, 2, data_dir="/d")
    adding = dataclasses.replace(m, epoch=2, adding=2, placement={**m.placement, 2: ("n1", "n2", "n3")})
    assert adding.nshards == 2 and list(adding.groups) == [0, 1, 2]
    assert adding.ring == m.ring  # no key maps to shard 2 yet
    assert adding.shards_on("n1") == [0, 1, 2]
    assert adding.node_for_raft_addr(adding.nodes["n1"].raft_addr(2)) == "n1"
    back = ShardMap.from_dict(tomllib.loads(adding.to_toml()))
    assert back == adding and back.adding == 2
    on_ring = dataclasses.replace(adding, epoch=3, nshards=3, adding=None)
    assert on_ring.ring == Ring(range(3), on_ring.vnodes) and "adding" not in on_ring.to_toml()
    assert ShardMap.from_dict(tomllib.loads(m.to_toml())).adding is None  # files of before load as they did


def test_adding_must_be_the_next_shard_id_with_a_placement() -> None:
    m = local_cluster(3, 2, data_dir="/d")
    with pytest.raises(ShardMapError, match=r"cluster\.adding must be in 2\.\.2"):
        dataclasses.replace(m, adding=3, placement={**m.placement, 3: ("n1",)})
    with pytest.raises(ShardMapError, match=r"placement must list every shard 0\.\.2"):
        dataclasses.replace(m, adding=2)
    d = base_dict()
    d["cluster"]["adding"] = 3
    with pytest.raises(ShardMapError, match="cluster.adding needs an explicit"):
        ShardMap.from_dict(d)


def test_a_removal_mark_round_trips_and_only_the_last_shard_can_be_marked() -> None:
    m = local_cluster(3, 3, base_port=7001)
    marked = dataclasses.replace(m, epoch=m.epoch + 1, removing=2)
    assert ShardMap.from_dict(tomllib.loads(marked.to_toml())) == marked
    assert "removing = 2" in marked.to_toml() and "removing" not in m.to_toml()
    assert list(marked.groups) == [0, 1, 2] and marked.ring == m.ring  # still on the ring, still hosted
    for bad in (0, 1, 3):
        with pytest.raises(ShardMapError):
            dataclasses.replace(m, removing=bad)
    with pytest.raises(ShardMapError):
        dataclasses.replace(local_cluster(3, 1, base_port=7001), removing=0)  # the only shard


def test_born_records_the_epoch_an_added_shard_was_created_and_round_trips() -> None:
    m = local_cluster(3, 2, base_port=7001)
    assert m.incarnation(0) == m.incarnation(1) == 0 and "[born]" not in m.to_toml()  # files of before
    grown = dataclasses.replace(m, epoch=5, nshards=3, placement={**m.placement, 2: ("n1", "n2", "n3")},
                                born={2: 4})
    assert grown.incarnation(2) == 4 and grown.incarnation(0) == 0
    assert ShardMap.from_dict(tomllib.loads(grown.to_toml())) == grown
    with pytest.raises(ShardMapError, match=r"born\.3: shard 3 is not in the map"):
        dataclasses.replace(grown, born={3: 4})
    with pytest.raises(ShardMapError, match=r"born\.2 must be in 1\.\.5"):
        dataclasses.replace(grown, born={2: 6})  # created after the map that holds it: impossible
    d = tomllib.loads(grown.to_toml())
    d["born"] = {"x": 1}
    with pytest.raises(ShardMapError, match="born key 'x' must be a shard id"):
        ShardMap.from_dict(d)


def test_a_node_takes_a_smaller_map_only_from_one_marking_that_removal() -> None:
    from raftkv.server.commands.member import shrink_allowed

    m = local_cluster(3, 3, base_port=7001)
    marked = dataclasses.replace(m, epoch=2, removing=2)
    smaller = dataclasses.replace(local_cluster(3, 2, base_port=7001), epoch=3)
    assert shrink_allowed(marked, smaller)
    assert not shrink_allowed(m, smaller)  # no removal marked
    assert not shrink_allowed(marked, dataclasses.replace(smaller, epoch=2))  # not newer
    # a node that missed the marking map: its replica opened under the 2-shard ring (epoch 3) is the proof
    assert shrink_allowed(m, smaller, opened=[(2, 3)])
    assert not shrink_allowed(m, smaller, opened=[(2, 1), (3, 1)])  # an older owner of 2 shards proves nothing
    assert not shrink_allowed(dataclasses.replace(local_cluster(3, 4, base_port=7001), removing=3),
                              dataclasses.replace(local_cluster(3, 2, base_port=7001), epoch=9))  # two less


def test_moved_leases_round_trip_and_a_client_reads_a_map_with_tables_it_does_not_know() -> None:
    """``[leases_moved]`` (a removal moved a shard's leases to shard 0) survives the file; an operator's file
    with an unknown table is refused, while a client reading a node's map (``newer_tables``) leaves it out."""
    m = dataclasses.replace(local_cluster(3, 3), leases_moved={3: 41})
    parsed = tomllib.loads(m.to_toml())
    assert ShardMap.from_dict(parsed) == m and ShardMap.from_dict(parsed).leases_moved == {3: 41}
    newer = {**parsed, "from_the_future": {"x": 1}}
    with pytest.raises(ShardMapError, match="from_the_future"):
        ShardMap.from_dict(newer)
    assert ShardMap.from_dict(newer, newer_tables=True) == m
    with pytest.raises(ShardMapError, match="leases_moved"):
        ShardMap.from_dict({**parsed, "leases_moved": {"0": 5}})  # shard 0 is never removed

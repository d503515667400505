"""A shard removed and added again is a new group: no node may carry the old group's data into it.

``raftkv shard remove 2`` then ``raftkv shard add`` gives shard id 2 to a new Raft group (its incarnation, the
map's ``born``, is the epoch of the add). A node that missed both — down, or paused and cut off — still holds
the old group's log, hard state and keys under the same id. The new group's terms and indexes start over, so
those could pass for its own (a stale vote, a log that "matches"). On 3 real node processes:

* n3 killed before the removal and restarted after the add: it reclaims the old data before the new
  member starts (``event=stale_incarnation``);
* n3 paused (SIGSTOP) before the second removal, unreachable for the operator (as across a partition), and
  resumed after the second add: it still runs the old group, whose frames the new group's members drop
  (another wire tag); the first map it fetches is the one with the new shard 2, so it stops the old group,
  reclaims it and starts the new one (``event=group_renewed``).

Each time, every acknowledged write reads back and n3's replica of the new shard 2 ends identical to the
others' (HASHKV at one revision).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raftkv import Client
from raftkv.cluster import LocalCluster
from raftkv.membership import Operator
from raftkv.resharder import Resharder
from shards.shardmap import ShardMap

from .conftest import dump_logs, replicas_agree, start_cluster


class _CutOff(Operator):
    """An operator for whom node ``cut`` is unreachable (no map reaches it but by its own polling)."""

    def __init__(self, path: str, cut: tuple[str, int] | None, **kw: Any) -> None:
        self.cut = cut  # first: the operator reads the map from the nodes as it starts
        super().__init__(path, **kw)

    def _call(self, addr: tuple[str, int], *args: Any, timeout: float = 2.0) -> Any:
        if addr == self.cut:
            raise ConnectionRefusedError(f"{addr} cut off")
        return super()._call(addr, *args, timeout=timeout)


def _remove_then_add(lc: LocalCluster, cut: str | None = None) -> int:
    """``shard remove 2`` then ``shard add`` (by an operator that cannot reach node ``cut``); the new shard 2's
    incarnation."""
    addr = lc.map.nodes[cut].client_addr if cut else None

    def resharder() -> Resharder:
        return Resharder(_CutOff(lc.config, addr, timeout=20.0, say=print), step_timeout=60.0, say=print)

    assert resharder().remove(2).shard == 2
    assert resharder().run().shard == 2
    m = ShardMap.load(lc.config)
    assert m.nshards == 3 and m.incarnation(2) > 0
    return m.incarnation(2)


def _write(lc: LocalCluster, prefix: str, n: int = 200) -> dict[str, bytes]:
    values = {f"{prefix}-{i}": f"{prefix}:{i}".encode() for i in range(n)}
    with Client(cluster=lc.config, timeout=15.0) as c:
        for k, v in values.items():
            c.put(k, v)
    return values


def _check(lc: LocalCluster, acked: dict[str, bytes], event: str) -> None:
    m = ShardMap.load(lc.config)
    assert "n3" in m.placement[2]
    for shard in m.groups:
        replicas_agree(m, shard, timeout=30.0)
    with Client(cluster=lc.config, timeout=15.0) as c:
        got = dict(zip(acked, c.mget(list(acked)), strict=True))
    assert {k: v for k, v in got.items() if v != acked[k]} == {}
    assert event in lc.log_file("n3").read_text(errors="replace")


def test_a_node_that_missed_a_removal_and_the_add_again_never_brings_the_old_group_into_the_new(
        tmp_path: Path) -> None:
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=3)
    try:
        acked = _write(lc, "before")
        lc.kill_node("n3")
        first = _remove_then_add(lc)
        acked |= _write(lc, "down")
        lc.start_node("n3")  # from the cluster file the commands saved: shard 2 is there again, born later
        _check(lc, acked, "event=stale_incarnation")

        lc.pause_node("n3")
        second = _remove_then_add(lc, cut="n3")
        assert second > first
        acked |= _write(lc, "paused")
        lc.resume_node("n3")  # its old group 2 still runs until n3 fetches the map (every 2 s)
        acked |= _write(lc, "resumed")
        _check(lc, acked, "event=group_renewed")
    except BaseException:
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        lc.stop()

"""The ``compaction`` nemesis: kill -9 while a node checkpoints and compacts its Raft log, and while it
installs a snapshot; the ``RAFTKV.FAULT COMPACT.NOW`` fault it forces compactions with; and a real run
(``raftkv-jepsen run --nemesis compaction``) that shows the faults happened and the run stays linearizable.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from jepsen_like.nemesis import FAULT_KINDS, Nemesis, parse_nemesis
from jepsen_like.nemesis import compaction as nemesis_compaction
from raftkv.server.api import BadRequest, Faults
from raftkv.server.commands.admin import cmd_fault

from .test_jepsen_harness import assert_pass, common, harness

# -- RAFTKV.FAULT COMPACT.NOW ------------------------------------------------------------------------------


class FakeReplica:
    def __init__(self) -> None:
        self.actions: list = []

    def on_tick_thread(self, action: object) -> None:
        self.actions.append(action)

    def forceLogCompaction(self) -> None:  # noqa: N802 - pysyncobj's name
        pass


def test_compact_now_is_refused_unless_armed_and_forces_the_chosen_replicas() -> None:
    replicas = {s: FakeReplica() for s in range(3)}
    node = SimpleNamespace(name="n1", faults=Faults.parse(["clock.skew_ms:0"]), replicas=replicas)
    with pytest.raises(BadRequest, match=r"COMPACT.NOW: not armed on this node \(start it with --fault compact.now:0"):
        cmd_fault(node, None, [b"RAFTKV.FAULT", b"COMPACT.NOW", b"-1"])
    node.faults = Faults.parse(["compact.now:0"])
    assert cmd_fault(node, None, [b"RAFTKV.FAULT", b"COMPACT.NOW", b"1"]) == 1
    assert [len(r.actions) for r in replicas.values()] == [0, 1, 0]
    assert replicas[1].actions[0] == replicas[1].forceLogCompaction  # on the tick thread, not the caller's
    assert cmd_fault(node, None, [b"RAFTKV.FAULT", b"compact.now", b"-1"]) == 3
    assert [len(r.actions) for r in replicas.values()] == [1, 2, 1]
    with pytest.raises(BadRequest, match="no replica of shard 7 on this node"):
        cmd_fault(node, None, [b"RAFTKV.FAULT", b"COMPACT.NOW", b"7"])
    with pytest.raises(BadRequest, match="beyond"):
        cmd_fault(node, None, [b"RAFTKV.FAULT", b"COMPACT.NOW", b"-2"])


# -- the nemesis against a stand-in cluster -----------------------------------------------------------------


class CompactionCluster:
    """Three nodes of three shards each: RAFTKV.STATUS counters that restart at 0 with the process, a log
    per node, and everything done recorded in ``events``.  COMPACT.NOW checkpoints every replica of the node
    (logged); a restarted node makes each other node start one snapshot transfer to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.map = type("Map", (), {"nodes": {"n1": None, "n2": None, "n3": None}, "nshards": 3})()
        self.alive = {n: True for n in self.map.nodes}
        self.counters = {n: self._zero() for n in self.map.nodes}
        self.commits = 0  # every status read of a live node sees one more entry committed in every shard
        self.events: list[tuple[str, str]] = []
        for n in self.map.nodes:
            self.log_file(n).write_text("event=node_started\n")

    @staticmethod
    def _zero() -> dict[str, int]:
        return {"checkpoints": 0, "snapshots_sent": 0, "snapshots_installed": 0}

    def log_file(self, node: str) -> Path:
        return self.root / f"{node}.log"

    def _log(self, node: str, line: str) -> None:
        with open(self.log_file(node), "a") as f:
            f.write(line + "\n")

    def leaders(self) -> dict[int, str]:
        return {0: "n1", 1: "n2", 2: "n3"}

    def signal_node(self, node: str, sig: int) -> bool:
        return self.alive[node]

    def pid(self, node: str) -> int | None:
        return 1 if self.alive[node] else None

    def call(self, node: str, *args: str) -> object:
        if not self.alive[node]:
            raise ConnectionRefusedError(node)
        if args == ("RAFTKV.STATUS",):
            c = self.counters[node]
            self.commits += 1
            shards = {str(s): {"commit_idx": self.commits,
                               "checkpoints": c["checkpoints"] // 3 + (s < c["checkpoints"] % 3),
                               "snapshots_sent": c["snapshots_sent"] if s == 0 else 0,
                               "snapshots_installed": 0} for s in range(3)}
            return json.dumps({"shards": shards})
        assert args == ("RAFTKV.FAULT", "COMPACT.NOW", "-1"), args
        self.events.append(("compact", node))
        self.counters[node]["checkpoints"] += 3
        for s in range(3):
            self._log(node, f"event=checkpoint_begin shard={s} index=9 keys=1")
            if s < 2:  # the third one is still committing when the kill comes
                self._log(node, f"event=checkpoint shard={s} index=9 keys_written=1")
        return 3

    def kill_node(self, node: str) -> None:
        self.events.append(("kill", node))
        self.alive[node] = False

    def start_node(self, node: str) -> None:
        if self.alive[node]:
            return
        self.events.append(("start", node))
        self.alive[node] = True
        self.counters[node] = self._zero()  # a new process counts from 0
        for n in self.map.nodes:
            if n != node and self.alive[n]:
                self.counters[n]["snapshots_sent"] += 1
        self._log(node, "event=snapshot_receiving shard=0 gen=1")  # and killed before it finished


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The nemesis's sleeps advance a fake clock instead of waiting."""
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    monkeypatch.setattr(nemesis_compaction, "_sleep", sleep)
    return now


@pytest.mark.parametrize("seed", range(4))
def test_compaction_nemesis_kills_in_a_checkpoint_and_in_a_snapshot_install(tmp_path: Path, seed: int,
                                                                          fake_time: list[float]) -> None:
    cluster = CompactionCluster(tmp_path)
    nem = Nemesis(cluster, random.Random(seed), clock=lambda: fake_time[0])
    first = nem.start_fault("compaction")
    nem.end_fault(first)  # the window's end restarts the node it left down
    assert all(cluster.alive.values())
    second = nem.start_fault("compaction")
    by_variant = {f.detail.split(":")[0]: f for f in (first, second)}
    assert set(by_variant) == {"checkpoint kill", "install kill"}  # the two variants alternate

    ckpt = by_variant["checkpoint kill"]
    assert re.search(r"COMPACT.NOW to 3 replicas, kill -9 \d+ ms after its first checkpoint began; "
                     r"checkpoints begun 3, committed 2 before the kill$",
                     ckpt.detail), ckpt.detail
    assert 0 <= int(re.search(r"kill -9 (\d+) ms after", ckpt.detail).group(1)) <= 200

    inst = by_variant["install kill"]
    (y,) = inst.nodes
    others = [n for n in cluster.map.nodes if n != y]
    # in this order: Y down, the others compact, Y back (it must install snapshots), Y killed again
    steps = [("kill", y), *[("compact", n) for n in others], ("start", y), ("kill", y)]
    assert any(cluster.events[i:i + len(steps)] == steps for i in range(len(cluster.events))), cluster.events
    before, after = map(int, re.search(r"checkpoints (\d+) -> (\d+);", inst.detail).groups())
    assert after == before + 6, inst.detail  # every replica of the two others
    before, after = map(int, re.search(r"snapshots sent (\d+) -> (\d+);", inst.detail).groups())
    assert after == before + 2 and "after the first snapshot chunk reached it" in inst.detail, inst.detail
    assert "kill -9, then COMPACT.NOW" in inst.detail  # every shard committed without Y first
    assert inst.detail.endswith("snapshot installs begun 1, finished 0 before the kill"), inst.detail

    healed = nem.heal_all()  # the second window is still open: the heal restarts its node
    assert all(cluster.alive.values()) and healed
    assert all(f.end is not None and not f.error for f in (first, second))


def test_compaction_is_a_fault_kind_of_all() -> None:
    assert "compaction" in FAULT_KINDS and "compaction" in parse_nemesis("all")
    assert parse_nemesis("kill,compaction") == ["kill", "compaction"]


# -- a real run ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_with_compaction_faults_passes(tmp_path: Path) -> None:
    """Seed 5, 12 s: a checkpoint kill (a node forced to compact every replica, then kill -9 within 200 ms of
    its first checkpoint beginning), then an install kill (a node killed, the others forced to compact past
    what it missed, the node restarted and killed again within 200 ms of the first snapshot chunk reaching
    it).  Each fault's counters show the
    compactions and the transfers happened; the run is linearizable and recovers; the node killed during its
    install later installs the snapshots when the window's end restarts it."""
    rc, res, out = harness(tmp_path, "--nemesis", "compaction", *common(5, 12))
    assert_pass(rc, res, out)
    faults = res["faults"]
    assert faults and all(f["kind"] == "compaction" and f["end"] is not None and not f["error"]
                          for f in faults), faults
    ckpt = [f for f in faults if f["detail"].startswith("checkpoint kill")]
    inst = [f for f in faults if f["detail"].startswith("install kill")]
    assert ckpt and inst, faults
    for f in ckpt:
        assert re.search(r"COMPACT.NOW to 3 replicas, kill -9 \d+ ms after its first checkpoint began",
                         f["detail"]), f["detail"]
    nodes = Path(res["dir"]) / "nodes"
    for f in inst:
        c = re.search(r"checkpoints (\d+) -> (\d+);.*snapshots sent (\d+) -> (\d+);", f["detail"])
        assert c, f["detail"]
        assert int(c.group(2)) >= int(c.group(1)) + 6  # every replica of the 2 others compacted
        assert int(c.group(4)) > int(c.group(3)) and "after the first snapshot chunk reached it" in f["detail"]
        (y,) = f["nodes"]
        assert "event=snapshot_installed" in (nodes / f"{y}.log").read_text(errors="replace")
    logs = "".join(p.read_text(errors="replace") for p in nodes.glob("n*.log"))
    assert logs.count("event=checkpoint ") >= 9, "fewer checkpoints than the forced ones"

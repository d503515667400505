"""The ``reshard`` nemesis: ``raftkv shard add`` and ``raftkv shard remove`` under load in the fault harness, and how the harness's clients
record the two refusals a move produces (``-MOVING``, ``-WRONGSHARD epoch shard``: both "not applied").

The run test is one short seeded harness run (~12 s of load, ~25 s wall on an idle machine); the rest is pure.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from jepsen_like.nemesis import FAULT_KINDS, OPTIONAL_KINDS, moves_left, parse_nemesis
from jepsen_like.workloads.base import NodeConn, classify
from raftkv.client import Attempts
from raftkv.errors import IndeterminateError, RaftKVError, UnavailableError
from raftkv.protocol import ReplyError
from shards.shardmap import ShardMap, local_cluster

from .test_jepsen_harness import assert_pass, common, harness

MOVING = "MOVING a key is being moved to a new shard (raftkv shard add); not applied, retry"
WRONGSHARD = "WRONGSHARD 5 3 the key now belongs to shard 3 (map epoch 5); not applied"


# -- the harness's clients and the refusals of a move --------------------------------------------------------

@pytest.mark.parametrize("reply", [MOVING, WRONGSHARD], ids=["MOVING", "WRONGSHARD"])
def test_a_refusal_of_a_move_is_recorded_as_not_applied(reply: str) -> None:
    """The routing client retries both codes; when the operation's time runs out with no attempt that may
    have applied, it raises UnavailableError, which the history records as ``fail`` (never ``ok``)."""
    attempts = Attempts(shard=0, write=True, deadline=10.0)
    attempts.refused(ReplyError(reply))  # retryable: no exception, the client sends it again
    with pytest.raises(UnavailableError) as e:
        attempts.backoff(now=11.0)
    assert classify(e.value, write=True) == "fail"


@pytest.mark.parametrize("reply", [MOVING, WRONGSHARD], ids=["MOVING", "WRONGSHARD"])
def test_a_refusal_after_an_attempt_that_may_have_applied_is_indeterminate(reply: str) -> None:
    """A write sent to a leader that never answered, then refused by a move: the first attempt may have
    applied, so the outcome is unknown (``info``), whatever the later refusal says."""
    attempts = Attempts(shard=0, write=True, deadline=10.0)
    attempts.transport_failed(("127.0.0.1", 7001), TimeoutError("timed out"), sent=True)
    attempts.refused(ReplyError(reply))
    with pytest.raises(IndeterminateError) as e:
        attempts.backoff(now=11.0)
    assert classify(e.value, write=True) == "info"


class _Conn:
    closed = False

    def __init__(self, reply: object) -> None:
        self.reply = reply

    def call(self, *_args: object, timeout: float) -> object:
        return self.reply


@pytest.mark.parametrize("reply", [MOVING, WRONGSHARD], ids=["MOVING", "WRONGSHARD"])
def test_a_plain_resp_refusal_of_a_move_is_a_fail(reply: str) -> None:
    """A pinned node's plain RESP reply (reads; the counter workload's WATCH/MULTI/EXEC) that refuses for a
    move raises a RaftKVError with that code: recorded as ``fail`` for reads and writes alike."""
    conn = NodeConn(("127.0.0.1", 7001), timeout=1.0)
    conn.conn = _Conn(ReplyError(reply))  # type: ignore[assignment]
    with pytest.raises(RaftKVError) as e:
        conn.call("SET", "k", "v")
    assert not isinstance(e.value, IndeterminateError) and e.value.code == reply.split()[0]
    assert classify(e.value, write=True) == classify(e.value, write=False) == "fail"


# -- the nemesis's pure parts ------------------------------------------------------------------------------

def test_reshard_is_named_explicitly_never_part_of_all() -> None:
    assert OPTIONAL_KINDS == ("reshard",) and "reshard" not in FAULT_KINDS
    assert "reshard" not in parse_nemesis("all")
    assert parse_nemesis("reshard") == ["reshard"] and parse_nemesis("kill,reshard") == ["kill", "reshard"]


def _status(**shards: tuple[object, int | None]) -> dict:
    return {"shards": {s.lstrip("s"): {"move": move, "ring_shards": ring} for s, (move, ring) in shards.items()}}


def test_moves_left_names_every_half_done_move() -> None:
    m = local_cluster(3, 4, base_port=7001)
    assert moves_left(m, {"n1": _status(s0=(None, 4), s1=(None, None)), "n2": {}}) == []
    half = dataclasses.replace(m, adding=4, placement={**m.placement, 4: ("n1", "n2", "n3")})
    assert moves_left(half, {}) == ["the cluster file still adds shard 4"]
    left = moves_left(m, {"n2": _status(s0=({"epoch": 5, "dest": 4, "phase": "handoff"}, 4), s3=(None, 3))})
    assert left == ["n2 shard 0: move {'epoch': 5, 'dest': 4, 'phase': 'handoff'}",
                    "n2 shard 3: serves a ring of 3 shards (the file: 4)"]
    removing = dataclasses.replace(m, removing=3)
    assert moves_left(removing, {}) == ["the cluster file still removes shard 3"]


def test_the_nemesis_alternates_adds_and_removals_within_its_bounds() -> None:
    """From 3 shards: add, remove, add, ...; every third window a node step instead; at the cap only removals,
    at the floor only adds."""
    import random
    from types import SimpleNamespace

    from jepsen_like import nemesis as nem

    n = nem.Nemesis(SimpleNamespace(map=local_cluster(3, 3, base_port=7001)), random.Random(1), lambda: 0.0)
    calls: list[tuple[str, int]] = []
    shards = [3]

    class FakeResharder:
        def close(self) -> None:
            pass

        def _unfinished_cleanup(self) -> None:
            return None

    def fake_map() -> ShardMap:
        return local_cluster(3, shards[0], base_port=7001)

    n._operator = lambda: SimpleNamespace(map=fake_map())  # type: ignore[method-assign]
    n._resharder = lambda op: FakeResharder()  # type: ignore[method-assign]
    n._adopt_map = fake_map  # type: ignore[method-assign]

    def move(f: object, resharder: object, nshards: int, remove: bool, pending: bool = False) -> None:
        calls.append(("remove" if remove else "add", nshards))
        shards[0] += -1 if remove else 1
    n._cut_reshard = lambda f, nshards, remove: move(f, None, nshards, remove)  # type: ignore[method-assign]
    n._shard_add = lambda f, r, nshards, pending: move(f, r, nshards, False)  # type: ignore[method-assign]
    n._shard_remove = lambda f, r, nshards, pending: move(f, r, nshards, True)  # type: ignore[method-assign]
    n._node_step = lambda f, op: calls.append(("node", shards[0]))  # type: ignore[method-assign]
    for _ in range(5):
        n._reshard_fault()
    assert nem.RESHARD_NODE_EVERY == 3
    assert calls == [("add", 3), ("remove", 4), ("node", 3), ("add", 3), ("remove", 4)]
    shards[0], calls[:] = nem.RESHARD_MAX_SHARDS, []
    n._last_reshard, n._reshard_windows = "remove", 0
    n._reshard_fault()
    assert calls == [("remove", nem.RESHARD_MAX_SHARDS)]
    shards[0], calls[:] = nem.RESHARD_MIN_SHARDS, []
    n._last_reshard, n._reshard_windows = "add", 0
    n._reshard_fault()
    assert calls == [("add", nem.RESHARD_MIN_SHARDS)]


# -- a real run ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_with_reshard_passes(tmp_path: Path) -> None:
    """Seed 1: the first window adds shard 3 to its end (3 -> 4 shards, some of the register keys move);
    the second runs ``raftkv shard remove 3`` as a process and kills it -9 right after it pre-copied shard 3's
    keys to the others (shard 3 still serving them), which the heal finishes before the final reads. The run
    passes, with the ``shard-moves`` check (no move left on any replica), and the cluster file ends with 3
    shards."""
    rc, res, out = harness(tmp_path, "--nemesis", "reshard", *common(1, 12))
    assert_pass(rc, res, out)
    faults = res["faults"]
    assert [f["kind"] for f in faults] == ["reshard", "reshard"] and not any(f["error"] for f in faults), faults
    assert re.match(r"shard add: 3 -> 4 shards: shard 3 \(epoch 3\) got \d+ of \d+ keys", faults[0]["detail"])
    assert "shard remove 4 -> 3 shards by the CLI, cut when pre-copied: kill -9 after" in faults[1]["detail"], \
        faults[1]
    assert "finished the removal of shard 3" in out
    assert res["checks"]["shard-moves"]["valid"] is True
    final = ShardMap.load(Path(res["dir"]) / "nodes" / "cluster.toml")
    assert (final.nshards, final.adding, final.removing) == (3, None, None)
    assert "replicas of 3 shards" in res["checks"]["replicas"]["summary"]

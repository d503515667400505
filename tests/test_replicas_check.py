"""The harness's ``replicas`` check and ``RAFTKV.HASHKV``: replicas at one revision hold the same data.

Pure parts against hand-made answers and a fake clock; ``hash_kv`` by properties; the command on a real
cluster (every replica of a shard answers the same digest, which a write changes).
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from jepsen_like.replicas import check, judge
from raftkv.client import Client
from raftkv.state import Store, hash_kv

from .conftest import start_cluster

A, B = "a" * 64, "b" * 64


def test_equal_digests_at_equal_revisions_pass() -> None:
    res = judge({0: {"n1": (5, A), "n2": (5, A), "n3": (5, A)}, 1: {"n1": (2, B), "n2": (2, B)}})
    assert res is not None and res["valid"] is True and "5 replicas of 2 shards" in res["summary"]


def test_different_digests_at_one_revision_fail_naming_the_shard() -> None:
    res = judge({0: {"n1": (5, A), "n2": (5, A)}, 1: {"n1": (7, A), "n2": (7, B), "n3": (7, A)}})
    assert res is not None and res["valid"] is False
    assert "shard 1 at revision 7" in res["summary"] and "n2 bbbbbbbbbbbb" in res["summary"]


def test_a_round_with_different_revisions_or_a_silent_node_settles_nothing() -> None:
    assert judge({0: {"n1": (5, A), "n2": (4, B)}}) is None  # n2 still catching up: different data is fine
    assert judge({0: {"n1": (5, A), "n2": "ConnectionRefusedError: ..."}}) is None


def test_check_asks_again_until_the_replicas_settle() -> None:
    answers = iter([(3, B), (4, A), (4, A)])  # n2 catches up on the second round
    t = [0.0]
    res = check(lambda n, s: (4, A) if n == "n1" else next(answers), {0: ["n1", "n2"]}, timeout=10,
                sleep=lambda d: t.__setitem__(0, t[0] + d), clock=lambda: t[0])
    assert res["valid"] is True and "2 rounds" in res["summary"]


def test_replicas_that_never_settle_are_unknown_never_a_pass() -> None:
    t = [0.0]
    res = check(lambda n, s: (4, A) if n == "n1" else (3, B), {0: ["n1", "n2"]}, timeout=2,
                sleep=lambda d: t.__setitem__(0, t[0] + d), clock=lambda: t[0])
    assert res["valid"] is None and res["verdict"] == "unknown" and "revision 3" in res["summary"]
    described = check(lambda n, s: (4, A) if n == "n1" else (3, B), {0: ["n1", "n2"]}, timeout=2,
                      sleep=lambda d: t.__setitem__(0, t[0] + d), clock=lambda: t[0],
                      describe=lambda n, s: f"{n}-status")
    assert "shard 0 n1: n1-status; shard 0 n2: n2-status" in described["summary"]  # who is stuck, and how


def test_replicas_that_stop_moving_are_given_up_on_before_the_timeout() -> None:
    """A follower stuck behind its leader (same answer, same Raft progress) is reported after ``stall`` s,
    not after the whole timeout; still unknown, never a pass."""
    t = [0.0]
    res = check(lambda n, s: (4, A) if n == "n1" else (3, B), {0: ["n1", "n2"]}, timeout=20, stall=5,
                sleep=lambda d: t.__setitem__(0, t[0] + d), clock=lambda: t[0],
                progress=lambda n, s: ("follower", 1, "n1", 3 if n == "n2" else 4))
    assert res["valid"] is None and res["verdict"] == "unknown" and "none of them moved in 5." in res["summary"]
    assert 5 <= t[0] < 6


def test_a_replica_that_still_moves_or_does_not_answer_is_waited_for() -> None:
    """Raft progress without a new revision yet (entries arriving, a snapshot being installed) restarts the
    stall clock, and so does a replica that does not answer (a node still starting): both settle later."""
    t = [0.0]
    clock = lambda: t[0]  # noqa: E731
    sleep = lambda d: t.__setitem__(0, t[0] + d)  # noqa: E731
    behind_until = 9.0  # n2 catches up at 9 s, its log growing all along
    res = check(lambda n, s: (4, A) if n == "n1" or t[0] >= behind_until else (3, B), {0: ["n1", "n2"]},
                timeout=20, stall=2, sleep=sleep, clock=clock,
                progress=lambda n, s: (n, round(t[0], 1) if n == "n2" else 4))
    assert res["valid"] is True and t[0] >= behind_until
    t[0] = 0.0
    res = check(lambda n, s: (4, A) if n == "n1" or t[0] >= behind_until else "ConnectionRefusedError: ...",
                {0: ["n1", "n2"]}, timeout=20, stall=2, sleep=sleep, clock=clock, progress=lambda n, s: 1)
    assert res["valid"] is True and t[0] >= behind_until


entries = st.dictionaries(st.binary(max_size=6), st.tuples(st.binary(max_size=6), st.integers(0, 50)), max_size=12)


@given(entries)
def test_hash_kv_depends_on_content_not_on_order(data: dict) -> None:
    items = list(data.items())
    assert hash_kv(9, items) == hash_kv(9, reversed(items)) == hash_kv(9, Store.of(data).items())


@given(entries, st.binary(max_size=6), st.binary(max_size=6))
def test_hash_kv_changes_with_any_value_revision_or_key(data: dict, key: bytes, value: bytes) -> None:
    before = hash_kv(9, data.items())
    assert hash_kv(10, data.items()) != before
    changed = dict(data)
    old = changed.get(key)
    changed[key] = (value, 51)  # revision 51 is never generated: always a change
    assert hash_kv(9, changed.items()) != before
    if old is not None:
        del changed[key]
        assert hash_kv(9, changed.items()) != before


def test_every_replica_answers_the_same_digest_and_a_write_changes_it(tmp_path: Path) -> None:
    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2)
    try:
        with Client(cluster=str(lc.config)) as c:
            for i in range(40):
                c.put(f"k{i}", f"v{i}")
            placement = {s: [n.name for n in lc.map.replicas(s)] for s in range(2)}

            def ask(node: str, shard: int) -> tuple[int, str]:
                rev, digest = lc.call(node, "RAFTKV.HASHKV", str(shard))
                return rev, digest.decode()

            first = check(ask, placement, timeout=30)
            assert first["valid"] is True, first
            before = {s: ask(placement[s][0], s) for s in placement}
            c.put("k0", "changed")
            after = check(ask, placement, timeout=30)
            assert after["valid"] is True, after
            changed = [s for s in placement if ask(placement[s][0], s) != before[s]]
            assert len(changed) == 1
        assert "no shard 9" in str(lc.call("n1", "RAFTKV.HASHKV", "9"))
    finally:
        lc.stop()

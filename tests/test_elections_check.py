"""The harness's ``elections`` check: one leader per shard and term, read from the nodes' logs."""

from __future__ import annotations

from jepsen_like.elections import judge, leaders_in

LOG = """\
ts=2026-12-02 12:56:19,420 level=INFO logger=raftkv.replica event=role_change shard=1 old=follower new=candidate term=1
ts=2026-12-02 12:56:19,427 level=INFO logger=raftkv.replica event=role_change shard=1 old=candidate new=leader term=2
ts=2026-12-02 12:56:20,001 level=INFO logger=raftkv.replica event=role_change shard=1 old=leader new=follower term=3
ts=2026-12-02 12:56:21,000 level=INFO logger=raftkv.replica event=role_change shard=0 old=candidate new=leader term=4
""".splitlines()


def test_leader_lines_are_read_and_other_role_changes_ignored() -> None:
    assert leaders_in("n1", LOG) == [(1, 2, "n1"), (0, 4, "n1")]


def test_one_leader_per_term_passes_even_when_a_node_logs_it_twice() -> None:
    res = judge([(1, 2, "n1"), (1, 3, "n2"), (0, 2, "n2"), (1, 2, "n1")])
    assert res["valid"] is True and "3 elections in 2 shards" in res["summary"]


def test_two_leaders_in_one_term_fail_naming_shard_term_and_nodes() -> None:
    res = judge([(1, 2, "n1"), (1, 3, "n2"), (1, 3, "n3"), (0, 3, "n1")])
    assert res["valid"] is False and res["summary"] == "shard 1 term 3: leaders n2, n3"

"""The harness's ``elections`` check: one leader per shard and term, read from the nodes' logs."""

from __future__ import annotations

from jepsen_like.elections import elected, judge, leaders_in

LOG = """\
ts=2026-12-02 12:56:19,420 level=INFO logger=raftkv.replica event=role_change shard=1 old=follower new=candidate term=1
ts=2026-12-02 12:56:19,427 level=INFO logger=raftkv.replica event=role_change shard=1 old=candidate new=leader term=2
ts=2026-12-02 12:56:20,001 level=INFO logger=raftkv.replica event=role_change shard=1 old=leader new=follower term=3
ts=2026-12-02 12:56:21,000 level=INFO logger=raftkv.replica event=role_change shard=0 old=candidate new=leader term=4
""".splitlines()


def test_leader_lines_are_read_and_other_role_changes_ignored() -> None:
    assert leaders_in("n1", LOG) == [(1, 2, "n1"), (0, 4, "n1")]


def _line(event: str) -> str:
    return f"ts=2026-12-02 12:56:19,420 level=INFO logger=raftkv {event}"


def test_a_shard_removed_and_added_again_is_a_new_group_whose_terms_start_over() -> None:
    """``shard remove`` then ``shard add`` of the same id: the new group's first leader (term 1) is no second
    leader of the old group's term 1, on a node that saw the removal or on one that started afterwards; two
    leaders in one term of one group still fail."""
    leader = "event=role_change shard=3 old=candidate new=leader term=1"
    n1 = [_line("event=serving node=n1 addr=127.0.0.1:7001 shards=[0, 1, 2] epoch=1"),
          _line("event=map_installed node=n1 epoch=2 started=[3] stopped=[] groups=4"), _line(leader),
          _line("event=map_installed node=n1 epoch=9 started=[] stopped=[3] groups=3")]
    n2 = [_line("event=serving node=n2 addr=127.0.0.2:7001 shards=[0, 1, 2] epoch=1"),
          _line("event=map_installed node=n2 epoch=2 started=[3] stopped=[] groups=4"),
          _line("event=map_installed node=n2 epoch=9 started=[] stopped=[3] groups=3"),
          _line("event=map_installed node=n2 epoch=11 started=[3] stopped=[] groups=4"), _line(leader)]
    n3 = [_line("event=serving node=n3 addr=127.0.0.3:7001 shards=[0, 1, 2, 3] epoch=12"), _line(leader)]
    assert judge(elected({"n1": n1, "n2": n2}))["valid"] is True
    res = judge(elected({"n1": n1, "n2": n2, "n3": n3}))  # n3, started after the re-add: the new group's too
    assert res["valid"] is False and res["summary"] == "shard 3 (its group re-created 1x) term 1: leaders n2, n3"


def test_one_leader_per_term_passes_even_when_a_node_logs_it_twice() -> None:
    res = judge([(1, 2, "n1"), (1, 3, "n2"), (0, 2, "n2"), (1, 2, "n1")])
    assert res["valid"] is True and "3 elections in 2 shards" in res["summary"]


def test_two_leaders_in_one_term_fail_naming_shard_term_and_nodes() -> None:
    res = judge([(1, 2, "n1"), (1, 3, "n2"), (1, 3, "n3"), (0, 3, "n1")])
    assert res["valid"] is False and res["summary"] == "shard 1 term 3: leaders n2, n3"

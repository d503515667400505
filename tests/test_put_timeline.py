"""bench/put_timeline.py's reading of recorded steps: which process plays which role in a request, and the
median timeline. Synthetic events (no cluster): the roles must not be fooled by traffic that is not the
request's (a follower's heartbeat reply before the AppendEntries, a slower follower's ack)."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("put_timeline", os.path.join(ROOT, "bench", "put_timeline.py"))
put_timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(put_timeline)

US = 1000  # events are in ns


def _request(t0: int, follower_first: str) -> dict[str, list[tuple[int, str]]]:
    """One put sent at ``t0``: leader L, followers A and B, ``follower_first`` acking first."""
    slow = "B" if follower_first == "A" else "A"
    ev = {
        "L": [(t0 + 100 * US, "propose"), (t0 + 150 * US, "loop"), (t0 + 200 * US, "send"), (t0 + 220 * US, "send"),
              (t0 + 250 * US, "commit"), (t0 + 900 * US, "commit_done"), (t0 + 1000 * US, "recv"),
              (t0 + 1010 * US, "loop"), (t0 + 1100 * US, "apply"), (t0 + 1200 * US, "reply")],
        follower_first: [(t0 + 50 * US, "send"),  # a heartbeat reply, before the request's AppendEntries
                         (t0 + 300 * US, "recv"), (t0 + 350 * US, "commit"), (t0 + 800 * US, "commit_done"),
                         (t0 + 810 * US, "send")],
        slow: [(t0 + 320 * US, "recv"), (t0 + 360 * US, "commit"), (t0 + 950 * US, "commit_done"),
               (t0 + 960 * US, "send")],
    }
    return ev


def _merge(*parts: dict[str, list[tuple[int, str]]]) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for part in parts:
        for pid, rows in part.items():
            out.setdefault(pid, []).extend(rows)
    return {pid: sorted(rows) for pid, rows in out.items()}


def test_the_follower_whose_ack_counted_is_chosen_and_earlier_traffic_is_left_out() -> None:
    t0, t1 = 10_000 * US, 20_000 * US
    ev = _merge(_request(t0, "A"), _request(t1, "B"))
    requests = [(t0, t0 + 1300 * US), (t1, t1 + 1300 * US)]
    windows = list(put_timeline.windows(requests, ev))
    assert [w[:2] for w in windows] == requests
    roles = put_timeline.leader_and_follower(windows[0][2])
    assert [r for r, _ in roles] == ["leader", "follower"]
    (_, lead), (_, follower) = roles
    assert lead[0] == (t0 + 100 * US, "propose")
    assert follower[0] == (t0 + 300 * US, "recv") and follower[-1] == (t0 + 810 * US, "send")  # A, not B
    rows, total, used = put_timeline.timeline(requests, ev)
    assert used == 2 and total == 1.3
    steps = {(role, step): ms for ms, role, step, _n in rows}
    assert steps[("leader", "propose#1")] == 0.1 and steps[("leader", "reply#1")] == 1.2
    assert steps[("follower", "commit_done#1")] == 0.8 and steps[("follower", "send#1")] == 0.81
    assert [ms for ms, *_ in rows] == sorted(ms for ms, *_ in rows)


def test_a_request_without_a_proposal_or_an_ack_is_not_counted() -> None:
    t0 = 10_000 * US
    ev = _request(t0, "A")
    ev["A"] = [e for e in ev["A"] if e[1] != "commit_done"]
    ev["B"] = [e for e in ev["B"] if e[1] != "commit_done"]
    assert put_timeline.leader_and_follower(next(put_timeline.windows([(t0, t0 + 1300 * US)], ev))[2]) == []
    no_proposal = {pid: [e for e in rows if e[1] != "propose"] for pid, rows in _request(t0, "A").items()}
    _rows, _total, used = put_timeline.timeline([(t0, t0 + 1300 * US)], no_proposal)
    assert used == 0


def test_every_process_names_the_entry_node_and_the_others_in_a_stable_order() -> None:
    t0 = 10_000 * US
    roles = put_timeline.every_process(next(put_timeline.windows([(t0, t0 + 1300 * US)], _request(t0, "B")))[2])
    assert [(role, rows[0][1]) for role, rows in roles] == [("entry", "propose"), ("other-1", "recv"),
                                                           ("other-2", "send")]

"""Pre-vote (raftkv.prevote): a replica that was away cannot depose a live leader when it comes back.

The rules are pure and tested as such; the effect is tested on three SafeSyncObj replicas in the seeded
simulation of tests/test_raftfix.py (fake clock, in-process network), with pre-vote off as the negative
control: there the returning replica's inflated term deposes the leader.
"""

from __future__ import annotations

import pickle
import random

from hypothesis import given
from hypothesis import strategies as st

from raftkv import prevote
from tests.test_raftfix import NODE_IDS, Cluster, SimNet, sim_clock

MIN_TIMEOUT = 0.1


def state(**kw: object) -> dict:
    base = dict(term=5, last_log_index=10, last_log_term=5, is_leader=False, leader_silent_s=None,
                min_timeout_s=MIN_TIMEOUT)
    base.update(kw)
    return base


def test_a_live_leaders_follower_and_the_leader_itself_refuse() -> None:
    req = prevote.Request(term=6, last_log_index=50, last_log_term=5)
    assert prevote.grants(req, **state())
    assert not prevote.grants(req, **state(leader_silent_s=0.03))  # heard from the leader 30 ms ago
    assert prevote.grants(req, **state(leader_silent_s=0.15))  # silent longer than any live leader would be
    assert not prevote.grants(req, **state(is_leader=True))


def test_a_term_not_above_ours_or_a_log_behind_ours_is_refused() -> None:
    assert not prevote.grants(prevote.Request(5, 50, 5), **state())
    assert not prevote.grants(prevote.Request(6, 9, 5), **state())  # shorter log, same last term
    assert not prevote.grants(prevote.Request(6, 99, 4), **state())  # longer log, older last term
    assert prevote.grants(prevote.Request(6, 10, 5), **state())  # equal logs


@given(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9), st.integers(0, 9), st.integers(0, 9),
       st.integers(0, 9))
def test_a_grant_implies_a_real_vote_would_be_granted(req_term: int, req_idx: int, req_last: int,
                                                      term: int, idx: int, last: int) -> None:
    """Pre-vote never grants what Raft's vote rule (higher term, log at least as up to date) would refuse."""
    req = prevote.Request(req_term, req_idx, req_last)
    if prevote.grants(req, **state(term=term, last_log_index=idx, last_log_term=last)):
        assert req_term > term and (req_last, req_idx) >= (last, idx)


def test_a_round_needs_a_majority_counting_the_requester() -> None:
    r = prevote.Round(term=7, size=3)
    assert not r.won()
    assert not r.add("b", term=6)  # a grant for another round
    assert r.add("b", term=7)
    five = prevote.Round(term=7, size=5)
    five.add("b", 7)
    five.add("b", 7)  # the same voter twice counts once
    assert not five.won()
    assert five.add("c", 7)
    assert prevote.Round(term=1, size=1).won()


def away_and_back(pre_vote: bool, seed: int = 21) -> tuple[int, int, int, int, int]:
    """Cut a follower off for 3 s (ten election timeouts), let it back, run 2 s.

    Returns (leader before, term before, leader after, term after, the returned replica's last log index
    minus the leader's): a replica that was away must catch up either way."""
    net = SimNet(random.Random(seed))
    with sim_clock(net, seed):
        c = Cluster(net, safe=True, pre_vote=pre_vote)
        assert c.run(3.0, until=lambda: c.leader() is not None)
        c.run(0.2)
        lead = c.leader()
        assert lead is not None
        away = next(n for n in NODE_IDS if n != lead)
        term = c.nodes[lead].raftCurrentTerm
        net.blocked.add(away)
        for i in range(20):
            c.submit(lead, f"w{i}")
            c.run(0.15)
        net.blocked.discard(away)
        c.run(2.0)
        after = c.leader()
        assert after is not None
        lag = c.nodes[away]._SyncObj__raftLog[-1][1] - c.nodes[after]._SyncObj__raftLog[-1][1]
        return lead, term, after, c.nodes[after].raftCurrentTerm, lag


def test_a_replica_back_from_a_partition_does_not_depose_the_leader() -> None:
    lead, term, after, term_after, lag = away_and_back(pre_vote=True)
    assert (after, term_after) == (lead, term)
    assert lag == 0


def test_without_pre_vote_the_returning_replica_deposes_the_leader() -> None:
    """Negative control: the same schedule without pre-vote changes the term (an election the leader lost
    its leadership to, though nothing was wrong with it)."""
    _lead, term, _after, term_after, lag = away_and_back(pre_vote=False)
    assert term_after > term
    assert lag == 0


def test_a_transfer_still_elects_its_target_at_once() -> None:
    """timeout_now skips pre-vote: the target's peers still hear from the leader, so they would refuse."""
    net = SimNet(random.Random(5))
    with sim_clock(net, 5):
        c = Cluster(net, safe=True)
        assert c.run(3.0, until=lambda: c.leader() is not None)
        c.run(0.2)
        lead = c.leader()
        assert lead is not None
        target = next(n for n in NODE_IDS if n != lead)
        peer = next(n for n in c.nodes[lead].otherNodes if n.id == target)
        c.nodes[lead].transferLeadership(peer)
        c.run(0.05)
        assert c.run(0.5, until=lambda: c.leader() == target)


def test_a_deposed_leader_does_not_campaign_at_once() -> None:
    """A leader deposed by a candidate it does not vote for (its own log is ahead: it went on appending after
    a transfer's timeout_now) becomes a follower with a fresh election timer.  Stock keeps the deadline it
    had as a follower, long past, so it asked for pre-votes in its very next tick, which a member that had
    heard from no leader yet (a replica just added) granted: seen in the member nemesis, where the old leader
    took the shard back from the transfer's target within 15 ms."""
    net = SimNet(random.Random(9))
    with sim_clock(net, 9):
        c = Cluster(net, safe=True)
        assert c.run(3.0, until=lambda: c.leader() is not None)
        c.run(2.0)  # leading for a while: the timer it had as a follower is long past
        lead = c.leader()
        assert lead is not None
        target = next(n for n in NODE_IDS if n != lead)
        old = c.nodes[lead]
        term = old.raftCurrentTerm
        net.hold = True
        net.drop_all()
        behind = {"type": "request_vote", "term": term + 1, "last_log_index": 1, "last_log_term": 0}
        net.deliver((net.now, 0, target, lead, pickle.dumps(behind)))
        assert not old._isLeader() and old.raftCurrentTerm == term + 1
        assert old._SyncObj__votedForNodeId is None  # the candidate's log is behind: no vote
        assert old._SyncObj__raftElectionDeadline - net.now >= old.conf.raftMinTimeout
        for _ in range(int(old.conf.raftMinTimeout / 0.005) - 2):
            c.tick()
            assert old._rf_prevote is None and old._SyncObj__raftState != 1, "the deposed leader campaigned"

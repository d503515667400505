"""Membership changes in raftkv.raftfix: one uncommitted change per group, configuration = latest in the log.

Same simulation as tests/test_raftfix.py (real pysyncobj replicas, ``SimNet``, fake clock, seeded RNG). Tests
parametrized over ``stock`` and ``safe`` run one script and one assertion on both; the stock case is marked as
the expected (strict) failure of pysyncobj 0.3.17, so it doubles as the failing-first evidence and notices the
day upstream fixes the bug. The stress replays one seed with
``RAFTFIX_SEED=<seed> pytest tests/test_raftfix_membership.py -k replay`` (``RAFTFIX_MEMBER_EXAMPLES`` sets how
many seeds hypothesis tries, default 25).
"""

from __future__ import annotations

import os
import pickle
import random
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pysyncobj import syncobj as _so
from pysyncobj.config import FAIL_REASON
from pysyncobj.node import Node

from raftkv.confchange import ConfChange

from .conftest import examples
from .test_raftfix import (
    NODE_IDS,
    Cluster,
    Faults,
    FaultSchedule,
    SafeReplica,
    SimNet,
    replay_hint,
    sim_clock,
)

STOCK_BUG = pytest.mark.xfail(strict=True, raises=AssertionError, reason="pysyncobj 0.3.17 bug, fixed by SafeSyncObj")
BOTH = [pytest.param(False, id="stock", marks=STOCK_BUG), pytest.param(True, id="safe")]
NOOP = bytes([_so._COMMAND_TYPE.NO_OP])
MEMBERSHIP = bytes([_so._COMMAND_TYPE.MEMBERSHIP])


def members(node: Any) -> set[int]:
    return {n.id for n in node._SyncObj__otherNodes}


def conf_entries(node: Any) -> list[tuple[int, list[Any]]]:
    """(index, request) of every membership entry in ``node``'s log."""
    found = []
    for command, idx, _term in node._SyncObj__raftLog[:]:
        if command[:1] == MEMBERSHIP:
            found.append((idx, _so.pickle.loads(command[1:])))
    return found


class Answers:
    """Collects membership callbacks: ``answers[name]`` is the FAIL_REASON each call got, in order."""

    def __init__(self) -> None:
        self.got: dict[str, list[int]] = {}

    def cb(self, name: str) -> Any:
        return lambda _result, err: self.got.setdefault(name, []).append(err)


def settled_cluster(net: SimNet, safe: bool) -> tuple[Cluster, int]:
    """A 3-node cluster whose leader's election no-op is applied; then the network is held (no delivery)."""
    c = Cluster(net, safe=safe, spares=(4, 5))
    assert c.run(3.0, until=lambda: c.leader() is not None)
    c.run(0.2)
    lead = c.leader()
    assert lead is not None
    net.hold = True
    net.drop_all()
    return c, lead


# --------------------------------------------------------------------------------------------------------------
# (a) a second change is refused while the first is uncommitted
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", BOTH)
def test_second_change_refused_while_first_uncommitted(safe: bool) -> None:
    """Leader gets 'add 4' then 'add 5' while nothing is delivered (so 'add 4' cannot commit). Stock appends
    both (its check reads ``__changeClusterIDx``, which nothing sets): two uncommitted configurations in one
    log, the leader already counting a quorum over 5 members. Raft allows one; the second must be refused."""
    net = SimNet(random.Random(21))
    with sim_clock(net, 21):
        c, lead = settled_cluster(net, safe)
        leader = c.nodes[lead]
        commit_before = leader.raftCommitIndex
        answers = Answers()
        leader.addNodeToCluster(4, callback=answers.cb("add4"))
        leader.addNodeToCluster(5, callback=answers.cb("add5"))
        c.tick()
        assert leader.raftCommitIndex == commit_before, "setup: nothing may commit while the net is held"
        assert [r[:2] for _i, r in conf_entries(leader)] == [["add", 4]]
        assert answers.got == {"add5": [FAIL_REASON.REQUEST_DENIED]}
        assert members(leader) == set(NODE_IDS) - {lead} | {4}

        # Once 'add 4' commits (node 4 need not run: 3 of {1,2,3,4} suffice), 'add 5' is admitted.
        net.hold = False
        assert c.run(2.0, until=lambda: answers.got.get("add4") == [FAIL_REASON.SUCCESS])
        leader.addNodeToCluster(5, callback=answers.cb("add5"))
        c.start(4, others=list(NODE_IDS))
        c.start(5, others=[*NODE_IDS, 4])
        assert c.run(3.0, until=lambda: len(answers.got["add5"]) == 2)
        assert answers.got["add5"][-1] == FAIL_REASON.SUCCESS
        assert c.run(2.0, until=lambda: all(members(n) | {i} == {1, 2, 3, 4, 5} for i, n in c.nodes.items()))


# --------------------------------------------------------------------------------------------------------------
# (b) a retried identical change is answered by the first
# --------------------------------------------------------------------------------------------------------------


def test_retried_identical_change_is_answered_by_the_pending_one() -> None:
    """'add 4' is pending; the same change retried on the leader and via a follower is not appended again
    and not refused: each retry's callback fires with the first entry's outcome, when it commits. A different
    change in the meantime is refused."""
    net = SimNet(random.Random(22))
    with sim_clock(net, 22):
        c, lead = settled_cluster(net, safe=True)
        leader = c.nodes[lead]
        follower = next(n for n in NODE_IDS if n != lead)
        answers = Answers()
        leader.addNodeToCluster(4, callback=answers.cb("first"))
        c.tick()
        leader.addNodeToCluster(4, callback=answers.cb("retry_on_leader"))
        leader.removeNodeFromCluster(follower, callback=answers.cb("other"))
        c.nodes[follower].addNodeToCluster(4, callback=answers.cb("retry_via_follower"))
        c.tick()  # the follower forwards its retry; the leader answers the other two
        for m in net.take(follower, lead, "apply_command"):
            net.deliver(m)
        c.tick()  # the leader answers the forwarded retry with the pending entry's (index, term)
        for m in net.take(lead, follower, "apply_command_response"):
            net.deliver(m)
        c.tick()
        assert len(conf_entries(leader)) == 1
        assert answers.got == {"other": [FAIL_REASON.REQUEST_DENIED]}

        net.hold = False
        assert c.run(2.0, until=lambda: len(answers.got) == 4)
        c.run(0.2)
        success = [FAIL_REASON.SUCCESS]
        assert answers.got == {"first": success, "retry_on_leader": success, "retry_via_follower": success,
                               "other": [FAIL_REASON.REQUEST_DENIED]}
        assert len(conf_entries(leader)) == 1


def test_refused_change_reaches_replica_callback_as_not_ok(tmp_path: Any) -> None:
    """RAFTKV.MEMBER relies on ``ShardReplica.change_members`` reporting a refusal as not ok (-> -TRYAGAIN)."""
    from raftkv.replica import ShardReplica  # the real adapter, driven by hand (autoTick off, one node)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replica = ShardReplica(0, f"127.0.0.1:{port}", [], str(tmp_path), conf_overrides={"autoTick": False})
    try:
        for _ in range(300):
            replica.doTick(0.01)
            if replica._isLeader() and replica.raftLastApplied >= 2:
                break
        assert replica._isLeader(), "setup: a single-node group elects itself"
        outcomes: list[tuple[bool, str]] = []
        replica.change_members("add", "127.0.0.1:2", lambda ok, why: outcomes.append((ok, why)))
        replica.change_members("add", "127.0.0.1:3", lambda ok, why: outcomes.append((ok, why)))
        replica.doTick(0.0)
        # 'add :2' is pending: a 2-member group needs both to commit and :2 never answers.
        assert outcomes == [(False, "REQUEST_DENIED")]
    finally:
        replica.destroy()


# --------------------------------------------------------------------------------------------------------------
# (c) a restarted node uses the newest configuration in its log
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", BOTH)
def test_restart_uses_uncommitted_configuration_in_journal(safe: bool) -> None:
    """A follower appends (and persists) 'add 4', its ack is lost, it crashes and restarts. The entry is in
    its log, uncommitted: Raft says it is the configuration in use. Stock re-applies changes only on commit,
    so it comes back with the old members (and would count votes over them)."""
    net = SimNet(random.Random(23))
    with sim_clock(net, 23):
        c, lead = settled_cluster(net, safe)
        f = next(n for n in NODE_IDS if n != lead)
        c.nodes[lead].addNodeToCluster(4)
        c.tick()
        for m in net.take(lead, f, "append_entries"):
            net.deliver(m)
        c.tick()  # f appends (and flushes) 'add 4'
        assert 4 in members(c.nodes[f]), "setup: the change takes effect on append"
        net.drop_all()  # the ack is lost
        c.crash(f)
        c.start(f)
        c.tick()
        assert [r[:2] for _i, r in conf_entries(c.nodes[f])] == [["add", 4]]
        assert c.nodes[f].raftCommitIndex < conf_entries(c.nodes[f])[0][0]
        assert 4 in members(c.nodes[f])


# --------------------------------------------------------------------------------------------------------------
# Follower: a configuration entry takes effect on append and is undone exactly on truncation
# --------------------------------------------------------------------------------------------------------------


def _conf_cmd(kind: str, node_id: int) -> bytes:
    return MEMBERSHIP + _so.pickle.dumps([kind, node_id, Node(node_id)])



# name -> (AppendEntries as (prevLogIdx, prevLogTerm, [(cmd, idx, term)], commit), members expected after)
FOLLOWER_SCRIPTS = {
    # A later entry removes 4 again; applying 'add 4' on commit must not bring 4 back.
    "apply_does_not_resurrect": ([(1, 0, [(_conf_cmd("add", 4), 2, 4), (_conf_cmd("rem", 4), 3, 4)], 2)], {2, 3}),
    # 'add 4' replaced by another leader's entry: 4 leaves again.
    "truncated_change_undone": ([(1, 0, [(_conf_cmd("add", 4), 2, 4)], 1), (1, 0, [(NOOP, 2, 5)], 1)], {2, 3}),
    # 'rem 4' was a no-op here (4 not a member); reversing it on truncation must not add 4.
    "truncated_noop_change": ([(1, 0, [(_conf_cmd("rem", 4), 2, 4)], 1), (1, 0, [(NOOP, 2, 5)], 1)], {2, 3}),
    # Positive space: appended, not committed, in effect.
    "in_effect_on_append": ([(1, 0, [(_conf_cmd("add", 4), 2, 4)], 1)], {2, 3, 4}),
}


@pytest.mark.parametrize("name", sorted(FOLLOWER_SCRIPTS))
@pytest.mark.parametrize("safe", [False, True], ids=["stock", "safe"])
def test_follower_configuration_follows_its_log(safe: bool, name: str, request: Any) -> None:
    script, expected = FOLLOWER_SCRIPTS[name]
    if not safe and name in ("apply_does_not_resurrect", "truncated_noop_change"):
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError,
                                              reason="pysyncobj 0.3.17 re-applies changes on commit and "
                                                     "reverses no-op changes"))
    net = SimNet(random.Random(24))
    with sim_clock(net, 24):
        c = Cluster(net, safe=safe)
        net.hold = True
        f = c.nodes[1]
        for prev_idx, prev_term, entries, commit in script:
            msg = {"type": "append_entries", "term": 5, "commit_index": commit, "entries": entries,
                   "prevLogIdx": prev_idx, "prevLogTerm": prev_term}
            net.deliver((net.now, 0, 2, 1, pickle.dumps(msg)))
            f.doTick(0.0)
            f.doTick(0.0)
        assert members(f) == expected


# --------------------------------------------------------------------------------------------------------------
# (d) randomized stress: membership churn with retries under drops, partitions and restarts
# --------------------------------------------------------------------------------------------------------------

POOL = (1, 2, 3, 4, 5)


class SafetyLog:
    """Election Safety, committed-entry agreement and one uncommitted configuration entry per leader's log,
    checked after every tick."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.leaders: dict[int, int] = {}  # term -> node that led it
        self.committed: dict[int, tuple[int, bytes]] = {}  # index -> (term, command)
        self.checked: dict[int, int] = {}  # node -> highest index compared

    def check(self, c: Cluster) -> None:
        for n, node in c.nodes.items():
            if node._isLeader():
                term = node.raftCurrentTerm
                holder = self.leaders.setdefault(term, n)
                assert holder == n, f"seed {self.seed}: nodes {holder} and {n} both led term {term}"
            log = node._SyncObj__raftLog
            first = log[0][1]
            if node._isLeader():
                tail = log[node.raftCommitIndex + 1 - first:]
                pending = [e[1] for e in tail if e[0][:1] == MEMBERSHIP]
                assert len(pending) <= 1, f"seed {self.seed}: leader {n} holds uncommitted changes at {pending}"
            for idx in range(max(self.checked.get(n, 0) + 1, first), node.raftCommitIndex + 1):
                command, _idx, term = log[idx - first]
                seen = self.committed.setdefault(idx, (term, command))
                assert seen == (term, command), f"seed {self.seed}: two different entries committed at {idx}"
            self.checked[n] = max(self.checked.get(n, 0), node.raftCommitIndex)


class UnserializedReplica(SafeReplica):
    """Negative control: SafeSyncObj admitting membership changes the way stock does (no pending check)."""

    def _rf_admit_change(self, request: Any, idx: int, term: int) -> tuple[int, int] | None:
        before = frozenset(self._SyncObj__otherNodes)
        if not self._SyncObj__doChangeCluster(request):
            return None
        self._rf_conf_changes.append(ConfChange(idx, term, request[0], request[1], before))
        return idx, term


def run_member_stress(seed: int, steps: int = 500, safe_cls: type[SafeReplica] = SafeReplica) -> dict[str, int]:
    """One seeded run of membership churn; raises AssertionError naming the seed on a safety violation.

    Requests (add, remove, replace = add NEW then remove OLD at once, and retries of the last request) go to
    a random running node, under random drops, duplicates, delays, partitions and crash-restarts. A node is
    started once its addition is confirmed and stopped once its removal is.
    Returns outcome counters (used to check the run exercised something).
    A node is never started before it is added: pysyncobj counts a node as a member of its own configuration,
    so a not-yet-added node can win an election (with the old members' votes) and commit under a
    configuration that is in no log; raftkv's operator adds first, then starts (``raftkv.membership``).
    """
    rng = random.Random(seed)
    faults = Faults(drop=rng.uniform(0, 0.1), dup=rng.uniform(0, 0.2), delay_max_s=rng.uniform(0, 0.04))
    net = SimNet(random.Random(seed + 1), faults)
    stats = {"ok": 0, "denied": 0, "other": 0, "requests": 0}
    with sim_clock(net, seed):
        c = Cluster(net, safe=True, spares=(4, 5), safe_cls=safe_cls)
        safety = SafetyLog(seed)
        # Every node boots with the group's initial members: its configuration is those plus the changes in its
        # log (or its dump's). Booting with a set the log does not explain (say, one member's uncommitted view)
        # gives a node a configuration no log entry implies; that is an operator error, not Raft's.
        boot = {n: [o for o in NODE_IDS if o != n] for n in POOL}
        faults_sched = FaultSchedule(rng, 0.01, 0.01, down_steps_max=80, cut_steps_max=120)
        last: tuple[str, int] | None = None

        def answer(kind: str, target: int) -> Any:
            def done(_result: Any, err: int) -> None:
                key = {FAIL_REASON.SUCCESS: "ok", FAIL_REASON.REQUEST_DENIED: "denied"}.get(err, "other")
                stats[key] += 1
                if err != FAIL_REASON.SUCCESS:
                    return
                if kind == "rem" and target in c.nodes:
                    c.crash(target)  # the operator stops a removed node...
                    faults_sched.down.pop(target, None)
                elif kind == "add" and target not in c.nodes and target not in faults_sched.down:
                    c.start(target, boot[target])  # ...and starts an added one (raftkv: ADD, then start)
            return done

        def request(kind: str, target: int) -> None:
            nonlocal last
            if not c.nodes:
                return
            via = c.nodes[rng.choice(sorted(c.nodes))]
            stats["requests"] += 1
            call = via.addNodeToCluster if kind == "add" else via.removeNodeFromCluster
            call(target, callback=answer(kind, target))
            last = (kind, target)

        for _step in range(steps):
            roll = rng.random()
            if roll < 0.03:
                request("add", rng.choice(POOL))
            elif roll < 0.05:
                request("rem", rng.choice(POOL))
            elif roll < 0.06:
                new, old = rng.sample(POOL, 2)
                request("add", new)
                request("rem", old)
            elif roll < 0.09 and last is not None:
                request(*last)
            elif roll < 0.3 and c.nodes:
                c.submit(rng.choice(sorted(c.nodes)), f"c{_step}")
            faults_sched.step(c, sorted(c.nodes), POOL, lambda n: c.start(n, boot[n]))
            c.tick()
            safety.check(c)
    return stats


@settings(max_examples=int(os.environ.get("RAFTFIX_MEMBER_EXAMPLES", examples(25))), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_membership_churn_keeps_election_safety_and_committed_entries(seed: int) -> None:
    with replay_hint("membership", "RAFTFIX_SEED", seed, "tests/test_raftfix_membership.py"):
        run_member_stress(seed)


def test_replay_seed() -> None:
    """Replay one run: ``RAFTFIX_SEED=<seed>``; default: a fixed seed, which must exercise both outcomes."""
    stats = run_member_stress(int(os.environ.get("RAFTFIX_SEED", "7")))
    assert stats["ok"] and stats["denied"], stats


def test_churn_catches_unserialized_changes() -> None:
    """The stress has teeth: with stock's admission (no pending check) it catches a leader holding two
    uncommitted changes within a few seeds."""
    failing = []
    for seed in range(10):
        try:
            run_member_stress(seed, safe_cls=UnserializedReplica)
        except AssertionError as e:
            failing.append(str(e))
            break
    assert any("uncommitted changes" in f for f in failing), failing

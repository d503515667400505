"""Moving keys to a new shard (raftkv.reshard): the per-key rules, and the whole protocol on state machines.

The protocol test runs ``shard add`` step by step on ``KVState`` objects (the sources and the new
shard), as ``raftkv.resharder`` orders it, with client increments and reads in every gap: clients
with the old map or the new one, replies lost and the same session sequence number retried later
(maybe on the other shard), and protocol steps run twice (a re-run after a crash). At every point
at most one shard serves a key, every read a shard serves is the latest write, and at the end
every increment counted once, and no key is stored twice.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv import reshard
from raftkv.reshard import FROZEN, HANDOFF, INCOMING, Move, Owner, keys_of, refusal
from raftkv.results import CmdError
from raftkv.state import KVState
from shards.ring import Ring

V = 32  # vnodes: small rings keep the properties fast; the rules do not depend on it
keys_st = st.binary(min_size=1, max_size=8)


@given(st.integers(1, 6), st.lists(keys_st, max_size=50))
def test_the_keys_that_move_are_the_ones_the_new_ring_gives_the_new_shard(n: int, keys: list[bytes]) -> None:
    old, new = Ring(range(n), V), Ring(range(n + 1), V)
    for key in keys:
        move = Move(5, old.shard_for(key), n, V, FROZEN)
        assert move.moving(key) == (new.shard_for(key) == n)
        if not move.moving(key):
            assert new.shard_for(key) == old.shard_for(key)  # adding a shard moves keys onto it only


@given(st.integers(1, 5), keys_st, st.sampled_from([None, FROZEN, HANDOFF, "done"]),
       st.sampled_from([None, INCOMING, "open"]), st.booleans())
def test_at_most_one_of_the_old_and_new_owner_serves_a_key_in_every_phase(
        n: int, key: bytes, source_phase: str | None, dest_phase: str | None, write: bool) -> None:
    old_owner, new_owner = Ring(range(n), V).shard_for(key), Ring(range(n + 1), V).shard_for(key)
    # the orchestrator opens the new shard only once every source handed off
    if dest_phase == "open" and source_phase in (None, FROZEN):
        return
    if source_phase == "done" and dest_phase != "open":
        return
    src_owner = Owner(old_owner, n + 1, V, 5) if source_phase == "done" else None
    src_move = Move(5, old_owner, n, V, source_phase) if source_phase in (FROZEN, HANDOFF) else None
    dst_owner = Owner(n, n + 1, V, 5) if dest_phase == "open" else None
    dst_move = Move(5, n, n, V, INCOMING) if dest_phase == INCOMING else None
    serving = []
    if refusal(src_owner, src_move, key, write) is None:
        serving.append(old_owner)
    if refusal(dst_owner, dst_move, key, write) is None and dest_phase is not None:
        serving.append(n)
    if old_owner == new_owner:  # the key does not move: its shard serves it throughout
        assert serving[:1] == [old_owner]
        return
    assert len(serving) <= 1
    if source_phase is None or (source_phase == FROZEN and not write):
        assert serving == [old_owner]
    if dest_phase == "open":
        assert serving == [n]


def test_phase_table_examples() -> None:
    move = Move(7, 0, 1, V, FROZEN)
    key = next(k for k in (f"k{i}".encode() for i in range(1000)) if move.moving(k))
    stay = next(k for k in (f"k{i}".encode() for i in range(1000)) if not move.moving(k))
    assert refusal(None, move, key, write=False) is None
    assert refusal(None, move, key, write=True).code == "MOVING"  # type: ignore[union-attr]
    assert refusal(None, move, stay, write=True) is None
    handed = Move(7, 0, 1, V, HANDOFF)
    err = refusal(None, handed, key, write=False)
    assert isinstance(err, CmdError) and err.code == "WRONGSHARD" and err.message.startswith("7 1 ")
    assert refusal(None, Move(7, 1, 1, V, INCOMING), stay, write=False).code == "MOVING"  # type: ignore[union-attr]
    assert refusal(Owner(0, 2, V, 7), None, key, write=False).code == "WRONGSHARD"  # type: ignore[union-attr]


@pytest.mark.parametrize("cmd, expected", [
    (("get", b"a"), ([b"a"], False)),
    (("set", b"a", b"v"), ([b"a"], True)),
    (("mget", [b"a", b"b"]), ([b"a", b"b"], False)),
    (("del", [b"a"]), ([b"a"], True)),
    (("session", b"c", 3, ("incrby", b"a", 1)), ([b"a"], True)),
    (("txn_once", "t", [(b"a", "exists", None)], [("put", b"b", b"v")], []), ([b"a", b"b"], True)),
    (("tx_prepare", "t", 0, [], [("put", b"b", b"v")], [("del", b"c")], 5), ([b"b", b"c"], True)),
    (("lease_grant", 0, 1000), ([], False)),
    (("tx_finish", "t", "committed", True), ([], False)),
])
def test_keys_of_commands(cmd: tuple, expected: tuple) -> None:
    assert keys_of(cmd) == expected


def test_a_prepare_touching_a_frozen_key_votes_no_for_good() -> None:
    s = KVState()
    s.apply(("mv_freeze", 3, 0, 1, V), 0)
    key = next(k for k in (f"k{i}".encode() for i in range(1000)) if s.move.moving(k))  # type: ignore[union-attr]
    vote = s.apply(("tx_prepare", "t1", 0, [], [("put", key, b"v")], [], 1), 1)
    assert vote[:2] == ("no", "moving")  # the coordinator answers -MOVING, which clients retry
    assert s.txns.locks == {}
    assert s.apply(("mv_abort", 3), 2) == "aborted"
    assert s.apply(("tx_prepare", "t1", 0, [], [("put", key, b"v")], [], 1), 3)[0] == "done"  # remembered


def test_a_state_with_a_move_survives_a_snapshot() -> None:
    s = KVState()
    s.apply(("set", b"a", b"1"), 0)
    s.apply(("mv_freeze", 3, 0, 1, V), 0)
    back = KVState.restore(s.snapshot())
    assert back.move == s.move and back.owner is None
    s.apply(("mv_handoff", 3), 0)
    s.apply(("mv_done", 3), 0)
    back = KVState.from_meta(s.meta(), s.data)
    assert back.owner == Owner(0, 2, V, 3) and back.move is None


# -- the whole protocol on state machines, with clients in every gap ---------------------------------

EPOCH = 9
NKEYS = 12


class World:
    """Sources ``0..n-1`` and the new shard ``n`` as ``KVState``s; the clients' model of every key."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.shards = {s: KVState() for s in range(n + 1)}
        self.old, self.new = Ring(range(n), V), Ring(range(n + 1), V)
        self.published = False  # the map whose ring has the new shard is out
        self.now = 0
        self.model: dict[bytes, int] = {}  # increments applied per key
        # client -> (seq, key, counted) in flight: refused (not counted yet) or its reply lost (counted)
        self.pending: dict[int, tuple[int, bytes, bool] | None] = {}
        self.seqs: dict[int, int] = {}

    def apply(self, shard: int, cmd: tuple) -> object:
        self.now += 1
        return self.shards[shard].apply(cmd, self.now)

    def read(self, shard: int, cmd: tuple) -> object:
        return self.shards[shard].read(cmd, self.now)

    def route(self, key: bytes, new_map: bool) -> int:
        return (self.new if new_map and self.published else self.old).shard_for(key)

    def client_op(self, client: int, key: bytes, new_map: bool, lose_reply: bool) -> None:
        inflight = self.pending.get(client)
        counted = False
        if inflight is None:
            self.seqs[client] = seq = self.seqs.get(client, 0) + 1
        else:
            seq, key, counted = inflight
        shard = self.route(key, new_map)
        res = self.apply(shard, ("session", b"c%d" % client, seq, ("incrby", key, 1)))
        if isinstance(res, CmdError):
            assert res.code in ("MOVING", "WRONGSHARD"), res
            self.pending[client] = (seq, key, counted)  # not applied: the client retries the same request
            return
        assert isinstance(res, int)
        if not counted:
            self.model[key] = self.model.get(key, 0) + 1
        assert res == self.model[key] or counted  # a retry of an applied request gets its first answer back
        self.pending[client] = (seq, key, True) if lose_reply else None
        got = self.read(shard, ("get", key))
        if not isinstance(got, CmdError):
            assert got == str(self.model[key]).encode(), "a served read missed the latest write"

    def check_one_server(self) -> None:
        for i in range(NKEYS):
            key = b"key%d" % i
            o, d = self.old.shard_for(key), self.new.shard_for(key)
            serving = [s for s in {o, d} if self.shards[s].read(("get", key), self.now) is not None
                       and not isinstance(self.shards[s].read(("get", key), self.now), CmdError)]
            assert len(serving) <= 1, f"{key!r} served by {serving}"

    # the steps of raftkv.resharder, in its order
    def steps(self) -> list[Callable[[], None]]:
        n, out = self.n, []
        out.append(lambda: self.apply(n, ("mv_install", EPOCH, n, V, 0, (), ())))
        for s in range(n):
            out.append(lambda s=s: self.apply(s, ("mv_freeze", EPOCH, s, n, V)))
        for s in range(n):
            out.append(lambda s=s: self._stream(s))
            out.append(lambda s=s: self.apply(s, ("mv_handoff", EPOCH)))
        out.append(lambda: self.apply(n, ("mv_open", EPOCH)))
        out.append(lambda: setattr(self, "published", True))
        for s in range(n):
            out.append(lambda s=s: self._purge(s))
            out.append(lambda s=s: self.apply(s, ("mv_done", EPOCH)))
        return out

    def _stream(self, s: int) -> None:
        if self.shards[s].move is None or self.shards[s].move.phase != FROZEN:  # type: ignore[union-attr]
            return  # a re-run: handed off already
        after = None
        while True:
            items, after = self.read(s, ("mv_scan", EPOCH, after, 3))  # type: ignore[misc]
            self.apply(self.n, ("mv_install", EPOCH, self.n, V, self.shards[s].revision, tuple(items), ()))
            if after is None:
                break
        rows, _ = self.read(s, ("mv_sessions", None, 1000))  # type: ignore[misc]
        self.apply(self.n, ("mv_install", EPOCH, self.n, V, 0, (), tuple(rows)))

    def _purge(self, s: int) -> None:
        move = self.shards[s].move
        if move is None:
            return
        items, _ = self.read(s, ("mv_scan", EPOCH, None, 1000))  # type: ignore[misc]
        self.apply(s, ("mv_purge", EPOCH, tuple(k for k, _, _ in items)))


op_st = st.tuples(st.integers(0, 2), st.integers(0, NKEYS - 1), st.booleans(), st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.lists(st.lists(op_st, max_size=6), min_size=20, max_size=20),
       st.sets(st.integers(0, 19)))
def test_shard_add_protocol_loses_no_write_applies_none_twice_and_reads_no_stale_value(
        n: int, gaps: list[list[tuple[int, int, bool, bool]]], twice: set[int]) -> None:
    w = World(n)
    for i in range(NKEYS):  # every key exists before the move
        w.client_op(9, b"key%d" % i, new_map=False, lose_reply=False)
    steps = w.steps()
    for i, step in enumerate(steps):
        for client, k, new_map, lose in gaps[i % len(gaps)]:
            w.client_op(client, b"key%d" % k, new_map, lose)
            w.check_one_server()
        step()
        if i in twice:
            step()  # a re-run after a crash: idempotent
        w.check_one_server()
    for client in list(w.pending):  # every client finishes its request with the new map
        while w.pending.get(client) is not None:
            w.client_op(client, b"", new_map=True, lose_reply=False)
    stored = {}
    for s, state in w.shards.items():
        assert state.move is None and state.owner == Owner(s, n + 1, V, EPOCH)
        for key in state.data.keys_between():
            assert key not in stored, f"{key!r} stored on shards {stored[key]} and {s}"
            stored[key] = s
    assert set(stored) == set(w.model)
    for key, count in w.model.items():
        assert stored[key] == w.new.shard_for(key)
        assert w.read(stored[key], ("get", key)) == str(count).encode(), "an increment lost or applied twice"


def test_reshard_handlers_are_registered_in_the_state_machine() -> None:
    from raftkv import state

    assert set(reshard.HANDLERS) <= set(state._HANDLERS)
    assert set(reshard.READ_HANDLERS) <= set(state._READ_HANDLERS)


def test_a_scan_returns_every_moving_key_once_in_answers_of_bounded_size() -> None:
    s = KVState()
    big = b"x" * (300 * 1024)
    for i in range(40):
        s.apply(("set", b"k%d" % i, big if i % 2 else b"small"), 0)
    s.apply(("mv_freeze", 3, 0, 1, V), 0)
    seen: list[bytes] = []
    after = None
    while True:
        items, after = s.read(("mv_scan", 3, after, 1000))
        assert sum(len(k) + len(v) for k, v, _ in items) <= reshard.SCAN_BYTES_MAX
        seen += [k for k, _, _ in items]
        if after is None:
            break
    expected = sorted(k for k in s.data.keys_between() if s.move.moving(k))  # type: ignore[union-attr]
    assert seen == expected and len(expected) > 5


@pytest.mark.parametrize("cmd", [("mv_freeze", 3), ("mv_install", 3, 1, V, 0, ((b"k",),), ()),
                                 ("mv_purge", 3, None), ("mv_freeze", 3, 0, 1, "x")])
def test_a_malformed_move_command_is_refused_and_changes_nothing(cmd: tuple) -> None:
    s = KVState()
    s.apply(("set", b"a", b"1"), 0)
    before = s.snapshot()
    res = s.apply(cmd, 0)
    if cmd[0] == "mv_purge":  # nothing under way: nothing to do, whatever the keys
        assert res == 0
    else:
        assert isinstance(res, CmdError) and res.code == "ERR", res
    s.applied -= 1
    s.log_ms = KVState.restore(before).log_ms
    assert s.snapshot() == before

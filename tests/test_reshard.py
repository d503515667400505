"""Moving keys when a shard is added or removed (raftkv.reshard): the per-key rules, and the whole protocol
on state machines.

The protocol tests run ``shard add`` and ``shard remove`` step by step on ``KVState`` objects (the
sources and the destinations), as ``raftkv.resharder`` orders them, with client increments and reads
in every gap: clients
with the old map or the new one, replies lost and the same session sequence number retried later
(maybe on the other shard), and protocol steps run twice (a re-run after a crash). At every point
at most one shard serves a key, every read a shard serves is the latest write, and at the end
every increment counted once, and no key is stored twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv import reshard
from raftkv.reshard import COPYING, FROZEN, HANDOFF, INCOMING, Move, Owner, keys_of, refusal
from raftkv.resharder import Pacer
from raftkv.results import CmdError
from raftkv.state import KVState
from raftkv.txn import COMMITTED, Record
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


@given(st.integers(2, 5), keys_st, st.sampled_from([None, FROZEN, HANDOFF]),
       st.sampled_from([None, INCOMING, "open"]), st.booleans(), st.booleans())
def test_at_most_one_shard_serves_a_key_in_every_phase_of_a_removal(
        n: int, key: bytes, gone_phase: str | None, dest_phase: str | None, write: bool, moved_before: bool) -> None:
    """Shard ``n-1`` is removed; ``d`` is the shard the ring without it gives ``key``. ``moved_before``: the
    shards took part in an earlier move (they have an owner), else they never did."""
    gone = n - 1
    old_owner, d = Ring(range(n), V).shard_for(key), Ring(range(gone), V).shard_for(key)
    # the orchestrator marks every remaining shard before it freezes the removed one, and opens them only
    # once it has handed off
    if (dest_phase is None and gone_phase is not None) or (dest_phase == "open" and gone_phase != HANDOFF):
        return
    src_owner = Owner(old_owner, n, V, 3) if moved_before else None
    src_move = Move(5, gone, gone, V, gone_phase, True) if gone_phase is not None else None
    dst_owner = Owner(d, gone, V, 5) if dest_phase == "open" else Owner(d, n, V, 3) if moved_before else None
    dst_move = Move(5, d, gone, V, INCOMING, True) if dest_phase == INCOMING else None
    serving = set()
    if refusal(src_owner if old_owner != gone else None, src_move if old_owner == gone else None, key,
               write) is None:
        serving.add(old_owner)
    if old_owner == d or dest_phase is not None:  # (before it is marked, no map sends an arriving key to d)
        if refusal(dst_owner, dst_move, key, write) is None:
            serving.add(d)
    if old_owner == d:  # the key does not move: its shard serves it throughout
        assert serving == {d}
        return
    assert len(serving) <= 1, serving
    if gone_phase is None or (gone_phase == FROZEN and not write):
        assert serving == {gone}
    if dest_phase == "open":
        assert serving == {d}


def test_only_the_last_shard_can_be_removed() -> None:
    assert reshard.removal_refusal(3, None) is None and reshard.removal_refusal(3, 2) is None
    assert "only the last shard (2)" in reshard.removal_refusal(3, 0)  # type: ignore[operator]
    assert "renumber" in reshard.removal_refusal(3, 1)  # type: ignore[operator]
    assert "no shard 7" in reshard.removal_refusal(3, 7)  # type: ignore[operator]
    assert "one shard" in reshard.removal_refusal(1, None)  # type: ignore[operator]


def test_keys_move_only_while_every_node_reports_one_state_machine_version() -> None:
    assert reshard.version_refusal({"n1": 1, "n2": 1, "n3": 1}) is None
    assert reshard.version_refusal({}) is None  # nobody reachable to disagree (the move's own steps then fail)
    why = reshard.version_refusal({"n1": 1, "n2": 2, "n3": 1})
    assert why is not None and "n1: 1, n2: 2, n3: 1" in why and "rolling upgrade" in why
    why = reshard.version_refusal({"n1": 1, "n2": None, "n3": 1})
    assert why is not None and "n2" in why and "n1" not in why.split(":")[0] and "upgrade" in why


def test_a_removal_move_dumps_with_its_mark_and_an_add_move_as_before() -> None:
    """Snapshots of add moves keep their 5-tuple (old snapshots load unchanged); removals carry the mark."""
    add = Move(4, 0, 2, V, FROZEN)
    assert add.dump() == (4, 0, 2, V, FROZEN) and reshard.load({"move": add.dump()})[1] == add
    rem = Move(4, 2, 2, V, FROZEN, True)
    assert rem.dump() == (4, 2, 2, V, FROZEN, True) and reshard.load({"move": rem.dump()})[1] == rem
    assert (rem.old_shards, rem.new_shards, add.old_shards, add.new_shards) == (3, 2, 2, 3)
    assert all(rem.moving(b"k%d" % i) for i in range(50))  # every key of the removed shard moves


def test_a_remaining_shard_refuses_only_the_keys_arriving_from_the_removed_one() -> None:
    s = KVState()
    old, new = Ring(range(3), V), Ring(range(2), V)
    own = next(k for k in (b"o%d" % i for i in range(1000)) if old.shard_for(k) == 0)
    arriving = next(k for k in (b"a%d" % i for i in range(1000)) if old.shard_for(k) == 2 and new.shard_for(k) == 0)
    elsewhere = next(k for k in (b"e%d" % i for i in range(1000)) if old.shard_for(k) == 2
                     and new.shard_for(k) == 1)
    s.apply(("set", own, b"mine"), 0)
    assert s.apply(("mv_install", 6, 0, V, 0, (), (), 2), 1) == 0  # marked incoming: it keeps its keys
    assert s.apply(("get", own), 2) == b"mine" and s.apply(("set", own, b"2"), 3) == 2  # its revision
    assert s.apply(("get", arriving), 4).code == "MOVING"  # type: ignore[union-attr]
    # a key for another remaining shard is refused as a malformed install, changing nothing
    assert s.apply(("mv_install", 6, 0, V, 50, ((elsewhere, b"x", None),), (), 2), 5).code == "ERR"  # type: ignore[union-attr]
    assert s.revision < 50
    assert s.apply(("mv_install", 6, 0, V, 50, ((arriving, b"x", None),), (), 2), 6) == 1
    assert s.data[arriving][1] > 50  # above every revision the removed shard had
    back = KVState.restore(s.snapshot())  # the mark survives a snapshot
    assert back.move == s.move == Move(6, 0, 2, V, INCOMING, True)
    assert s.apply(("mv_open", 6), 7) == "open" and s.owner == Owner(0, 2, V, 6)
    assert s.apply(("get", arriving), 8) == b"x"
    assert s.apply(("get", elsewhere), 9).code == "WRONGSHARD"  # type: ignore[union-attr]


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
    """The shards of a ring change as ``KVState``s, and the clients' model of every key.

    An add: sources ``0..n-1`` and the new shard ``n``.  A removal (``removing``): shards ``0..n-1``, the
    last of which (``n-1``) goes; the others receive its keys.
    """

    def __init__(self, n: int, removing: bool = False, log_events: int = 10_000) -> None:
        self.n = n
        self.removing = removing
        self.gone = n - 1 if removing else None
        self.shards = {s: KVState() for s in range(n if removing else n + 1)}
        self.old, self.new = Ring(range(n), V), Ring(range(n - 1 if removing else n + 1), V)
        self.published = False  # the map with the new ring is out
        self.now = 0
        self.model: dict[bytes, int] = {}  # the value of every key that exists (increments since created)
        # client -> (seq, key, delete, counted) in flight: refused (not applied yet) or its reply lost (applied)
        self.pending: dict[int, tuple[int, bytes, bool, bool] | None] = {}
        self.seqs: dict[int, int] = {}
        # an add's pre-copy: the revision each source's began at, where it stands, the sources copied to the end
        self.since: dict[int, int] = {}
        self.cursor: dict[int, bytes | None] = {}
        self.precopied: set[int] = set()
        for src in range(n):  # a short change log: the final copy copies every key again
            self.shards[src].changes.events_max = log_events

    def apply(self, shard: int, cmd: tuple) -> object:
        self.now += 1
        return self.shards[shard].apply(cmd, self.now)

    def read(self, shard: int, cmd: tuple) -> object:
        return self.shards[shard].read(cmd, self.now)

    def route(self, key: bytes, new_map: bool) -> int:
        """A client with the new map (once it is out) goes by the new ring; so does one that follows the
        ``-WRONGSHARD epoch shard`` its key's old shard answers once handed off, before the map is out."""
        old = self.old.shard_for(key)
        move = self.shards[old].move
        told = move is not None and move.phase == HANDOFF and move.moving(key)
        return (self.new if new_map and (self.published or told) else self.old).shard_for(key)

    def client_op(self, client: int, key: bytes, new_map: bool, lose_reply: bool, delete: bool = False) -> None:
        inflight = self.pending.get(client)
        counted = False
        if inflight is None:
            self.seqs[client] = seq = self.seqs.get(client, 0) + 1
        else:
            seq, key, delete, counted = inflight
        shard = self.route(key, new_map)
        res = self.apply(shard, ("session", b"c%d" % client, seq, ("del", [key]) if delete else ("incrby", key, 1)))
        if isinstance(res, CmdError):
            assert res.code in ("MOVING", "WRONGSHARD"), res
            self.pending[client] = (seq, key, delete, counted)  # not applied: the client retries the same request
            return
        assert isinstance(res, int)
        if not counted:  # (a retry of an applied request gets its first answer back: not checked again)
            if delete:
                assert res == (1 if key in self.model else 0), "a delete saw another state than the model's"
                self.model.pop(key, None)
            else:
                self.model[key] = self.model.get(key, 0) + 1
                assert res == self.model[key]
        self.pending[client] = (seq, key, delete, True) if lose_reply else None
        got = self.read(shard, ("get", key))
        if not isinstance(got, CmdError):
            want = self.model.get(key)
            assert got == (None if want is None else str(want).encode()), "a served read missed the latest write"

    def check_one_server(self) -> None:
        for i in range(NKEYS):
            key = b"key%d" % i
            o, d = self.old.shard_for(key), self.new.shard_for(key)
            serving = [s for s in {o, d} if self.shards[s].read(("get", key), self.now) is not None
                       and not isinstance(self.shards[s].read(("get", key), self.now), CmdError)]
            assert len(serving) <= 1, f"{key!r} served by {serving}"

    # the steps of raftkv.resharder, in its order
    def steps(self) -> list[Callable[[], None]]:
        return self._remove_steps() if self.removing else self._add_steps()

    def _add_steps(self) -> list[Callable[[], None]]:
        n, out = self.n, []
        out.append(lambda: self.apply(n, ("mv_install", EPOCH, n, V, 0, (), ())))
        for s in range(n):
            out += self._precopy_steps(s)
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

    def _remove_steps(self) -> list[Callable[[], None]]:
        gone, out = self.n - 1, []
        for d in range(gone):  # the remaining shards refuse the arriving keys until they open
            out.append(lambda d=d: self.apply(d, ("mv_install", EPOCH, d, V, 0, (), (), gone)))
        out += self._precopy_steps(gone)
        out.append(lambda: self.apply(gone, ("mv_freeze", EPOCH, gone, gone, V, True)))
        for d in range(gone):  # revisions above the removed shard's first
            out.append(lambda d=d: self.apply(d, ("mv_install", EPOCH, d, V, self.shards[gone].revision, (), (),
                                                  gone)))
        out.append(lambda: self._stream(gone))
        out.append(lambda: self.apply(gone, ("mv_handoff", EPOCH)))
        for d in range(gone):
            out.append(lambda d=d: self.apply(d, ("mv_open", EPOCH)))
        out.append(lambda: setattr(self, "published", True))  # and the removed shard's group stops
        return out

    def _install(self, dest: int, revision: int, items: tuple, sessions: tuple) -> None:
        extra = (self.gone,) if self.removing else ()
        assert self.apply(dest, ("mv_install", EPOCH, dest, V, revision, items, sessions, *extra)) == len(items)

    def _precopy_steps(self, s: int) -> list[Callable[[], None]]:
        """A source's pre-copy in chunks, clients writing and deleting between them; a second run starts it
        over part-way (the first one died), and the last chunks may not reach the end (then no ``since``)."""
        return [lambda: self._precopy_begin(s), lambda: self._precopy_chunk(s), lambda: self._precopy_chunk(s),
                lambda: self._precopy_begin(s), *[lambda: self._precopy_chunk(s)] * 4]

    def _discard(self, d: int, s: int) -> None:
        """``mv_discard`` in slices of 3 keys, as the resharder does (with bigger slices)."""
        after = None
        while True:
            _n, after = self.apply(d, ("mv_discard", EPOCH, s, after, 3))
            if after is None:
                return

    def _precopy_begin(self, s: int) -> None:
        cmd = ("mv_precopy", EPOCH, s, s, V, True) if self.removing else ("mv_precopy", EPOCH, s, self.n, V)
        if self.apply(s, cmd) == COPYING:
            for d in self._dests():  # what an earlier run's pre-copy left may hold keys deleted since
                self._discard(d, s)
            self.since[s] = self.shards[s].revision  # read before the copy begins, as the resharder does
            self.cursor[s] = None

    def _precopy_chunk(self, s: int) -> None:
        if s not in self.cursor or self.shards[s].move is None or self.shards[s].move.phase != COPYING:
            return  # done, or a source an earlier run froze
        items, cursor = self.read(s, ("mv_scan", EPOCH, self.cursor[s], 2))  # type: ignore[misc]
        for d in self._dests():
            mine = tuple(i for i in items if self.new.shard_for(i[0]) == d)
            if mine:
                self._install(d, self.since[s], mine, ())
        if cursor is None:
            del self.cursor[s]  # the whole shard was looked at
            self.precopied.add(s)
        else:
            self.cursor[s] = cursor

    def _dests(self) -> list[int]:
        return list(range(self.n - 1)) if self.removing else [self.n]

    def _to_dests(self, rows: list) -> None:
        rev = max(self.shards[s].revision for s in self.shards)
        for d in self._dests():
            mine = tuple(r for r in rows if self.new.shard_for(r[0]) == d)
            if mine:
                self.apply(d, ("mv_apply", EPOCH, rev, mine))

    def _replay(self, s: int) -> bool:
        """The final copy after a pre-copy: the source's changes since (False: the log lost some)."""
        since = self.since[s]
        after: object = since
        while after is not None:
            got = self.read(s, ("mv_delta", EPOCH, since, after, 2))
            if got == "compacted":
                return False
            rows, after = got  # type: ignore[misc]
            self._to_dests(rows)
        ttls = self.read(s, ("mv_ttls", EPOCH))
        missing: list = []
        for d in self._dests():
            mine = tuple(r for r in ttls if self.new.shard_for(r[0]) == d)  # type: ignore[union-attr]
            missing += self.apply(d, ("mv_ttlsync", EPOCH, s, mine))  # type: ignore[operator]
        if missing:
            self._to_dests(self.read(s, ("mv_get", EPOCH, tuple(missing))))  # type: ignore[arg-type]
        return True

    def _stream(self, s: int) -> None:
        if self.shards[s].move is None or self.shards[s].move.phase != FROZEN:  # type: ignore[union-attr]
            return  # a re-run: handed off already
        if s in self.precopied and self._replay(s):
            rows, _ = self.read(s, ("mv_sessions", None, 1000))  # type: ignore[misc]
            for d in self._dests():
                self._install(d, 0, (), tuple(rows))
            return
        for d in self._dests():  # a pre-copy cut short, or one the log cannot bring up to date
            self._discard(d, s)
        dests = self._dests()
        after = None
        while True:
            items, after = self.read(s, ("mv_scan", EPOCH, after, 3))  # type: ignore[misc]
            for d in dests:
                self._install(d, self.shards[s].revision, tuple(i for i in items if self.new.shard_for(i[0]) == d), ())
            if after is None:
                break
        rows, _ = self.read(s, ("mv_sessions", None, 1000))  # type: ignore[misc]
        for d in dests:
            self._install(d, 0, (), tuple(rows))

    def _purge(self, s: int) -> None:
        move = self.shards[s].move
        if move is None:
            return
        items, _ = self.read(s, ("mv_scan", EPOCH, None, 1000))  # type: ignore[misc]
        self.apply(s, ("mv_purge", EPOCH, tuple(k for k, _, _ in items)))

    def run(self, gaps: list[list[tuple[int, int, bool, bool, bool]]], twice: set[int]) -> None:
        """Every key written, then the steps with client operations before each, some steps run twice; then
        every client finishes its request with the new map."""
        for i in range(NKEYS):  # every key exists before the move
            self.client_op(9, b"key%d" % i, new_map=False, lose_reply=False)
        for i, step in enumerate(self.steps()):
            for client, k, new_map, lose, delete in gaps[i % len(gaps)]:
                self.client_op(client, b"key%d" % k, new_map, lose, delete)
                self.check_one_server()
            step()
            if i in twice:
                step()  # a re-run after a crash: idempotent
            self.check_one_server()
        for client in list(self.pending):
            while self.pending.get(client) is not None:
                self.client_op(client, b"", new_map=True, lose_reply=False)

    def check_end(self) -> None:
        """Each key once, on the shard the new ring gives it, with every increment counted once."""
        stored: dict[bytes, int] = {}
        for s, state in self.shards.items():
            if s == self.gone:
                assert state.move is not None and state.move.phase == HANDOFF  # its group is deleted now
                continue
            assert state.move is None and state.owner == Owner(s, len(self.new), V, EPOCH)
            for key in state.data.keys_between():
                assert key not in stored, f"{key!r} stored on shards {stored[key]} and {s}"
                stored[key] = s
        assert set(stored) == set(self.model), "a deleted key came back, or a key was lost"
        for key, count in self.model.items():
            assert stored[key] == self.new.shard_for(key)
            assert self.read(stored[key], ("get", key)) == str(count).encode(), "an increment lost or applied twice"


op_st = st.tuples(st.integers(0, 2), st.integers(0, NKEYS - 1), st.booleans(), st.booleans(),
                  st.sampled_from([False, False, False, True]))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.lists(st.lists(op_st, max_size=6), min_size=20, max_size=20),
       st.sets(st.integers(0, 40)), st.sampled_from([10_000, 10_000, 3]))
def test_shard_add_protocol_loses_no_write_applies_none_twice_and_reads_no_stale_value(
        n: int, gaps: list[list[tuple[int, int, bool, bool, bool]]], twice: set[int], log_events: int) -> None:
    """Clients increment and delete keys in every gap (the pre-copy's chunks included): the copy made once
    the sources froze must replay what changed and forget what was deleted since the pre-copy (from the
    change log; with a log too short to hold every change since, by copying every key again)."""
    w = World(n, log_events=log_events)
    w.run(gaps, twice)
    w.check_end()


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 4), st.lists(st.lists(op_st, max_size=6), min_size=20, max_size=20),
       st.sets(st.integers(0, 30)), st.sampled_from([10_000, 10_000, 3]))
def test_shard_remove_protocol_loses_no_write_applies_none_twice_and_reads_no_stale_value(
        n: int, gaps: list[list[tuple[int, int, bool, bool, bool]]], twice: set[int], log_events: int) -> None:
    """As for an add: the removed shard is pre-copied while it serves, then its changes since are replayed
    (or, with a change log too short, every key copied again)."""
    w = World(n, removing=True, log_events=log_events)
    w.run(gaps, twice)
    w.check_end()


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


def test_a_lock_is_finished_as_aborted_without_its_home_only_once_the_home_left_the_ring() -> None:
    """``home_removed``: a shard opened under the 2-shard ring may abort a lock homed at shard 2; never while a
    move is under way (a source of an add keeps the old ring until it is done), nor for a home on its ring."""
    opened = Owner(0, 2, V, 9)
    assert reshard.home_removed(opened, None, 2) and reshard.home_removed(opened, None, 5)
    assert not reshard.home_removed(opened, None, 1)
    assert not reshard.home_removed(None, None, 2)  # never took part in a move: nothing is known
    assert not reshard.home_removed(opened, Move(10, 0, 2, V, HANDOFF), 2)  # an add of shard 2 under way
    assert not reshard.home_removed(Owner(0, 2, V, 9), Move(9, 0, 2, V, INCOMING, True), 2)  # not open yet


def test_a_removed_shard_counts_committed_transactions_not_yet_finished_everywhere() -> None:
    """``mv_status``'s last field, which the removal waits to see at 0 before the hand-off."""
    s = KVState()
    assert s.read(("mv_status",))[6] == 0
    s.txns.records["t"] = record = Record(COMMITTED, (0, 2), 0)
    assert s.read(("mv_status",))[6] == 1
    record.acked = True
    assert s.read(("mv_status",))[6] == 0


def test_a_removal_given_up_before_the_copy_leaves_the_remaining_shards_as_they_were() -> None:
    """``mv_abort`` on a removal's destination: it stops refusing the arriving keys, unless one was copied
    there already (then the removal can only be finished)."""
    old, new = Ring(range(3), V), Ring(range(2), V)
    arriving = next(k for k in (b"a%d" % i for i in range(1000)) if old.shard_for(k) == 2 and new.shard_for(k) == 0)
    s = KVState()
    s.apply(("mv_install", 6, 0, V, 0, (), (), 2), 0)
    assert s.apply(("get", arriving), 1).code == "MOVING"  # type: ignore[union-attr]
    assert s.apply(("mv_abort", 6), 2) == "aborted" and s.move is None and s.owner is None
    assert s.apply(("get", arriving), 3) is None  # as before the removal (no map sends it here)
    s.apply(("mv_install", 8, 0, V, 0, ((arriving, b"x", None),), (), 2), 4)
    assert s.apply(("mv_abort", 8), 5).code == "ERR" and s.move is not None  # type: ignore[union-attr]


def test_a_discard_walks_a_removal_destinations_keys_in_bounded_slices_and_forgets_only_the_arrived_ones(
        ) -> None:
    """``mv_discard ... after limit``: each entry looks at ``limit`` keys at most (a remaining shard of a removal
    holds keys of its own: one walk over all of them held the node's driver for long enough to cost
    elections); the slices together forget exactly what the whole walk (the older form) forgets."""
    old, new = Ring(range(3), V), Ring(range(2), V)
    keys = [b"k%04d" % i for i in range(600)]
    own = [k for k in keys if old.shard_for(k) == 0]
    arrived = [k for k in keys if old.shard_for(k) == 2 and new.shard_for(k) == 0]

    def destination() -> KVState:
        s = KVState()
        for k in own:
            s.apply(("set", k, b"mine"), 0)
        s.apply(("mv_install", 6, 0, V, 0, tuple((k, b"moved", None) for k in arrived), (), 2), 0)
        return s

    whole, sliced = destination(), destination()
    assert whole.apply(("mv_discard", 6, 2), 1) == len(arrived) > 0
    after, slices, forgotten = None, 0, 0
    while True:
        looked_before = len(sliced.data)
        n, after = sliced.apply(("mv_discard", 6, 2, after, 50), 1)
        assert n <= 50 and looked_before - len(sliced.data) == n
        forgotten, slices = forgotten + n, slices + 1
        if after is None:
            break
    assert forgotten == len(arrived) and slices >= (len(own) + len(arrived)) // 50
    assert sorted(sliced.data.keys_between()) == sorted(whole.data.keys_between()) == sorted(own)
    assert sliced.apply(("mv_discard", 6, 2, None, 50), 2) == (0, own[49])  # again: nothing left to forget


def test_the_final_copy_brings_deadlines_changed_without_a_revision_and_keys_expired_early_at_the_new_shard(
        ) -> None:
    """EXPIRE and PERSIST change no revision, so the change log does not show them: ``mv_ttlsync`` gives the
    new shard's keys the frozen source's deadlines; a key that expired at the new shard first (its clock) is
    reported missing and sent again (``mv_get``)."""
    src, dst = KVState(), KVState()
    move = Move(3, 0, 1, V, FROZEN)
    a, b, c = [k for k in (f"k{i}".encode() for i in range(1000)) if move.moving(k)][:3]
    for key, value in ((a, b"1"), (b, b"2"), (c, b"3")):
        src.apply(("set", key, value), 10)
    src.apply(("expire", a, 10_000, True, None), 10)
    src.apply(("expire", c, 50, True, None), 10)  # c: a deadline at log time 50
    dst.apply(("mv_install", 3, 1, V, 0, (), ()), 10)
    assert src.apply(("mv_precopy", 3, 0, 1, V), 10) == COPYING
    since = src.revision
    items, _ = src.read(("mv_scan", 3, None, 100))  # type: ignore[misc]
    dst.apply(("mv_install", 3, 1, V, since, tuple(items), ()), 10)
    src.apply(("persist", a), 20)  # no revision, no change in the log
    src.apply(("expire", b, 20_000, True, None), 20)
    assert src.apply(("mv_freeze", 3, 0, 1, V), 20) == FROZEN
    dst.apply(("noop",), 60)  # the new shard's clock passes c's deadline first: c expires there
    assert c not in dst.data and c in src.data
    assert src.read(("mv_delta", 3, since, since, 100)) == ([], None)  # no value changed since the pre-copy
    missing = dst.apply(("mv_ttlsync", 3, 0, tuple(src.read(("mv_ttls", 3)))), 60)  # type: ignore[arg-type]
    assert missing == [c]
    dst.apply(("mv_apply", 3, src.revision, tuple(src.read(("mv_get", 3, tuple(missing))))), 60)  # type: ignore[arg-type]
    assert dst.expiries.get(a) is None and dst.expiries.get(b) == 20_000 and dst.expiries.get(c) == 50
    assert [dst.data[k][0] for k in (a, b, c)] == [b"1", b"2", b"3"]


def test_a_source_being_pre_copied_refuses_nothing_and_only_then_freezes() -> None:
    s = KVState()
    move = Move(3, 0, 1, V, FROZEN)
    key = next(k for k in (f"k{i}".encode() for i in range(1000)) if move.moving(k))
    assert s.apply(("mv_precopy", 3, 0, 1, V), 0) == COPYING
    assert not isinstance(s.apply(("set", key, b"v"), 1), CmdError)  # a write of a moving key is served
    assert s.read(("mv_delta", 3, 0, 0, 10)).code == "ERR"  # type: ignore[union-attr]  # not frozen yet
    assert s.apply(("mv_precopy", 3, 0, 1, V), 2) == COPYING  # a re-run
    assert s.apply(("mv_freeze", 3, 0, 1, V), 3) == FROZEN
    assert s.apply(("mv_precopy", 3, 0, 1, V), 4) == FROZEN  # never back
    assert refusal(None, s.move, key, write=True).code == "MOVING"  # type: ignore[union-attr]
    assert s.apply(("mv_abort", 3), 5) == "aborted"


@settings(deadline=None)
@given(st.floats(0.05, 1.0), st.floats(0.0, 10.0, allow_subnormal=False))
def test_a_paced_move_keeps_the_cluster_busy_at_most_its_duty(duty: float, busy: float) -> None:
    """``Pacer``: after each chunk of the pre-copy or the cleanup, rest so that busy / (busy + rest) <= duty;
    at 1, never rest."""
    rest = Pacer(duty).rest(busy)
    assert rest >= 0 and (busy == 0 or busy / (busy + rest) <= duty + 1e-9)
    assert Pacer(1.0).rest(busy) == 0
    with pytest.raises(ValueError):
        Pacer(0)


def test_keys_on_leases_move_with_their_leases_and_die_with_them_at_the_new_shard() -> None:
    """Shard 2 joins shards 0 and 1. Moving keys on leases are attached to their leases at the new shard:
    each lease's home records shard 2 (``mv_leaseuse``), shard 2 keeps a mirror (``mv_attach``); a key of a
    lease that ended before (its home answers None) or during the move (its drop reached shard 2 first) is
    forgotten there. Afterwards KEEPALIVE refreshes shard 2's mirror, REVOKE's drop deletes the moved keys,
    and a source's stale copies leave their leases at the hand-off (a lease's end no longer touches them)."""
    shards = {s: KVState() for s in range(3)}
    move = Move(EPOCH, 0, 2, V, FROZEN)
    moving = [k for k in (f"k{i}".encode() for i in range(2000)) if move.moving(k)]
    old = Ring(range(2), V)
    on0 = [k for k in moving if old.shard_for(k) == 0]
    on1 = [k for k in moving if old.shard_for(k) == 1]
    staying = next(k for k in (f"s{i}".encode() for i in range(100)) if old.shard_for(k) == 0 and not move.moving(k))
    t = 100

    def put(shard: int, key: bytes, lid: int) -> None:  # what SET key value LEASE lid does (raftkv.leases)
        home = lid & 1023
        left = None if home == shard else shards[home].apply(("lease_use", lid, shard), t)
        assert not isinstance(shards[shard].apply(("lease_put", key, b"v", lid, left), t), CmdError)

    kept = shards[0].apply(("lease_grant", 0, 60_000), t)  # homed at 0; keys on 0 (moving and not) and on 1
    put(0, on0[0], kept)
    put(0, staying, kept)
    put(1, on1[0], kept)
    during = shards[1].apply(("lease_grant", 1, 60_000), t)  # homed at 1, its key on 0: revoked mid-move
    put(0, on0[1], during)
    before = shards[1].apply(("lease_grant", 1, 60_000), t)  # homed at 1, its key on 0: revoked before the use
    put(0, on0[2], before)
    shards[2].apply(("mv_install", EPOCH, 2, V, 0, (), ()), t)
    for s in (0, 1):
        assert shards[s].apply(("mv_freeze", EPOCH, s, 2, V), t) == FROZEN
        items, _ = shards[s].read(("mv_scan", EPOCH, None, 100), t)  # type: ignore[misc]
        shards[2].apply(("mv_install", EPOCH, 2, V, shards[s].revision, tuple(items), ()), t)
    assert shards[1].apply(("lease_revoke", before), t)[1] == (0,)  # type: ignore[index]  # 0's drop: not yet
    rows = {s: shards[s].read(("mv_leases", EPOCH, None, 100), t) for s in (0, 1)}
    assert rows[0] == (sorted([(on0[0], kept), (on0[1], during), (on0[2], before)]), None)
    assert rows[1] == ([(on1[0], kept)], None)
    assert shards[0].read(("mv_leases", EPOCH, None, 2), t)[1] is not None  # type: ignore[index]  # pages
    t += 10
    assert shards[0].apply(("mv_leaseuse", ((kept, 2),)), t) == (60_000 - 10,)
    assert shards[1].apply(("mv_leaseuse", ((during, 2), (before, 2))), t) == (60_000 - 10, None)
    assert shards[1].apply(("lease_revoke", during), t)[1] == (0, 2)  # type: ignore[index]
    assert shards[2].apply(("lease_drop", during, 60_000), t) == 0  # reaches 2 before its attach: a tombstone
    attach0 = ((kept, 60_000 - 10, (on0[0],)), (during, 60_000 - 10, (on0[1],)), (before, None, (on0[2],)))
    assert shards[2].apply(("mv_attach", EPOCH, 0, attach0), t) == 1
    assert shards[2].apply(("mv_attach", EPOCH, 1, ((kept, 60_000 - 10, (on1[0],)),)), t) == 1
    assert shards[2].apply(("mv_attach", EPOCH, 0, attach0), t) == 1  # the second round: the same
    dest = shards[2]
    assert on0[0] in dest.data and on1[0] in dest.data and on0[1] not in dest.data and on0[2] not in dest.data
    assert dest.leases.key_lease == {on0[0]: kept, on1[0]: kept}
    dest.leases.check()
    for s in (0, 1):
        shards[s].apply(("mv_handoff", EPOCH), t)
        assert all(not move.moving(k) for k in shards[s].leases.key_lease)  # left their leases at the hand-off
        shards[s].leases.check()
    dest.apply(("mv_open", EPOCH), t)
    # KEEPALIVE at the home refreshes every shard it names, the new one included
    ttl, told = shards[0].apply(("lease_keepalive", kept), t + 1000)  # type: ignore[misc]
    assert told == (1, 2) and dest.apply(("lease_refresh", kept, ttl), t + 1000) == 1
    # REVOKE: the home deletes its own keys, the drop deletes the moved ones; the sources' stale copies stay
    # for the cleanup (mv_purge), untouched by the lease's end
    assert shards[0].apply(("lease_revoke", kept), t + 2000)[1] == (1, 2)  # type: ignore[index]
    assert staying not in shards[0].data and on0[0] in shards[0].data
    assert dest.apply(("lease_drop", kept, 60_000), t + 2000) == 2
    assert on0[0] not in dest.data and on1[0] not in dest.data and not dest.leases.key_lease
    dest.leases.check()


def test_a_moved_key_dies_at_its_leases_guard_on_the_new_shard_when_no_drop_comes() -> None:
    """The mirror's guard deadline (the home's remaining time, in the new shard's log time) deletes the moved
    key even if the lease's home never reaches the new shard again."""
    src, dst = KVState(), KVState()
    move = Move(EPOCH, 0, 1, V, FROZEN)
    key = next(k for k in (f"k{i}".encode() for i in range(1000)) if move.moving(k))
    lid = src.apply(("lease_grant", 0, 5_000), 0)
    src.apply(("lease_put", key, b"v", lid, None), 0)
    dst.apply(("mv_install", EPOCH, 1, V, 0, (), ()), 0)
    src.apply(("mv_freeze", EPOCH, 0, 1, V), 0)
    dst.apply(("mv_install", EPOCH, 1, V, src.revision, tuple(src.read(("mv_scan", EPOCH, None, 10), 0)[0]), ()),
              0)
    left = src.apply(("mv_leaseuse", ((lid, 1),)), 1_000)
    assert left == (4_000,)
    assert dst.apply(("mv_attach", EPOCH, 0, ((lid, 4_000, (key,)),)), 1_000) == 1
    dst.apply(("mv_open", EPOCH), 1_000)
    assert dst.read(("get", key), 4_999) == b"v"
    assert dst.read(("get", key), 5_000) is None  # the guard passed: gone for readers at once
    dst.apply(("noop",), 5_000)
    assert key not in dst.data and not dst.leases.key_lease


def test_a_removal_moves_keys_on_leases_homed_elsewhere_and_their_homes_forget_the_removed_shard() -> None:
    """Removing shard 2 of 0..2: its keys on a lease homed at shard 0 move with the lease (to the shard the
    ring without 2 gives each); once 2 handed off, shard 0's lease stops naming it (``mv_leaseforget``), so
    KEEPALIVE and the lease's end no longer go to a shard that is gone. ``status`` counts the leases homed at
    2 (what shard 0 adopts, below)."""
    shards = {s: KVState() for s in range(3)}
    after = Ring(range(2), V)
    on2 = [k for k in (f"k{i}".encode() for i in range(3000)) if Ring(range(3), V).shard_for(k) == 2][:6]
    lid = shards[0].apply(("lease_grant", 0, 60_000), 0)
    for key in on2:
        left = shards[0].apply(("lease_use", lid, 2), 0)
        shards[2].apply(("lease_put", key, b"v", lid, left), 0)
    assert reshard.status(shards[2])[3] == 0  # a mirror, no lease homed at 2: nothing stops the removal
    homed = shards[2].apply(("lease_grant", 2, 60_000), 0)
    assert reshard.status(shards[2])[3] == 1  # a lease homed at 2 does
    shards[2].apply(("lease_revoke", homed), 0)
    assert reshard.status(shards[2])[3] == 0
    for d in (0, 1):
        shards[d].apply(("mv_install", EPOCH, d, V, 0, (), (), 2), 0)
    assert shards[2].apply(("mv_freeze", EPOCH, 2, 2, V, True), 0) == FROZEN
    items, _ = shards[2].read(("mv_scan", EPOCH, None, 100), 0)  # type: ignore[misc]
    for d in (0, 1):
        mine = tuple(row for row in items if after.shard_for(row[0]) == d)
        shards[d].apply(("mv_install", EPOCH, d, V, shards[2].revision, mine, (), 2), 0)
    rows, _ = shards[2].read(("mv_leases", EPOCH, None, 100), 0)  # type: ignore[misc]
    assert sorted(k for k, _lid in rows) == sorted(on2)
    dests = sorted({after.shard_for(k) for k in on2})
    left = shards[0].apply(("mv_leaseuse", tuple((lid, d) for d in dests)), 0)
    for d, remaining in zip(dests, left, strict=True):  # type: ignore[arg-type]
        keys = tuple(k for k in on2 if after.shard_for(k) == d)
        assert shards[d].apply(("mv_attach", EPOCH, 2, ((lid, remaining, keys),)), 0) == len(keys)
    shards[2].apply(("mv_handoff", EPOCH), 0)
    for d in (0, 1):
        shards[d].apply(("mv_open", EPOCH), 0)
    assert shards[0].leases.leases[lid].shards == {2, *dests} - {0}
    assert [shards[d].apply(("mv_leaseforget", EPOCH, 2), 0) for d in (0, 1)] == [1, 0]
    assert shards[0].apply(("mv_leaseforget", EPOCH, 2), 0) == 0  # again: nothing left to forget
    assert 2 not in shards[0].apply(("lease_keepalive", lid), 0)[1]  # type: ignore[index]
    assert shards[0].apply(("lease_revoke", lid), 0)[1] == tuple(d for d in dests if d != 0)  # type: ignore[index]
    if 1 in dests:
        assert shards[1].apply(("lease_drop", lid, 60_000), 0) == sum(1 for k in on2 if after.shard_for(k) == 1)
    assert not any(k in shards[d].data for d in (0, 1) for k in on2)


def _remove_shard_2_with_its_leases(shards: dict[int, KVState], now: int) -> list[bytes]:
    """Removing shard 2 of 0..2 as the resharder does (pure): its keys move (with their leases, homed at 2:
    ``mv_leaseuse`` there), it hands off; returns its keys."""
    after = Ring(range(2), V)
    for d in (0, 1):
        shards[d].apply(("mv_install", EPOCH, d, V, 0, (), (), 2), now)
    assert shards[2].apply(("mv_freeze", EPOCH, 2, 2, V, True), now) == FROZEN
    items, _ = shards[2].read(("mv_scan", EPOCH, None, 1000), now)  # type: ignore[misc]
    for d in (0, 1):
        mine = tuple(row for row in items if after.shard_for(row[0]) == d)
        shards[d].apply(("mv_install", EPOCH, d, V, shards[2].revision, mine, (), 2), now)
    rows, _ = shards[2].read(("mv_leases", EPOCH, None, 1000), now)  # type: ignore[misc]
    pairs = sorted({(lid, after.shard_for(k)) for k, lid in rows})
    left = dict(zip(pairs, shards[2].apply(("mv_leaseuse", tuple(pairs), 2), now), strict=True))  # type: ignore
    for (lid, d), remaining in left.items():
        keys = tuple(k for k, x in rows if x == lid and after.shard_for(k) == d)
        shards[d].apply(("mv_attach", EPOCH, 2, ((lid, remaining, keys),)), now)
    assert shards[2].apply(("mv_handoff", EPOCH), now) == HANDOFF
    return [row[0] for row in items]


def test_a_removal_moves_the_leases_homed_on_the_removed_shard_to_shard_0() -> None:
    """Shard 2 is the home of leases with keys on 0, 1 and 2, one of them with a pending drop; once it handed
    off it refuses every lease command (``-WRONGSHARD`` naming shard 0, session-wrapped too), and shard 0 adopts
    its leases from ``mv_leasehomes`` in chunks: each alive one a home lease there with at least the time it had
    left, a mirror it held becoming its home keys, the ended one a drop for the shards that hold its keys.
    KEEPALIVE, TTL and REVOKE then work on shard 0 and reach the other shards; a re-run of the adoption, even
    after one adopted lease ended on shard 0, takes nothing twice and brings nothing back."""
    shards = {s: KVState() for s in range(3)}
    ring = Ring(range(3), V)
    on = {s: [k for k in (f"k{i}".encode() for i in range(400)) if ring.shard_for(k) == s][:4] for s in range(3)}
    ids = [shards[2].apply(("lease_grant", 2, ttl), 0) for ttl in (60_000, 60_000, 30_000)]
    kept, ended, short = ids
    for lid in ids:  # keys on every shard: on 2 at home, elsewhere as mirrors (lease_use, lease_put)
        for s, keys in on.items():
            for key in keys[ids.index(lid)::3]:
                left = None if s == 2 else shards[2].apply(("lease_use", lid, s), 0)
                assert isinstance(shards[s].apply(("lease_put", key, b"v", lid, left), 0), int)
    shards[2].apply(("lease_revoke", ended), 1_000)  # a drop still owed to 0 and 1
    assert set(shards[2].leases.dropping) == {ended}
    moved = _remove_shard_2_with_its_leases(shards, 2_000)
    refused = shards[2].apply(("lease_keepalive", kept), 2_000)
    assert isinstance(refused, CmdError) and refused.code == "WRONGSHARD" and refused.message.startswith(f"{EPOCH} 0")
    wrapped = shards[2].apply(("session", b"c1", 1, ("lease_keepalive", kept)), 2_000)
    assert isinstance(wrapped, CmdError) and wrapped.code == "WRONGSHARD"
    assert isinstance(shards[2].read(("lease_ttl", kept), 2_000), CmdError)
    # shard 0 adopts, one lease per chunk, with a re-run of the first chunk
    after, chunks = None, []
    while True:
        rows, seq, after = shards[2].read(("mv_leasehomes", EPOCH, after, 1), 3_000)  # type: ignore[misc]
        chunks.append(rows)
        if after is None:
            break
    assert seq == 3 and sorted(r[0] for c in chunks for r in c) == sorted(ids)
    assert [shards[0].apply(("mv_leaseadopt", EPOCH, 2, c, False), 3_000) for c in chunks[:2]] == [1, 1]
    assert shards[0].apply(("mv_leaseadopt", EPOCH, 2, chunks[0], False), 3_000) == 0  # taken already
    assert shards[0].apply(("mv_leaseadopt", EPOCH, 2, chunks[2], True), 3_000) == 1
    zero = shards[0].leases
    zero.check()
    assert zero.adopted == {2: EPOCH} and not zero.adopting
    for lid, ttl in ((kept, 60_000), (short, 30_000)):
        lease = zero.leases[lid]
        assert lease.home and lease.ttl_ms == ttl and lease.deadline_ms >= 3_000 + (ttl - 3_000)
        assert lease.shards == {1}  # 2 is gone; 0 is the home itself
        i = ids.index(lid)  # its keys on 0: those put there, and those of 2 the ring without 2 gave to 0
        assert lease.keys == set(on[0][i::3]) | {k for k in on[2][i::3] if Ring(range(2), V).shard_for(k) == 0}
        assert all(k in moved for k in on[2][i::3])
    assert zero.dropping[ended][1] == {1} and ended not in zero.leases
    assert not any(k in shards[0].data for k in on[0][1::3])  # the ended lease's mirror keys on 0 went with it
    # the leases work on their new home: KEEPALIVE names the other shards to refresh, REVOKE the ones to drop
    assert shards[0].apply(("lease_keepalive", kept), 4_000) == (60_000, (1,))
    assert shards[0].read(("lease_ttl", kept), 4_000)[0] == 60_000  # type: ignore[index]
    assert shards[0].apply(("lease_revoke", short), 4_000) == (30_000, (1,))
    # after the short lease ended on 0, a re-run of the adoption brings nothing back
    assert shards[0].apply(("mv_leaseadopt", EPOCH, 2, chunks[2], True), 5_000) == 0
    assert short not in zero.leases
    zero.check()


def test_lease_ids_of_a_removed_shard_route_to_shard_0_and_a_shard_added_again_numbers_above_them() -> None:
    """``home_in``: ids a removed shard granted up to the recorded sequence number live on shard 0, later ones
    (a shard added again with the same number grants above the floor its map gives ``lease_grant``) on it."""
    from raftkv.leases import home_in, lease_id

    moved = {2: 7}
    assert [home_in(lease_id(seq, 2), moved) for seq in (1, 7, 8)] == [0, 0, 2]
    assert home_in(lease_id(3, 1), moved) == 1 and home_in(lease_id(3, 2), {}) == 2
    again = KVState()
    lid = again.apply(("lease_grant", 2, 1_000, 7), 0)
    assert lid == lease_id(8, 2) and home_in(lid, moved) == 2
    assert again.apply(("lease_grant", 2, 1_000, 7), 0) == lease_id(9, 2)  # the floor only ever lifts the count


def test_a_destination_that_received_nothing_answers_a_discard_without_walking_its_keys() -> None:
    """A removal's destination counts the keys installed since its move began (``arrived``, kept in a
    snapshot): with none, ``mv_discard`` and a given-up removal's ``mv_abort`` answer without walking the
    shard's own keys (every removal's first discard used to walk them all, stalling the node's driver); once
    keys arrived, a discard walks and forgets exactly those; a snapshot without the count walks."""
    ring = Ring(range(3), V)
    d = KVState()
    own = [k for k in (f"k{i}".encode() for i in range(600)) if ring.shard_for(k) == 0][:50]
    for k in own:
        d.apply(("set", k, b"mine"), 0)
    d.apply(("mv_install", EPOCH, 0, V, 0, (), (), 2), 0)
    assert d.arrived == 0

    class Unwalkable:  # the shard's keys, refusing to be walked
        def __init__(self, data: Any) -> None:
            self.data = data

        def keys_between(self, *a: Any) -> Any:
            raise AssertionError("walked the keys")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.data, name)

    real, d.data = d.data, Unwalkable(d.data)  # type: ignore[assignment]
    assert d.apply(("mv_discard", EPOCH, 2, None, 100), 0) == (0, None)
    assert d.apply(("mv_discard", EPOCH, 2), 0) == 0
    d.data = real
    arriving = [k for k in (f"a{i}".encode() for i in range(600))
                if ring.shard_for(k) == 2 and Ring(range(2), V).shard_for(k) == 0][:7]
    d.apply(("mv_install", EPOCH, 0, V, 0, tuple((k, b"moved", None) for k in arriving), (), 2), 0)
    assert d.arrived == len(arriving)
    copy = KVState()
    copy.load_extra(d.extra())
    assert copy.arrived == len(arriving)
    extra = d.extra()
    del extra["arrived"]
    copy.load_extra(extra)
    assert copy.arrived is None  # a snapshot from before the count: unknown, so a discard walks
    forgotten, cursor = 0, None
    while True:
        n, cursor = d.apply(("mv_discard", EPOCH, 2, cursor, 10), 0)  # type: ignore[misc]
        forgotten += n
        if cursor is None:
            break
    assert forgotten == len(arriving) and all(k in d.data for k in own) and not any(k in d.data for k in arriving)
    assert d.apply(("mv_abort", EPOCH), 0) == "aborted"

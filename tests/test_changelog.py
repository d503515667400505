"""The change feed of a shard (raftkv.changelog): what is retained, what a cursor gets, what is refused."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.changelog import ChangeLog
from raftkv.results import CmdError
from raftkv.state import KVState

from .conftest import examples

KEYS = [b"a", b"ab", b"b"]
changes = st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(st.none(), st.sampled_from([b"", b"x", b"xyz"]))),
                   max_size=40)


def match_for(key: bytes, prefix: bool):
    return (lambda k: k.startswith(key)) if prefix else (lambda k: k == key)


@settings(max_examples=examples(300), deadline=None)
@given(changes, st.integers(1, 6), st.integers(1, 12), st.integers(0, 45), st.sampled_from(KEYS), st.booleans(),
       st.integers(1, 5))
def test_the_log_answers_like_the_full_history_or_refuses(writes, events_max, bytes_max, after, key, prefix,
                                                          count) -> None:
    log = ChangeLog(events_max=events_max, bytes_max=bytes_max)
    history = []  # every change ever, the model
    for rev, (k, v) in enumerate(writes, start=1):
        log.record(rev, k, v)
        history.append((rev, k, v))
    revision = len(writes)
    # Retained: exactly the newest changes, everything after the floor, within both limits.
    assert list(log.events) == [e for e in history if e[0] > log.floor]
    assert len(log.events) <= events_max and log.bytes <= bytes_max
    assert log.bytes == sum(len(k) + len(v or b"") for _, k, v in log.events)

    got = log.since(min(after, revision), match_for(key, prefix), count, revision)
    after = min(after, revision)
    if after < log.floor:
        assert isinstance(got, CmdError) and got.code == "COMPACTED"
        assert got.message.startswith(f"oldest={log.floor}:")
        return
    want = [e for e in history if e[0] > after and match_for(key, prefix)(e[1])]
    events, cursor = got
    assert events == want[:count]
    # The cursor covers exactly what was answered: nothing matching between the last event and it.
    assert cursor == (want[count - 1][0] if len(want) >= count else revision)


@settings(max_examples=examples(200), deadline=None)
@given(changes, st.lists(st.integers(2, 4), min_size=1, max_size=30))
def test_a_watcher_that_keeps_up_sees_every_change_once_in_order(writes, counts) -> None:
    """Keeping up: it takes at least as many events per poll as are written between polls (2), and the
    window (4) holds what is written between two polls: then it is never refused."""
    log, cursor, seen = ChangeLog(events_max=4, bytes_max=1 << 20), 0, []
    pending = list(enumerate(writes, start=1))
    for count in counts:
        for rev, (k, v) in pending[:2]:  # two changes between polls: never more than the window
            log.record(rev, k, v)
        pending = pending[2:]
        got = log.since(cursor, match_for(b"", True), count, len(writes) - len(pending))
        assert not isinstance(got, CmdError), got
        events, cursor = got
        seen += events
    applied = len(writes) - len(pending)
    while cursor < applied:  # drain what is left
        events, cursor = log.since(cursor, match_for(b"", True), 4, applied)
        seen += events
    assert seen == [(rev, k, v) for rev, (k, v) in enumerate(writes[:applied], start=1)]


def test_a_cursor_ahead_of_the_shard_is_refused() -> None:
    got = ChangeLog().since(5, match_for(b"k", False), 10, revision=3)
    assert isinstance(got, CmdError) and got.code == "ERR"


# -- inside the state machine ---------------------------------------------------------------------

state_commands = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.sampled_from([b"1", b"2"])),
    st.tuples(st.just("del"), st.lists(st.sampled_from(KEYS), min_size=1, max_size=2)),
    st.tuples(st.just("incrby"), st.sampled_from(KEYS), st.just(1)),
    st.tuples(st.just("txn"), st.just(()), st.tuples(st.tuples(st.just("put"), st.sampled_from(KEYS), st.just(b"t")),
                                                      st.tuples(st.just("del"), st.sampled_from(KEYS))), st.just(())),
    st.tuples(st.just("expire"), st.sampled_from(KEYS), st.integers(-1, 3), st.just(False), st.just(None)),
    st.tuples(st.just("noop")),
), max_size=40)


def replay(events) -> dict:
    data: dict = {}
    for _rev, k, v in events:
        if v is None:
            assert k in data, "a deletion event for a key that did not exist"
            del data[k]
        else:
            data[k] = v
    return data


@settings(max_examples=examples(200), deadline=None)
@given(state_commands, st.integers(0, 40))
def test_replaying_the_feed_rebuilds_the_data_and_survives_snapshots(cmds, cut) -> None:
    s = KVState()
    for i, cmd in enumerate(cmds[:cut]):
        s.apply(cmd, now_ms=i)
    s = KVState.restore(s.snapshot())  # a restarted replica serves the same history
    for i, cmd in enumerate(cmds[cut:], start=cut):
        s.apply(cmd, now_ms=i)
    s.apply(("noop",), now_ms=10_000)  # reap every key whose deadline passed
    events, cursor = s.read(("changes", b"", True, 0, 10_000), now_ms=10_000)
    assert cursor == s.revision
    assert replay(events) == {k: v for k, (v, _rev) in s.data.items()}
    newest = {k: rev for rev, k, _v in events}
    assert all(newest[k] == rev for k, (_v, rev) in s.data.items()), "a key's revision is its newest change"


def test_old_snapshots_and_backup_loads_have_no_history_before_them() -> None:
    s = KVState()
    s.apply(("set", b"k", b"1"), 0)
    s.apply(("bk_load", [(b"restored", b"v", 7)], 7), 1)
    got = s.read(("changes", b"k", False, 0, 10))
    assert isinstance(got, CmdError) and got.message.startswith("oldest=7")
    assert s.read(("changes", b"k", False, 7, 10)) == ([], 7)
    legacy = KVState()
    legacy.apply(("set", b"k", b"1"), 0)
    legacy.load_extra(None)  # what a version 1/2 snapshot restores to
    assert isinstance(legacy.read(("changes", b"k", False, 0, 10)), CmdError)
    assert legacy.read(("changes", b"k", False, None, 10)) == ([], 1)


# -- delivery: the client's cursors over replicas that lag, lose replies and change leaders -------------

SHARD_OF = {b"a": 0, b"ab": 1, b"b": 1}


class FakeShards:
    """Two shards of three replicas each, applying one log per shard at their own pace; a poll is answered
    by any replica that has applied the cursor it is asked about (as after a leader change), and a reply
    may be lost on its way (the client then sends the same request again)."""

    def __init__(self, rng) -> None:
        self.rng = rng
        self.logs: dict[int, list[tuple]] = {0: [], 1: []}
        self.replicas = {s: [(KVState(), [0]) for _ in range(3)] for s in (0, 1)}

    def write(self, key: bytes, value: bytes | None) -> None:
        self.logs[SHARD_OF[key]].append(("set", key, value) if value is not None else ("del", [key]))
        for shard, replicas in self.replicas.items():
            for state, applied in replicas:  # each replica catches up by a random amount
                target = self.rng.randint(applied[0], len(self.logs[shard]))
                for i in range(applied[0], target):
                    state.apply(self.logs[shard][i], now_ms=i)
                applied[0] = target

    def caught_up(self, shard: int) -> KVState:
        state, applied = self.replicas[shard][0]
        for i in range(applied[0], len(self.logs[shard])):
            state.apply(self.logs[shard][i], now_ms=i)
        applied[0] = len(self.logs[shard])
        return state

    def call(self, args: list[bytes]) -> object:
        from raftkv.changelog import encode_cursor
        from raftkv.server.commands.watch import decode_cursor, event_rows

        while True:
            _, kind, subject, _, raw, _, count = args[:7]
            prefix = kind == b"PREFIX"
            shards = [0, 1] if prefix else [SHARD_OF[subject]]
            cursors, rows = decode_cursor(raw, shards), []
            for s in shards:
                fresh = [st for st, _ in self.replicas[s] if cursors[s] is None or st.revision >= cursors[s]]
                state = self.rng.choice(fresh or [self.caught_up(s)])
                events, cursors[s] = state.read(("changes", subject, prefix, cursors[s], int(count)))
                rows += event_rows(s, events)
            if self.rng.random() < 0.7:  # else the reply is lost: the client retries the same request
                return [encode_cursor(cursors, prefix), rows]


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(st.none(), st.sampled_from([b"1", b"2"]))), max_size=30),
       st.sampled_from([(b"", True), (b"a", True), (b"b", False)]), st.integers(0, 2**32), st.integers(1, 3))
def test_a_watch_hands_out_every_change_once_however_it_is_served_and_resumed(writes, subject, seed,
                                                                           count) -> None:
    import random

    from raftkv.watchclient import Watch

    key, prefix = subject
    shards_of_watch = [0, 1] if prefix else [SHARD_OF[key]]
    rng = random.Random(seed)
    cluster = FakeShards(rng)
    w = Watch(cluster.call, key, prefix, shards_of_watch, 0, block_s=0, count=count)
    seen, expected = [], []
    for k, v in writes:
        cluster.write(k, v)
        if rng.random() < 0.4:  # the consumer takes a few events, stops, and resumes from its cursors
            stop_after = rng.randint(1, 3)
            for n, e in enumerate(w.handing_out(*w.fetch(block=False)), start=1):  # one step of iter(w)
                seen.append(e)
                if n >= stop_after:
                    break
            w = Watch(cluster.call, key, prefix, shards_of_watch, dict(w.cursors), block_s=0, count=count)
    for s in shards_of_watch:  # drain
        cluster.caught_up(s)
    while any(w.cursors is None or w.cursors[s] < cluster.caught_up(s).revision for s in shards_of_watch):
        seen += w.poll(block=False)
    for s in shards_of_watch:
        events, _ = cluster.caught_up(s).read(("changes", key, prefix, 0, 10_000))
        expected += [(s, rev, k, v) for rev, k, v in events]
    assert sorted((e.shard, e.revision, e.key, e.value) for e in seen) == sorted(expected)  # all, once
    for s in shards_of_watch:
        revs = [e.revision for e in seen if e.shard == s]
        assert revs == sorted(revs), "out of order within a shard"


def test_the_replicas_snapshot_format_keeps_the_change_log() -> None:
    s = KVState()
    for i in range(5):
        s.apply(("set", b"k%d" % i, b"v"), now_ms=i)
    s.apply(("del", [b"k0"]), now_ms=9)
    loaded = KVState.from_chunks(s.freeze().chunks(keys_per_chunk=2))  # what ShardReplica writes and reads
    assert loaded.read(("changes", b"k", True, 0, 100)) == s.read(("changes", b"k", True, 0, 100))
    assert loaded.changes.floor == s.changes.floor == 0

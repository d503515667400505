"""The engine journal (raftkv.raftlog) against a list model: what a restart finds is what the last sync covered.

Random sequences of pysyncobj's journal operations (append, tail truncation, compaction, clear, atomic replace,
term/vote and commit writes) run on an ``EngineJournal``; at random points the "process" dies (the engine is
closed with whatever it buffered) and the journal is reopened from the engine. The reopened log and hard state
must equal the model as of the last completed sync, and a term/vote write is durable when it returns.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pysyncobj.journal import FileJournal

from raftkv.engine import Engine
from raftkv.raftlog import EngineJournal

OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 4)),
    st.tuples(st.just("trunc_tail"), st.integers(0, 10)),
    st.tuples(st.just("compact"), st.integers(0, 10)),
    st.tuples(st.just("clear"), st.just(0)),
    st.tuples(st.just("replace"), st.integers(0, 5)),
    st.tuples(st.just("term"), st.integers(1, 3)),
    st.tuples(st.just("commit"), st.just(0)),
    st.tuples(st.just("sync"), st.just(0)),
    st.tuples(st.just("crash"), st.just(0)),
), max_size=60)


class Model:
    """What the journal holds now, and what it held at the last sync."""

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, int, int]] = []
        self.hard: tuple[int, Any, int] = (0, None, 1)
        self.durable = (list(self.entries), self.hard)

    def synced(self) -> None:
        self.durable = (list(self.entries), self.hard)


def _open(path: str) -> tuple[Engine, EngineJournal]:
    engine = Engine(path, map_size=1 << 24)
    return engine, EngineJournal.open(engine, 7)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_reopened_journal_is_the_last_synced_state(tmp_path_factory: Any, ops: list[tuple[str, int]]) -> None:
    path = str(tmp_path_factory.mktemp("engine"))
    engine, journal = _open(path)
    other = EngineJournal.open(engine, 8)  # a second group on the same engine must never be touched
    other.add(b"other", 1, 1)
    other.flush()
    model = Model()
    next_idx, term = 1, 1
    try:
        for op, arg in ops:
            if op == "add":
                for _ in range(arg):
                    entry = (b"cmd%d" % next_idx, next_idx, term)
                    journal.add(*entry)
                    model.entries.append(entry)
                    next_idx += 1
            elif op == "trunc_tail" and model.entries:
                pos = arg % len(model.entries)
                journal.deleteEntriesFrom(pos)
                del model.entries[pos:]
                next_idx = model.entries[-1][1] + 1 if model.entries else next_idx
            elif op == "compact":
                journal.deleteEntriesTo(arg)
                model.entries = model.entries[arg:]
            elif op == "clear":
                journal.clear()
                model.entries = []
            elif op == "replace":
                new = [(b"snap%d" % k, next_idx + k, term) for k in range(arg)]
                journal.replace_entries(new)
                model.entries = list(new)
                next_idx += arg
                model.synced()  # replace_entries is durable on return
            elif op == "term":
                term += arg
                journal.setCurrentTerm(term, f"node{term}")
                model.hard = (term, f"node{term}", model.hard[2])
                model.synced()  # a vote is durable before it can be sent
            elif op == "commit" and model.entries:
                journal.setRaftCommitIndex(model.entries[-1][1])
                model.hard = (model.hard[0], model.hard[1], model.entries[-1][1])
            elif op == "sync":
                journal.flush()
                assert not journal.needs_flush
                model.synced()
            elif op == "crash":
                engine.close()
                engine, journal = _open(path)
                model.entries, model.hard = list(model.durable[0]), model.durable[1]
                assert list(journal[i] for i in range(len(journal))) == model.entries
                assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == model.hard[:2]
                last = model.entries[-1][1] if model.entries else None
                assert journal.getRaftCommitIndex() == (min(model.hard[2], last) if last else model.hard[2])
                next_idx = (last + 1) if last else next_idx
                assert [EngineJournal.open(engine, 8)[0]] == [(b"other", 1, 1)]
    finally:
        engine.close()


def test_old_layout_journal_is_migrated_once(tmp_path: Any) -> None:
    """A data dir of the old layout (pysyncobj's journal + .meta) is copied into the engine on first open."""
    legacy = os.path.join(tmp_path, "shard-0.journal")
    old = FileJournal(legacy)
    for k in range(1, 6):
        old.add(b"e%d" % k, k, 2)
    old.setRaftCommitIndex(4)  # pysyncobj writes .meta (commit included) on a term change
    old.setCurrentTerm(3, "127.0.0.1:9")
    old.flush()
    old._destroy()
    engine = Engine(os.path.join(tmp_path, "engine"), map_size=1 << 24)
    try:
        journal = EngineJournal.open(engine, 0, legacy_journal=legacy)
        assert [journal[i][1] for i in range(len(journal))] == [1, 2, 3, 4, 5]
        assert (journal.getCurrentTerm(), journal.getVotedForNodeId(), journal.getRaftCommitIndex()) == (
            3, "127.0.0.1:9", 4)
        assert not os.path.exists(legacy) and os.path.exists(legacy + ".migrated")
        again = EngineJournal.open(engine, 0, legacy_journal=legacy)
        assert len(again) == 5
    finally:
        engine.close()


def test_a_commit_index_change_alone_asks_for_no_commit_and_rides_along(tmp_path: Any) -> None:
    """Raft needs the commit index only as a hint after a restart: setting it must not cost a commit of its own
    (nothing an ack or a vote depends on changed), yet the next commit carries it, after the entries it covers."""
    engine, journal = _open(str(tmp_path))
    try:
        journal.add(b"a", 1, 1)
        journal.flush()
        commits = engine.stats().count
        journal.setRaftCommitIndex(1)
        assert not journal.needs_flush and journal.unsynced_seq() == 0
        journal.request_flush()
        assert engine.stats().count == commits, "a commit index change alone was committed"
        journal.add(b"b", 2, 1)
        assert journal.needs_flush
        journal.request_flush()  # not pipelined: commits now
        assert engine.stats().count == commits + 1
        engine.close()
        engine, journal = _open(str(tmp_path))
        assert journal.getRaftCommitIndex() == 1 and len(journal) == 2
    finally:
        engine.close()


def test_durable_index_is_the_end_of_the_durable_prefix(tmp_path: Any) -> None:
    """What a leader may count itself for: entries up to the first one not yet committed."""
    engine, journal = _open(str(tmp_path))
    try:
        for i in (1, 2):
            journal.add(b"e", i, 1)
        assert journal.durable_index() == 0
        journal.flush()
        journal.add(b"e", 3, 1)
        assert journal.durable_index() == 2
        journal.deleteEntriesFrom(2)  # entry 3 gone, its replacement not yet durable
        journal.add(b"f", 3, 2)
        assert journal.durable_index() == 2
        journal.flush()
        assert journal.durable_index() == 3
    finally:
        engine.close()


def test_without_metasync_a_commit_is_durable_only_once_a_later_flush_completed(tmp_path: Any) -> None:
    """``metasync=False``: a commit's meta page is flushed by the next commit's fsync, so the engine counts the
    commit durable only then (or after an explicit meta flush: what ``sync`` and an idle committer do)."""
    points: list[str] = []
    engine = Engine(str(tmp_path), map_size=1 << 24, metasync=False, point=points.append)
    try:
        # A committer with more to commit skips the meta flush: the step it repeats, played here by hand.
        first = engine.put(b"k1", b"v")
        with engine._commit_lock:
            engine._commit_buffered()
        assert not engine.covers(first), "counted durable while a power loss could still undo it"
        second = engine.put(b"k2", b"v")
        with engine._commit_lock:
            engine._commit_buffered()
        assert engine.covers(first) and not engine.covers(second)
        engine.sync()
        assert engine.covers(second)
        assert points == ["engine.commit.before", "engine.commit.written"] * 2 + ["engine.commit.after"]
        third = engine.put(b"k3", b"v")
        engine.sync()  # commit + meta flush
        assert engine.covers(third) and engine.stats().meta_flushes == 2
    finally:
        engine.close()


def test_a_pipelined_engine_commits_in_the_background_and_says_when(tmp_path: Any) -> None:
    """``request_commit`` returns at once; the committer thread commits and calls back; ``sync`` still blocks
    until everything buffered before it is durable."""
    import threading

    engine = Engine(str(tmp_path), map_size=1 << 24)
    done = threading.Event()
    engine.start_committer(done.set)
    try:
        seq = engine.put(b"k", b"v")
        engine.request_commit()
        assert done.wait(10) and engine.covers(seq)
        seq = engine.put(b"k", b"w")
        engine.sync()
        assert engine.covers(seq) and engine.get(b"k") == b"w"
    finally:
        engine.close()


def test_injected_sync_latency_delays_every_durable_commit_and_is_counted(tmp_path: Any) -> None:
    """The slow-disk fault (``Engine.delay_s``): group commits and ``commit_now`` each take at least the delay,
    the commit-time counters include it, and a commit with nothing buffered does not wait; 0 turns it off."""
    eng = Engine(str(tmp_path / "engine"))
    try:
        eng.delay_s = 0.05
        eng.sync()  # nothing buffered: no commit, no delay
        assert eng.stats().count == 0
        seq = eng.put(b"k", b"v")
        eng.sync()
        assert eng.covers(seq) and eng.get(b"k") == b"v"
        eng.commit_now(lambda batch: batch.put(b"k2", b"v2"))
        st = eng.stats()
        assert st.count == 2 and st.last_s >= 0.05 and st.total_s >= 0.1
        eng.delay_s = 0.0
        eng.put(b"k", b"w")
        eng.sync()
        assert eng.get(b"k") == b"w" and eng.stats().count == 3
    finally:
        eng.close()

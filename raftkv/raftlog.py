"""One Raft group's log and hard state, stored in the node's ``Engine`` (a pysyncobj ``Journal``).

Layout (big-endian numbers, so one group's entries sort by index and groups never interleave):

* ``b"L" + u32 group + u64 index`` -> ``u64 term + command``: the log entries;
* ``b"H" + u32 group`` -> pickled ``(term, voted_for, commit_index)``: the hard state.

pysyncobj reads the log by position all the time, so the entries are also kept in a list in memory (as its
own journals do); the engine is read once, at start-up. Every change is buffered in the engine and made durable
by ``flush()`` (``Engine.sync``: one commit for every group of the node), with these rules:

* the term and vote are durable before ``setCurrentTerm`` returns, so before a vote can be sent;
* the commit index is written in the same buffer as the entries it covers, after them, so a commit that
  carries it carries them: the durable commit index never names an entry the durable log lacks. A change of
  the commit index alone asks for no commit (``needs_flush`` stays false): Raft needs the commit index only
  as a hint after a restart (an older one is safe), so it rides along with the next commit that carries
  entries or a term instead of costing each node one more commit per write;
* truncation (tail or prefix), clearing and ``replace_entries`` are range deletions in that same buffer: a
  crash leaves the log as of the last commit, never half rewritten.

With a pipelined engine (``Engine.start_committer``) ``request_flush()`` asks for that commit without waiting
for it; ``unsynced_seq``/``covers`` tell raftfix what the group's outgoing messages must wait for, and
``durable_index`` how far a leader may count itself.

A group whose data dir still holds the journal files of the old layout (``shard-N.journal`` and ``.meta``)
is migrated on open: the entries and the hard state are copied into the engine in one commit, then the old
files are renamed ``*.migrated``.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from typing import Any

from pysyncobj.journal import FileJournal, Journal

from raftkv.engine import Engine

_LOG, _HARD = b"L", b"H"
_TERM = struct.Struct(">Q")


def _log_key(group: int, idx: int) -> bytes:
    return _LOG + struct.pack(">IQ", group, idx)


def _log_bounds(group: int) -> tuple[bytes, bytes]:
    """``[lo, hi)`` covering every log key of ``group``."""
    return _LOG + struct.pack(">I", group), _LOG + struct.pack(">I", group + 1)


def _hard_key(group: int) -> bytes:
    return _HARD + struct.pack(">I", group)


class EngineJournal(Journal):
    """The log and hard state of Raft group ``group`` in ``engine``; ``needs_flush``/``flush()`` as raftfix expects."""

    def __init__(self, engine: Engine, group: int, defer_term: bool = False) -> None:
        self._engine = engine
        self._group = group
        self._defer_term = defer_term
        self._entries: list[tuple[bytes, int, int]] = []
        self._last_seq = 0  # engine sequence number of this group's latest write that acks/votes depend on
        self._buffered_seq = 0  # ... of its latest write of any kind (a commit index change included)
        # (seq, index) of appended entries not yet known durable, oldest first (durable_index)
        self._unsynced: collections.deque[tuple[int, int]] = collections.deque()
        lo, hi = _log_bounds(group)
        for key, value in engine.scan(lo, hi):
            idx = struct.unpack(">Q", key[-8:])[0]
            self._entries.append((value[8:], idx, _TERM.unpack_from(value)[0]))
        raw = engine.get(_hard_key(group))
        self._term, self._vote, self._commit = pickle.loads(raw) if raw is not None else (0, None, 1)

    @classmethod
    def open(cls, engine: Engine, group: int, legacy_journal: str | None = None,
             defer_term: bool = False) -> EngineJournal:
        """The group's journal; first migrates ``legacy_journal`` (old-layout files) if the engine has none.

        ``defer_term``: a term/vote write is made durable by the next flush instead of at once, for a driver that
        sends nothing of a loop before that loop's flush (``raftkv.driver``); one commit then covers every
        group's term changes, which keeps an election burst over many groups from costing a sync each.
        """
        journal = cls(engine, group, defer_term)
        if legacy_journal and os.path.exists(legacy_journal) and not journal._entries:
            journal._migrate(legacy_journal)
        return journal

    def _migrate(self, path: str) -> None:
        old = FileJournal(path)
        try:
            entries = [old[i] for i in range(len(old))]
            hard = (old.getCurrentTerm(), old.getVotedForNodeId(), old.getRaftCommitIndex())
        finally:
            old._destroy()
        for command, idx, term in entries:
            self.add(command, idx, term)
        self._term, self._vote = hard[0], hard[1]
        self._commit = min(hard[2], entries[-1][1]) if entries else hard[2]
        self._write_hard()
        self.flush()
        for suffix in ("", ".meta"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, path + suffix + ".migrated")

    # ---- pysyncobj Journal -----------------------------------------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        self._entries.append((command, idx, term))
        self._wrote(self._engine.put(_log_key(self._group, idx), _TERM.pack(term) + command))
        self._unsynced.append((self._last_seq, idx))

    def clear(self) -> None:
        self._entries = []
        self._unsynced.clear()
        self._wrote(self._engine.delete_range(*_log_bounds(self._group)))

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802,N803 - pysyncobj's names
        """Drop the entries at positions ``entryFrom`` and later (a tail truncation)."""
        if entryFrom >= len(self._entries):
            return
        first = self._entries[entryFrom][1]
        del self._entries[entryFrom:]
        unsynced = self._unsynced
        while unsynced and unsynced[-1][1] >= first:
            unsynced.pop()  # gone from the log: whatever replaces them is appended (and tracked) anew
        self._wrote(self._engine.delete_range(_log_key(self._group, first), _log_bounds(self._group)[1]))

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802,N803
        """Drop the entries before position ``entryTo`` (log compaction)."""
        if entryTo <= 0:
            return
        if entryTo >= len(self._entries):
            self.clear()
            return
        keep_from = self._entries[entryTo][1]
        self._entries = self._entries[entryTo:]
        unsynced = self._unsynced
        while unsynced and unsynced[0][1] < keep_from:
            unsynced.popleft()
        self._wrote(self._engine.delete_range(_log_bounds(self._group)[0], _log_key(self._group, keep_from)))

    def replace_entries(self, entries: list[tuple[bytes, int, int]]) -> None:
        """Make ``entries`` the whole log, atomically and durably (one engine commit)."""
        self.clear()
        for entry in entries:
            self.add(*entry)
        self.flush()

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        """Nothing to release: the engine belongs to the node."""

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802,N803
        self._commit = raftCommitIndex
        self._write_hard(must_sync=False)

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return min(self._commit, self._entries[-1][1]) if self._entries else self._commit

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:  # noqa: N802,N803
        self._term, self._vote = term, votedForNodeId
        self._write_hard()
        if not self._defer_term:
            self.flush()  # a vote must be durable before it is sent

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self._term

    def getVotedForNodeId(self) -> Any:  # noqa: N802
        return self._vote

    def _write_hard(self, must_sync: bool = True) -> None:
        record = pickle.dumps((self._term, self._vote, self._commit), protocol=pickle.HIGHEST_PROTOCOL)
        self._wrote(self._engine.put(_hard_key(self._group), record), must_sync)

    def _wrote(self, seq: int, must_sync: bool = True) -> None:
        self._buffered_seq = seq
        if must_sync:
            self._last_seq = seq

    # ---- raftfix durability interface ------------------------------------------------------------------------

    @property
    def needs_flush(self) -> bool:
        """This group buffered writes that acks or votes depend on and no commit has made durable yet."""
        return not self._engine.covers(self._last_seq)

    def flush(self) -> None:
        """Make every write of this group durable, a commit index change included (one engine commit covers
        every group's writes)."""
        if not self._engine.covers(self._buffered_seq):
            self._engine.sync()

    def request_flush(self) -> None:
        """Have this group's writes made durable: without waiting if the engine is pipelined (see ``covers``)."""
        if self.needs_flush:
            self._engine.request_commit()

    def unsynced_seq(self) -> int:
        """0 if every write of this group is durable, else the sequence number a commit must cover first."""
        seq = self._last_seq
        return 0 if self._engine.covers(seq) else seq

    def covers(self, seq: int) -> bool:
        """Whether the writes up to ``seq`` (an ``unsynced_seq`` value) are durable."""
        return self._engine.covers(seq)

    def durable_index(self) -> int:
        """The log index up to which every entry in the log is durable (the leader counts itself that far)."""
        unsynced = self._unsynced
        while unsynced and self._engine.covers(unsynced[0][0]):
            unsynced.popleft()
        if unsynced:
            return unsynced[0][1] - 1
        return self._entries[-1][1] if self._entries else 0

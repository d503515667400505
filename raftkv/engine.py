"""The node's storage engine: one LMDB environment holds every Raft group's log and hard state.

Why LMDB (docs/engine.md has the measurements): a write transaction is a copy-on-write B+tree commit that
becomes visible and durable atomically, with no write-ahead log of our own and no rename windows: a process
killed at any instant leaves the database as of the last completed commit, and with ``sync`` on (the default)
so does a power loss, given a disk that honours fsync. Pages live in the page cache, not in Python memory.

Write path (group commit): callers buffer operations (``put``, ``delete``, ``delete_range``) from any thread;
``sync()`` applies everything buffered so far, by every group, in ONE write transaction with one durable
commit. Each buffered operation gets a sequence number, so a caller knows its writes are durable once
the last commit covered the number it was given (``covers``): the first group to flush in a driver loop
syncs every group's entries, and the others find nothing left to do.

Reads (``get``, ``scan``) see committed data only. The Raft log is also kept in memory by its journal
(``raftkv.raftlog``); the engine is read at start-up.

Crash points: ``point(name)`` is called at ``engine.commit.before`` (operations taken from the buffer, nothing
committed) and ``engine.commit.after`` (committed and durable, the callers not yet told); tests pass a function
that kills the node there (tests/test_crash_points.py).

Slow-disk fault: ``delay_s`` (0 in production) is added to every durable commit, after LMDB's own sync and
before the callers learn it is durable, as a disk whose fsync takes that much longer would. The node sets it
from the ``disk.slow_ms`` fault point (``raftkv serve --fault disk.slow_ms:MS``, ``RAFTKV.FAULT DISK.SLOW_MS``
at run time), which the fault harness's ``slow-disk`` nemesis sends; the commit-time metrics include it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import lmdb

# The map's size is the database's size limit: address space reserved (mmap), not disk or memory used, as
# LMDB grows the file as data is written. 64 GiB holds far more Raft log than a node keeps between compactions,
# and leaves room for many environments in one process (tests open hundreds; 2^47 bytes of address space).
DEFAULT_MAP_SIZE = 1 << 36
ENGINE_DIR = "engine"

_PUT, _DEL, _DEL_RANGE = 0, 1, 2
T = TypeVar("T")


class EngineError(Exception):
    """The storage engine could not be opened or written (message says what and where)."""


@dataclasses.dataclass
class SyncStats:
    """Durable commits: how many, how many operations they carried, and their time in seconds."""

    count: int = 0
    ops: int = 0
    total_s: float = 0.0
    last_s: float = 0.0
    max_s: float = 0.0


def _no_point(name: str) -> None:
    """The production crash-point hook: does nothing."""


class Engine:
    """One LMDB environment in ``path`` (a directory, created if missing), shared by all groups of a node."""

    def __init__(self, path: str, *, map_size: int = DEFAULT_MAP_SIZE,
                 point: Callable[[str], None] = _no_point) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        try:
            # sync/metasync on: a completed commit is durable. max_readers: reads are short and few threads read.
            self._env = lmdb.open(path, map_size=map_size, subdir=True, sync=True, metasync=True,
                                  max_dbs=0, max_readers=64, lock=True)
        except lmdb.Error as exc:
            raise EngineError(f"cannot open the storage engine in {path}: {exc}") from exc
        self._point = point
        self._lock = threading.Lock()  # guards _pending and _seq (any thread may buffer)
        self._commit_lock = threading.Lock()  # one writer at a time, in buffer order
        self._pending: list[tuple[int, bytes, bytes | None]] = []
        self._seq = 0  # number of the last buffered operation
        self._synced_seq = 0  # every operation numbered <= this is durable
        self._stats = SyncStats()
        self._closed = False
        self.delay_s = 0.0  # injected sync latency (the disk.slow_ms fault point); 0 in production

    # ---- buffered writes -------------------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> int:
        """Buffer ``key = value``; returns the operation's sequence number."""
        return self._buffer(_PUT, key, value)

    def delete(self, key: bytes) -> int:
        """Buffer the deletion of ``key`` (absent is fine)."""
        return self._buffer(_DEL, key, None)

    def delete_range(self, lo: bytes, hi: bytes) -> int:
        """Buffer the deletion of every key in ``[lo, hi)``."""
        return self._buffer(_DEL_RANGE, lo, hi)

    def _buffer(self, op: int, key: bytes, value: bytes | None) -> int:
        with self._lock:
            self._pending.append((op, key, value))
            self._seq += 1
            return self._seq

    def covers(self, seq: int) -> bool:
        """Whether the operation numbered ``seq`` (and all before it) is durable."""
        return seq <= self._synced_seq

    def sync(self) -> None:
        """Commit everything buffered so far (by any caller) in one durable transaction; returns when durable."""
        with self._commit_lock:
            with self._lock:
                ops, self._pending = self._pending, []
                seq = self._seq
            if not ops:
                return
            self._point("engine.commit.before")
            t0 = time.perf_counter()
            try:
                with self._env.begin(write=True) as txn:
                    for op, key, value in ops:
                        if op == _PUT:
                            txn.put(key, value)
                        elif op == _DEL:
                            txn.delete(key)
                        else:
                            _delete_range(txn, key, value)  # type: ignore[arg-type]
            except lmdb.MapFullError as exc:
                raise EngineError(f"storage engine in {self.path} is full (map size {self._env.info()['map_size']} "
                                  f"bytes): restart the node with a larger --engine-map-gib") from exc
            except lmdb.Error as exc:
                # The batch is lost with the aborted transaction, and callers must not ack what it held: the node
                # cannot go on safely without it.
                raise EngineError(f"storage engine commit failed in {self.path}: {exc}") from exc
            self._slow_disk()
            dt = time.perf_counter() - t0
            self._synced_seq = seq
            st = self._stats
            st.count += 1
            st.ops += len(ops)
            st.total_s += dt
            st.last_s = dt
            st.max_s = max(st.max_s, dt)
            self._point("engine.commit.after")

    def _slow_disk(self) -> None:
        # Holding the commit lock, as a slow fsync holds the one writer: later commits queue behind it.
        delay = self.delay_s
        if delay > 0:
            time.sleep(delay)

    def stats(self) -> SyncStats:
        """A copy of the commit counters."""
        return dataclasses.replace(self._stats)

    def size_bytes(self) -> int:
        """Bytes the environment's data file takes on disk (0 once closed)."""
        try:
            return os.stat(os.path.join(self.path, "data.mdb")).st_blocks * 512
        except OSError:
            return 0

    # ---- committed reads -------------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The committed value of ``key``, or None."""
        with self._env.begin() as txn:
            return txn.get(key)

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Committed ``(key, value)`` pairs with ``lo <= key < hi``, in key order (one read snapshot)."""
        with self._env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_range(lo):
                return
            for key, value in cursor:
                if key >= hi:
                    return
                yield key, value

    def read_view(self) -> ReadView:
        """A consistent read-only view of everything committed now; it stays the same until closed."""
        return ReadView(self._env.begin())

    def commit_now(self, write: Callable[[WriteBatch], T], name: str = "checkpoint") -> T:
        """Run ``write`` in one write transaction of its own and commit it durably, now.

        For large, self-contained writes (a shard's checkpoint or snapshot install) that must be atomic on
        their own and should not wait in, or bloat, the group-commit buffer. Operations buffered by others
        are not included (they commit with the next ``sync``); callers must not depend on their order.
        ``name`` names the crash points around the commit: ``engine.<name>.before`` / ``.after``. Returns what
        ``write`` returned.
        """
        with self._commit_lock:
            self._point(f"engine.{name}.before")
            t0 = time.perf_counter()
            try:
                with self._env.begin(write=True) as txn:
                    result = write(WriteBatch(txn))
            except lmdb.MapFullError as exc:
                raise EngineError(f"storage engine in {self.path} is full (map size {self._env.info()['map_size']} "
                                  f"bytes): restart the node with a larger --engine-map-gib") from exc
            except lmdb.Error as exc:
                raise EngineError(f"storage engine commit failed in {self.path}: {exc}") from exc
            self._slow_disk()
            dt = time.perf_counter() - t0
            st = self._stats
            st.count += 1
            st.total_s += dt
            st.last_s = dt
            st.max_s = max(st.max_s, dt)
            self._point(f"engine.{name}.after")
            return result

    def close(self) -> None:
        """Close the environment; buffered operations that were not synced are dropped (as in a crash)."""
        if not self._closed:
            self._closed = True
            self._env.close()


class WriteBatch:
    """The writes of one ``Engine.commit_now`` transaction (applied in call order)."""

    def __init__(self, txn: lmdb.Transaction) -> None:
        self._txn = txn

    def put(self, key: bytes, value: bytes) -> None:
        """Set ``key``."""
        self._txn.put(key, value)

    def delete(self, key: bytes) -> None:
        """Delete ``key`` (absent is fine)."""
        self._txn.delete(key)

    def delete_range(self, lo: bytes, hi: bytes) -> None:
        """Delete every key in ``[lo, hi)``."""
        _delete_range(self._txn, lo, hi)

    def delete_first(self, lo: bytes, hi: bytes, limit: int) -> int:
        """Delete the first ``limit`` keys in ``[lo, hi)``; returns how many were deleted (0: none left)."""
        cursor = self._txn.cursor()
        n = 0
        if not cursor.set_range(lo):
            return 0
        while n < limit and cursor.key() and cursor.key() < hi:
            if not cursor.delete():
                break
            n += 1
        return n

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Set every ``(key, value)`` of ``items`` (fastest in key order); returns how many."""
        _consumed, added = self._txn.cursor().putmulti(items)
        return added


class ReadView:
    """A read-only snapshot of the engine (one LMDB read transaction); close it when done."""

    def __init__(self, txn: lmdb.Transaction) -> None:
        self._txn: lmdb.Transaction | None = txn

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` in this view, or None."""
        assert self._txn is not None, "read view closed"
        return self._txn.get(key)

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` pairs with ``lo <= key < hi``, in key order."""
        assert self._txn is not None, "read view closed"
        cursor = self._txn.cursor()
        if not cursor.set_range(lo):
            return
        for key, value in cursor:
            if key >= hi:
                return
            yield key, value

    def close(self) -> None:
        """End the view (LMDB may then reuse the pages it pinned)."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = None

    def __enter__(self) -> ReadView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _delete_range(txn: lmdb.Transaction, lo: bytes, hi: bytes) -> None:
    cursor = txn.cursor()
    if not cursor.set_range(lo):
        return
    while cursor.key() and cursor.key() < hi:
        if not cursor.delete():
            break

"""The node's storage engine: one LMDB environment holds every Raft group's log and hard state.

Why LMDB (docs/engine.md has the measurements): a write transaction is a copy-on-write B+tree commit that
becomes visible and durable atomically, with no write-ahead log of our own and no rename windows: a process
killed at any instant leaves the database as of the last completed commit, and with ``sync`` on (the default)
so does a power loss, given a disk that honours fsync. Pages live in the page cache, not in Python memory.

Write path (group commit): callers buffer operations (``put``, ``delete``, ``delete_range``) from any thread;
a commit applies everything buffered so far, by every group, in ONE write transaction with one durable
commit. Each buffered operation gets a sequence number, so a caller knows its writes are durable once a
commit covered the number it was given (``covers``). Two ways to commit:

* ``sync()``: commit now, on the calling thread, and return once durable (blocking);
* pipelined, after ``start_committer(on_commit)``: ``request_commit()`` returns at once and a committer thread
  commits in the background (py-lmdb releases the GIL for the transaction's writes and fsyncs), then calls
  ``on_commit()``; the caller (the node's Raft driver) goes on receiving, ticking and sending meanwhile and
  releases whatever waited for durability once ``covers`` says so. A commit requested while one runs starts
  as soon as it completes and carries everything buffered by then (the batch grows with the load).

Both keep buffer order: commits are serialised (``_commit_lock``), each takes the whole buffer.

``metasync=False`` (LMDB's MDB_NOMETASYNC) makes a commit one ``fdatasync`` (the data pages) instead of two
(data, then the meta page): a kill -9 still loses nothing committed, but a power loss may undo the LAST
commit, whose meta page is only flushed by the next commit's ``fdatasync`` (or an explicit ``env.sync``).
The engine accounts for that honestly: ``covers`` counts a commit's operations durable only once a later
commit (or a meta flush) completed, and a committer with nothing more to commit flushes the meta page at once.

Reads (``get``, ``scan``) see committed data only. The Raft log is also kept in memory by its journal
(``raftkv.raftlog``); the engine is read at start-up.

Crash points: ``point(name)`` is called at ``engine.commit.before`` (operations taken from the buffer, nothing
committed), ``engine.commit.written`` (``metasync=False`` only: committed, safe from kill -9, a power loss may
still undo it; the commit before it is now durable) and ``engine.commit.after`` (everything committed so far is
durable, the callers not yet told); tests pass a function that kills the node there
(tests/test_crash_points.py), or blocks a commit there (tests/test_raftnet.py).

Slow-disk fault: ``delay_s`` (0 in production) is added to every durable commit, after LMDB's own sync and
before the callers learn it is durable, as a disk whose fsync takes that much longer would. The node sets it
from the ``disk.slow_ms`` fault point (``raftkv serve --fault disk.slow_ms:MS``, ``RAFTKV.FAULT DISK.SLOW_MS``
at run time), which the fault harness's ``slow-disk`` nemesis sends; the commit-time metrics include it.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
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

log = logging.getLogger("raftkv.engine")

_PUT, _DEL, _DEL_RANGE = 0, 1, 2
T = TypeVar("T")


class EngineError(Exception):
    """The storage engine could not be opened or written (message says what and where)."""


@dataclasses.dataclass
class SyncStats:
    """Durable commits: how many, how many operations they carried, and their time in seconds.

    ``meta_flushes``: with ``metasync=False``, the meta-page flushes forced when nothing else was to commit
    (their time is in ``total_s`` too). ``deferred``: commit requests that found the writer busy (a checkpoint
    committing on its own thread) and were left to the next driver loop.
    """

    count: int = 0
    ops: int = 0
    total_s: float = 0.0
    last_s: float = 0.0
    max_s: float = 0.0
    meta_flushes: int = 0
    deferred: int = 0


def _no_point(name: str) -> None:
    """The production crash-point hook: does nothing."""


def _no_commit_callback() -> None:
    """Until ``start_committer``: nobody to tell."""


class Engine:
    """One LMDB environment in ``path`` (a directory, created if missing), shared by all groups of a node."""

    def __init__(self, path: str, *, map_size: int = DEFAULT_MAP_SIZE,
                 point: Callable[[str], None] = _no_point, metasync: bool = True, sync: bool = True) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        try:
            # sync on: a commit fsyncs. metasync on: the commit is durable when it returns; off: see module doc.
            # sync off (raftkv serve --unsafe-no-sync, a negative control for the harness's power nemesis): no
            # fsync at all, yet every commit is counted durable. max_readers: reads are short and few threads read.
            self._env = lmdb.open(path, map_size=map_size, subdir=True, sync=sync, metasync=metasync,
                                  max_dbs=0, max_readers=64, lock=True)
        except lmdb.Error as exc:
            raise EngineError(f"cannot open the storage engine in {path}: {exc}") from exc
        self.metasync = metasync
        self.synced = sync  # False only in the unsafe no-sync mode
        self._point = point
        self._lock = threading.Lock()  # guards _pending and _seq (any thread may buffer)
        self._commit_lock = threading.Lock()  # one writer at a time, in buffer order
        self._pending: list[tuple[int, bytes, bytes | None]] = []
        self._seq = 0  # number of the last buffered operation
        self._written_seq = 0  # every operation numbered <= this is committed (survives kill -9)
        self._synced_seq = 0  # every operation numbered <= this is durable (survives power loss too)
        self._stats = SyncStats()
        self._closed = False
        # The committer (pipelined commits): a thread, its wake-up and what it reports.
        self._committer: threading.Thread | None = None
        self._on_commit: Callable[[], None] = _no_commit_callback
        self._wanted = threading.Condition(threading.Lock())  # guards _requested and _stopping
        self._requested = False
        self._stopping = False
        self._failure: EngineError | None = None
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
        """Commit everything buffered before this call (by any caller) and return once it is durable.

        Blocking, on the calling thread; with a committer running it waits for the commit in progress (if any)
        and commits what is left. Raises ``EngineError`` if this commit, or an earlier background one, failed.
        """
        with self._commit_lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        self._raise_failure()
        self._commit_buffered()
        if self._written_seq > self._synced_seq:
            self._flush_meta()

    # ---- pipelined commits -----------------------------------------------------------------------------------

    def start_committer(self, on_commit: Callable[[], None]) -> None:
        """Commit in the background from now on (``request_commit``); ``on_commit()`` runs on the committer
        thread after each commit completes or fails (it must not block: the driver's ``wake`` is what fits)."""
        if self._committer is not None:
            raise RuntimeError("the committer is already running")
        self._on_commit = on_commit
        self._committer = threading.Thread(target=self._commit_loop, name="engine-commit", daemon=True)
        self._committer.start()

    @property
    def pipelined(self) -> bool:
        """A committer thread commits in the background: ``request_commit`` does not wait for the disk."""
        return self._committer is not None

    def request_commit(self) -> None:
        """Have everything buffered so far committed: in the background if pipelined (returns at once; watch
        ``covers``), else now (``sync``). Raises ``EngineError`` if a background commit failed."""
        if self._committer is None:
            # A checkpoint or an install holds LMDB's one writer: do not wait for it on the driver thread. What
            # depends on this commit waits in raftfix's gate, and the driver's next loop asks again.
            if not self._commit_lock.acquire(blocking=False):
                self._stats.deferred += 1
                return
            try:
                self._sync_locked()
            finally:
                self._commit_lock.release()
            return
        self._raise_failure()
        with self._wanted:
            if not self._requested:
                self._requested = True
                self._wanted.notify()

    def _commit_loop(self) -> None:
        wanted = self._wanted
        while True:
            with wanted:
                while not self._requested and not self._stopping:
                    wanted.wait()
                if self._stopping:
                    return
                self._requested = False
            synced = self._synced_seq
            try:
                with self._commit_lock:
                    committed = self._commit_buffered()
                    # Without metasync this commit is not durable until the next one's fsync: when no further
                    # commit is already asked for, flush the meta page now rather than leave acks waiting.
                    if self._written_seq > self._synced_seq and (not committed or not self._requested):
                        self._flush_meta()
            except EngineError as exc:
                self._failure = exc  # covers() never moves again; the next request_commit/sync raises it
                log.critical("event=engine_commit_failed path=%s error=%s", self.path, exc)
            if self._synced_seq == synced and self._failure is None:
                continue  # nothing became durable: nobody to tell
            try:
                self._on_commit()
            except Exception:
                log.exception("event=engine_on_commit_failed")
            if self._failure is not None:
                return

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise EngineError(f"an earlier storage engine commit failed in {self.path}: {self._failure}")

    def _commit_buffered(self) -> bool:
        """Commit the whole buffer in one write transaction (``_commit_lock`` held); False if it was empty."""
        with self._lock:
            ops, self._pending = self._pending, []
            seq = self._seq
        if not ops:
            return False
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
            self._failure = EngineError(f"storage engine in {self.path} is full (map size "
                                        f"{self._env.info()['map_size']} bytes): restart the node with a larger "
                                        "--engine-map-gib")
            raise self._failure from exc
        except lmdb.Error as exc:
            # The batch is lost with the aborted transaction, and callers must not ack what it held: the node
            # cannot go on safely without it.
            self._failure = EngineError(f"storage engine commit failed in {self.path}: {exc}")
            raise self._failure from exc
        self._slow_disk()
        dt = time.perf_counter() - t0
        self._count(dt, len(ops))
        if self.metasync:
            self._written_seq = self._synced_seq = seq
            self._point("engine.commit.after")
        else:
            # This commit's fdatasync flushed the previous commit's meta page: that one is durable now.
            self._synced_seq = self._written_seq
            self._written_seq = seq
            self._point("engine.commit.written")
        return True

    def _flush_meta(self) -> None:
        """Make the last commit durable (``metasync=False``): one fdatasync of the meta page it wrote."""
        t0 = time.perf_counter()
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            self._failure = EngineError(f"storage engine sync failed in {self.path}: {exc}")
            raise self._failure from exc
        self._stats.meta_flushes += 1
        self._stats.total_s += time.perf_counter() - t0
        self._synced_seq = self._written_seq
        self._point("engine.commit.after")

    def _count(self, dt: float, ops: int) -> None:
        st = self._stats
        st.count += 1
        st.ops += ops
        st.total_s += dt
        st.last_s = dt
        st.max_s = max(st.max_s, dt)

    def _slow_disk(self) -> None:
        # Holding the commit lock, as a slow fsync holds the one writer: later commits queue behind it.
        delay = self.delay_s
        if delay > 0:
            time.sleep(delay)

    def writer_busy(self) -> bool:
        """A commit holds LMDB's one writer now (a racy hint: for callers that would rather not wait)."""
        return self._commit_lock.locked()

    def stats(self) -> SyncStats:
        """A copy of the commit counters."""
        return dataclasses.replace(self._stats)

    def size_bytes(self) -> int:
        """Bytes the environment's data file takes on disk (0 once closed)."""
        try:
            return os.stat(os.path.join(self.path, "data.mdb")).st_blocks * 512
        except OSError:
            return 0

    def usage(self) -> dict[str, int]:
        """What the environment holds now: ``keys`` (every group's), ``bytes_in_use`` (the B+tree's pages) and
        ``file_bytes`` (the data file on disk). Pages freed by deletions are reused by later writes; the file
        itself never shrinks (LMDB), so ``bytes_in_use`` is what a deletion gives back."""
        st = self._env.stat()
        pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return {"keys": st["entries"], "bytes_in_use": pages * st["psize"], "file_bytes": self.size_bytes()}

    # ---- committed reads -------------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The committed value of ``key``, or None."""
        with self._env.begin() as txn:
            return txn.get(key)

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Committed ``(key, value)`` pairs with ``lo <= key < hi``, in key order (one read snapshot)."""
        with self.read_view() as view:
            yield from view.scan(lo, hi)

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
            self._count(time.perf_counter() - t0, 0)
            if not self.metasync:
                self._flush_meta()  # durable on return, like every commit_now (it also covers earlier commits)
            self._point(f"engine.{name}.after")
            return result

    def close(self) -> None:
        """Stop the committer (after the commit in progress, if any) and close the environment; buffered
        operations that were not committed are dropped (as in a crash)."""
        if self._committer is not None:
            with self._wanted:
                self._stopping = True
                self._wanted.notify()
            if threading.current_thread() is not self._committer:
                self._committer.join()
        with self._commit_lock:
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
        return self.delete_first_sized(lo, hi, limit)[0]

    def delete_first_sized(self, lo: bytes, hi: bytes, limit: int) -> tuple[int, int]:
        """``delete_first``, also returning the bytes of the keys and values deleted: ``(keys, bytes)``."""
        cursor = self._txn.cursor()
        n = size = 0
        if not cursor.set_range(lo):
            return 0, 0
        while n < limit and cursor.key() and cursor.key() < hi:
            size += len(cursor.key()) + len(cursor.value())
            if not cursor.delete():
                break
            n += 1
        return n, size

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

    def keys(self, lo: bytes, hi: bytes) -> Iterator[bytes]:
        """The keys ``lo <= key < hi``, in key order (no value is read)."""
        assert self._txn is not None, "read view closed"
        cursor = self._txn.cursor()
        if not cursor.set_range(lo):
            return
        for key in cursor.iternext(keys=True, values=False):
            if key >= hi:
                return
            yield key

    def scan_batches(self, lo: bytes, hi: bytes, size: int) -> Iterator[list[tuple[bytes, bytes]]]:
        """``scan(lo, hi)`` in lists of at most ``size`` pairs, read by the cursor's own iterator (no Python step
        per key: for streaming a whole shard)."""
        assert self._txn is not None, "read view closed"
        cursor = self._txn.cursor()
        if not cursor.set_range(lo):
            return
        rows = cursor.iternext(keys=True, values=True)
        while True:
            batch = list(itertools.islice(rows, size))
            if not batch:
                return
            if batch[-1][0] >= hi:  # the range ends inside this batch: keep what is below hi
                del batch[bisect.bisect_left(batch, (hi,)):]
                if batch:
                    yield batch
                return
            yield batch

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

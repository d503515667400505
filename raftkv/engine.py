"""The node's storage engine: one store holds every Raft group's log, hard state and key-value data.

The store (``raftkv.store``) is LMDB (``raftkv.lmdbstore``, the default for a new data directory) or RocksDB
(``raftkv.rocksstore``, ``raftkv serve --engine rocksdb``); an existing directory keeps the store it was
created with (``store_kind``). Either
commits a batch atomically and, with ``sync`` on (the default), durably: a process killed at any instant, or a
power loss, leaves the database as of the last completed commit, given a disk that honours fsync, with no
write-ahead log or rename window of our own. docs/engine.md has the measurements behind the choice.

Write path (group commit): callers buffer operations (``put``, ``delete``, ``delete_range``) from any thread;
a commit applies everything buffered so far, by every group, in ONE write transaction with one durable
commit. Each buffered operation gets a sequence number, so a caller knows its writes are durable once a
commit covered the number it was given (``covers``). Two ways to commit:

* ``sync()``: commit now, on the calling thread, and return once durable (blocking);
* pipelined, after ``start_committer(on_commit)``: ``request_commit()`` returns at once and a committer thread
  commits in the background (py-lmdb releases the GIL while it writes and fsyncs; rocksdict holds it), then calls
  ``on_commit()``; the caller (the node's Raft driver) goes on receiving, ticking and sending meanwhile and
  releases whatever waited for durability once ``covers`` says so. A commit requested while one runs starts
  as soon as it completes and carries everything buffered by then (the batch grows with the load).

Both keep buffer order: commits are serialised (``_commit_lock``), each takes the whole buffer.

``metasync=False`` (LMDB only: MDB_NOMETASYNC) makes a commit one ``fdatasync`` (the data pages) instead of two
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

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from raftkv.store import DEL, DEL_RANGE, PUT, ReadView, Store, StoreError, WriteBatch

# The map's size is the database's size limit: address space reserved (mmap), not disk or memory used, as
# LMDB grows the file as data is written. 64 GiB holds far more Raft log than a node keeps between compactions,
# and leaves room for many environments in one process (tests open hundreds; 2^47 bytes of address space).
DEFAULT_MAP_SIZE = 1 << 36
ENGINE_DIR = "engine"

log = logging.getLogger("raftkv.engine")

T = TypeVar("T")
#: Store kinds, and the one a new data directory gets (``RAFTKV_ENGINE`` in the environment overrides it, for
#: running the test suite on either).
STORE_KINDS = ("rocksdb", "lmdb")
DEFAULT_STORE = os.environ.get("RAFTKV_ENGINE") or "lmdb"


class EngineError(Exception):
    """The storage engine could not be opened or written (message says what and where)."""


def store_kind(path: str) -> str | None:
    """The kind of store an existing engine directory holds (None: none yet)."""
    from raftkv.lmdbstore import is_lmdb_dir
    from raftkv.rocksstore import is_rocks_dir

    if is_lmdb_dir(path):
        return "lmdb"
    if is_rocks_dir(path):
        return "rocksdb"
    return None


def open_store(path: str, kind: str | None, *, map_size: int, sync: bool, metasync: bool) -> Store:
    """Open the store in ``path``: the kind it already holds, else ``kind`` (None: ``DEFAULT_STORE``)."""
    found = store_kind(path)
    if found is not None and kind is not None and found != kind:
        raise EngineError(f"{path} holds a {found} store, not {kind}: start the node with --engine {found} "
                          "(or move the data directory aside to start empty)")
    # metasync=False is LMDB's one-fsync mode: asking for it asks for LMDB.
    kind = found or kind or ("lmdb" if not metasync else DEFAULT_STORE)
    if kind == "lmdb":
        from raftkv.lmdbstore import LmdbStore

        return LmdbStore(path, map_size=map_size, sync=sync, metasync=metasync)
    if kind == "rocksdb":
        if not metasync:
            raise EngineError("metasync=False is an LMDB setting: a RocksDB commit syncs once already")
        from raftkv.rocksstore import RocksStore

        return RocksStore(path, sync=sync)
    raise EngineError(f"unknown storage engine {kind!r}: one of {', '.join(STORE_KINDS)}")


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
    """One store in ``path`` (a directory, created if missing), shared by all groups of a node.

    ``kind``: the store for a new directory (None: ``DEFAULT_STORE``); ``map_size``: LMDB's size limit.
    """

    def __init__(self, path: str, *, map_size: int = DEFAULT_MAP_SIZE,
                 point: Callable[[str], None] = _no_point, metasync: bool = True, sync: bool = True,
                 kind: str | None = None) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        try:
            # sync on: a commit fsyncs. metasync on: the commit is durable when it returns; off: see module doc.
            # sync off (raftkv serve --unsafe-no-sync, a negative control for the harness's power nemesis): no
            # fsync at all, yet every commit is counted durable.
            self._store = open_store(path, kind, map_size=map_size, sync=sync, metasync=metasync)
        except StoreError as exc:
            raise EngineError(str(exc)) from exc
        self.kind = self._store.kind
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
        return self._buffer(PUT, key, value)

    def delete(self, key: bytes) -> int:
        """Buffer the deletion of ``key`` (absent is fine)."""
        return self._buffer(DEL, key, None)

    def delete_range(self, lo: bytes, hi: bytes) -> int:
        """Buffer the deletion of every key in ``[lo, hi)``."""
        return self._buffer(DEL_RANGE, lo, hi)

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
            self._store.commit(ops)
        except StoreError as exc:
            # The batch is lost with the failed commit, and callers must not ack what it held: the node cannot
            # go on safely without it.
            self._failure = EngineError(str(exc))
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
            self._store.flush_meta()
        except StoreError as exc:
            self._failure = EngineError(str(exc))
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
        """A commit holds the store's one writer now (a racy hint: for callers that would rather not wait)."""
        return self._commit_lock.locked()

    def stats(self) -> SyncStats:
        """A copy of the commit counters."""
        return dataclasses.replace(self._stats)

    def size_bytes(self) -> int:
        """Bytes the store's files take on disk (0 once closed)."""
        return self._store.size_bytes()

    def usage(self) -> dict[str, int]:
        """What the store holds now: ``keys`` (every group's), ``bytes_in_use`` (live data) and ``file_bytes``
        (on disk); see the store's own ``usage`` for how each is counted."""
        return self._store.usage()

    # ---- committed reads -------------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The committed value of ``key``, or None."""
        return self._store.get(key)

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Committed ``(key, value)`` pairs with ``lo <= key < hi``, in key order (one read snapshot)."""
        with self.read_view() as view:
            yield from view.scan(lo, hi)

    def read_view(self) -> ReadView:
        """A consistent read-only view of everything committed now; it stays the same until closed."""
        return self._store.read_view()

    def commit_now(self, write: Callable[[WriteBatch], T], name: str = "checkpoint") -> T:
        """Run ``write`` on one write batch of its own and commit it durably, now.

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
                result = self._store.commit_with(write)
            except StoreError as exc:
                raise EngineError(str(exc)) from exc
            self._slow_disk()
            self._count(time.perf_counter() - t0, 0)
            if not self.metasync:
                self._flush_meta()  # durable on return, like every commit_now (it also covers earlier commits)
            self._point(f"engine.{name}.after")
            return result

    def close(self) -> None:
        """Stop the committer (after the commit in progress, if any) and close the store; buffered
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
                self._store.close()

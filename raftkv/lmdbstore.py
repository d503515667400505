"""raftkv.lmdbstore: the LMDB store beneath ``raftkv.engine.Engine`` (one environment per node).

A write transaction is a copy-on-write B+tree commit that becomes visible and durable atomically, with no
log of its own and no recovery step: a process killed at any instant leaves the database as of the last
completed commit, and with ``sync`` on so does a power loss. A durable commit writes every page it dirtied
(each touched leaf and its path to the root) and fsyncs twice (data pages, then the meta page): on a disk
whose fsync cost grows with the pages it writes, that is most of a commit's time (docs/engine.md).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import lmdb

from raftkv.store import DEL, PUT, StoreError, StoreFull

__all__ = ["LmdbStore", "LmdbWriteBatch", "LmdbReadView", "is_lmdb_dir"]

T = TypeVar("T")
DATA_FILE = "data.mdb"
log = logging.getLogger("raftkv.lmdbstore")
_MADV_NORMAL, _MADV_RANDOM = 0, 1  # <sys/mman.h> on Linux


def is_lmdb_dir(path: str) -> bool:
    """``path`` holds an LMDB environment."""
    return os.path.exists(os.path.join(path, DATA_FILE))


class LmdbStore:
    """One LMDB environment in ``path``; ``map_size`` is its size limit (address space, sparse on disk)."""

    kind = "lmdb"

    def __init__(self, path: str, *, map_size: int, sync: bool, metasync: bool) -> None:
        try:
            # max_readers: reads are short and few threads read. readahead=False (MDB_NORDAHEAD): a page fault
            # reads that page, not the 128 KiB around it. Gets and checkpoints touch random pages of the B+tree;
            # with readahead each fault pulled in 32 pages, so a node whose data outgrew its memory (10M keys
            # in a 300 MB cgroup) re-read the disk for nearly every request (docs/benchmarks.md). Streaming a
            # whole shard turns it back on for the stream (``Readahead``).
            self._env = lmdb.open(path, map_size=map_size, subdir=True, sync=sync, metasync=metasync,
                                  max_dbs=0, max_readers=64, lock=True, readahead=False)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the storage engine in {path}: {exc}") from exc
        self.path = path
        self.readahead = Readahead(os.path.join(path, DATA_FILE))

    @contextlib.contextmanager
    def _write_txn(self) -> Iterator[lmdb.Transaction]:
        """One write transaction, committed on leaving; LMDB's errors become the store's."""
        try:
            with self._env.begin(write=True) as txn:
                yield txn
        except lmdb.MapFullError as exc:
            raise StoreFull(f"storage engine in {self.path} is full (map size {self._env.info()['map_size']} "
                            "bytes): restart the node with a larger --engine-map-gib") from exc
        except lmdb.Error as exc:
            raise StoreError(f"storage engine commit failed in {self.path}: {exc}") from exc

    def commit(self, ops: list[tuple[int, bytes, bytes | None]]) -> None:
        """Apply ``ops`` (``(PUT|DEL|DEL_RANGE, key, value-or-hi)``) in one transaction and commit it."""
        with self._write_txn() as txn:
            for op, key, value in ops:
                if op == PUT:
                    txn.put(key, value)
                elif op == DEL:
                    txn.delete(key)
                else:
                    _delete_range(txn, key, value)  # type: ignore[arg-type]

    def commit_with(self, write: Callable[[LmdbWriteBatch], T]) -> T:
        """Run ``write`` in one write transaction and commit it; returns what ``write`` returned."""
        with self._write_txn() as txn:
            return write(LmdbWriteBatch(txn))

    def flush_meta(self) -> None:
        """``metasync=False``: make the last commit durable (one fdatasync of the meta page it wrote)."""
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            raise StoreError(f"storage engine sync failed in {self.path}: {exc}") from exc

    def get(self, key: bytes) -> bytes | None:
        with self._env.begin() as txn:
            return txn.get(key)

    def read_view(self) -> LmdbReadView:
        return LmdbReadView(self._env.begin(), self.readahead)

    def size_bytes(self) -> int:
        try:
            return os.stat(os.path.join(self.path, DATA_FILE)).st_blocks * 512
        except OSError:
            return 0

    def usage(self) -> dict[str, int]:
        """``keys`` (every group's), ``bytes_in_use`` (the B+tree's pages) and ``file_bytes``. Pages freed by
        deletions are reused by later writes; the file never shrinks, so ``bytes_in_use`` is what a deletion
        gives back."""
        st = self._env.stat()
        pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return {"keys": st["entries"], "bytes_in_use": pages * st["psize"], "file_bytes": self.size_bytes()}

    def close(self) -> None:
        self._env.close()


class LmdbWriteBatch:
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


class LmdbReadView:
    """A read-only snapshot of the engine (one LMDB read transaction); close it when done."""

    def __init__(self, txn: lmdb.Transaction, readahead: Readahead | None = None) -> None:
        self._txn: lmdb.Transaction | None = txn
        self._readahead = readahead

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
        """The keys ``lo <= key < hi``, in key order (no value is read; a walk of a shard's keys, as a move's
        scan makes: the kernel reads ahead meanwhile, as for ``scan_batches``)."""
        assert self._txn is not None, "read view closed"
        cursor = self._txn.cursor()
        if not cursor.set_range(lo):
            return
        with self._readahead or contextlib.nullcontext():
            for key in cursor.iternext(keys=True, values=False):
                if key >= hi:
                    return
                yield key

    def scan_batches(self, lo: bytes, hi: bytes, size: int) -> Iterator[list[tuple[bytes, bytes]]]:
        """``scan(lo, hi)`` in lists of at most ``size`` pairs, read by the cursor's own iterator (no Python step
        per key: for streaming a whole shard). The kernel reads ahead in the data file meanwhile: the B+tree's
        leaves lie mostly in file order, and a cold stream read page by page ran at a quarter of the speed."""
        assert self._txn is not None, "read view closed"
        cursor = self._txn.cursor()
        if not cursor.set_range(lo):
            return
        rows = cursor.iternext(keys=True, values=True)
        with self._readahead or contextlib.nullcontext():
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

    def __enter__(self) -> LmdbReadView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Readahead:
    """While at least one holder is inside (``with``), the kernel reads ahead on faults in the environment's
    map (``madvise(MADV_NORMAL)``); otherwise only the faulting page (``MADV_RANDOM``, what LMDB set at open
    for ``readahead=False``). Thread-safe; the advice covers every thread's reads of the map meanwhile.
    Where the map cannot be found or advised (not Linux), nothing changes."""

    def __init__(self, data_file: str) -> None:
        self._file = os.path.realpath(data_file)
        self._lock = threading.Lock()
        self._holders = 0
        self._span: tuple[int, int] | None = None  # the map's (address, length): fixed while the env is open

    def __enter__(self) -> Readahead:
        with self._lock:
            self._holders += 1
            if self._holders == 1:
                self._advise(_MADV_NORMAL)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._advise(_MADV_RANDOM)

    def _advise(self, advice: int) -> None:
        span = self._span = self._span or _mapping(self._file)
        if span is None:
            return
        if _madvise is None or _madvise(span[0], span[1], advice) != 0:
            log.debug("event=madvise_failed file=%s advice=%d", self._file, advice)


def _mapping(path: str) -> tuple[int, int] | None:
    """``(address, length)`` of this process's mapping of ``path`` (``/proc/self/maps``), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == path:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    return lo, hi - lo
    except OSError:
        pass
    return None


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def _delete_range(txn: lmdb.Transaction, lo: bytes, hi: bytes) -> None:
    cursor = txn.cursor()
    if not cursor.set_range(lo):
        return
    while cursor.key() and cursor.key() < hi:
        if not cursor.delete():
            break

"""raftkv.rocksstore: the RocksDB store beneath ``raftkv.engine.Engine`` (through ``rocksdict``).

A commit is one ``WriteBatch``: RocksDB appends it to its write-ahead log as one record and, with ``sync``
on, ``fdatasync``s the log before the write returns; the batch is atomic (a torn last record is dropped at
recovery, which replays the log up to the last whole record: point-in-time recovery). The data goes to an
in-memory table, flushed to sorted files and compacted in the background. So a durable commit writes about
the batch's own bytes, sequentially, and syncs once, where a B+tree writes every page it dirtied: on this
project's machines that is the difference between ~0.5 ms and ~2.5 ms per commit (docs/engine.md).

Choices, each for a reason:

* no compression: the CPU is the scarcer resource on a node that runs Raft and RESP in Python;
* a block cache shared by every store of the process (``CACHE_BYTES``) with index and filter blocks in it,
  and small write buffers: memory stays bounded whatever the data size (tests open hundreds of stores);
* range deletions are point deletions of the keys found in the range: RocksDB's range tombstones made the
  next seek into the range slow until compaction dropped them (docs/engine.md), and the Raft log's prefix
  deletion seeks there next;
* a read view is a pair of RocksDB iterators created together under the store's write lock: an iterator
  reads the database as of its creation, so both see the same commits, whatever is written later (rocksdict
  0.3.29's ``Snapshot`` objects answer point reads at the snapshot but iterate the live database).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rocksdict import (
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    RdictIter,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from raftkv.store import DEL, PUT, StoreError

__all__ = ["RocksStore", "RocksWriteBatch", "RocksReadView", "is_rocks_dir"]

T = TypeVar("T")
#: The block cache shared by every RocksDB store of this process: data, index and filter blocks.
CACHE_BYTES = 64 << 20
#: One in-memory table's size before it is flushed to a sorted file; at most two per store.
WRITE_BUFFER_BYTES = 16 << 20
#: ``usage()`` counts the keys one by one up to about this many (RocksDB only estimates the count).
EXACT_COUNT_MAX = 100_000

_cache_lock = threading.Lock()
_cache: Cache | None = None


def is_rocks_dir(path: str) -> bool:
    """``path`` holds a RocksDB database."""
    return os.path.exists(os.path.join(path, "CURRENT"))


def _shared_cache() -> Cache:
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = Cache(CACHE_BYTES)
        return _cache


def options() -> Options:
    """raftkv's RocksDB settings (module doc)."""
    o = Options(raw_mode=True)
    o.create_if_missing(True)
    o.set_compression_type(DBCompressionType.none())
    o.set_write_buffer_size(WRITE_BUFFER_BYTES)
    o.set_max_write_buffer_number(2)
    o.set_max_background_jobs(2)
    o.set_keep_log_file_num(2)
    o.set_max_log_file_size(1 << 20)
    table = BlockBasedOptions()
    table.set_block_cache(_shared_cache())
    table.set_cache_index_and_filter_blocks(True)
    table.set_bloom_filter(10, False)
    o.set_block_based_table_factory(table)
    return o


class RocksStore:
    """One RocksDB database in ``path``. ``sync`` off: nothing is fsynced (the unsafe no-sync mode)."""

    kind = "rocksdb"

    def __init__(self, path: str, *, sync: bool) -> None:
        try:
            self._db = Rdict(path, options=options())
        except Exception as exc:  # rocksdict raises plain exceptions (e.g. the lock held by another process)
            raise StoreError(f"cannot open the storage engine in {path}: {exc}") from exc
        self.path = path
        self._wo = WriteOptions()
        self._wo.sync = sync
        self._write_lock = threading.Lock()  # a read view's iterators are created between two writes

    def commit(self, ops: list[tuple[int, bytes, bytes | None]]) -> None:
        """Apply ``ops`` (``(PUT|DEL|DEL_RANGE, key, value-or-hi)``) as one batch and commit it."""
        batch = RocksWriteBatch(self._db)
        for op, key, value in ops:
            if op == PUT:
                batch.put(key, value)  # type: ignore[arg-type]
            elif op == DEL:
                batch.delete(key)
            else:
                batch.delete_range(key, value)  # type: ignore[arg-type]
        self._write(batch)

    def commit_with(self, write: Callable[[RocksWriteBatch], T]) -> T:
        """Run ``write`` on one batch and commit it; returns what ``write`` returned."""
        batch = RocksWriteBatch(self._db)
        result = write(batch)
        self._write(batch)
        return result

    def _write(self, batch: RocksWriteBatch) -> None:
        if batch.batch.is_empty():
            return
        try:
            with self._write_lock:
                self._db.write(batch.batch, self._wo)
        except Exception as exc:
            raise StoreError(f"storage engine commit failed in {self.path}: {exc}") from exc

    def flush_meta(self) -> None:
        """Nothing to do: a synced write is durable when it returns."""

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def read_view(self) -> RocksReadView:
        with self._write_lock:
            return RocksReadView(self._db.iter(), self._db.iter())

    def size_bytes(self) -> int:
        total = 0
        try:
            with os.scandir(self.path) as it:
                for entry in it:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat().st_blocks * 512
        except OSError:
            return 0
        return total

    def usage(self) -> dict[str, int]:
        """``keys`` (every group's: counted when RocksDB estimates at most ``EXACT_COUNT_MAX``, else its
        estimate), ``bytes_in_use`` (its estimate of the live data) and ``file_bytes`` (the directory on disk:
        deleted data is given back as compactions rewrite the files)."""
        def prop(name: str) -> int:
            return int(self._db.property_int_value(name) or 0)

        keys = prop("rocksdb.estimate-num-keys")
        if keys <= EXACT_COUNT_MAX:
            keys = sum(1 for _ in _keys_in(self._db, b"", b"\xff" * 16))  # every key prefix is below 0xff
        return {"keys": keys,
                "bytes_in_use": prop("rocksdb.estimate-live-data-size") + prop("rocksdb.cur-size-all-mem-tables"),
                "file_bytes": self.size_bytes()}

    def close(self) -> None:
        self._db.close()


def _bounded(db: Rdict, lo: bytes, hi: bytes) -> RdictIter:
    """An iterator over the live database at the first key >= ``lo``, ending before ``hi``."""
    ro = ReadOptions()
    ro.set_iterate_upper_bound(hi)
    it = db.iter(ro)
    it.seek(lo)
    return it


def _keys_in(db: Rdict, lo: bytes, hi: bytes) -> Iterator[bytes]:
    it = _bounded(db, lo, hi)
    while it.valid():
        yield it.key()
        it.next()


class RocksWriteBatch:
    """The writes of one ``Engine.commit_now`` commit (applied in call order). Reads inside it see the committed
    data minus this batch's own deletions, plus the keys this batch put (for ``delete_range``)."""

    def __init__(self, db: Rdict) -> None:
        self._db = db
        self.batch = WriteBatch(raw_mode=True)
        self._put: set[bytes] = set()
        self._gone: set[bytes] = set()

    def put(self, key: bytes, value: bytes) -> None:
        """Set ``key``."""
        self.batch.put(key, value)
        self._put.add(key)
        self._gone.discard(key)

    def delete(self, key: bytes) -> None:
        """Delete ``key`` (absent is fine)."""
        self.batch.delete(key)
        self._put.discard(key)
        self._gone.add(key)

    def delete_range(self, lo: bytes, hi: bytes) -> None:
        """Delete every key in ``[lo, hi)``, committed or put earlier in this batch."""
        for key in [*_keys_in(self._db, lo, hi), *(k for k in self._put if lo <= k < hi)]:
            if key not in self._gone:
                self.delete(key)

    def delete_first(self, lo: bytes, hi: bytes, limit: int) -> int:
        """Delete the first ``limit`` committed keys in ``[lo, hi)``; returns how many (0: none left)."""
        return self.delete_first_sized(lo, hi, limit)[0]

    def delete_first_sized(self, lo: bytes, hi: bytes, limit: int) -> tuple[int, int]:
        """``delete_first``, also returning the bytes of the keys and values deleted: ``(keys, bytes)``."""
        it = _bounded(self._db, lo, hi)
        n = size = 0
        while n < limit and it.valid():
            key = it.key()
            if key not in self._gone:
                size += len(key) + len(it.value())
                self.delete(key)
                n += 1
            it.next()
        return n, size

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Set every ``(key, value)`` of ``items``; returns how many."""
        n = 0
        for key, value in items:
            self.put(key, value)
            n += 1
        return n


class RocksReadView:
    """A read-only, point-in-time view of the store (module doc); close it when done.

    One iterator answers ``get``, the other walks the scans. Scans share it, so a scan must be finished or
    abandoned before the next one starts (a generator resumed after another scan began raises).
    """

    def __init__(self, getter: RdictIter, walker: RdictIter) -> None:
        self._getter: RdictIter | None = getter
        self._walker: RdictIter | None = walker
        self._scans = 0  # the walker belongs to the scan with this number

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` in this view, or None."""
        it = self._getter
        assert it is not None, "read view closed"
        it.seek(key)
        return it.value() if it.valid() and it.key() == key else None

    def _walk(self, lo: bytes) -> tuple[RdictIter, int]:
        it = self._walker
        assert it is not None, "read view closed"
        self._scans += 1
        it.seek(lo)
        return it, self._scans

    def _check(self, scan: int) -> None:
        if scan != self._scans:
            raise RuntimeError("a read view's scan was resumed after another scan of the same view began")

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` pairs with ``lo <= key < hi``, in key order."""
        it, scan = self._walk(lo)
        while it.valid():
            key = it.key()
            if key >= hi:
                return
            yield key, it.value()
            self._check(scan)
            it.next()

    def keys(self, lo: bytes, hi: bytes) -> Iterator[bytes]:
        """The keys ``lo <= key < hi``, in key order (no value is read)."""
        it, scan = self._walk(lo)
        while it.valid():
            key = it.key()
            if key >= hi:
                return
            yield key
            self._check(scan)
            it.next()

    def scan_batches(self, lo: bytes, hi: bytes, size: int) -> Iterator[list[tuple[bytes, bytes]]]:
        """``scan(lo, hi)`` in lists of at most ``size`` pairs."""
        it, scan = self._walk(lo)
        while True:
            batch = []
            while len(batch) < size and it.valid():
                key = it.key()
                if key >= hi:
                    break
                batch.append((key, it.value()))
                it.next()
            if not batch:
                return
            yield batch
            if len(batch) < size:
                return
            self._check(scan)

    def close(self) -> None:
        """Release the iterators (and the versions they pin)."""
        self._getter = self._walker = None

    def __enter__(self) -> RocksReadView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A shard's key-value data in the node's storage engine, with the writes since the last checkpoint in memory.

``KVState`` (raftkv.state) sees its data through the mapping interface of ``raftkv.state.Store``:
``key -> (value, mod_revision)``.  ``EngineStore`` gives the same interface over the node's engine:

* **committed part**: every key of shard S as of the shard's last checkpoint, under
  ``b"D" + u32 S + u32 generation + key`` (a snapshot install writes a new generation beside the current one
  and switches to it in one small commit: ``raftkv.snapshot``) with the value packed as ``u64 revision (little-endian) + value`` (the in-memory
  ``Store``'s packing).  A checkpoint commits the writes below together with the rest of the shard's state
  and its applied index in one engine transaction (``raftkv.snapshot``), so the committed data always
  matches the applied index stored beside it: a restart loads no data at all, and replays the log above
  that index.
* **overlay**: the keys written since that checkpoint (the packed value, or None for a deletion), in a
  dict, bounded by how often the replica checkpoints.  Reads look here first, then in the engine.  While a
  checkpoint commits (on another thread), its writes are *frozen*: still read, between the overlay and the
  engine, until the commit holding them completes.

Data larger than memory is the point: only the overlay and the engine's page cache (file-backed, which the
kernel may drop) hold keys.  Keys of one shard are contiguous and in byte order in the engine, so a shard,
or a range of keys inside it, scans in order (``keys_between``).

Concurrency contract: writes (``__setitem__``, ``pop``, ``freeze``, ``thaw``) happen on the one thread applying
the shard's log; ``write_checkpoint`` and ``checkpointed`` may run on the thread committing the checkpoint.
Other threads may read (``get``, ``peek``-style stale reads, ``len``); they see either side of a checkpoint,
never a mix that did not exist, because frozen writes are dropped only after the engine commit that holds
them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from raftkv.engine import Engine, ReadView, WriteBatch

_MISSING = object()


def data_prefix(shard: int, gen: int = 0) -> bytes:
    """Engine key prefix of shard ``shard``'s data in generation ``gen``."""
    return b"D" + shard.to_bytes(4, "big") + gen.to_bytes(4, "big")


def data_range(shard: int, gen: int = 0) -> tuple[bytes, bytes]:
    """``[lo, hi)`` covering every data key of ``shard`` in generation ``gen``."""
    return data_prefix(shard, gen), data_prefix(shard, gen + 1)


def shard_range(shard: int) -> tuple[bytes, bytes]:
    """``[lo, hi)`` covering every data key of ``shard``, all generations."""
    return b"D" + shard.to_bytes(4, "big"), b"D" + (shard + 1).to_bytes(4, "big")


def pack(entry: tuple[bytes, int]) -> bytes:
    """``(value, revision)`` as stored: u64 revision (little-endian), then the value."""
    value, rev = entry
    return rev.to_bytes(8, "little") + value


def unpack(raw: bytes) -> tuple[bytes, int]:
    """Inverse of ``pack``."""
    return raw[8:], int.from_bytes(raw[:8], "little")


def _in_order(keys: Iterable[bytes]) -> Iterator[bytes]:
    """``keys`` in byte order, sorted lazily (a heap): a scan that stops after a chunk (a move's ``mv_scan``)
    pays for the keys it took, not for sorting every key written since the last checkpoint (up to 10,000:
    that sort was most of a chunk's scan)."""
    heap = list(keys)
    heapq.heapify(heap)
    while heap:
        yield heapq.heappop(heap)


class EngineStore:
    """``key -> (value, revision)`` of one shard: committed in ``engine``, newer writes in memory (module doc)."""

    def __init__(self, engine: Engine, shard: int, count: int = 0, gen: int = 0) -> None:
        self._engine = engine
        self.shard = shard
        self.gen = gen
        self._prefix = data_prefix(shard, gen)
        self._lo, self._hi = data_range(shard, gen)
        self._overlay: dict[bytes, bytes | None] = {}
        # The overlay of a checkpoint being committed (``freeze``): read after the overlay, before the engine.
        self._frozen: dict[bytes, bytes | None] = {}
        self._count = count  # live keys, committed and overlay together

    # ---- reads -----------------------------------------------------------------------------------------------

    def _raw(self, key: bytes) -> bytes | None:
        raw = self._overlay.get(key, _MISSING)
        if raw is _MISSING:
            raw = self._frozen.get(key, _MISSING)
            if raw is _MISSING:
                return self._engine.get(self._prefix + key)
        return raw  # type: ignore[return-value]

    def get(self, key: bytes, default: Any = None) -> Any:
        """``(value, revision)`` of ``key``, or ``default``."""
        raw = self._raw(key)
        return default if raw is None else unpack(raw)

    def __getitem__(self, key: bytes) -> tuple[bytes, int]:
        raw = self._raw(key)
        if raw is None:
            raise KeyError(key)
        return unpack(raw)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self._raw(key) is not None

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def keys_between(self, lo: bytes = b"", hi: bytes | None = None) -> Iterator[bytes]:
        """Live keys ``k`` with ``lo <= k < hi`` (no upper bound when ``hi`` is None), in byte order."""
        overlay = self._merged()  # a consistent copy: the applying thread may write meanwhile
        mine = _in_order(k for k in overlay if lo <= k and (hi is None or k < hi))
        n = len(self._prefix)
        end = self._hi if hi is None else self._prefix + hi
        committed = (k[n:] for k, _ in self._engine.scan(self._prefix + lo, end))
        last = None
        for key in heapq.merge(committed, mine):
            if key == last:
                continue  # in both: the overlay's entry decides
            last = key
            if overlay.get(key, _MISSING) is None:
                continue  # deleted since the checkpoint
            yield key

    def values_where(self, want: Callable[[bytes], bool], lo: bytes = b"",
                     values: bool = True) -> Iterator[tuple[bytes, bytes | None]]:
        """Every live key ``k >= lo`` in byte order, with its value (no revision) where ``want(k)``, else None
        (``values`` False: ``b""`` where ``want(k)``, no value read: a move's cleanup wants keys only).

        One engine read view for the whole walk, and no value read that is not wanted (a move's scan,
        ``raftkv.reshard``, wants a third of a shard's keys): ``keys_between`` then a ``get`` per key opened a
        read transaction per key."""
        overlay = self._merged()  # a consistent copy, taken before the view (see ``keys_between``)
        mine = _in_order(k for k in overlay if lo <= k)
        prefix = self._prefix
        n = len(prefix)
        with self._engine.read_view() as view:
            last = None
            for key in heapq.merge((k[n:] for k in view.keys(prefix + lo, self._hi)), mine):
                if key == last:
                    continue  # in both: the overlay's entry decides
                last = key
                raw = overlay.get(key, _MISSING)
                if raw is None:
                    continue  # deleted since the checkpoint
                if not want(key):
                    yield key, None
                    continue
                if not values:
                    yield key, b""
                    continue
                if raw is _MISSING:
                    raw = view.get(prefix + key)  # listed by this very view: present
                yield key, raw[8:]  # type: ignore[index]

    def __iter__(self) -> Iterator[bytes]:
        return self.keys_between()

    def items(self) -> Iterator[tuple[bytes, tuple[bytes, int]]]:
        """``(key, (value, revision))`` in key order (reads each key: for tools and tests, not hot paths)."""
        for key in self.keys_between():
            entry = self.get(key)
            if entry is not None:
                yield key, entry

    # ---- writes (the applying thread only) -------------------------------------------------------------------

    def __setitem__(self, key: bytes, entry: tuple[bytes, int]) -> None:
        if self._raw(key) is None:
            self._count += 1
        self._overlay[key] = pack(entry)

    def pop(self, key: bytes, *default: Any) -> Any:
        """Delete ``key``; returns its ``(value, revision)``, else ``default`` (KeyError without one)."""
        raw = self._raw(key)
        if raw is None:
            if default:
                return default[0]
            raise KeyError(key)
        self._overlay[key] = None
        self._count -= 1
        return unpack(raw)

    def __delitem__(self, key: bytes) -> None:
        self.pop(key)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def pending(self) -> int:
        """Keys written since the last completed checkpoint."""
        return len(self._merged())

    def written(self) -> int:
        """Keys written since the checkpoint in progress (or the last one) began: cheap, for the trigger."""
        return len(self._overlay)

    def _merged(self) -> dict[bytes, bytes | None]:
        frozen, overlay = self._frozen, self._overlay  # read once: both may be replaced meanwhile
        if not frozen:
            return overlay.copy()
        merged = frozen.copy()
        merged.update(overlay)
        return merged

    def freeze(self) -> dict[bytes, bytes | None]:
        """Start a checkpoint: the writes so far become the frozen set (still read, no longer written) and new
        writes go to a fresh overlay. Returns the frozen set, to pass to ``write_checkpoint``."""
        if self._frozen:
            raise RuntimeError("a checkpoint is already being committed")
        self._frozen, self._overlay = self._overlay, {}
        return self._frozen

    def checkpoint_rows(self, frozen: dict[bytes, bytes | None]) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
        """``frozen``'s writes as engine rows: ``(keys to delete, (key, value) rows to put in key order)``.

        Built before the checkpoint's transaction: that one holds the engine's only writer, and every group's
        log commit on the node waits behind it (building these rows for 10,000 keys inside it held the writer
        for the milliseconds of Python it took, and the GIL waits of a busy node on top)."""
        prefix = self._prefix
        deletes = [prefix + key for key, raw in frozen.items() if raw is None]
        puts = sorted((prefix + key, raw) for key, raw in frozen.items() if raw is not None)
        return deletes, puts  # (in key order LMDB's C loop fills pages in sequence: half the time of one by one)

    def write_checkpoint(self, batch: WriteBatch, frozen: dict[bytes, bytes | None] | None = None,
                         rows: tuple[list[bytes], list[tuple[bytes, bytes]]] | None = None) -> None:
        """Add ``frozen``'s writes (default: ``freeze()`` now; or its ``checkpoint_rows``, built beforehand) to
        ``batch``, one engine transaction; call ``checkpointed`` once it committed (``thaw`` if it failed)."""
        if rows is None:
            rows = self.checkpoint_rows(self.freeze() if frozen is None else frozen)
        deletes, puts = rows
        for key in deletes:
            batch.delete(key)
        batch.put_many(puts)

    def checkpointed(self) -> None:
        """The transaction holding the frozen writes committed: the engine has them now."""
        self._frozen = {}

    def thaw(self) -> None:
        """The checkpoint failed: its writes go back under the newer ones (the applying thread only)."""
        frozen, self._frozen = self._frozen, {}
        frozen.update(self._overlay)
        self._overlay = frozen

    def view(self) -> StoreView:
        """A point-in-time, read-only copy for another thread (backups): the engine as of now plus the overlay."""
        return StoreView(self._engine.read_view(), self.shard, self.gen, self._merged(), self._count)


class StoreView:
    """A frozen ``EngineStore``: ``items()`` in key order, ``len``; call ``close`` (or exhaust ``items``)."""

    def __init__(self, view: ReadView, shard: int, gen: int, overlay: dict[bytes, bytes | None], count: int) -> None:
        self._view = view
        self._lo, self._hi = data_range(shard, gen)
        self._overlay = overlay
        self._count = count

    def __len__(self) -> int:
        return self._count

    def items(self) -> Iterator[tuple[bytes, tuple[bytes, int]]]:
        """Every live ``(key, (value, revision))`` in key order; closes the view at the end."""
        try:
            n = len(self._lo)
            overlay = self._overlay
            committed = ((k[n:], raw) for k, raw in self._view.scan(self._lo, self._hi))
            mine = sorted(overlay.items())
            last = None
            for key, raw in heapq.merge(committed, mine, key=lambda kv: kv[0]):
                if key == last:
                    continue
                last = key
                raw = overlay.get(key, raw)
                if raw is not None:
                    yield key, unpack(raw)
        finally:
            self.close()

    def close(self) -> None:
        """Release the engine snapshot."""
        self._view.close()

"""Reclaiming a removed replica's space in the node's storage engine.

A node stops a shard's group when an installed shard map no longer places the shard on it (``Node.install_map``;
a rebalance removes the node from the group before it pushes that map). Everything the group stored in the
node's engine is then deleted: its log entries and hard state (``raftkv.raftlog``), its checkpoint metadata
(``raftkv.snapshot``) and every generation of its keys (``raftkv.kvstore``), plus its files in the data dir
(the checkpoint marker, old-layout journals). Every one of those engine keys is ``prefix + u32 group + ...``
for a prefix in ``GROUP_PREFIXES``, so a group's data is four contiguous ranges (``group_ranges``).

Steps, each crash-safe:

1. **mark** (``mark``): ``b"R" + u32 group`` is committed durably, before the group is destroyed. From then on
   the group's data is "being reclaimed": a restart never loads it (a marked shard that the map places on the
   node again is reclaimed to the end before its new member starts, ``finish``), and resumes the deletion.
2. **prepare** (first ``step`` after the group is gone from the driver): one engine commit of whatever the group
   still had buffered (so no write of it lands after the deletions), then its directory is removed (and the
   parent directory fsynced, so the marker file cannot come back after a power loss while the metadata it
   points at is gone).
3. **chunks** (``step``, once per driver loop): one engine commit deletes up to ``chunk_keys`` keys of the
   group's ranges; the commit that finds fewer left also deletes the mark. A large shard thus never holds the
   one writer (or the driver) for long, and the node's other groups commit between two chunks.

A crash anywhere leaves the mark (then the restart resumes) or no key of the group at all. Nothing here changes
what the group's other members hold: the node had already left the group.

Threads: ``mark``, ``finish``, ``stats``, ``pending`` and ``leftover`` from any thread; ``step`` on the driver
thread (``RaftDriver.add_chore``). One lock serialises the work on a group, so ``finish`` (a re-add) and the
driver's ``step`` never delete the same group at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Container

from raftkv.engine import Engine, EngineError, WriteBatch
from raftkv.filejournal import DEFAULT_STORAGE

log = logging.getLogger("raftkv.reclaim")

#: Keys deleted per engine commit: a few ms of commit, so the driver's other groups wait at most that long.
CHUNK_KEYS = 2_000
#: ``leftover`` counts at most this many keys per group (it is for status and tests, not a full scan).
LEFTOVER_CAP = 10_000
#: Every engine key of group G is one of these prefixes + u32 G + ...: ``H`` hard state, ``L`` log entries
#: (raftkv.raftlog), ``M`` checkpoint metadata (raftkv.snapshot), ``D`` data keys of every generation
#: (raftkv.kvstore), ``I`` the group's incarnation (``Reclaimer.adopt``).
GROUP_PREFIXES = (b"D", b"H", b"I", b"L", b"M")
_MARK = b"R"
_INCARNATION = b"I"


def incarnation_key(group: int) -> bytes:
    """Engine key holding the incarnation (``ShardMap.born``) of the group whose data the node holds; absent: 0."""
    return _INCARNATION + group.to_bytes(4, "big")


def mark_key(group: int) -> bytes:
    """Engine key saying ``group``'s data is being reclaimed."""
    return _MARK + group.to_bytes(4, "big")


def group_ranges(group: int) -> list[tuple[bytes, bytes]]:
    """``[lo, hi)`` ranges covering every engine key ``group`` stores (the mark excepted)."""
    return [(p + group.to_bytes(4, "big"), p + (group + 1).to_bytes(4, "big")) for p in GROUP_PREFIXES]


@dataclasses.dataclass
class ReclaimStats:
    """Since this process started: groups whose reclaim finished, the keys and bytes (keys + values) deleted
    and the commits that deleted them."""

    groups: int = 0
    keys: int = 0
    bytes: int = 0
    chunks: int = 0


@dataclasses.dataclass
class _Progress:
    prepared: bool = False  # buffered writes committed and the directory removed, in this process
    keys: int = 0
    bytes: int = 0
    chunks: int = 0
    t0: float = dataclasses.field(default_factory=time.perf_counter)


class Reclaimer:
    """Deletes the engine data of groups this node no longer hosts (module doc)."""

    def __init__(self, engine: Engine, group_dir: Callable[[int], str] | None = None,
                 chunk_keys: int = CHUNK_KEYS) -> None:
        self._engine = engine
        self._group_dir = group_dir
        self.chunk_keys = chunk_keys
        self._lock = threading.RLock()
        self._pending: dict[int, _Progress] = {}
        self._stats = ReclaimStats()
        self.failure: str | None = None  # why reclaiming stopped until the next start (None: it did not)
        lo, hi = _MARK, bytes([_MARK[0] + 1])
        for key, _ in engine.scan(lo, hi):
            group = int.from_bytes(key[1:5], "big")
            self._pending[group] = _Progress()
        if self._pending:
            log.info("event=reclaim_resumed groups=%s", sorted(self._pending))

    def mark(self, group: int) -> None:
        """Durably mark ``group``'s data as being reclaimed (one engine commit, with whatever was buffered)."""
        with self._lock:
            if group in self._pending:
                return
            self._engine.put(mark_key(group), b"")
            self._engine.sync()
            self._pending[group] = _Progress()
        log.info("event=reclaim_begin group=%d", group)

    def pending(self) -> list[int]:
        """Groups marked and not yet fully deleted."""
        with self._lock:
            return sorted(self._pending)

    def stats(self) -> ReclaimStats:
        """A copy of the counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    def step(self, in_use: Container[int] = ()) -> bool:
        """Delete one chunk of the first marked group not in ``in_use`` (the driver's live groups); True while
        more is left to do.

        Never waits: when ``finish`` holds the group lock or a checkpoint holds the engine's one writer, it
        leaves the chunk to the next call (the driver's loop is every group's heartbeat).
        """
        if not self._pending or self.failure is not None:
            return False
        if self._engine.writer_busy() or not self._lock.acquire(blocking=False):
            return True
        try:
            group = next((g for g in self._pending if g not in in_use), None)
            if group is None:
                return False
            try:
                self._chunk(group)
            except (EngineError, OSError) as exc:
                # Left for the next start (the mark is durable); the driver's own commits report a broken engine.
                self.failure = f"group {group}: {exc}"
                log.error("event=reclaim_failed group=%d error=%s", group, exc)
                return False
            return any(g not in in_use for g in self._pending)
        finally:
            self._lock.release()

    def incarnation(self, group: int) -> int | None:
        """The incarnation of ``group`` whose data this engine holds (None: none recorded, i.e. 0 or no data)."""
        value = self._engine.get(incarnation_key(group))
        return None if value is None else int.from_bytes(value, "big")

    def holds(self, group: int) -> bool:
        """Whether the engine holds any log entry, hard state, checkpoint or data key of ``group``."""
        g = group.to_bytes(4, "big")
        with self._engine.read_view() as view:
            return any(next(view.scan(p + g, p + (group + 1).to_bytes(4, "big")), None) is not None
                       for p in GROUP_PREFIXES if p != _INCARNATION)

    def adopt(self, group: int, incarnation: int) -> bool:
        """Before a member of incarnation ``incarnation`` of ``group`` starts on this node: whatever the engine
        holds of another incarnation (a shard removed while this node was down or cut off, then added again)
        is reclaimed first, and the incarnation is recorded durably. True if old data was reclaimed.

        A group's data is only ever that of one incarnation: a member never starts from another group's log
        (whose terms and entries the new group's leader could take for its own).
        """
        with self._lock:
            stale = False
            held = self.incarnation(group) or 0
            if group not in self._pending and held != incarnation and self.holds(group):
                log.warning("event=stale_incarnation group=%d held=%s want=%d msg='reclaiming the data of an "
                            "earlier group of this shard id before the new one starts'", group, held, incarnation)
                self.mark(group)
                stale = True
            self.finish(group)
            if self.incarnation(group) != (incarnation or None):
                if incarnation:
                    self._engine.put(incarnation_key(group), incarnation.to_bytes(8, "big"))
                else:
                    self._engine.delete(incarnation_key(group))
                self._engine.sync()
            return stale

    def finish(self, group: int) -> None:
        """Reclaim ``group`` to the end now, if it is marked (before a new member of it starts here)."""
        with self._lock:
            while group in self._pending:
                self._chunk(group)

    def _chunk(self, group: int) -> None:
        progress = self._pending[group]
        if not progress.prepared:
            self._engine.sync()  # the group's last buffered writes land before the deletions, never after
            self._remove_dir(group)
            progress.prepared = True
        limit = self.chunk_keys

        def write(batch: WriteBatch) -> tuple[int, int, bool]:
            keys = size = 0
            for lo, hi in group_ranges(group):
                n, b = batch.delete_first_sized(lo, hi, limit - keys)
                keys += n
                size += b
                if keys >= limit:
                    return keys, size, False
            batch.delete(mark_key(group))  # nothing left: the same commit ends the reclaim
            return keys, size, True

        keys, size, done = self._engine.commit_now(write, "reclaim")
        progress.keys += keys
        progress.bytes += size
        progress.chunks += 1
        st = self._stats
        st.keys += keys
        st.bytes += size
        st.chunks += 1
        if done:
            del self._pending[group]
            st.groups += 1
            log.info("event=reclaim_done group=%d keys=%d bytes=%d chunks=%d ms=%.1f", group, progress.keys,
                     progress.bytes, progress.chunks, (time.perf_counter() - progress.t0) * 1000)

    def _remove_dir(self, group: int) -> None:
        if self._group_dir is None:
            return
        path = self._group_dir(group)
        if not os.path.exists(path):
            return
        shutil.rmtree(path)
        DEFAULT_STORAGE.fsync_dir(path)  # the removal is durable: its checkpoint marker cannot come back

    def leftover(self, hosted: Container[int], cap: int = LEFTOVER_CAP) -> dict[int, int]:
        """Engine keys of groups not in ``hosted``, per group (at most ``cap`` counted per group): what a
        node holds for groups it does not serve. Empty once every removed group was reclaimed."""
        counts: dict[int, int] = {}
        with self._engine.read_view() as view:
            for prefix in GROUP_PREFIXES:
                lo, end = prefix, bytes([prefix[0] + 1])
                while True:
                    first = next(view.scan(lo, end), None)
                    if first is None:
                        break
                    group = int.from_bytes(first[0][1:5], "big")
                    g_lo, g_hi = prefix + group.to_bytes(4, "big"), prefix + (group + 1).to_bytes(4, "big")
                    if group not in hosted:
                        n = counts.get(group, 0)
                        for _ in view.scan(g_lo, g_hi):
                            n += 1
                            if n >= cap:
                                break
                        counts[group] = n
                    lo = g_hi
        return counts

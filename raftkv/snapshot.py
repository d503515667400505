"""Checkpoints and snapshots of one shard replica, kept in the node's storage engine.

pysyncobj compacts its log and ships state to lagging followers through a *serializer* object: ``serialize``
at the applied index when it compacts, ``checkSerializing`` before it drops the log prefix, ``deserialize`` on
restart and after a snapshot install, and ``getTransmissionData`` / ``setTransmissionData`` to move a snapshot
in chunks.  ``ShardSnapshots`` takes its place for a ``ShardReplica`` (raftkv.replica):

* **Checkpoint** (``serialize``): the writes applied since the last checkpoint (the ``EngineStore`` overlay),
  the shard's other state (``KVState.meta``: revision, sessions, transactions, leases, ...) and pysyncobj's
  snapshot data (the last two applied entries and the members) go into ONE engine transaction with one durable
  commit.  Its cost is the keys written since the last checkpoint, not the shard's size.  Only after it has
  committed does pysyncobj drop the log prefix it covers (a later commit), so at every instant the engine
  holds a checkpoint at some index S and the log holds every entry after S: a crash anywhere restarts from
  S and replays the rest.
* **Restart** (``deserialize``): reads the checkpoint's metadata; the data stays in the engine.  Nothing is
  loaded into memory and nothing below S is replayed, whatever the data size.
* **Snapshot to a follower** (``getTransmissionData``): a consistent engine read view (LMDB MVCC, so the
  stream is the checkpoint as of its start even if the leader checkpoints again meanwhile) streamed as
  records: a header (format, pysyncobj data, state metadata, the leader's generation), then the keys in
  order in slices of ``KEYS_PER_RECORD`` (the cursor's own ``(key, value)`` rows, marshalled: no Python step
  per key), then an end record.  Each record carries its length and a CRC-32.  While more than
  ``SEND_BACKLOG_BYTES`` wait to leave for the follower's node (``unsent``) no chunk is made, so a transfer
  never queues much in front of the heartbeats, votes and acks sharing the connection (and raftfix bounds
  the time a leader spends making chunks per send).
* **Install** (``setTransmissionData`` + ``deserialize``): the follower writes the received keys into a
  generation it does not serve from (data keys carry a generation number: ``raftkv.kvstore``): the leader's,
  so they are stored exactly as received, unless the follower serves from that one (it installed from this
  leader before), then the next one, each key re-prefixed.  It commits them per ``INSTALL_COMMIT_BYTES`` of
  stream and at the end, while it goes on serving from the current generation.  Once the end record arrived,
  every record's checksum and the key count agree and the last keys are committed (durably: every engine
  commit is), one small commit writes the snapshot's metadata naming the new generation: that is the switch.
  The old generation's keys are then deleted a slice per tick (``tidy``).  A crash before the switch leaves
  the old state (the partial generation is deleted at start-up); a crash after it, the new one; a damaged,
  cut or out-of-order stream (records' keys must lie in the leader's range and ascend) is refused, never
  acknowledged, and sent again.  A replica with no checkpoint yet draws its generation at random, so a new
  follower takes the first, faster path.

pysyncobj checks for a "dump file" to decide whether to load a snapshot at start-up; here that file is a small
marker that says "the checkpoint is in the engine".  It exists whenever the engine holds a checkpoint of the
shard (``open_state`` at start-up, and after the first checkpoint).  A dump of the old format
(``RKVSNAP2``: the whole state in the file) found there is moved into the engine once, then replaced by the
marker.

Threads: everything here runs on the thread that ticks the group.
"""

from __future__ import annotations

import logging
import marshal
import os
import pickle
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from pysyncobj.config import SERIALIZER_STATE

from raftkv.engine import Engine, EngineError, WriteBatch
from raftkv.kvstore import EngineStore, data_range, pack, shard_range
from raftkv.state import KVState

log = logging.getLogger("raftkv.snapshot")

MARKER = b"RKVENGN1 the shard's state is in the node's storage engine\n"
LEGACY_MAGIC = b"RKVSNAP2"
STREAM_MAGIC = b"RKVSTRM1"
FORMAT = 1  # of checkpoint metadata, and of version-1 streams (records are lists of (key, value) rows)
# Version-2 streams: a record is ([keys without the shard's prefix], (values,)), pickled.
# Version-3 streams (sent now): the header also names the leader's generation, and a record is the rows exactly
# as the leader's cursor read them (whole engine keys, values as stored) in marshal's format 4: no Python step
# per key on the leader, and on a follower that installs into the generation the leader's keys already name,
# none either (``_Receiving``). Receivers take every version; a receiver of an older build refuses a newer
# stream as an unknown format (nothing installed), as it must.
# Version-4 streams: as version 3, and the header's transaction table sends its history as pickled segments
# (raftkv.retained), which a version-3 receiver would not read: it refuses the stream instead.
STREAM_FORMAT = 4
STREAM_FORMATS = (FORMAT, 2, 3, STREAM_FORMAT)
ROWS_FORMATS = (3, STREAM_FORMAT)  # streams whose records are marshalled engine rows
# Checkpoint metadata whose transaction-history segments are engine rows of their own (``history_key``),
# written when a segment changes, not with every checkpoint: a shard keeps ten minutes of finished
# transactions, and one metadata value holding them all grew to megabytes rewritten every checkpoint.
CHECKPOINT_FORMAT = 4
MARSHAL_VERSION = 4  # the format of version-3 records (stable since Python 3.4)
KEYS_PER_RECORD = 2_000
_REC_HEAD = 8  # u32 length + u32 CRC-32 of the payload
#: A follower commits the keys received so far once this many bytes of stream are waiting (and at the end),
#: not per chunk: each commit is a durable one (an fsync), and the install needs durability only at its end.
INSTALL_COMMIT_BYTES = 4 << 20
#: A leader sends the next chunk to a follower only while less than this is queued for that follower's node
#: and not yet taken by its socket: a snapshot never queues more than that in front of the heartbeats,
#: votes and acks that share the connection.
SEND_BACKLOG_BYTES = 4 << 20
FRESH_GENS = 1 << 31  # a replica with no checkpoint takes a generation below this at random (open_state)


def meta_key(shard: int) -> bytes:
    """Engine key of shard ``shard``'s checkpoint metadata."""
    return b"M" + shard.to_bytes(4, "big")


def history_key(shard: int, n: int) -> bytes:
    """Engine key of row ``n`` of shard ``shard``'s transaction history (a pickled segment, raftkv.retained)."""
    return meta_key(shard) + b"h" + n.to_bytes(8, "big")


def history_range(shard: int) -> tuple[bytes, bytes]:
    """``[lo, hi)`` of every history row of ``shard`` (inside the group's ``M`` range, so reclaim deletes them)."""
    return meta_key(shard) + b"h", meta_key(shard) + b"i"


def _record(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big") + payload


class SnapshotError(ValueError):
    """A snapshot stream or file is damaged or of an unknown format."""


class ShardSnapshots:
    """pysyncobj's serializer for one shard replica, backed by the engine (module doc)."""

    def __init__(self, engine: Engine, shard: int, marker_path: str, batch_bytes: int,
                 get_state: Callable[[], KVState], set_state: Callable[[KVState], None],
                 background: bool = False) -> None:
        self._engine = engine
        self.shard = shard
        self._marker = marker_path
        self._received = marker_path + ".recv"
        self._batch = max(64 * 1024, batch_bytes)
        self._get_state = get_state
        self._set_state = set_state
        self._status = SERIALIZER_STATE.NOT_SERIALIZING
        self._status_id: int | None = None
        self._background = background  # checkpoints commit on a thread of their own (serialize)
        self._committing: threading.Thread | None = None
        self._done: tuple | None = None  # (ok, index, store, keys, seconds, history rows) of the checkpoint just committed
        self._tx: dict[Any, _Transmission] = {}
        self._gen = 0  # generation of the shard's data in use (a snapshot install moves to the next)
        self._rx: _Receiving | None = None
        self._stale: list[int] = []  # generations whose keys are still to be deleted (tidy)
        # The history segments the engine holds as of the last committed checkpoint: id(blob) -> (blob, row).
        # Holding each blob keeps its id from being reused; ``Retained`` hands back the same bytes object while
        # a segment is unchanged, so a checkpoint writes only the segments it has not seen.
        self._rows: dict[int, tuple[bytes, int]] = {}
        self._next_row = 0
        self.stats = {"checkpoints": 0, "checkpoint_keys": 0, "checkpoint_s": 0.0, "installs": 0, "sent": 0}
        #: bytes queued for a node and not yet sent (``MuxTransport.unsent``): paces a transfer (leader)
        self.unsent: Callable[[Any], int] | None = None

    # ---- start-up --------------------------------------------------------------------------------------------

    def open_state(self) -> KVState:
        """The state to start from before any dump load: an empty state over this shard's engine data.

        Also restores the invariant "marker present iff the engine holds a checkpoint" that pysyncobj's start-up
        relies on, and drops every generation of the shard's data but the current one (a transfer cut short, or
        the old generation of an install whose clean-up did not finish).
        """
        blob = self._engine.get(meta_key(self.shard))
        if blob is not None:
            self._write_marker()
        elif os.path.exists(self._marker) and not self._is_legacy(self._marker):
            raise EngineError(f"{self._marker} says shard {self.shard}'s state is in the engine, but the engine "
                              f"in {self._engine.path} holds no checkpoint of it: the data directory is "
                              "inconsistent (engine directory lost or replaced?); restore it from a backup")
        gens = self._generations()
        if blob is None:
            # No checkpoint yet: any generation not holding keys will do, and one drawn at random is almost
            # never the one a leader's snapshot names, so such a snapshot's keys are stored as they arrive
            # (``_Receiving``: the follower installs into the leader's generation unless it serves from it).
            self._gen = next(g for g in iter(lambda: secrets.randbelow(FRESH_GENS), None) if g not in gens)
        else:
            self._gen = _load_meta(blob, self.shard, None)[3]
        self._stale = [g for g in gens if g != self._gen]
        return KVState(data=EngineStore(self._engine, self.shard, gen=self._gen))

    def _generations(self) -> list[int]:
        """Generations with keys in the engine (one seek each)."""
        lo, hi = shard_range(self.shard)
        gens: list[int] = []
        with self._engine.read_view() as view:
            while True:
                first = next(view.scan(lo, hi), None)
                if first is None:
                    return gens
                gen = int.from_bytes(first[0][5:9], "big")
                gens.append(gen)
                lo = data_range(self.shard, gen)[1]

    # ---- checkpoint (pysyncobj: serialize / checkSerializing) ------------------------------------------------

    def serialize(self, data: tuple, id: int) -> None:  # noqa: A002 - pysyncobj's name
        """Checkpoint the state at the applied entry ``data[1]`` (pysyncobj's compaction).

        On the applying thread: the writes so far are frozen and the metadata is taken, as of this index. A
        thread then commits them (LMDB's one writer: the driver's own log commits wait their turn meanwhile,
        and everything that depends on them waits in raftfix's gate, while the driver goes on receiving,
        ticking and sending heartbeats, so a long checkpoint is not mistaken for a dead leader).
        ``checkSerializing`` reports SERIALIZING until it is done; the log prefix is dropped only after.
        """
        raft_data = data[1:]
        state = self._get_state()
        store = state.data
        t0, cpu0 = time.perf_counter(), time.thread_time()
        frozen = store.freeze()
        meta, rows, puts, deletes = self._split_history(state.meta())
        blob = _dump_meta(raft_data, meta, store.gen, CHECKPOINT_FORMAT)

        def write(batch: WriteBatch) -> None:
            store.write_checkpoint(batch, rows=data_rows)
            for key in deletes:
                batch.delete(key)
            for key, seg in puts:
                batch.put(key, seg)
            batch.put(meta_key(self.shard), blob)

        data_rows: tuple = ([], [])

        def commit() -> None:
            nonlocal data_rows
            try:
                data_rows = store.checkpoint_rows(frozen)  # outside the transaction: the writer is held less
                t1 = time.perf_counter()
                self._engine.commit_now(write)
                held = time.perf_counter() - t1
                store.checkpointed()
                self._write_marker()
            except Exception:  # the applying thread thaws the frozen writes (checkSerializing)
                log.exception("event=checkpoint_failed shard=%d", self.shard)
                self._done = (False, id, store, 0, 0.0, None)
                return
            dt = time.perf_counter() - t0
            log.info("event=checkpoint shard=%d index=%d keys_written=%d meta_bytes=%d ms=%.1f commit_ms=%.1f",
                     self.shard, raft_data[0][1], len(frozen), len(blob), dt * 1000, held * 1000)
            self._done = (True, id, store, len(frozen), dt, rows)

        self._done = None
        self._status, self._status_id = SERIALIZER_STATE.SERIALIZING, id
        # with event=checkpoint (logged once committed): a crash between the two was a crash in a checkpoint
        # prep_ms: how long the applying thread spent on it (every group's heartbeats waited as long); cpu_ms: how
        # much of that was its own CPU (the rest: the GIL or a CPU held by others)
        log.info("event=checkpoint_begin shard=%d index=%d keys=%d prep_ms=%.1f cpu_ms=%.1f", self.shard,
                 raft_data[0][1], len(frozen), (time.perf_counter() - t0) * 1000, (time.thread_time() - cpu0) * 1000)
        if self._background:
            self._committing = threading.Thread(target=commit, name=f"checkpoint-{self.shard}", daemon=True)
            self._committing.start()
        else:
            commit()

    def checkSerializing(self) -> tuple[int, int | None]:  # noqa: N802 - pysyncobj's name
        """SERIALIZING while a checkpoint commits; then SUCCESS (or FAILED) once, with its index;
        NOT_SERIALIZING otherwise. Runs on the applying thread, which is where a failed one is undone."""
        if self._status == SERIALIZER_STATE.SERIALIZING:
            done = self._done
            if done is None:
                return SERIALIZER_STATE.SERIALIZING, self._status_id
            self._finish(done)
        status, sid = self._status, self._status_id
        if status != SERIALIZER_STATE.NOT_SERIALIZING:
            self._status, self._status_id = SERIALIZER_STATE.NOT_SERIALIZING, None
        return status, sid

    def _split_history(self, meta: tuple) -> tuple[tuple, dict, list[tuple[bytes, bytes]], list[bytes]]:
        """``meta`` with its transaction-history segments replaced by row numbers, what ``_rows`` becomes once
        the checkpoint is committed, the rows to write (segments the engine does not hold yet) and the rows to
        delete (segments gone since the last checkpoint)."""
        dump = meta[3]
        segments = dump.get("segments")
        rows: dict[int, tuple[bytes, int]] = {}
        puts: list[tuple[bytes, bytes]] = []
        refs: dict[str, list[int]] = {}
        for name, blobs in segments.items():
            ns = refs[name] = []
            for seg in blobs:
                known = self._rows.get(id(seg))
                if known is None or known[0] is not seg:
                    known = (seg, self._next_row)
                    self._next_row += 1
                    puts.append((history_key(self.shard, known[1]), seg))
                rows[id(seg)] = known
                ns.append(known[1])
        deletes = [history_key(self.shard, n) for i, (_, n) in self._rows.items() if i not in rows]
        light = {k: v for k, v in dump.items() if k != "segments"}
        light["segment_rows"] = refs
        return (*meta[:3], light, *meta[4:]), rows, puts, deletes

    def _finish(self, done: tuple) -> None:
        ok, sid, store, keys, dt, rows = done
        self._done, self._committing = None, None
        if ok:  # the engine holds exactly these history segments now
            self._rows = rows
        if ok:
            self.stats["checkpoints"] += 1
            self.stats["checkpoint_keys"] += keys
            self.stats["checkpoint_s"] += dt
            self._status = SERIALIZER_STATE.SUCCESS
        else:
            store.thaw()
            self._status = SERIALIZER_STATE.FAILED
        self._status_id = sid

    def wait_checkpoint(self) -> None:
        """Block until a checkpoint being committed is done (before replacing the state it belongs to)."""
        thread = self._committing
        if thread is not None:
            thread.join()
        if self._done is not None:
            self._finish(self._done)

    # ---- restart and install (pysyncobj: deserialize) ----------------------------------------------------

    def deserialize(self) -> tuple:
        """``(None, last, before, members)`` of the checkpoint now in effect; sets the replica's state.

        After a complete snapshot transfer, first switches to the generation it wrote (one small commit); a dump
        of the old format is moved into the engine first too.
        """
        self.wait_checkpoint()  # its commit must not land after the state it belongs to is replaced
        if self._rx is not None and self._rx.complete:
            self._flip(self._rx)
            self._rx = None
        elif self._is_legacy(self._marker):
            self._migrate_legacy(self._marker)
        blob = self._engine.get(meta_key(self.shard))
        if blob is None:
            raise EngineError(f"shard {self.shard}: no checkpoint in the engine in {self._engine.path}")
        raft_data, meta, _count, gen, rows = _load_meta_rows(blob, self.shard, self._engine.get)
        self._gen = gen
        self._rows = _rows_of(meta, rows)
        self._next_row = max(rows, default=-1) + 1
        state = KVState.from_meta(meta, EngineStore(self._engine, self.shard, count=meta[6], gen=gen))
        self._set_state(state)
        log.info("event=checkpoint_loaded shard=%d index=%d keys=%d gen=%d", self.shard, raft_data[0][1],
                 len(state), gen)
        return (None, *raft_data)

    def _flip(self, rx: _Receiving) -> None:
        """Make the fully received generation current: the snapshot's metadata, one small commit."""
        blob = _dump_meta(rx.raft_data, rx.meta, rx.gen)
        lo, hi = history_range(self.shard)

        def write(batch: WriteBatch) -> None:
            batch.delete_range(lo, hi)  # the history now comes with the metadata; the next checkpoint splits it
            batch.put(meta_key(self.shard), blob)

        self._engine.commit_now(write, "install.flip")
        self._rows = {}
        old, self._gen = self._gen, rx.gen
        self._stale.append(old)  # its keys are deleted a slice at a time (tidy)
        self._write_marker()
        self.stats["installs"] += 1
        # where the time went: parsing the records, committing their keys (commits: how many), the rest
        # (waiting for the next chunk, and everything else the driver did meanwhile)
        log.info("event=snapshot_installed shard=%d index=%d keys=%d gen=%d ms=%.1f parse_ms=%.0f commit_ms=%.0f "
                 "commits=%d", self.shard, rx.raft_data[0][1], rx.keys, rx.gen, (time.perf_counter() - rx.t0) * 1000,
                 rx.parse_s * 1000, rx.commit_s * 1000, rx.commits)

    def tidy(self, max_keys: int = 5_000) -> int:
        """Delete up to ``max_keys`` keys of generations no longer in use (one commit); returns how many.

        Called between ticks, so dropping a large shard's old generation never holds the driver for long.
        """
        while self._stale:
            lo, hi = data_range(self.shard, self._stale[0])
            n = self._engine.commit_now(lambda b, lo=lo, hi=hi: b.delete_first(lo, hi, max_keys), "tidy")
            if n:
                return n
            self._stale.pop(0)  # that generation is gone: on to the next, if any
        return 0

    def _is_legacy(self, path: str) -> bool:
        try:
            with open(path, "rb") as f:
                return f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC
        except FileNotFoundError:
            return False

    def _migrate_legacy(self, path: str) -> None:
        """Move an old-format dump (the whole state in one file, before the engine held data) into the engine."""
        with open(path, "rb") as f:
            blob = f.read()
        body = memoryview(blob)[12:]
        if zlib.crc32(body).to_bytes(4, "big") != blob[8:12]:
            raise SnapshotError(f"{path}: snapshot checksum mismatch")
        pos, parts = 0, []
        while pos < len(body):
            n = int.from_bytes(body[pos:pos + 8], "big")
            parts.append(body[pos + 8:pos + 8 + n])
            pos += 8 + n
        raft_data = pickle.loads(parts[0])
        old = KVState.from_chunks(iter(parts[1:]))
        lo, hi = data_range(self.shard, self._gen)
        blob = _dump_meta(raft_data, old.meta(), self._gen)

        def write(batch: WriteBatch) -> None:
            batch.delete_range(lo, hi)
            batch.put_many((lo + k, pack(entry)) for k, entry in sorted(old.data.items()))
            batch.put(meta_key(self.shard), blob)

        self._engine.commit_now(write)
        os.rename(path, path + ".migrated")
        self._write_marker()
        log.warning("event=snapshot_migrated shard=%d keys=%d from=%s (old layout: the state now lives in the "
                    "storage engine; the old file was kept as %s.migrated)", self.shard, len(old), path, path)

    def _write_marker(self) -> None:
        if os.path.exists(self._marker) and not self._is_legacy(self._marker):
            return
        tmp = self._marker + ".tmp"
        with open(tmp, "wb") as f:
            f.write(MARKER)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._marker)
        dir_fd = os.open(os.path.dirname(os.path.abspath(self._marker)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # ---- sending (leader) --------------------------------------------------------------------------------

    def getTransmissionData(self, node: Any) -> tuple[bytes, bool, bool] | None:  # noqa: N802 - pysyncobj's
        """The next chunk of the snapshot stream for ``node``: ``(data, is_first, is_last)``; None if none yet,
        or while more than ``SEND_BACKLOG_BYTES`` wait to leave for ``node`` (``unsent``: pysyncobj then sends a
        plain heartbeat, and asks again at its next send)."""
        tx = self._tx.get(node)
        if self.unsent is not None and self.unsent(node) > SEND_BACKLOG_BYTES:
            if tx is not None:
                tx.held += 1
            return None
        if tx is None:
            tx = _Transmission.open(self._engine, self.shard)
            if tx is None:
                return None
            self._tx[node] = tx
            self.stats["sent"] += 1
        t0 = time.perf_counter()
        data = tx.read(self._batch)
        tx.read_s += time.perf_counter() - t0
        is_first = tx.first
        tx.first = False
        if not data:
            tx.close()
            del self._tx[node]
            # read_ms: making the chunks; held: times a chunk waited for the connection's backlog to drain
            log.info("event=snapshot_sent shard=%d node=%s index=%d chunks=%d ms=%.1f read_ms=%.0f held=%d",
                     self.shard, getattr(node, "id", node), tx.tag[0], tx.chunks,
                     (time.perf_counter() - tx.t0) * 1000, tx.read_s * 1000, tx.held)
            return b"", is_first, True
        tx.chunks += 1
        return data, is_first, False

    def transmission_tag(self, node: Any) -> tuple[int, int] | None:
        """``(index, term)`` of the last entry the snapshot being sent to ``node`` covers."""
        tx = self._tx.get(node)
        return None if tx is None else tx.tag

    def cancelTransmisstion(self, node: Any) -> None:  # noqa: N802 - pysyncobj's (misspelt) name
        """Drop the transfer to ``node`` (disconnected); the next one starts from a fresh view."""
        tx = self._tx.pop(node, None)
        if tx is not None:
            tx.close()

    def close(self) -> None:
        """Release every open transfer's engine view (the group is being destroyed)."""
        for node in list(self._tx):
            self.cancelTransmisstion(node)
        self.wait_checkpoint()

    # ---- receiving (follower) ----------------------------------------------------------------------------

    def setTransmissionData(self, chunk: tuple[bytes, bool, bool] | None) -> bool:  # noqa: N802
        """Take a received chunk; True once the last chunk arrived whole and everything received is committed
        (then ``deserialize`` switches to it).  The keys go into a generation not in use, in a commit per
        ``INSTALL_COMMIT_BYTES`` of stream (none of them is read before the switch, and a crash before it
        deletes them at start-up, so they need no commit of their own per chunk).  A damaged or out-of-place
        chunk ends the transfer: nothing is acknowledged and the leader sends the snapshot again."""
        if chunk is None:
            return False
        data, is_first, is_last = chunk
        if is_first:
            self.wait_checkpoint()
            cut = self._rx
            if cut is not None and cut.gen is not None and cut.gen != self._gen and cut.gen not in self._stale:
                self._stale.append(cut.gen)  # a transfer cut short by this new one: its keys go (tidy)
            self._rx = _Receiving(self.shard, self._gen)
            log.info("event=snapshot_receiving shard=%d", self.shard)  # then snapshot_installed
        rx = self._rx
        if rx is None:
            return False
        try:
            had_gen = rx.gen is not None
            t0 = time.perf_counter()
            rx.feed(data, is_last)
            rx.parse_s += time.perf_counter() - t0
            if not had_gen and rx.gen is not None and rx.gen in self._stale:
                self._stale.remove(rx.gen)  # cleared by the first commit: tidy must not delete what is written next
            if rx.gen is not None and (is_last or rx.pending_bytes >= INSTALL_COMMIT_BYTES):
                self._commit_received(rx)
        except Exception as exc:
            # Refused (SnapshotError) or not written (an engine error, raised on): either way this transfer is
            # over, and what it wrote is deleted; the leader sends the snapshot again.
            self._rx = None
            if rx.gen is not None and rx.gen not in self._stale:
                self._stale.append(rx.gen)
            if not isinstance(exc, SnapshotError):
                raise
            log.warning("event=snapshot_refused shard=%d", self.shard, exc_info=True)
            return False
        return is_last and rx.complete

    def _commit_received(self, rx: _Receiving) -> None:
        """Commit the rows received so far into generation ``rx.gen`` (emptied first by the transfer's first
        commit: a transfer cut short may have left keys there)."""
        batches, rx.pending, rx.pending_bytes = rx.pending, [], 0
        clear, (lo, hi) = rx.clear, data_range(self.shard, rx.gen)

        def write(batch: WriteBatch) -> None:
            if clear:
                batch.delete_range(lo, hi)
            for rows in batches:
                batch.put_many(rows)

        t0 = time.perf_counter()
        try:
            self._engine.commit_now(write, "install.chunk")
        except (TypeError, ValueError) as exc:  # rows that are not (bytes, bytes) pairs: a damaged stream
            raise SnapshotError(f"snapshot record damaged ({exc})") from exc
        rx.clear = False
        rx.commits += 1
        rx.commit_s += time.perf_counter() - t0


class _Receiving:
    """A snapshot stream being received: records parsed as they arrive, their engine rows kept until committed.

    The generation the keys go to (``gen``) is known once the header is: the leader's own if that is not the
    one the follower serves from (its keys are then stored as received), else the next one (each key gets the
    follower's prefix, one Python step per key).
    """

    def __init__(self, shard: int, current_gen: int) -> None:
        self.shard = shard
        self.current_gen = current_gen
        self.gen: int | None = None
        self.prefix = b""
        self.src: tuple[bytes, bytes] | None = None  # the leader's data range (version 3)
        self.last_key = b""  # the last key of the records so far (version 3: each record's keys come after it)
        self.t0 = time.perf_counter()
        self.buf = bytearray()
        self.magic_seen = False
        self.format = FORMAT
        self.raft_data: Any = None
        self.meta: Any = None
        self.keys = 0
        self.complete = False
        self.clear = True  # the first commit empties the generation
        self.pending: list[list[tuple[bytes, bytes]]] = []
        self.pending_bytes = 0
        self.parse_s = self.commit_s = 0.0  # time spent parsing records and committing keys
        self.commits = 0

    def _header(self, head: Any) -> None:
        if not isinstance(head, tuple) or head[0] not in STREAM_FORMATS:
            raise SnapshotError("unknown snapshot format")
        self.format, self.raft_data, self.meta = head[0], head[1], head[2]
        if self.format in ROWS_FORMATS:
            src_gen = head[3]
            self.src = data_range(self.shard, src_gen)
            self.gen = src_gen if src_gen != self.current_gen else self.current_gen + 1
        else:
            self.gen = self.current_gen + 1
        self.prefix = data_range(self.shard, self.gen)[0]

    def _rows(self, payload: bytes) -> list[tuple[bytes, bytes]]:
        """The engine rows of one data record (``payload``) of the stream's version."""
        prefix = self.prefix
        if self.format in ROWS_FORMATS:
            try:
                rows = marshal.loads(payload)
            except (EOFError, ValueError, TypeError) as exc:
                raise SnapshotError(f"snapshot record damaged ({exc})") from exc
            assert self.src is not None
            lo, hi = self.src
            # The leader's cursor read them in order from its range: check the ends (and the order across
            # records); the record's CRC-32 vouches for what is between.
            try:
                ordered = (isinstance(rows, list) and len(rows) > 0
                           and lo <= rows[0][0] <= rows[-1][0] < hi and rows[0][0] > self.last_key)
            except (IndexError, TypeError, KeyError):
                ordered = False
            if not ordered:
                raise SnapshotError("snapshot record damaged (keys outside the leader's range or out of order)")
            self.last_key = rows[-1][0]
            if prefix != lo:
                n = len(lo)
                try:
                    rows = [(prefix + k[n:], v) for k, v in rows]
                except (TypeError, ValueError) as exc:
                    raise SnapshotError(f"snapshot record damaged ({exc})") from exc
            return rows
        if self.format == 2:
            keys, values = pickle.loads(payload)
            if len(keys) != len(values):
                raise SnapshotError("snapshot record damaged (keys and values differ in number)")
            return list(zip(map(prefix.__add__, keys), values, strict=True))
        return [(prefix + k, raw) for k, raw in pickle.loads(payload)]

    def feed(self, data: bytes, is_last: bool) -> None:
        """Parse ``data``: the rows of the records it completes join ``pending``; SnapshotError if the stream
        is damaged."""
        if self.complete:
            if data:
                raise SnapshotError("data after the snapshot stream's end record")
            return
        buf = self.buf
        buf += data
        if not self.magic_seen:
            if len(buf) < len(STREAM_MAGIC):
                return
            if bytes(buf[:len(STREAM_MAGIC)]) != STREAM_MAGIC:
                raise SnapshotError("not a raftkv snapshot stream")
            del buf[:len(STREAM_MAGIC)]
            self.magic_seen = True
        pos = 0
        while len(buf) - pos >= _REC_HEAD:
            n = int.from_bytes(buf[pos:pos + 4], "big")
            if len(buf) - pos - _REC_HEAD < n:
                break
            with memoryview(buf) as whole:  # one copy of the record (slicing the bytearray would make two)
                payload = bytes(whole[pos + _REC_HEAD:pos + _REC_HEAD + n])
            if zlib.crc32(payload) != int.from_bytes(buf[pos + 4:pos + 8], "big"):
                raise SnapshotError("snapshot stream damaged (record checksum mismatch)")
            pos += _REC_HEAD + n
            if n == 0:
                if self.meta is None or self.keys != self.meta[6]:
                    raise SnapshotError(f"snapshot holds {self.keys} keys, its header says "
                                        f"{None if self.meta is None else self.meta[6]}")
                self.complete = True
                if pos != len(buf):
                    raise SnapshotError("data after the snapshot stream's end record")
            elif self.meta is None:
                self._header(pickle.loads(payload))
            else:
                rows = self._rows(payload)
                self.pending.append(rows)
                self.pending_bytes += n
                self.keys += len(rows)
        del buf[:pos]
        if is_last and not self.complete:
            raise SnapshotError("snapshot stream cut short (no end record)")


class _Transmission:
    """One snapshot stream being sent: a read view of the engine turned into records, read in chunks."""

    def __init__(self, view: Any, head: bytes, tag: tuple[int, int], shard: int, gen: int) -> None:
        self.first = True
        self.tag = tag
        self.t0 = time.perf_counter()
        self.read_s = 0.0
        self.chunks = self.held = 0
        self._view = view
        self._records = self._generate(view, head, shard, gen)
        self._buf = bytearray(STREAM_MAGIC)

    @classmethod
    def open(cls, engine: Engine, shard: int) -> _Transmission | None:
        view = engine.read_view()
        blob = view.get(meta_key(shard))
        if blob is None:
            view.close()
            return None
        raft_data, meta, _count, gen = _load_meta(blob, shard, view.get)
        last = raft_data[0]
        head = pickle.dumps((STREAM_FORMAT, raft_data, meta, gen), protocol=pickle.HIGHEST_PROTOCOL)
        return cls(view, head, (last[1], last[2]), shard, gen)

    @staticmethod
    def _generate(view: Any, head: bytes, shard: int, gen: int) -> Iterator[bytes]:
        yield _record(head)
        lo, hi = data_range(shard, gen)
        for rows in view.scan_batches(lo, hi, KEYS_PER_RECORD):
            yield _record(marshal.dumps(rows, MARSHAL_VERSION))  # the cursor's (key, value) tuples as they are
        yield _record(b"")  # the end: a stream cut short is refused

    def read(self, size: int) -> bytes:
        buf = self._buf
        while len(buf) < size:
            rec = next(self._records, None)
            if rec is None:
                break
            buf += rec
        with memoryview(buf) as whole:
            out = bytes(whole[:size])
        del buf[:size]
        return out

    def close(self) -> None:
        self._view.close()


def _dump_meta(raft_data: Any, meta: tuple, gen: int, fmt: int = FORMAT) -> bytes:
    return pickle.dumps((fmt, raft_data, meta, gen), protocol=pickle.HIGHEST_PROTOCOL)


def _load_meta(blob: bytes, shard: int, get: Callable[[bytes], bytes | None] | None) -> tuple[Any, tuple, int, int]:
    """``(raft_data, state meta, key count, generation)`` of a stored checkpoint.

    ``get`` reads the history rows a ``CHECKPOINT_FORMAT`` checkpoint names (from the same engine view); with
    None they are not read, and the meta's transaction table is not usable (for the generation only)."""
    return _load_meta_rows(blob, shard, get)[:4]  # type: ignore[return-value]


def _load_meta_rows(blob: bytes, shard: int,
                    get: Callable[[bytes], bytes | None] | None) -> tuple[Any, tuple, int, int, list[int]]:
    """``_load_meta`` and the history row numbers the checkpoint names, in the order of its segments (this
    node's own rows: never to be taken for a follower's), from one unpickling of the blob (about 1.3 MB with
    a full watch ring; a restart used to unpickle it twice per shard)."""
    parts = pickle.loads(blob)
    if not isinstance(parts, tuple) or parts[0] not in (FORMAT, CHECKPOINT_FORMAT):
        raise SnapshotError(f"shard {shard}: unknown checkpoint format {parts[0] if isinstance(parts, tuple) else parts!r}")
    _fmt, raft_data, meta, gen = parts
    rows = [n for ns in meta[3]["segment_rows"].values() for n in ns] if _fmt == CHECKPOINT_FORMAT else []
    if _fmt == CHECKPOINT_FORMAT and get is not None:
        dump = dict(meta[3])
        segments = {}
        for name, ns in dump.pop("segment_rows").items():
            segs = segments[name] = []
            for n in ns:
                seg = get(history_key(shard, n))
                if seg is None:
                    raise SnapshotError(f"shard {shard}: checkpoint names history row {n}, which the engine lacks")
                segs.append(seg)
        dump["segments"] = segments
        meta = (*meta[:3], dump, *meta[4:])
    return raft_data, meta, meta[6], gen, rows


def _rows_of(meta: tuple, rows: list[int]) -> dict[int, tuple[bytes, int]]:
    """``ShardSnapshots._rows`` for a state loaded from ``meta`` (its segments, resolved, in row order)."""
    segments = meta[3].get("segments") if isinstance(meta[3], dict) else None
    if not segments or not rows:
        return {}
    blobs = [seg for name in segments for seg in segments[name]]
    return {id(seg): (seg, n) for seg, n in zip(blobs, rows, strict=True)}

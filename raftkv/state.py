"""The key-value state machine of one shard: pure, deterministic, no I/O.

Theory of operation
-------------------
Every replica of a shard applies the same Raft log entries in the same order to
a ``KVState``; the result of an entry depends only on the state and the entry,
never on the clock, the replica or the thread.  Time enters through ``now_ms``,
which the leader stamps into each log entry: *log time* (``raftkv.logclock``).
``apply`` clamps it to the previous entry's log time, so log time is replicated
and never goes backwards, whatever the stamps say; every horizon (sessions,
transaction GC, remembered transaction ids, fences) is measured in it.

Each key holds a value and its *modification revision*: the shard's revision
counter, bumped by every write that changes something.  Revisions let clients
and transactions compare "has this key changed since I read it?".  A deleted key
has no revision left, so the shard also keeps ``del_rev``, the revision of its
newest deletion: WATCH of a missing key (``("watchrev", key)`` ->
``("missing", revision)``) is still valid at EXEC only if no deletion came
since, so a key created and deleted in between is noticed.

Commands are plain tuples (cheap to pickle into the Raft log):

========================================  ======================================
command                                   result
========================================  ======================================
``("get", key)``                          value or ``None``
``("getrev", key)``                       ``(value, mod_revision)`` or ``None``
``("watchrev", key)``                     ``("rev", mod_revision)`` or
                                          ``("missing", shard revision)``
``("mget", [key, ...])``                  list of values / ``None``
``("entries", [key, ...])``               ``((value, rev) or None, ...), del_rev``
``("exists", [key, ...])``                number of keys that exist
``("set", key, value)``                   new modification revision
``("del", [key, ...])``                   number of keys deleted
``("cas", key, expected, new)``           ``(swapped, value before)``;
                                          ``expected=None`` means "absent"
``("txn", compares, then_ops, else_ops)`` ``TxnResult`` (see ``raftkv.txn``)
``("txn_once", txid, c, then, else)``     the same, at most once per ``txid``
                                          for ``TOMBSTONE_TTL_MS`` of log time
``("session", client, seq, command)``     the command's result, once per seq
``("noop",)``                             ``None`` (a read barrier)
``("changes", key, prefix, after, n)``    recent changes, for watchers
                                          (``raftkv.changelog``)
========================================  ======================================

Retried commands are de-duplicated through *sessions*: a client wraps a command
as ``("session", client_id, seq, command)``; a session is one logical caller
with at most one request in flight, so the state keeps only the last sequence
number and its result per session.  A retry of that sequence number returns the
stored result without applying twice.  Idle sessions expire after
``SESSION_TTL_MS`` of log time so the table stays bounded.

Errors are returned, not raised (every replica must reach the same state):
``CmdError(code, message)`` with a stable code.  Keys locked by a prepared
cross-shard transaction (``raftkv.txn``) answer ``Locked`` instead of a value so
that the node can wait for, or resolve, the lock.

``unsafe_skip_locks`` is a DELIBERATELY BROKEN mode, a negative control for the
fault harness (``raftkv serve --unsafe-skip-locks``): the one-shard writes in
``SKIP_LOCK_OPS`` (plain SET/DEL/APPEND/INCR... and one-shard transactions)
ignore those locks and write under a prepared transaction, whose COMMIT then
lands on top (lost updates, G-single).  It is a node setting, not replicated
state, so it keeps replicas in step only when every node of the cluster has the
same setting (the harness starts them all with it).
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from raftkv import (
    backup_state,
    changelog,
    expiry,
    keyspace,
    leases,
    locks,
    mapregister,
    reshard,
    strings,
    txn,
)
from raftkv.results import CmdError, Locked

SNAPSHOT_CHUNK_KEYS = 20_000


def hash_kv(revision: int, items: Iterable[tuple[bytes, tuple[bytes, int]]]) -> str:
    """A digest of a shard's data as of ``revision``: every ``(key, (value, mod_revision))`` in key order.

    Two replicas of a shard at the same revision have applied the same writes, so their digests must be
    equal; a difference is divergence (etcd's HashKV check does the same). Length-prefixed, so no two
    different contents hash alike by concatenation.
    """
    h = hashlib.sha256(b"raftkv-hashkv-1|%d|" % revision)
    for key, (value, rev) in sorted(items):  # stores differ in iteration order (a dict, or the engine's key order)
        h.update(b"%d:%s%d:%s%d|" % (len(key), key, len(value), value, rev))
    return h.hexdigest()
# 4: the transaction table's history as pickled segments (raftkv.retained; an older build refuses it rather
# than load an empty history); 3: adds log time and the deletion revision; 2: data as a Store (packed
# values); 1, 2 and 3 still load
SNAPSHOT_VERSION = 4
# the non-data state of a checkpoint (``meta``/``from_meta``), stored beside the data in the engine
META_VERSION = 1
#: The command set this state machine applies: raised whenever a command is added or what one does changes.
#: Replicas of a group apply its log alike only if they agree on it, so moving keys between shards (which
#: exercises the newest commands) runs only while every node reports the same version (``raftkv.resharder``).
#: 2: keys attached to leases move with a shard add (``mv_leases``, ``mv_leaseuse``, ``mv_attach``; a moved key
#: leaves its lease at the source, ``drop_key``/``install_key``).
#: 3: ``mv_discard`` walks a destination's keys in slices (``after limit``, answers a cursor).
#: 4: a home shard keeps up to 500,000 transaction records (``TXN_RECORDS_MAX``, was 100,000: ten minutes of
#: finished ones at 167 transactions a second filled it); ``tx_gc`` walks each table in log-time order;
#: ``tx_batch`` carries many transactions' tail messages in one command.
#: 5: a removal moves the removed shard's leases to shard 0 (``mv_leasehomes``, ``mv_leaseadopt``; ``mv_leaseuse``
#: names the home; ``lease_grant`` takes a floor for its ids; a handed-off removed shard refuses lease commands);
#: a destination counts the keys it received (``arrived``) and ``mv_discard`` answers at once when there are none.
STATE_MACHINE_VERSION = 5
#: The first version whose removals move leases' homes (an older one refuses to remove a shard that homes one).
LEASE_HOMES_VERSION = 5
SESSION_TTL_MS = 10 * 60 * 1000
SESSIONS_MAX = 100_000
# The one-shard writes that ``KVState.unsafe_skip_locks`` lets through prepared transactions' locks.
SKIP_LOCK_OPS = frozenset({"set", "del", "cas", "txn", "txn_once", "incrby", "append", "getdel", "setopt",
                           "incrbyfloat", "getex"})


class Store(dict):
    """``key -> (value, mod_revision)``, kept packed as one bytes object per key.

    A tuple and an int per key cost ~100 bytes of Python objects, as much as a
    typical value: the revision is stored as 8 bytes in front of the value
    instead.  Reads unpack on the way out, so callers see ``(value, revision)``.
    """

    __slots__ = ()

    def get(self, key: bytes, default: Any = None) -> Any:  # type: ignore[override]
        raw = dict.get(self, key)
        return default if raw is None else (raw[8:], int.from_bytes(raw[:8], "little"))

    def __getitem__(self, key: bytes) -> tuple[bytes, int]:
        raw = dict.__getitem__(self, key)
        return raw[8:], int.from_bytes(raw[:8], "little")

    def __setitem__(self, key: bytes, entry: tuple[bytes, int]) -> None:
        value, rev = entry
        dict.__setitem__(self, key, rev.to_bytes(8, "little") + value)

    def items(self) -> Any:  # type: ignore[override]
        for key, raw in dict.items(self):
            yield key, (raw[8:], int.from_bytes(raw[:8], "little"))

    def values(self) -> Any:  # type: ignore[override]
        for raw in dict.values(self):
            yield raw[8:], int.from_bytes(raw[:8], "little")

    def pop(self, key: bytes, *default: Any) -> Any:
        raw = dict.pop(self, key, *default)
        return raw if raw is None or not isinstance(raw, bytes) else (raw[8:], int.from_bytes(raw[:8], "little"))

    def copy(self) -> Store:  # type: ignore[override]
        return _store_from_packed(dict.copy(self))

    def __reduce__(self) -> Any:
        return (_store_from_packed, (dict.copy(self),))

    def keys_between(self, lo: bytes = b"", hi: bytes | None = None) -> Iterator[bytes]:
        """Keys ``k`` with ``lo <= k < hi`` (no upper bound when ``hi`` is None), in byte order."""
        return iter(sorted(k for k in dict.keys(self) if lo <= k and (hi is None or k < hi)))

    def values_where(self, want: Callable[[bytes], bool], lo: bytes = b"",
                     values: bool = True) -> Iterator[tuple[bytes, bytes | None]]:
        """Every key ``k >= lo`` in byte order, with its value where ``want(k)``, else None; ``values`` False:
        ``b""`` instead of the value (``raftkv.kvstore.EngineStore.values_where``'s twin)."""
        for key in self.keys_between(lo):
            yield key, (dict.__getitem__(self, key)[8:] if values else b"") if want(key) else None

    def view(self) -> Store:
        """A point-in-time copy to read on another thread (``raftkv.kvstore.EngineStore.view``'s twin)."""
        return self.copy()

    @classmethod
    def of(cls, entries: dict[bytes, tuple[bytes, int]]) -> Store:
        """A store holding ``entries`` (``key -> (value, revision)``)."""
        st = cls()
        for key, entry in entries.items():
            st[key] = entry
        return st


def _store_from_packed(packed: dict[bytes, bytes]) -> Store:
    st = Store()
    dict.update(st, packed)
    return st


@dataclass(frozen=True)
class FrozenState:
    """A copy of a ``KVState`` taken at one log index, for serializing off the applying thread."""

    data: Store
    revision: int
    sessions: dict
    txns: Any
    applied: int
    fences: dict
    extra: dict = field(default_factory=dict)  # log_ms, del_rev (see KVState.extra)

    def chunks(self, keys_per_chunk: int = SNAPSHOT_CHUNK_KEYS) -> Iterator[bytes]:
        """The state as pickled blobs: a header, then the keys in slices of ``keys_per_chunk``.

        Each slice is one short C call, so a thread serializing a large state
        lets the others (Raft heartbeats) run between slices.
        """
        yield pickle.dumps(("raftkv-state", SNAPSHOT_VERSION, self.revision, self.sessions, self.txns,
                            self.applied, self.fences, len(self.data), self.extra), protocol=pickle.HIGHEST_PROTOCOL)
        raw = iter(dict.items(self.data))
        while batch := dict(itertools.islice(raw, keys_per_chunk)):
            yield pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)


@dataclass
class KVState:
    """All data of one shard replica.  ``apply`` is the only way to change it."""

    data: Store = field(default_factory=Store)
    revision: int = 0
    # session id -> (last seq, its result, log time of last use in ms)
    sessions: dict[bytes, tuple[int, Any, int]] = field(default_factory=dict)
    # transaction-layer state (locks, staged writes, coordinator records) lives
    # in raftkv.txn.TxnTable so the state machine stays one concept per module.
    txns: Any = None
    applied: int = 0
    # backup fences (raftkv.backup_state): backup id -> log time (ms) the fence lapses
    fences: dict[str, int] = field(default_factory=dict)
    # what each fence saw of this shard's move state when it went up: backup id -> (owner, move) as tuples
    fence_marks: dict[str, tuple] = field(default_factory=dict)
    # log time of the newest applied entry: log time never goes below it (raftkv.logclock)
    log_ms: int = 0
    # revision of the newest deletion on this shard (WATCH of a missing key compares it)
    del_rev: int = 0
    # key deadlines in log time (raftkv.expiry)
    expiries: expiry.Expiries = field(default_factory=expiry.Expiries)
    # leases and the keys attached to them, in log time (raftkv.leases)
    leases: leases.LeaseTable = field(default_factory=leases.LeaseTable)
    # the newest changes, for watchers (raftkv.changelog)
    changes: changelog.ChangeLog = field(default_factory=changelog.ChangeLog)
    # online resharding (raftkv.reshard): the ring this shard serves under since its last move, and the move
    # under way; both None on a shard that never took part in one (nothing is checked then)
    owner: reshard.Owner | None = None
    move: reshard.Move | None = None
    # keys installed here (``install_key``) since this shard's incoming move began; None: not known (no move
    # here, or a snapshot from before the count). 0 lets ``mv_discard`` answer without walking the shard's keys.
    arrived: int | None = None
    # shard 0 only: the cluster's authoritative shard map, (epoch, text) (raftkv.mapregister); None: empty
    map_register: tuple[int, str] | None = None
    # DANGEROUS, testing only (module doc): one-shard writes ignore prepared transactions' locks.
    # A node setting (never in a snapshot): ShardReplica sets it on every state it applies to.
    unsafe_skip_locks: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict) and not isinstance(self.data, Store):
            self.data = Store.of(self.data)
        if self.txns is None:
            self.txns = txn.TxnTable()

    # -- the entry point --------------------------------------------------
    def apply(self, cmd: tuple, now_ms: int) -> Any:
        """Apply one command at log time ``now_ms`` and return its result."""
        # Clamp: a leader whose stamp is behind the previous entry's cannot move log time back.
        if now_ms < self.log_ms:
            now_ms = self.log_ms
        else:
            self.log_ms = now_ms
        if self.expiries:
            self._reap(now_ms)
        if self.leases:
            leases.reap(self, now_ms)
        self.applied += 1
        op = cmd[0]
        handler = _HANDLERS.get(op)
        if handler is None:
            return CmdError("ERR", f"unknown state machine command {op!r}")
        if self.owner is not None or self.move is not None:
            refused = reshard.check(self, cmd)
            if refused is not None:
                return self._refuse_moved(cmd, refused, now_ms)
        if self.unsafe_skip_locks and op in SKIP_LOCK_OPS:
            return self._apply_blind(handler, cmd, now_ms)
        return handler(self, cmd, now_ms)

    def _refuse_moved(self, cmd: tuple, refused: CmdError, now_ms: int) -> Any:
        """A command touching a key this shard does not serve now (``raftkv.reshard``): nothing applies.

        A PREPARE of a transaction this shard has not seen votes NO and is remembered as aborted, as under
        a backup fence (a duplicate of one prepared before the freeze gets its first vote back).
        """
        if cmd[0] != "tx_prepare":
            return refused
        txid = cmd[1]
        if txid in self.txns.prepared or txid in self.txns.done:
            return self.txns.apply(self, cmd, now_ms)
        self.txns.done[txid] = (txn.ABORTED, now_ms, cmd[2], cmd[6] if len(cmd) > 6 else None)
        return ("no", txn.REASON_MOVING, None)

    def _apply_blind(self, handler: Any, cmd: tuple, now_ms: int) -> Any:
        """The deliberately broken path (``unsafe_skip_locks``): ``handler`` sees no lock on any key."""
        blind, self.txns.blind = self.txns.blind, True
        try:
            return handler(self, cmd, now_ms)
        finally:
            self.txns.blind = blind

    def apply_batch(self, cmds: list, now_ms: int) -> list:
        """Apply a batch of commands (one Raft entry) in order."""
        apply = self.apply
        return [apply(c, now_ms) for c in cmds]

    def read(self, cmd: tuple, now_ms: int = 0) -> Any:
        """A read-only command (get/getrev/mget/exists/pttl) without going through the log.

        Changes nothing, so it may run outside log order: at a ReadIndex point
        (linearizable) or on any replica (stale).  ``now_ms`` is the log time the
        reader stands at (the leader's): a key whose deadline has passed reads as
        missing although no entry has deleted it yet.
        """
        handler = _READ_HANDLERS.get(cmd[0])
        if handler is None:
            return CmdError("ERR", f"{cmd[0]!r} is not a read-only command")
        if self.owner is not None or self.move is not None:
            refused = reshard.check(self, cmd)
            if refused is not None:
                return refused
        return handler(self, cmd, max(now_ms, self.log_ms))

    def serves(self, key: bytes) -> bool:
        """Is ``key`` this shard's to read now (``raftkv.reshard``)?  Scans leave the others out."""
        return (self.owner is None and self.move is None) or reshard.serves(self.owner, self.move, key)

    def lookup(self, key: bytes, now_ms: int) -> tuple[bytes, int] | None:
        """``(value, revision)`` of ``key`` at log time ``now_ms``: None if missing or expired."""
        entry = self.data.get(key)
        if entry is not None and self.expiries and self.expiries.expired(key, now_ms):
            return None
        if entry is not None and self.leases and self.leases.expired(key, now_ms):
            return None
        return entry

    def _reap(self, now_ms: int) -> None:
        """Delete the keys whose deadline has come (each entry does, before its commands run)."""
        held = []
        for key in self.expiries.due(now_ms):
            if self.txns.lock_of(key) is not None:
                held.append(key)  # a prepared transaction holds it: expire once the lock is gone
            elif key in self.data:
                self.write(key, None)
            else:
                self.expiries.clear(key)
        for key in held:
            self.expiries.set(key, self.expiries.deadlines[key])

    # -- local (possibly stale) reads, for explicitly stale GETs ------------
    def peek(self, key: bytes) -> tuple[bytes, int] | None:
        """The local ``(value, revision)`` of ``key`` without going through the log."""
        return self.data.get(key)

    def __len__(self) -> int:
        return len(self.data)

    # -- snapshots ----------------------------------------------------------
    def snapshot(self) -> bytes:
        """Serialize the whole state (data, revision, sessions, transactions)."""
        return pickle.dumps(
            (SNAPSHOT_VERSION, self.data, self.revision, self.sessions, self.txns.dump(), self.applied,
             self.fences, self.extra()),
            protocol=pickle.HIGHEST_PROTOCOL,
        )

    @classmethod
    def restore(cls, blob: bytes) -> KVState:
        """Rebuild a state from ``snapshot()`` output; refuses unknown versions."""

        parts = pickle.loads(blob)
        if not isinstance(parts, tuple) or parts[0] not in (1, 2, 3, SNAPSHOT_VERSION):
            raise ValueError(f"unsupported snapshot version {parts[0] if parts else None!r}")
        _, data, revision, sessions, txns, applied = parts[:6]
        fences = dict(parts[6]) if len(parts) > 6 else {}  # backup fences (older snapshots have none)
        s = cls(data=data, revision=revision, sessions=sessions, txns=txn.TxnTable.load(txns), applied=applied,
                fences=fences)
        s.load_extra(parts[7] if len(parts) > 7 else None)
        return s

    def meta(self) -> tuple:
        """Everything but the key-value data, as plain values (what a checkpoint stores beside the data)."""
        return (META_VERSION, self.revision, self.sessions, self.txns.dump(), self.applied, self.fences, len(self.data),
                self.extra())

    @classmethod
    def from_meta(cls, meta: tuple, data: Any) -> KVState:
        """A state of ``meta`` (from ``meta()``) over ``data``, a store that already holds its keys."""
        if not isinstance(meta, tuple) or meta[0] != META_VERSION:
            raise ValueError(f"unsupported state format {meta[0] if isinstance(meta, tuple) else meta!r}")
        _, revision, sessions, txns, applied, fences, _count, extra = meta
        s = cls(data=data, revision=revision, sessions=sessions, txns=txn.TxnTable.load(txns), applied=applied,
                fences=dict(fences))
        s.load_extra(extra)
        return s

    def extra(self) -> dict:
        """State added in snapshot version 3, as a dict so later additions load the same way."""
        out = {"log_ms": self.log_ms, "del_rev": self.del_rev, "expires": self.expiries.dump(),
               "leases": self.leases.dump(), "changes": self.changes.dump()}
        if self.owner is not None or self.move is not None:  # only shards that took part in a move
            out["owner"] = None if self.owner is None else self.owner.dump()
            out["move"] = None if self.move is None else self.move.dump()
            if self.arrived is not None:
                out["arrived"] = self.arrived
        if self.map_register is not None:
            out["map"] = list(self.map_register)
        if self.fence_marks:  # only while a backup runs
            out["fence_marks"] = dict(self.fence_marks)
        return out

    def load_extra(self, extra: dict | None) -> None:
        """Inverse of ``extra``.  A version 1/2 snapshot lacks it: derive safe values.

        The deletion revision becomes the current revision (a WATCH of a missing key
        taken before then may abort once, spuriously, never commit wrongly); log time
        becomes the newest time the state remembers, so it does not start from 0.
        """
        if extra is not None:
            self.log_ms, self.del_rev = int(extra["log_ms"]), int(extra["del_rev"])
            self.expiries = expiry.Expiries(extra.get("expires"))  # snapshots before expiry have none
            self.leases = leases.LeaseTable(extra.get("leases"))  # nor before leases
            self.changes = changelog.ChangeLog.load(extra.get("changes"), self.revision)  # none before watch
            self.owner, self.move = reshard.load(extra)  # none before resharding
            self.arrived = extra.get("arrived")  # unknown before the count: a discard then walks
            reg = extra.get("map")  # none before the replicated shard map
            self.map_register = None if reg is None else (int(reg[0]), str(reg[1]))
            self.fence_marks = backup_state.load_marks(extra.get("fence_marks"))  # none before marks
            return
        self.changes = changelog.ChangeLog.load(None, self.revision)
        self.del_rev = self.revision
        self.log_ms = max([self.txns.newest_ms(), *(t for _, _, t in self.sessions.values())], default=0)

    def freeze(self) -> FrozenState:
        """A point-in-time copy to serialize elsewhere (``FrozenState.chunks``).

        Cheap (the key-value store is copied at C speed), so it can run on the
        applying thread while the slow serialization runs on another.
        """
        return FrozenState(self.data.copy(), self.revision, dict(self.sessions), self.txns.dump(), self.applied,
                           dict(self.fences), self.extra())

    @classmethod
    def from_chunks(cls, blobs: Iterator[bytes]) -> KVState:
        """Rebuild a state from ``FrozenState.chunks()`` output; refuses unknown formats."""

        head = pickle.loads(next(blobs))
        if not isinstance(head, tuple) or head[:2] not in {("raftkv-state", v) for v in (2, 3, SNAPSHOT_VERSION)}:
            raise ValueError(f"unsupported snapshot format {head[:2] if isinstance(head, tuple) else head!r}")
        _, _, revision, sessions, txns, applied, fences, nkeys = head[:8]
        data = Store()
        for blob in blobs:
            dict.update(data, pickle.loads(blob))
        if len(data) != nkeys:
            raise ValueError(f"snapshot holds {len(data)} keys, its header says {nkeys}")
        s = cls(data=data, revision=revision, sessions=sessions, txns=txn.TxnTable.load(txns), applied=applied,
                fences=fences)
        s.load_extra(head[8] if len(head) > 8 else None)
        return s

    # -- primitives shared with the transaction layer -----------------------
    def write(self, key: bytes, value: bytes | None, keep_ttl: bool = False) -> int:
        """Set (or delete, when ``value`` is None) ``key``; returns the new revision.

        A write clears the key's deadline (as in Redis) unless ``keep_ttl``.  Every change is
        recorded in the change log (deleting a missing key changes nothing and is not).
        """
        self.revision += 1
        if self.expiries and not (keep_ttl and value is not None):
            self.expiries.clear(key)
        if self.leases:
            self.leases.detach(key)  # a write without LEASE detaches the key, as in etcd
        if value is None:
            if self.data.pop(key, None) is not None:
                self.del_rev = self.revision
                self.changes.record(self.revision, key, None)
        else:
            self.data[key] = (value, self.revision)
            self.changes.record(self.revision, key, value)
        return self.revision

    def lock_of(self, key: bytes) -> Locked | None:
        """The lock a prepared transaction holds on ``key``, if any."""
        return self.txns.lock_of(key)

    def drop_key(self, key: bytes) -> None:
        """Forget ``key`` that moved to another shard: no revision, no change a watcher sees (it was not
        deleted, it lives elsewhere now)."""
        self.data.pop(key, None)
        if self.expiries:
            self.expiries.clear(key)
        if self.leases:
            self.leases.detach(key)  # the lease's end must not reach a key that lives elsewhere

    def install_key(self, key: bytes, value: bytes, deadline_ms: int | None) -> None:
        """Store ``key`` moved here from another shard, with its deadline (log time), at a new revision.

        Not attached to any lease: a move attaches the keys it moved on leases afterwards (``mv_attach``)."""
        self.revision += 1
        if self.arrived is not None:
            self.arrived += 1
        if self.leases:
            self.leases.detach(key)
        self.data[key] = (value, self.revision)
        if deadline_ms is None:
            if self.expiries:
                self.expiries.clear(key)
        else:
            self.expiries.set(key, deadline_ms)


def _get(s: KVState, cmd: tuple, now_ms: int) -> Any:
    key = cmd[1]
    lock = s.txns.lock_of(key)
    if lock is not None:
        return lock
    entry = s.lookup(key, now_ms)
    return None if entry is None else entry[0]


def _getrev(s: KVState, cmd: tuple, now_ms: int) -> Any:
    key = cmd[1]
    lock = s.txns.lock_of(key)
    if lock is not None:
        return lock
    return s.lookup(key, now_ms)


def _watchrev(s: KVState, cmd: tuple, now_ms: int) -> Any:
    entry = _getrev(s, cmd, now_ms)
    if isinstance(entry, Locked):
        return entry
    return ("missing", s.revision) if entry is None else ("rev", entry[1])


def _lookup_all(s: KVState, keys: Any, now_ms: int) -> list | Locked:
    """Every key's live ``(value, revision)`` or None; the first lock held on any of them instead."""
    for key in keys:
        lock = s.txns.lock_of(key)
        if lock is not None:
            return lock
    return [s.lookup(key, now_ms) for key in keys]


def _entries(s: KVState, cmd: tuple, now_ms: int) -> Any:
    """``(entries, del_rev)``: every key's ``(value, revision)`` or None, and the newest deletion revision."""
    found = _lookup_all(s, cmd[1], now_ms)
    return found if isinstance(found, Locked) else (tuple(found), s.del_rev)


def _mget(s: KVState, cmd: tuple, now_ms: int) -> Any:
    found = _lookup_all(s, cmd[1], now_ms)
    return found if isinstance(found, Locked) else [None if e is None else e[0] for e in found]


def _exists(s: KVState, cmd: tuple, now_ms: int) -> Any:
    found = _lookup_all(s, cmd[1], now_ms)
    return found if isinstance(found, Locked) else sum(1 for e in found if e is not None)


def _set(s: KVState, cmd: tuple, now_ms: int) -> Any:
    _, key, value = cmd
    lock = s.txns.lock_of(key)
    if lock is not None:
        return lock
    return s.write(key, value)


def _del(s: KVState, cmd: tuple, now_ms: int) -> Any:
    keys = cmd[1]
    for key in keys:
        lock = s.txns.lock_of(key)
        if lock is not None:
            return lock
    n = 0
    for key in keys:
        if key in s.data:
            s.write(key, None)
            n += 1
    return n


def _cas(s: KVState, cmd: tuple, now_ms: int) -> Any:
    _, key, expected, new = cmd
    lock = s.txns.lock_of(key)
    if lock is not None:
        return lock
    entry = s.data.get(key)
    current = None if entry is None else entry[0]
    if current != expected:
        return (False, current)
    s.write(key, new)
    return (True, current)


def _session(s: KVState, cmd: tuple, now_ms: int) -> Any:
    _, client, seq, inner = cmd
    known = s.sessions.get(client)
    if known is not None:
        last_seq, last_result, _ = known
        if seq == last_seq:
            s.sessions[client] = (last_seq, last_result, now_ms)
            return last_result
        if seq < last_seq:
            return CmdError("STALEREQ", f"request {seq} of session is older than {last_seq}; not applied")
    result = s.apply(inner, now_ms)
    s.applied -= 1  # the inner command is part of this entry
    if isinstance(result, Locked):
        # Not applied: the caller will retry the same seq after the lock clears.
        return result
    s.sessions[client] = (seq, result, now_ms)
    if len(s.sessions) > SESSIONS_MAX or s.applied % 1024 == 0:
        _expire_sessions(s, now_ms)
    return result


def _expire_sessions(s: KVState, now_ms: int) -> None:
    horizon = now_ms - SESSION_TTL_MS
    stale = [c for c, (_, _, t) in s.sessions.items() if t < horizon]
    for c in stale:
        del s.sessions[c]
    if len(s.sessions) > SESSIONS_MAX:
        # Oldest first; deterministic because ties break on the session id.
        by_age = sorted(s.sessions.items(), key=lambda kv: (kv[1][2], kv[0]))
        for c, _ in by_age[: len(s.sessions) - SESSIONS_MAX]:
            del s.sessions[c]


def _noop(s: KVState, cmd: tuple, now_ms: int) -> Any:
    return None


def _txn(s: KVState, cmd: tuple, now_ms: int) -> Any:
    return txn.apply_local_txn(s, cmd[1], cmd[2], cmd[3])


def _txn_once(s: KVState, cmd: tuple, now_ms: int) -> Any:
    return s.txns.apply_once(s, cmd, now_ms)


def _txn_layer(s: KVState, cmd: tuple, now_ms: int) -> Any:
    return s.txns.apply(s, cmd, now_ms)


# The messages a ``tx_batch`` may carry: transactions' tails (raftkv.server.tailbatch), which name no key.
TX_BATCHABLE = frozenset({"tx_settle", "tx_finish", "tx_ack"})


def _tx_batch(s: KVState, cmd: tuple, now_ms: int) -> Any:
    """``("tx_batch", (msg, ...))``: each message applied as if alone, in order; one result each."""
    out = []
    for msg in cmd[1]:
        if not isinstance(msg, tuple) or not msg or msg[0] not in TX_BATCHABLE:
            out.append(CmdError("ERR", f"tx_batch carries only {', '.join(sorted(TX_BATCHABLE))}"))
            continue
        out.append(s.apply(msg, now_ms))
        s.applied -= 1  # the message is part of this entry
    return tuple(out)


_HANDLERS = {
    "get": _get,
    "getrev": _getrev,
    "mget": _mget,
    "exists": _exists,
    "set": _set,
    "del": _del,
    "cas": _cas,
    "session": _session,
    "noop": _noop,
    "txn": _txn,
    "txn_once": _txn_once,
    "watchrev": _watchrev,
    # cross-shard transaction messages, see raftkv.txn
    "tx_begin": _txn_layer,
    "tx_stage": _txn_layer,
    "tx_prepare": _txn_layer,
    "tx_refuse": _txn_layer,
    "tx_decide": _txn_layer,
    "tx_settle": _txn_layer,
    "tx_finish": _txn_layer,
    "tx_resolve": _txn_layer,
    "tx_gc": _txn_layer,
    "tx_ack": _txn_layer,
    "tx_batch": _tx_batch,
    # backup fence and restore load; tx_prepare honours the fence (it replaces the entry above)
    **backup_state.HANDLERS,
    # counters, append, conditional set (Redis string commands)
    **strings.HANDLERS,
    # EXPIRE, PTTL, PERSIST
    **expiry.HANDLERS,
    # locks with fencing tokens
    **locks.HANDLERS,
    # leases (grant, keepalive, revoke, attached keys, cross-shard mirrors)
    **leases.HANDLERS,
    # moving keys to a new shard (raftkv shard add)
    **reshard.HANDLERS,
    # the cluster's shard map, on shard 0 (raftkv.mapregister)
    **mapregister.HANDLERS,
}

_READ_HANDLERS = {"get": _get, "getrev": _getrev, "watchrev": _watchrev, "mget": _mget, "exists": _exists,
                  "entries": _entries,
                  **expiry.READ_HANDLERS, **keyspace.READ_HANDLERS, **leases.READ_HANDLERS,
                  **changelog.READ_HANDLERS, **reshard.READ_HANDLERS,
                  **mapregister.READ_HANDLERS}

"""Transactions inside one shard's state machine: pure, deterministic, no I/O.

Theory of operation
-------------------
A transaction is etcd-style: a list of *compares*, then the *then* ops when
every compare holds, else the *else* ops.

* compare: ``(key, kind, arg)`` with kind ``"value"`` (value equals ``arg``;
  ``None`` means absent), ``"rev"`` (modification revision equals ``arg``; 0
  means absent), ``"exists"``, ``"missing"``, or ``"watch"`` (internal, for
  EXEC: ``arg`` is what ``("watchrev", key)`` answered at WATCH, and the
  compare holds only if the key was not written or deleted since).
* op: ``("put", key, value)``, ``("del", key)``, ``("get", key)`` or
  ``("append", key, suffix, len_max)``.  Ops of a branch run in order; a
  ``get`` after a ``put`` of the same key sees the put.
  ``("put", key, value, ttl_ms)`` also gives the key a deadline ``ttl_ms`` after
  the log time it is applied at (COPY and RENAME carry a key's time to live).
  ``append`` sets the key to its current value (empty if missing) + ``suffix``,
  keeps its deadline (as Redis's APPEND does) and answers the new length.  Its
  new value depends on the current one, which is why it is safe only under the
  key's lock: a participant computes the result at PREPARE, when it takes the
  lock, and applies ``current + suffix`` at COMMIT; nothing can write a locked
  key in between (every single-key write, expiry and lease end waits for the
  lock), so the value COMMIT appends to is the one PREPARE saw.  A transaction
  where an append in *either* branch would make a value longer than
  ``len_max`` (the node's ``value_bytes_max``) is refused before anything is
  applied: the one-shard path answers ``TOOBIG``, a participant votes NO
  (``REASON_TOOBIG``) -- at PREPARE the branch that will run is not known yet.

When all keys live on one shard the whole transaction is one Raft entry
(``("txn_once", txid, compares, then_ops, else_ops)``): its result is kept in
``TxnTable.once`` under its id for ``TOMBSTONE_TTL_MS`` of log time, apart from
the clients' sessions, so a retry finds it however busy the shard is.  Otherwise it
runs *parallel commits* over the shards' Raft groups (one consensus round before
the client is answered; docs/transactions.md has the protocol and its recovery
argument):

P1. ``tx_stage`` on the *home* shard (the shard of the first key) replicates a
    record in state STAGING listing the participants and ``start_ms`` (the
    home's log time as the coordinator read it), *in parallel with* every
    ``tx_prepare`` (step 2, carrying the same ``start_ms``).  A STAGING record
    whose participants all hold their prepare is committed: the client is
    answered then.  A NO vote is final, so the client hears the abort at once.
P2. ``tx_settle`` on the home writes the decision down (the CAS of step 3) and,
    when the home is a participant, finishes it there in the same entry; then
    ``tx_finish`` on the others and ``tx_ack`` (step 4).
P3. Recovery of a STAGING record (its home leader after ``PENDING_TIMEOUT_MS``,
    or a reader whose ``tx_resolve`` answered STAGING: resolve never decides
    one) sends ``tx_refuse`` to every participant: a prepared one answers its
    vote; any other records an ABORTED tombstone (STALE below its
    ``prepare_floor``) and can never prepare.  All YES: commit; else abort.

Classic 2PC (three rounds; nodes of earlier versions speak only this, see
``--txn-classic-2pc``) is the steps below:

1. ``tx_begin`` on the *home* shard replicates a
   transaction record in state PENDING, before any participant hears of it.
2. ``tx_prepare`` on every participant (it carries the record's creation time
   on the home shard, ``start_ms``, in the home's log time): a PREPARE that
   started no later than a transaction whose tombstone this participant has
   already forgotten is refused (``prepare_floor``, see 6).  If any key is locked by another
   transaction the participant votes NO at once (no-wait: nothing waits, so
   nothing deadlocks) and remembers the transaction as ABORTED; otherwise it
   locks every key the transaction reads or writes (both branches), evaluates
   its compares, computes the results both branches would give, and votes YES
   with them.
3. ``tx_decide`` on the home shard is a compare-and-set PENDING -> COMMITTED or
   ABORTED.  The first decision wins; a later one (a recovering leader, a
   resolver, a duplicate coordinator) gets the first one back.  The branch of
   a conditional transaction is part of the decision: the then-branch runs iff
   every compare on every participant held.
4. ``tx_finish`` on every participant applies the decided branch's staged
   writes (COMMITTED) or drops them (ABORTED), unlocks, and keeps a tombstone
   so a late or duplicate PREPARE cannot lock again.  ``tx_ack`` on the home
   shard marks the record finished.
5. ``tx_resolve`` on the home shard answers the outcome for a participant or
   reader that met an old lock: a PENDING record older than the caller's
   timeout is aborted (CAS), a missing record gets an ABORTED tombstone.
6. ``tx_gc`` forgets finished records, tombstones and remembered one-shard
   ids older than ``TOMBSTONE_TTL_MS`` of log time.  Forgetting a tombstone
   raises ``prepare_floor[home]`` to its transaction's ``start_ms``, so a
   PREPARE that sat in a network buffer past the GC (its tombstone gone) is
   refused instead of locking again; a later COMMIT re-sent for it then finds
   nothing staged.  Only the home's own log times are compared, so no clock
   skew between shards matters.

Every message is idempotent by transaction id, so the I/O layer retries any
message whose outcome is unknown.  The coordinator's side (the plan, the
decision, the sans-IO run and recovery) is ``raftkv.txnrun``.

Legal record transitions (anything else is refused and leaves state as is)::

    (none) --begin--> PENDING --decide--> COMMITTED | ABORTED
    (none) --stage--> STAGING --decide/settle--> COMMITTED | ABORTED
    (none) --resolve/decide/settle--> ABORTED (tombstone)
    PENDING --resolve (older than timeout)--> ABORTED

Participant transitions: (none) --prepare--> prepared (YES) | tombstone (NO);
(none) --refuse--> tombstone; prepared --finish/settle--> tombstone.  A refuse
never touches a prepared transaction, and a prepare never gets past a tombstone
(or, once GC forgot it, past ``prepare_floor``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from raftkv.results import CmdError, Locked
from raftkv.retained import Retained


class KVState(Protocol):
    """What the transaction layer uses of a shard's state (``raftkv.state.KVState``, which holds a
    ``TxnTable``): declared here so the two modules do not import each other."""

    data: Any  # key -> (value, revision)
    del_rev: int
    txns: TxnTable
    log_ms: int  # the log time of the entry being applied
    expiries: Any  # raftkv.expiry.Expiries

    def write(self, key: bytes, value: bytes | None) -> int: ...

COMPARE_KINDS = ("value", "rev", "exists", "missing", "watch")
OP_KINDS = ("put", "del", "get", "append")

PENDING = "PENDING"
STAGING = "STAGING"  # a parallel-commit record: committed as soon as every participant holds its prepare
COMMITTED = "COMMITTED"
ABORTED = "ABORTED"
OUTCOMES = (COMMITTED, ABORTED)

# Abort reasons (the node maps them to error codes).
REASON_CONFLICT = "conflict"  # a participant met another transaction's lock (-TXNCONFLICT)
REASON_TIMEOUT = "timeout"  # a participant did not vote in time, or a resolver aborted (-TRYAGAIN)
REASON_UNKNOWN = "unknown"  # no record (garbage-collected or never begun): aborted by tombstone
REASON_STALE = "stale"  # a PREPARE older than the participant's GC horizon (-TRYAGAIN)
REASON_REFUSED = "refused"  # recovery made a participant refuse the PREPARE it had not yet applied (-TRYAGAIN)
REASON_TOOBIG = "toobig"  # an APPEND would make a value longer than its len_max (-TOOBIG)
REASON_MOVING = "moving"  # a key is being moved to a new shard, or lives on another one now (-MOVING)
# The tombstone of a refused stale PREPARE: the transaction's outcome is unknown here (it may
# have committed with this shard's writes long ago), so any later outcome is accepted, as a no-op.
STALE = "STALE"

TOMBSTONE_TTL_MS = 10 * 60 * 1000  # keep finished records/tombstones this long (log time)
# open + finished records on one home shard: finished ones stay TOMBSTONE_TTL_MS, so this is ~830 cross-shard
# transactions a second homed on the shard for the whole TTL (at 100,000, 167 a second filled it: -BUSY)
TXN_RECORDS_MAX = 500_000
TXN_KEYS_MAX = 10_000  # keys in one transaction
TXN_IDS_MAX = 500_000  # remembered one-shard transaction ids on one shard (~830/s for the whole TTL)


@dataclass(frozen=True)
class TxnResult:
    """Outcome of a transaction: which branch ran and the result of each op."""

    succeeded: bool
    results: tuple


@dataclass(frozen=True)
class ResultRun:
    """A ``TxnResult`` whose results are consecutive integers, kept as its first and count.

    What the id table remembers of a bulk load's batch (a put's result is its revision, and a batch's puts
    take consecutive revisions): two integers instead of one per key for the table's whole window. Lossless:
    ``expand`` gives the same ``TxnResult`` back."""

    succeeded: bool
    first: int
    count: int

    @staticmethod
    def of(result: Any) -> Any:
        """``result`` in its remembered form: a ``ResultRun`` when that is exact, else itself."""
        if not isinstance(result, TxnResult) or len(result.results) < 8:
            return result
        r = result.results
        if any(type(x) is not int for x in r) or r[-1] - r[0] != len(r) - 1:
            return result
        if any(b - a != 1 for a, b in zip(r, r[1:], strict=False)):
            return result
        return ResultRun(result.succeeded, r[0], len(r))

    @staticmethod
    def expand(kept: Any) -> Any:
        """The result that ``of`` was given."""
        if isinstance(kept, ResultRun):
            return TxnResult(kept.succeeded, tuple(range(kept.first, kept.first + kept.count)))
        return kept


def validate(compares: list, then_ops: list, else_ops: list) -> str | None:
    """Why the transaction is malformed, or None.  Run at the edge, before the log."""
    for c in compares:
        if len(c) != 3 or c[1] not in COMPARE_KINDS or not isinstance(c[0], bytes):
            return f"bad compare {c!r}: want (key, one of {'/'.join(COMPARE_KINDS)}, arg)"
    for op in list(then_ops) + list(else_ops):
        if not op or op[0] not in OP_KINDS or not isinstance(op[1], bytes):
            return f"bad op {op!r}: want (put key value) / (del key) / (get key)"
        if op[0] == "put" and (len(op) not in (3, 4) or not isinstance(op[2], bytes)
                               or (len(op) == 4 and (type(op[3]) is not int or op[3] < 1))):
            return f"bad put {op!r}: want (put key value [ttl_ms >= 1])"
        if op[0] == "append" and (len(op) != 4 or not isinstance(op[2], bytes) or type(op[3]) is not int
                                  or op[3] < 0):
            return f"bad append {op!r}: want (append key suffix len_max >= 0)"
    if len(keys_of(compares, then_ops, else_ops)) > TXN_KEYS_MAX:
        return f"transaction touches more than {TXN_KEYS_MAX} keys (TXN_KEYS_MAX)"
    return None


def keys_of(compares: list, then_ops: list, else_ops: list) -> list[bytes]:
    """Every key the transaction touches, in first-seen order."""
    seen: dict[bytes, None] = {}
    for c in compares:
        seen.setdefault(c[0], None)
    for op in list(then_ops) + list(else_ops):
        seen.setdefault(op[1], None)
    return list(seen)


def compare_holds(entry: tuple[bytes, int] | None, kind: str, arg: Any, del_rev: int = 0) -> bool:
    """Does one compare hold for a key whose ``(value, revision)`` is ``entry``?

    ``del_rev`` is the shard's newest deletion revision (only ``"watch"`` uses it).
    """
    if kind == "value":
        return (None if entry is None else entry[0]) == arg
    if kind == "rev":
        return (0 if entry is None else entry[1]) == arg
    if kind == "exists":
        return entry is not None
    if kind == "missing":
        return entry is None
    if kind == "watch":
        tag, n = arg
        if tag == "rev":
            return entry is not None and entry[1] == n
        # Missing at WATCH, when the shard was at revision n: still missing, and no deletion since
        # (a key created and deleted in between leaves no revision of its own to compare).
        return entry is None and del_rev <= n
    raise ValueError(f"unknown compare kind {kind!r}")


def is_read_only(then_ops: Any, else_ops: Any) -> bool:
    """Neither branch writes: the transaction can be answered from a consistent read, without locks."""
    return all(op[0] == "get" for op in list(then_ops) + list(else_ops))


def answer_read_only(compares: Any, then_ops: Any, else_ops: Any, entries: dict[bytes, Any],
                     del_revs: dict[bytes, int]) -> TxnResult:
    """A read-only transaction's result from every key's ``(value, revision)`` at one instant
    (``del_revs``: each key's shard's newest deletion revision at that instant)."""
    ok = all(compare_holds(entries[k], kind, arg, del_revs[k]) for k, kind, arg in compares)
    results = tuple(None if entries[op[1]] is None else entries[op[1]][0] for op in (then_ops if ok else else_ops))
    return TxnResult(ok, results)


def watch_read(key: bytes) -> tuple:
    """The read WATCH makes of ``key`` (its answer goes to ``watch_compare``)."""
    return ("watchrev", key)


def watch_compare(key: bytes, seen: Any) -> tuple:
    """The compare EXEC checks for a key WATCH read as ``seen``: "nothing changed since"."""
    return (key, "watch", tuple(seen))


def watch_compare_missing_writes(key: bytes, seen: Any) -> tuple:
    """DELIBERATELY BROKEN ``watch_compare``, for ``raftkv serve --unsafe-watch-miss`` only (a negative
    control for the fault harness): a key WATCH saw present is only checked to still exist, so a write
    to it between WATCH and EXEC is missed (a lost update).  A key WATCH saw missing is checked as usual."""
    return (key, "exists", None) if tuple(seen)[0] == "rev" else watch_compare(key, seen)


def single_shard_cmd(txid: str, compares: Any, then_ops: Any, else_ops: Any) -> tuple:
    """A one-shard transaction as one state-machine command, applied at most once per ``txid``."""
    return ("txn_once", txid, tuple(compares), tuple(then_ops), tuple(else_ops))


def apply_local_txn(s: KVState, compares: list, then_ops: list, else_ops: list) -> TxnResult | Locked | CmdError:
    """Run a single-shard transaction atomically against ``s``."""
    for key in keys_of(compares, then_ops, else_ops):
        lock = s.txns.lock_of(key)
        if lock is not None:
            return lock
    too_big = _append_too_big(s.data, then_ops) or _append_too_big(s.data, else_ops)
    if too_big is not None:
        return CmdError("TOOBIG", too_big)
    ok = all(compare_holds(s.data.get(k), kind, arg, s.del_rev) for k, kind, arg in compares)
    return TxnResult(ok, tuple(_apply_ops(s, then_ops if ok else else_ops)))


def _apply_ops(s: KVState, ops: Any) -> list:
    results: list = []
    for op in ops:
        kind, key = op[0], op[1]
        if kind == "get":
            entry = s.data.get(key)
            results.append(None if entry is None else entry[0])
        elif kind == "put":
            results.append(s.write(key, op[2]))
            if len(op) > 3:
                s.expiries.set(key, s.log_ms + op[3])
        elif kind == "append":  # under the key's lock since PREPARE (cross-shard) or in this entry (one shard)
            entry = s.data.get(key)
            value = (b"" if entry is None else entry[0]) + op[2]
            s.write(key, value, keep_ttl=True)
            results.append(len(value))
        else:  # del
            existed = key in s.data
            if existed:
                s.write(key, None)
            results.append(1 if existed else 0)
    return results


def _append_too_big(data: Any, ops: Any) -> str | None:
    """Why an append of ``ops`` would make a value longer than its ``len_max``, or None."""
    if not any(op[0] == "append" for op in ops):
        return None  # only appends can grow a value past the limit: no need to read every key
    for op, length in zip(ops, _simulate_ops(data, ops), strict=True):
        if op[0] == "append" and length > op[3]:
            return (f"APPEND to {op[1]!r} would make a value of {length} bytes, over value_bytes_max={op[3]}; "
                    "nothing applied")
    return None


def _simulate_ops(data: dict, ops: Any) -> tuple:
    """The results ``ops`` would give if applied now (puts answer True): used at PREPARE."""
    overlay: dict[bytes, bytes | None] = {}
    out: list = []
    for op in ops:
        kind, key = op[0], op[1]
        if key in overlay:
            cur = overlay[key]
        else:
            entry = data.get(key)
            cur = None if entry is None else entry[0]
        if kind == "get":
            out.append(cur)
        elif kind == "put":
            overlay[key] = op[2]
            out.append(True)
        elif kind == "append":
            overlay[key] = (cur or b"") + op[2]
            out.append(len(overlay[key]))  # type: ignore[arg-type]
        else:
            out.append(1 if cur is not None else 0)
            overlay[key] = None
    return tuple(out)


# -- replicated state ------------------------------------------------------------------

@dataclass
class Record:
    """Coordinator-side transaction record, on the home shard."""

    state: str
    participants: tuple[int, ...]
    created_ms: int
    branch: bool | None = None
    results: tuple | None = None
    reason: str = ""
    acked: bool = False  # every participant has applied tx_finish
    finished_ms: int | None = None
    # A STAGING record's start as its coordinator stamped it (home log time, also in its PREPAREs);
    # None for a PENDING one, whose start is its creation.  (Old snapshots lack the field: the
    # class default None applies.)
    start_ms: int | None = None

    def __reduce__(self) -> tuple:
        # Pickled as the constructor's positional arguments, not the default (class, attribute dict): a
        # checkpoint pickles again every history segment with a new or changed record, thousands of records
        # (raftkv.retained), and this is about 3x faster per record (3.5 -> 1.3 ms per 2,048). The builds
        # before this one load it too (same fields, same order); ``tests/test_txn.py`` checks every field is here.
        return (Record, (self.state, self.participants, self.created_ms, self.branch, self.results, self.reason,
                         self.acked, self.finished_ms, self.start_ms))

    def answer(self) -> tuple:
        """What stage/begin/decide/resolve reply: ``(state, branch, results, reason, participants, start_ms)``."""
        start = self.created_ms if self.start_ms is None else self.start_ms
        return (self.state, self.branch, self.results, self.reason, self.participants, start)


@dataclass
class Prepared:
    """Participant-side state of a prepared transaction: its locks and staged branches."""

    home: int
    keys: tuple[bytes, ...]
    then_ops: tuple
    else_ops: tuple
    vote: tuple
    since_ms: int
    start_ms: int | None = None  # the record's creation on the home shard (home log time)


def _older(table: dict[str, tuple], horizon: int) -> list[str]:
    """The ids of ``table`` (``txid -> (_, log time, ...)``, in log-time order) older than ``horizon``."""
    old = []
    for t, entry in table.items():
        if entry[1] >= horizon:
            break
        old.append(t)
    return old


class Records(Retained):
    """A home shard's transaction records (``Retained``), indexed by whether they are acked.

    ``unacked``: the records that are open, or decided with participants still to finish, the
    only ones the recovery loop (ten times a second) has anything to do about.  Kept by every
    write of the dict; a record acked in place leaves the index at the next ``touch``."""

    def __init__(self, items: Any = (), /) -> None:
        self.unacked: set[str] = set()
        super().__init__(items)

    def __setitem__(self, key: str, value: Record) -> None:
        super().__setitem__(key, value)
        self._index(key, value)

    def touch(self, key: str) -> None:
        """As ``Retained.touch``, and re-index the record."""
        super().touch(key)
        if key in self:
            self._index(key, self[key])

    def clear(self) -> None:
        """As ``dict.clear``."""
        super().clear()
        self.unacked = set()

    def _index(self, key: str, rec: Record) -> None:
        if rec.acked:
            self.unacked.discard(key)
        else:
            self.unacked.add(key)

    def _forget(self, key: str) -> None:
        super()._forget(key)
        self.unacked.discard(key)

    def _loaded(self) -> None:
        self.unacked = {t for t, r in self.items() if not r.acked}


@dataclass
class TxnTable:
    """Cross-shard transaction state of one shard (locks, staged writes, records)."""

    locks: dict[bytes, Any] = field(default_factory=dict)  # key -> Locked
    prepared: dict[str, Prepared] = field(default_factory=dict)
    # participant tombstones: txid -> (outcome, log time, home, start_ms); older ones lack the last two
    # (done, records and once hold ten minutes of history: raftkv.retained keeps their snapshots cheap)
    done: dict[str, tuple] = field(default_factory=Retained)
    records: Records = field(default_factory=lambda: Records())
    # home shard -> newest start_ms of a forgotten tombstone: PREPAREs started no later are refused
    prepare_floor: dict[int, int] = field(default_factory=dict)
    # one-shard transactions: txid -> (result, log time)
    once: dict[str, tuple] = field(default_factory=Retained)
    # True only while KVState's DELIBERATELY BROKEN ``unsafe_skip_locks`` mode applies a one-shard write:
    # lock_of then sees no lock (never in a snapshot; raftkv.state's module doc)
    blind: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.records, Records):
            self.records = Records(self.records)
        for name in ("done", "once"):
            if not isinstance(getattr(self, name), Retained):
                setattr(self, name, Retained(getattr(self, name)))

    def lock_of(self, key: bytes) -> Locked | None:
        """The lock held on ``key`` by a prepared transaction, if any."""
        if not self.locks or self.blind:
            return None
        return self.locks.get(key)

    def apply_once(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        """``("txn_once", txid, compares, then, else)``: a one-shard transaction, applied once per id."""
        _, txid, compares, then_ops, else_ops = cmd
        known = self.once.get(txid)
        if known is not None:
            return ResultRun.expand(known[0])
        if len(self.once) >= TXN_IDS_MAX:
            self._forget_once(now_ms - TOMBSTONE_TTL_MS)
            if len(self.once) >= TXN_IDS_MAX:  # refuse rather than evict: evicting shrinks the window
                return CmdError("BUSY", f"too many transaction ids remembered on this shard ({TXN_IDS_MAX})")
        result = apply_local_txn(s, compares, then_ops, else_ops)
        if not isinstance(result, Locked):  # not applied: the caller retries once the lock clears
            self.once[txid] = (ResultRun.of(result), now_ms)
        return result

    def _forget_once(self, horizon: int) -> int:
        old = _older(self.once, horizon)
        for t in old:
            del self.once[t]
        return len(old)

    def newest_ms(self) -> int:
        """The newest log time this table remembers (to seed log time from an old snapshot)."""
        times = [r.finished_ms or r.created_ms for r in self.records.values()]
        times += [d[1] for d in self.done.values()] + [p.since_ms for p in self.prepared.values()]
        times += [at for _, at in self.once.values()]
        return max(times, default=0)

    def apply(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        """Apply one 2PC message (``tx_*`` command); errors are returned, never raised."""
        handler = _TX_HANDLERS.get(cmd[0])
        if handler is None:
            return CmdError("ERR", f"unknown transaction message {cmd[0]!r}")
        try:
            return handler(self, s, cmd, now_ms)
        except (ValueError, TypeError, IndexError) as e:  # malformed message: refuse, change nothing
            return CmdError("ERR", f"{cmd[0]}: malformed message: {e}")

    # -- coordinator side (home shard) ------------------------------------------------
    def _begin(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        _, txid, participants = cmd
        rec = self.records.get(txid)
        if rec is not None:  # duplicate begin (client retry, second coordinator): idempotent
            return rec.answer()
        if len(self.records) >= TXN_RECORDS_MAX:
            return CmdError("BUSY", f"too many transaction records on this shard ({TXN_RECORDS_MAX})")
        if not participants:
            raise ValueError("no participants")
        rec = self.records[txid] = Record(PENDING, tuple(participants), now_ms)
        return rec.answer()

    def _stage(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        _, txid, participants, start_ms = cmd
        rec = self.records.get(txid)
        if rec is not None:  # a duplicate, a second coordinator, or a record aborted first: it stands
            return rec.answer()
        if len(self.records) >= TXN_RECORDS_MAX:
            return CmdError("BUSY", f"too many transaction records on this shard ({TXN_RECORDS_MAX})")
        if not participants:
            raise ValueError("no participants")
        if type(start_ms) is not int:
            raise ValueError(f"bad start {start_ms!r}")
        rec = self.records[txid] = Record(STAGING, tuple(participants), now_ms, start_ms=start_ms)
        return rec.answer()

    def _decide(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        _, txid, outcome, branch, results, reason = cmd
        if outcome not in OUTCOMES:
            raise ValueError(f"bad outcome {outcome!r}")
        rec = self.records.get(txid)
        if rec is None:
            # Never begun here or long forgotten: only abort is safe (see module doc).
            return self._tombstone(txid, now_ms).answer()
        if rec.state in (PENDING, STAGING):
            rec.state = outcome
            rec.branch = branch if outcome == COMMITTED else None
            rec.results = results if outcome == COMMITTED else None
            rec.reason = reason if outcome == ABORTED else ""
            self.records.touch(txid)
        return rec.answer()

    def _settle(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        # Parallel commits: the decision, and when the home shard is a participant too (home is
        # not None), its finish, in one entry: the home never holds an outcome before its record.
        _, txid, outcome, branch, results, reason, home, start_ms = cmd
        answer = self._decide(s, ("tx_decide", txid, outcome, branch, results, reason), now_ms)
        if home is not None and answer[0] in OUTCOMES:
            done = self._finish(s, ("tx_finish", txid, answer[0], answer[1], home, start_ms), now_ms)
            if isinstance(done, CmdError):
                return done
        return answer

    def _resolve(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        _, txid, abort_after_ms = cmd
        rec = self.records.get(txid)
        if rec is None:
            return self._tombstone(txid, now_ms).answer()
        if rec.state == PENDING and now_ms - rec.created_ms >= abort_after_ms:
            rec.state, rec.reason = ABORTED, REASON_TIMEOUT
            self.records.touch(txid)
        # A STAGING record is never decided here: it may be committed already (every participant
        # prepared), which only the participants can tell.  The caller runs recovery (TxnRun.recover).
        return rec.answer()

    def _tombstone(self, txid: str, now_ms: int) -> Record:
        rec = self.records[txid] = Record(ABORTED, (), now_ms, reason=REASON_UNKNOWN, acked=True,
                                          finished_ms=now_ms)
        return rec

    def _ack(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        _, txid = cmd
        rec = self.records.get(txid)
        if rec is None:
            return False
        if rec.state in (PENDING, STAGING):
            raise ValueError("ack of an undecided transaction")
        if not rec.acked:
            rec.acked, rec.finished_ms = True, now_ms
            self.records.touch(txid)
        return True

    # -- participant side ----------------------------------------------------------------
    def _prepare(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        # start_ms is absent in PREPAREs logged by older versions: they replay as they did.
        _, txid, home, compares, then_ops, else_ops, *rest = cmd
        start_ms = rest[0] if rest else None
        if len(rest) > 1:
            raise ValueError("too many fields")
        done = self.done.get(txid)
        if done is not None:  # finished here already: a late or duplicate PREPARE
            return ("done", done[0])
        prep = self.prepared.get(txid)
        if prep is not None:
            return prep.vote
        floor = self.prepare_floor.get(home)
        if start_ms is not None and floor is not None and start_ms <= floor:
            # Started no later than a transaction whose tombstone is forgotten here: this may be
            # a PREPARE delayed past its own tombstone's GC.  Refuse, for good (a tombstone again).
            self.done[txid] = (STALE, now_ms, home, start_ms)
            return ("no", REASON_STALE, None)
        keys = tuple(keys_of(compares, then_ops, else_ops))
        for k in keys:
            other = self.locks.get(k)
            if other is not None:
                # No-wait: vote NO, lock nothing, and remember the abort (this vote is final).
                self.done[txid] = (ABORTED, now_ms, home, start_ms)
                return ("no", REASON_CONFLICT, (k, other.txid, other.home_shard, other.since_ms))
        if _append_too_big(s.data, then_ops) or _append_too_big(s.data, else_ops):
            # Refused for good (a NO vote is final): nothing locked, nothing staged.
            self.done[txid] = (ABORTED, now_ms, home, start_ms)
            return ("no", REASON_TOOBIG, None)
        ok = all(compare_holds(s.data.get(k), kind, arg, s.del_rev) for k, kind, arg in compares)
        vote = ("yes", ok, _simulate_ops(s.data, then_ops), _simulate_ops(s.data, else_ops))
        for k in keys:
            self.locks[k] = Locked(k, txid, home, now_ms)
        self.prepared[txid] = Prepared(home, keys, tuple(then_ops), tuple(else_ops), vote, now_ms, start_ms)
        return vote

    def _refuse(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        # Recovery of a STAGING record asks every participant: "your vote, or refuse for good".
        _, txid, home, start_ms = cmd
        done = self.done.get(txid)
        if done is not None:
            return ("done", done[0])
        prep = self.prepared.get(txid)
        if prep is not None:  # prepared: the vote stands (and the locks stay until the outcome)
            return prep.vote
        floor = self.prepare_floor.get(home)
        if floor is not None and start_ms <= floor:
            # Older than a forgotten tombstone: this refusal was delayed past GC, and the transaction
            # may have committed here long ago.  A PREPARE would be refused as stale, so say that,
            # with a STALE tombstone, which takes whatever outcome is re-sent as a no-op.
            self.done[txid] = (STALE, now_ms, home, start_ms)
            return ("no", REASON_STALE, None)
        # Not prepared: it never will be.  The tombstone turns a later PREPARE away, and when GC
        # forgets it, prepare_floor does (start_ms is the record's, as in the PREPAREs).
        self.done[txid] = (ABORTED, now_ms, home, start_ms)
        return ("no", REASON_REFUSED, None)

    def _finish(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        # (home, start_ms) name the transaction's start for its tombstone when nothing was prepared
        # here; absent in older messages.
        _, txid, outcome, branch, *rest = cmd
        home, start_ms = rest if rest else (None, None)
        if outcome not in OUTCOMES:
            raise ValueError(f"bad outcome {outcome!r}")
        done = self.done.get(txid)
        if done is not None and done[0] == STALE:  # nothing was staged: record the outcome, apply nothing
            self.done[txid] = (outcome, *done[1:])
            return outcome
        if done is not None:
            if done[0] != outcome:  # an invariant broke: two outcomes for one transaction
                return CmdError("TXNBUG", f"transaction {txid} finished {done[0]} here, now told {outcome}")
            return outcome
        prep = self.prepared.pop(txid, None)
        if prep is not None:
            for k in prep.keys:
                lock = self.locks.get(k)
                if lock is not None and lock.txid == txid:
                    del self.locks[k]
            if outcome == COMMITTED:
                _apply_ops(s, prep.then_ops if branch else prep.else_ops)
            home, start_ms = prep.home, prep.start_ms
        self.done[txid] = (outcome, now_ms, home, start_ms)
        return outcome

    def _gc(self, s: KVState, cmd: tuple, now_ms: int) -> Any:
        # Every table is in log-time order (entries are added at the log time of their entry, and log
        # time never goes back), so each walk stops at the first entry young enough to keep: a GC costs
        # what it forgets, not the ten minutes of history it keeps.
        horizon = now_ms - TOMBSTONE_TTL_MS
        old_records = []
        for t, r in self.records.items():
            if r.created_ms >= horizon:  # finished no earlier than created: nothing after it is old
                break
            if r.finished_ms is not None and r.finished_ms < horizon:
                old_records.append(t)
        for t in old_records:
            del self.records[t]
        old_done = _older(self.done, horizon)
        for t in old_done:
            d = self.done.pop(t)
            if len(d) > 3 and d[2] is not None and d[3] is not None:
                self.prepare_floor[d[2]] = max(self.prepare_floor.get(d[2], d[3]), d[3])
        return len(old_records) + len(old_done) + self._forget_once(horizon)

    # -- snapshots -------------------------------------------------------------------------
    def dump(self) -> Any:
        """Picklable form for snapshots (everything: locks, staged writes, records, tombstones).

        The history (``done``, ``records``, ``once``) goes as pickled segments, of which only those
        changed since the previous dump are pickled again (raftkv.retained)."""
        return {"locks": dict(self.locks), "prepared": {t: replace(p) for t, p in self.prepared.items()},
                "prepare_floor": dict(self.prepare_floor),
                "segments": {"done": self.done.segments(), "records": self.records.segments(),
                             "once": self.once.segments()}}

    @classmethod
    def load(cls, blob: Any) -> TxnTable:
        """Inverse of ``dump`` (and of the plain-dict form of versions before segments)."""
        segs = blob.get("segments")
        if segs is not None:
            history = {"done": Retained.from_segments(segs["done"]), "records": Records.from_segments(segs["records"]),
                       "once": Retained.from_segments(segs["once"])}
        else:
            history = {"done": Retained(blob.get("done", {})),
                       "records": Records({t: replace(r) for t, r in blob.get("records", {}).items()}),
                       "once": Retained(blob.get("once", {}))}
        return cls(locks=dict(blob.get("locks", {})),
                   prepared={t: replace(p) for t, p in blob.get("prepared", {}).items()},
                   prepare_floor=dict(blob.get("prepare_floor", {})), **history)

    def check_invariants(self) -> None:
        """Assert the table's internal consistency (tests call this after every step)."""
        for k, lock in self.locks.items():
            prep = self.prepared.get(lock.txid)
            assert prep is not None and k in prep.keys, f"lock on {k!r} without its prepared txn"
        for t, prep in self.prepared.items():
            assert t not in self.done, f"{t} both prepared and finished"
            for k in prep.keys:
                assert self.locks[k].txid == t, f"prepared {t} lost its lock on {k!r}"
        for t, rec in self.records.items():
            assert rec.state in (PENDING, STAGING, *OUTCOMES)
            assert not (rec.acked and rec.state in (PENDING, STAGING)), f"{t} acked while undecided"
        unacked = {t for t, rec in self.records.items() if not rec.acked}
        assert self.records.unacked == unacked, f"unacked index {self.records.unacked} != {unacked}"


_TX_HANDLERS: dict[str, Callable[..., Any]] = {
    "tx_begin": TxnTable._begin,
    "tx_stage": TxnTable._stage,
    "tx_decide": TxnTable._decide,
    "tx_settle": TxnTable._settle,
    "tx_resolve": TxnTable._resolve,
    "tx_ack": TxnTable._ack,
    "tx_prepare": TxnTable._prepare,
    "tx_finish": TxnTable._finish,
    "tx_refuse": TxnTable._refuse,
    "tx_gc": TxnTable._gc,
}

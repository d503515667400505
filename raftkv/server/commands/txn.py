"""RESP commands for transactions: MSET, RAFTKV.TXN, WATCH/MULTI/EXEC/DISCARD/UNWATCH.

``RAFTKV.TXN`` grammar (tokens are bulk strings, keywords case-insensitive)::

    RAFTKV.TXN [ID txid] [RING tag] <ncompares> <compare>... <nthen> <op>... <nelse> <op>...
    compare := key VALUE v | key REV n | key EXISTS | key MISSING
    op      := PUT key value | DEL key | GET key | APPEND key suffix

The reply is ``[succeeded (1|0), [result...]]``, one result per op of the
branch that ran: ``PUT`` -> ``OK``, ``DEL`` -> 1/0, ``GET`` -> value or nil,
``APPEND`` -> the value's new length (as Redis's APPEND).  An APPEND carries
this node's ``value_bytes_max``: a transaction where one would make a longer
value is refused with ``-TOOBIG`` (see ``raftkv.txn``).
``ID`` names the transaction (1-64 characters): resending the same ID after an
unknown outcome finds the first attempt instead of running twice. That holds only
while the ring stays the same: a transaction's record lives on its home shard (the
shard of its first key), and after ``raftkv shard add|remove`` the same ID would be
planned afresh, with another home, and could run a second time. ``RING tag``
(``ShardMap.ring_tag`` of the map the client routes by) makes the node refuse with
``-RINGCHANGED`` (not run) when its ring differs; the client library sends it, and
treats that refusal after an unknown outcome as unknown.

Per connection, ``WATCH`` records each key's modification revision (a
linearizable read; for a missing key, the shard's revision, checked against its
newest deletion) and answers only once every read is done: a WATCH that said OK
before its read would let a write acknowledged after the OK slip under the
EXEC (the read, waiting on a lock, could apply after that write).  Because
WATCH's reply is then this connection's newest write-like future, a read
pipelined after it waits for it and sees at least the state WATCH saw.
``MULTI`` starts queueing (``SET``, ``DEL``, ``GET``,
``MSET``, ``APPEND`` answer ``+QUEUED``); ``EXEC`` runs the queue as ONE transaction whose
compares are "revision unchanged since WATCH" and returns the array of
replies, or a nil array when a watched key changed.  ``MSET`` and ``EXEC``
retry a no-wait conflict internally (with backoff) before answering
``-TXNCONFLICT``, since plain Redis clients do not know that error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from raftkv.acl import Access
from raftkv.protocol import NIL_ARRAY, OK, QUEUED, Error
from raftkv.server import coordinator
from raftkv.server.api import BadRequest, Command, NodeAPI, admin_access
from raftkv.server.conn import Conn
from raftkv.txn import PENDING, TxnResult, watch_compare, watch_compare_missing_writes, watch_read


class _Syntax(Exception):
    pass


def parse_txn(args: list[bytes], value_bytes_max: int) -> tuple[str | None, str | None, list, list, list]:
    """``RAFTKV.TXN`` arguments (without the command name) -> (txid, ring tag, compares, then, else).

    ``value_bytes_max`` goes into each APPEND op: the state machine refuses one that would pass it.
    """
    pos = 0
    txid = None

    def take() -> bytes:
        nonlocal pos
        if pos >= len(args):
            raise _Syntax("unexpected end of arguments")
        pos += 1
        return args[pos - 1]

    def count() -> int:
        tok = take()
        try:
            n = int(tok)
        except ValueError:
            raise _Syntax(f"expected a count, got {tok!r}") from None
        if n < 0 or n > len(args):
            raise _Syntax(f"bad count {n}")
        return n

    ring = None
    if args and args[0].upper() == b"ID":
        take()
        txid = take().decode(errors="replace")
    if pos < len(args) and args[pos].upper() == b"RING":
        take()
        ring = take().decode(errors="replace")
    compares = []
    for _ in range(count()):
        key, kind = take(), take().upper()
        if kind == b"VALUE":
            compares.append((key, "value", take()))
        elif kind == b"REV":
            try:
                compares.append((key, "rev", int(take())))
            except ValueError:
                raise _Syntax("REV needs an integer revision") from None
        elif kind == b"EXISTS":
            compares.append((key, "exists", None))
        elif kind == b"MISSING":
            compares.append((key, "missing", None))
        else:
            raise _Syntax(f"unknown compare {kind!r}: want VALUE, REV, EXISTS or MISSING")
    branches: list[list] = []
    for _ in range(2):
        ops = []
        for _ in range(count()):
            kind = take().upper()
            if kind == b"PUT":
                key = take()
                ops.append(("put", key, take()))
            elif kind == b"DEL":
                ops.append(("del", take()))
            elif kind == b"GET":
                ops.append(("get", take()))
            elif kind == b"APPEND":
                key = take()
                ops.append(("append", key, take(), value_bytes_max))
            else:
                raise _Syntax(f"unknown op {kind!r}: want PUT, DEL, GET or APPEND")
        branches.append(ops)
    if pos != len(args):
        raise _Syntax(f"{len(args) - pos} extra argument(s)")
    return txid, ring, compares, branches[0], branches[1]


def op_replies(ops: list, results: tuple) -> list:
    """Results of a branch's ops as RESP replies (PUT -> OK whatever the shard count; DEL and APPEND
    -> integers)."""
    out = []
    for op, r in zip(ops, results, strict=True):
        out.append(OK if op[0] == "put" else (int(r) if op[0] in ("del", "append") else r))
    return out


def _check(node: NodeAPI, keys: list[bytes], values: list[bytes]) -> None:
    for k in keys:
        node.shard_of(k)  # raises the node's TOOBIG error for oversize keys
    for v in values:
        node.check_value(v)


def cmd_mset(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    args = req[1:]
    if len(args) % 2:
        return Error("WRONGARGS", "wrong number of arguments for 'mset' command")
    puts = [("put", args[i], args[i + 1]) for i in range(0, len(args), 2)]
    _check(node, args[0::2], args[1::2])

    async def go() -> Any:
        res = await coordinator.with_conflict_retries(node, [], puts, [])
        return res if isinstance(res, Error) else OK
    return node.run(go())


def cmd_txn(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    try:
        txid, ring, compares, then_ops, else_ops = parse_txn(req[1:], node.limits.value_bytes_max)
    except _Syntax as e:
        return Error("ERR", f"RAFTKV.TXN syntax: {e} (see 'RAFTKV.TXN [ID id] [RING tag] n key VALUE v ... n PUT k v "
                            "... n ...')")
    keys = [c[0] for c in compares] + [op[1] for op in then_ops + else_ops]
    if not keys:
        return Error("ERR", "RAFTKV.TXN: a transaction needs at least one key")
    _check(node, keys, [op[2] for op in then_ops + else_ops if op[0] in ("put", "append")])

    async def go() -> Any:
        res = await node.coordinate_at_home(txid or coordinator.new_txid(), compares, then_ops, else_ops,
                                            ring=ring)
        if isinstance(res, Error):
            return res
        assert isinstance(res, TxnResult)
        return [1 if res.succeeded else 0, op_replies(then_ops if res.succeeded else else_ops, res.results)]
    return node.run(go())


# -- WATCH / MULTI / EXEC ---------------------------------------------------------------

class ConnTxn:
    """One connection's optimistic-transaction state."""

    def __init__(self) -> None:
        self.watches: list[tuple[bytes, asyncio.Future]] = []
        self.queuing = False
        self.queued: list[tuple[bytes, list]] = []  # (command name, ops)
        self.dirty: str | None = None


def _state(conn: Conn) -> ConnTxn:
    if conn.txn is None:
        conn.txn = ConnTxn()
    return conn.txn


# Commands that act on MULTI itself rather than being queued by it.
CONTROL = {b"EXEC", b"DISCARD", b"MULTI", b"WATCH", b"UNWATCH", b"QUIT"}


def in_multi(conn: Conn) -> bool:
    return conn.txn is not None and conn.txn.queuing


def queue(node: NodeAPI, conn: Conn, req: list[bytes], name: bytes) -> Any:
    """Called by ``Node.dispatch`` for every non-control command inside MULTI."""
    t = conn.txn
    args = req[1:]
    if name == b"SET" and len(args) == 2:
        ops = [("put", args[0], args[1])]
    elif name == b"MSET" and args and len(args) % 2 == 0:
        ops = [("put", args[i], args[i + 1]) for i in range(0, len(args), 2)]
    elif name == b"DEL" and args:
        ops = [("del", k) for k in args]
    elif name == b"GET" and len(args) == 1:
        ops = [("get", args[0])]
    elif name == b"APPEND" and len(args) == 2:
        ops = [("append", args[0], args[1], node.limits.value_bytes_max)]
    else:
        t.dirty = f"{name.decode(errors='replace')} is not supported inside MULTI"
        return Error("ERR", f"{t.dirty} (raftkv queues SET, MSET, DEL, GET and APPEND)")
    try:
        _check(node, [op[1] for op in ops], [op[2] for op in ops if op[0] in ("put", "append")])
    except BadRequest as e:
        t.dirty = str(e)
        return e.error
    t.queued.append((name, ops))
    return QUEUED


def cmd_watch(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    if in_multi(conn):
        return Error("ERR", "WATCH inside MULTI is not allowed")
    t = _state(conn)
    reads = []
    for key in req[1:]:
        shard = node.shard_of(key)
        fut = asyncio.ensure_future(coordinator.tx_call(node, shard, watch_read(key), node.timing.request_timeout_s,
                                                        read=True))
        t.watches.append((key, fut))  # registered now: an UNWATCH or EXEC right behind finds it
        reads.append(fut)

    async def read_all() -> Any:
        # A failed read is reported by EXEC (-EXECABORT), as before; WATCH itself always says OK.
        await asyncio.gather(*reads, return_exceptions=True)
        return OK
    return node.run(read_all())


def cmd_unwatch(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    if conn.txn is not None:
        for _, f in conn.txn.watches:
            f.cancel()
        conn.txn.watches.clear()
    return OK


def cmd_multi(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    if in_multi(conn):
        return Error("ERR", "MULTI calls can not be nested")
    _state(conn).queuing = True
    return OK


def cmd_discard(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    if not in_multi(conn):
        return Error("ERR", "DISCARD without MULTI")
    cmd_unwatch(node, conn, req)
    conn.txn = None
    return OK


def cmd_exec(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    if not in_multi(conn):
        return Error("ERR", "EXEC without MULTI")
    t, conn.txn = conn.txn, None
    if t.dirty is not None:
        for _, f in t.watches:
            f.cancel()
        return Error("EXECABORT", f"Transaction discarded because of previous errors: {t.dirty}")

    # --unsafe-watch-miss: the deliberately broken compare (a negative control for the fault harness)
    compare = watch_compare_missing_writes if node.unsafe_watch_miss else watch_compare

    async def go() -> Any:
        compares = []
        for key, fut in t.watches:
            try:
                entry = await fut
            except coordinator.TxnCallFailed as e:
                return Error("EXECABORT", f"WATCH {key!r} could not be read: {e}")
            compares.append(compare(key, entry))
        then_ops = [op for _, ops in t.queued for op in ops]
        if not then_ops and not compares:
            return []
        res = await coordinator.with_conflict_retries(node, compares, then_ops, [])
        if isinstance(res, Error):
            return res
        if not res.succeeded:
            return NIL_ARRAY
        replies, pos = [], 0
        for name, ops in t.queued:
            part = op_replies(ops, res.results[pos:pos + len(ops)])
            pos += len(ops)
            replies.append(sum(part) if name == b"DEL" else (OK if name == b"MSET" else part[0]))
        return replies
    return node.run(go())


def cmd_txstats(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.TXSTATS: this node's local view per shard: [shard, role, locks, prepared, open records,
    records, tombstones] (a racy local read, for operators and tests)."""
    out = []
    for shard, r in sorted(node.replicas.items()):
        t = r.state.txns
        try:
            open_records = sum(1 for rec in list(t.records.values()) if rec.state == PENDING or not rec.acked)
            out.append([shard, b"leader" if r.is_leader() else b"follower", len(t.locks), len(t.prepared),
                        open_records, len(t.records), len(t.done)])
        except RuntimeError:
            continue
    return out


def _mset_access(req: list[bytes]) -> Access:
    return Access("write", writes=tuple(req[1::2]))


def _txn_access(req: list[bytes]) -> Access:
    try:
        _txid, _ring, compares, then_ops, else_ops = parse_txn(req[1:], 0)  # keys only: the limit plays no part
    except _Syntax:
        return Access("txn")  # refused by the handler anyway
    ops = then_ops + else_ops
    reads = [c[0] for c in compares] + [op[1] for op in ops if op[0] == "get"]
    return Access("txn", tuple(reads), tuple(op[1] for op in ops if op[0] != "get"))


def _watch_access(req: list[bytes]) -> Access:
    return Access("read", tuple(req[1:]))


def _txn_control(req: list[bytes]) -> Access:
    return Access("txn")


COMMANDS: dict[bytes, Command] = {
    b"MSET": Command(-3, cmd_mset, access=_mset_access),
    b"RAFTKV.TXN": Command(-4, cmd_txn, access=_txn_access),
    b"RAFTKV.TXSTATS": Command(1, cmd_txstats, access=admin_access),
    b"WATCH": Command(-2, cmd_watch, access=_watch_access),
    b"UNWATCH": Command(1, cmd_unwatch, access=_txn_control),
    b"MULTI": Command(1, cmd_multi, access=_txn_control),
    b"EXEC": Command(1, cmd_exec, access=_txn_control),
    b"DISCARD": Command(1, cmd_discard, access=_txn_control),
}

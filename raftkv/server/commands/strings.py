"""Redis string commands: INCR, INCRBY, DECR, DECRBY, INCRBYFLOAT, APPEND, GETDEL, GETSET, GETEX,
SETNX, MSETNX, STRLEN, and SET's NX / XX / GET options (state-machine side: ``raftkv.strings``).

Each is one command on the key's shard, so it is linearizable; MSETNX spans
shards and runs as one transaction ("every key missing, then put them all").
The single-key writes may be wrapped in ``RAFTKV.REQ`` like SET.
"""

from __future__ import annotations

from typing import Any

from raftkv.acl import Access
from raftkv.protocol import Error
from raftkv.server import coordinator
from raftkv.server.api import BadRequest, Command, NodeAPI
from raftkv.server.commands.kv import SESSION_WRITES, TTL_OPTIONS, Session, to_reply, ttl_ms, write
from raftkv.server.conn import Conn
from raftkv.strings import INT64_MAX, INT64_MIN, parse_float
from raftkv.txn import TxnResult

_NOT_INTEGER = Error("ERR", "value is not an integer or out of range")


def _int_arg(raw: bytes) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(_NOT_INTEGER) from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadRequest(_NOT_INTEGER)
    return value


def _incr(node: NodeAPI, req: list[bytes], delta: int, session: Session | None) -> Any:
    key = req[1]
    return write(node, node.shard_of(key), ("incrby", key, delta), session)


def cmd_incr(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    return _incr(node, req, 1, session)


def cmd_decr(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    return _incr(node, req, -1, session)


def cmd_incrby(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    return _incr(node, req, _int_arg(req[2]), session)


def cmd_decrby(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    return _incr(node, req, -_int_arg(req[2]), session)


def cmd_incrbyfloat(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    key, increment = req[1], req[2]
    problem = parse_float(increment)
    if isinstance(problem, str):
        return Error("ERR", problem)  # refused before the log, with the state machine's own check
    return write(node, node.shard_of(key), ("incrbyfloat", key, increment), session)


def cmd_getset(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    """GETSET key value: SET, answering the value before (the deadline goes, as in Redis)."""
    key, value = req[1], req[2]
    node.check_value(value)
    return write(node, node.shard_of(key), ("setopt", key, value, None), session, lambda r: r[1])


def cmd_getex(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    """GETEX key [EX s | PX ms | EXAT unix-s | PXAT unix-ms | PERSIST]: the value, and a new deadline."""
    key = req[1]
    shard = node.shard_of(key)
    opts = [a.upper() for a in req[2:]]
    if not opts and session is None:
        async def read() -> Any:  # no option: a plain GET, no log entry
            return to_reply(await node.execute(shard, ("get", key), read=True))
        return node.run(read())
    if opts == [b"PERSIST"]:
        ttl: Any = "persist"
    elif not opts:
        ttl = None
    elif len(opts) == 2 and opts[0] in TTL_OPTIONS:
        ttl = ("in", ttl_ms(opts[0], req[3], "getex"))
    else:
        return Error("ERR", "syntax error")
    return write(node, shard, ("getex", key, ttl), session)


def cmd_append(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    key, suffix = req[1], req[2]
    node.check_value(suffix)
    return write(node, node.shard_of(key), ("append", key, suffix, node.limits.value_bytes_max), session)


def cmd_getdel(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    key = req[1]
    return write(node, node.shard_of(key), ("getdel", key), session)


def cmd_setnx(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    key, value = req[1], req[2]
    node.check_value(value)
    return write(node, node.shard_of(key), ("setopt", key, value, "nx"), session, lambda r: 1 if r[0] else 0)


def cmd_msetnx(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """MSETNX k v [k v ...]: set them all if none exists (one transaction) -> 1, else 0."""
    args = req[1:]
    if len(args) % 2:
        return Error("WRONGARGS", "wrong number of arguments for 'msetnx' command")
    keys, values = args[0::2], args[1::2]
    for k in keys:
        node.shard_of(k)
    for v in values:
        node.check_value(v)

    async def go() -> Any:
        # Like MSET: a key still locked by a transaction another node just answered (parallel commits) is
        # retried, not turned into an error a Redis client does not know.
        res = await coordinator.with_conflict_retries(node, [(k, "missing", None) for k in keys],
                                          [("put", k, v) for k, v in zip(keys, values, strict=True)], [])
        if isinstance(res, Error):
            return res
        assert isinstance(res, TxnResult)
        return 1 if res.succeeded else 0
    return node.run(go())


def cmd_strlen(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    key = req[1]
    shard = node.shard_of(key)

    async def go() -> Any:
        res = to_reply(await node.execute(shard, ("get", key), read=True))
        return res if isinstance(res, Error) else (0 if res is None else len(res))
    return node.run(go())


def _read_write_first(req: list[bytes]) -> Access:
    return Access("write", (req[1],), (req[1],))


def _msetnx_access(req: list[bytes]) -> Access:
    keys = tuple(req[1::2])
    return Access("write", keys, keys)


def _strlen_access(req: list[bytes]) -> Access:
    return Access("read", (req[1],))


SESSION_WRITES.update({b"INCR": (2, cmd_incr), b"DECR": (2, cmd_decr), b"INCRBY": (3, cmd_incrby),
                       b"DECRBY": (3, cmd_decrby), b"APPEND": (3, cmd_append), b"GETDEL": (2, cmd_getdel),
                       b"SETNX": (3, cmd_setnx), b"INCRBYFLOAT": (3, cmd_incrbyfloat), b"GETSET": (3, cmd_getset),
                       b"GETEX": (-2, cmd_getex)})

COMMANDS: dict[bytes, Command] = {
    b"INCR": Command(2, cmd_incr, access=_read_write_first),
    b"DECR": Command(2, cmd_decr, access=_read_write_first),
    b"INCRBY": Command(3, cmd_incrby, access=_read_write_first),
    b"DECRBY": Command(3, cmd_decrby, access=_read_write_first),
    b"INCRBYFLOAT": Command(3, cmd_incrbyfloat, access=_read_write_first),
    b"GETSET": Command(3, cmd_getset, access=_read_write_first),
    b"GETEX": Command(-2, cmd_getex, access=_read_write_first),
    b"APPEND": Command(3, cmd_append, access=_read_write_first),
    b"GETDEL": Command(2, cmd_getdel, access=_read_write_first),
    b"SETNX": Command(3, cmd_setnx, access=_read_write_first),
    b"MSETNX": Command(-3, cmd_msetnx, access=_msetnx_access),
    b"STRLEN": Command(2, cmd_strlen, read=True, access=_strlen_access),
}

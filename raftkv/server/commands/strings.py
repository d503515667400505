"""Redis string commands: INCR, INCRBY, DECR, DECRBY, APPEND, GETDEL, SETNX, MSETNX, STRLEN,
and SET's NX / XX / GET options (state-machine side: ``raftkv.strings``).

Each is one command on the key's shard, so it is linearizable; MSETNX spans
shards and runs as one transaction ("every key missing, then put them all").
The single-key writes may be wrapped in ``RAFTKV.REQ`` like SET.
"""

from __future__ import annotations

from typing import Any

from raftkv.acl import Access
from raftkv.protocol import Error
from raftkv.server.api import BadRequest, Command, NodeAPI
from raftkv.server.commands.kv import SESSION_WRITES, Session, to_reply, write
from raftkv.server.conn import Conn
from raftkv.strings import INT64_MAX, INT64_MIN
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
        from raftkv.server.coordinator import new_txid

        res = await node.coordinate_at_home(new_txid(), [(k, "missing", None) for k in keys],
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
                       b"SETNX": (3, cmd_setnx)})

COMMANDS: dict[bytes, Command] = {
    b"INCR": Command(2, cmd_incr, access=_read_write_first),
    b"DECR": Command(2, cmd_decr, access=_read_write_first),
    b"INCRBY": Command(3, cmd_incrby, access=_read_write_first),
    b"DECRBY": Command(3, cmd_decrby, access=_read_write_first),
    b"APPEND": Command(3, cmd_append, access=_read_write_first),
    b"GETDEL": Command(2, cmd_getdel, access=_read_write_first),
    b"SETNX": Command(3, cmd_setnx, access=_read_write_first),
    b"MSETNX": Command(-3, cmd_msetnx, access=_msetnx_access),
    b"STRLEN": Command(2, cmd_strlen, read=True, access=_strlen_access),
}

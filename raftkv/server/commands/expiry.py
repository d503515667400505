"""Key expiry commands: EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT (NX|XX|GT|LT), TTL, PTTL, PERSIST.

State-machine side and the theory: ``raftkv.expiry`` (deadlines in replicated
log time; reads see an expired key gone at once; the leader reclaims it
through the log).
"""

from __future__ import annotations

import time
from typing import Any

from raftkv.acl import Access
from raftkv.protocol import Error
from raftkv.server.api import BadRequest, Command, NodeAPI
from raftkv.server.commands.kv import SESSION_WRITES, Session, to_reply, write
from raftkv.server.conn import Conn

_CONDITIONS = {b"NX": "nx", b"XX": "xx", b"GT": "gt", b"LT": "lt"}


def _expire(node: NodeAPI, req: list[bytes], unit_ms: int, absolute: bool, session: Session | None) -> Any:
    key = req[1]
    try:
        amount = int(req[2])
    except ValueError:
        raise BadRequest(Error("ERR", "value is not an integer or out of range")) from None
    if len(req) > 4:
        return Error("ERR", "syntax error")
    cond = None
    if len(req) == 4:
        cond = _CONDITIONS.get(req[3].upper())
        if cond is None:
            return Error("ERR", f"Unsupported option {req[3].decode(errors='replace')}")
    ms = amount * unit_ms
    if absolute:
        # A Unix time: the shard's deadlines are in log time, so convert to "from now" with this
        # node's clock (its skew shifts this one deadline; log time itself never reads a wall clock).
        ms -= int(time.time() * 1000)
    return write(node, node.shard_of(key), ("expire", key, ms, False, cond), session)


def cmd_expire(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    return _expire(node, req, 1000, False, session)


def cmd_pexpire(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    return _expire(node, req, 1, False, session)


def cmd_expireat(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    return _expire(node, req, 1000, True, session)


def cmd_pexpireat(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    return _expire(node, req, 1, True, session)


def cmd_persist(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    key = req[1]
    return write(node, node.shard_of(key), ("persist", key), session)


def _ttl(node: NodeAPI, req: list[bytes], seconds: bool) -> Any:
    key = req[1]
    shard = node.shard_of(key)

    async def go() -> Any:
        ms = to_reply(await node.execute(shard, ("pttl", key), read=True))
        if isinstance(ms, Error) or not seconds or ms < 0:
            return ms
        return (ms + 500) // 1000  # Redis rounds TTL to the nearest second
    return node.run(go())


def cmd_ttl(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    return _ttl(node, req, True)


def cmd_pttl(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    return _ttl(node, req, False)


def _writes_key(req: list[bytes]) -> Access:
    return Access("write", (req[1],), (req[1],))


def _reads_key(req: list[bytes]) -> Access:
    return Access("read", (req[1],))


SESSION_WRITES.update({b"EXPIRE": (-3, cmd_expire), b"PEXPIRE": (-3, cmd_pexpire), b"EXPIREAT": (-3, cmd_expireat),
                       b"PEXPIREAT": (-3, cmd_pexpireat), b"PERSIST": (2, cmd_persist)})

COMMANDS: dict[bytes, Command] = {
    b"EXPIRE": Command(-3, cmd_expire, access=_writes_key),
    b"PEXPIRE": Command(-3, cmd_pexpire, access=_writes_key),
    b"EXPIREAT": Command(-3, cmd_expireat, access=_writes_key),
    b"PEXPIREAT": Command(-3, cmd_pexpireat, access=_writes_key),
    b"PERSIST": Command(2, cmd_persist, access=_writes_key),
    b"TTL": Command(2, cmd_ttl, read=True, access=_reads_key),
    b"PTTL": Command(2, cmd_pttl, read=True, access=_reads_key),
}

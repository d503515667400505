"""``RAFTKV.LOCK name owner ttl_ms`` and ``RAFTKV.UNLOCK name owner`` (state-machine side and the
fencing argument: ``raftkv.locks``).  ``RAFTKV.LOCK`` answers ``[1, fencing token]`` or
``[0, current holder]``; both may be wrapped in ``RAFTKV.REQ`` so a retry applies once."""

from __future__ import annotations

from typing import Any

from raftkv.acl import Access
from raftkv.protocol import Error
from raftkv.server.api import Command, NodeAPI
from raftkv.server.commands.kv import SESSION_WRITES, Session, write
from raftkv.server.conn import Conn

TTL_MS_MAX = 24 * 3600 * 1000


def cmd_lock(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    key, owner = req[1], req[2]
    try:
        ttl_ms = int(req[3])
    except ValueError:
        return Error("ERR", "RAFTKV.LOCK: ttl_ms must be an integer")
    if not 1 <= ttl_ms <= TTL_MS_MAX:
        return Error("ERR", f"RAFTKV.LOCK: ttl_ms must be 1..{TTL_MS_MAX}")
    node.check_value(owner)
    return write(node, node.shard_of(key), ("lock", key, owner, ttl_ms), session, list)


def cmd_unlock(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    key, owner = req[1], req[2]
    return write(node, node.shard_of(key), ("unlock", key, owner), session)


def _lock_access(req: list[bytes]) -> Access:
    return Access("write", (req[1],), (req[1],))


SESSION_WRITES.update({b"RAFTKV.LOCK": (4, cmd_lock), b"RAFTKV.UNLOCK": (3, cmd_unlock)})

COMMANDS: dict[bytes, Command] = {
    b"RAFTKV.LOCK": Command(4, cmd_lock, access=_lock_access),
    b"RAFTKV.UNLOCK": Command(3, cmd_unlock, access=_lock_access),
}

"""``RAFTKV.LOCK name owner ttl_ms``, ``RAFTKV.LOCK name owner LEASE id`` and ``RAFTKV.UNLOCK name owner``
(state-machine side and the fencing argument: ``raftkv.locks``, ``raftkv.leases``).  ``RAFTKV.LOCK``
answers ``[1, fencing token]`` or ``[0, current holder]``; both may be wrapped in ``RAFTKV.REQ`` so a
retry applies once.  With ``LEASE id`` the lock key is attached to the lease: it is held while the
lease is kept alive and released when the lease expires or is revoked (``Client.lock``)."""

from __future__ import annotations

from typing import Any

from raftkv.acl import Access
from raftkv.protocol import Error
from raftkv.server.api import Command, NodeAPI
from raftkv.server.commands.kv import SESSION_WRITES, Session, write
from raftkv.server.commands.leases import attach, parse_lease_id
from raftkv.server.conn import Conn

TTL_MS_MAX = 24 * 3600 * 1000


def cmd_lock(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    key, owner = req[1], req[2]
    if len(req) != 4:
        return _lock_on_lease(node, req, session)
    try:
        ttl_ms = int(req[3])
    except ValueError:
        return Error("ERR", "RAFTKV.LOCK: ttl_ms must be an integer")
    if not 1 <= ttl_ms <= TTL_MS_MAX:
        return Error("ERR", f"RAFTKV.LOCK: ttl_ms must be 1..{TTL_MS_MAX}")
    node.check_value(owner)
    return write(node, node.shard_of(key), ("lock", key, owner, ttl_ms), session, list)


def _lock_on_lease(node: NodeAPI, req: list[bytes], session: Session | None) -> Any:
    if len(req) != 5 or req[3].upper() != b"LEASE":
        return Error("ERR", "syntax error: RAFTKV.LOCK name owner ttl_ms | RAFTKV.LOCK name owner LEASE id")
    key, owner = req[1], req[2]
    node.check_value(owner)
    lid = parse_lease_id(node, req[4])
    return attach(node, node.shard_of(key), lid, lambda remaining: ("lease_lock", key, owner, lid, remaining),
                  session, list)


def cmd_unlock(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    key, owner = req[1], req[2]
    return write(node, node.shard_of(key), ("unlock", key, owner), session)


def _lock_access(req: list[bytes]) -> Access:
    return Access("write", (req[1],), (req[1],))


SESSION_WRITES.update({b"RAFTKV.LOCK": (-4, cmd_lock), b"RAFTKV.UNLOCK": (3, cmd_unlock)})

COMMANDS: dict[bytes, Command] = {
    b"RAFTKV.LOCK": Command(-4, cmd_lock, access=_lock_access),
    b"RAFTKV.UNLOCK": Command(3, cmd_unlock, access=_lock_access),
}

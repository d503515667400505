"""``RAFTKV.USER`` and ``RAFTKV.ROLE``: manage users and roles online (see ``raftkv.acl``).

::

    RAFTKV.USER ADD name password [role ...]     (replaces an existing user)
    RAFTKV.USER DEL name | GRANT name role | REVOKE name role | LIST
    RAFTKV.ROLE SET name [CATEGORIES c[,c...]] [READ prefix ...] [WRITE prefix ...]
    RAFTKV.ROLE DEL name | LIST

A change is a compare-and-set of the table's one replicated key, retried when
another change got in first, so concurrent operators never lose each other's
changes.  Passwords are hashed (scrypt, random salt) by the node that receives
the command; only the hash is replicated.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from raftkv.acl import ACL_KEY, CATEGORIES, AclError, AclTable, hash_password
from raftkv.protocol import OK, Error
from raftkv.server.api import Command, NodeAPI, admin_access
from raftkv.server.commands.kv import to_reply
from raftkv.server.conn import Conn

CHANGE_RETRIES = 10
USER_USAGE = ("usage: RAFTKV.USER ADD name password [role ...] | DEL name | GRANT name role | REVOKE name role "
              "| LIST")
ROLE_USAGE = "usage: RAFTKV.ROLE SET name [CATEGORIES c,c] [READ prefix ...] [WRITE prefix ...] | DEL name | LIST"


async def _read(node: NodeAPI) -> AclTable | Error:
    shard = node.map.shard_for_key(ACL_KEY)
    res = to_reply(await node.execute(shard, ("get", ACL_KEY), read=True))
    return res if isinstance(res, Error) else AclTable.decode(res)


async def _change(node: NodeAPI, change: Callable[[AclTable], AclTable]) -> Any:
    """Apply ``change`` to the replicated table by compare-and-set; retried on a concurrent change."""
    shard = node.map.shard_for_key(ACL_KEY)
    for _ in range(CHANGE_RETRIES):
        current = to_reply(await node.execute(shard, ("get", ACL_KEY), read=True))
        if isinstance(current, Error):
            return current
        try:
            new = change(AclTable.decode(current))
        except AclError as e:
            return Error("ERR", str(e))
        res = to_reply(await node.execute(shard, ("cas", ACL_KEY, current, new.encode())))
        if isinstance(res, Error):
            return res
        if res[0]:
            return OK
    return Error("TRYAGAIN", "the user/role table kept changing under this command; retry")


def cmd_user(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    action = req[1].upper()
    args = [a.decode(errors="replace") for a in req[2:]]
    if action == b"LIST" and not args:
        async def listing() -> Any:
            table = await _read(node)
            if isinstance(table, Error):
                return table
            return [[u.name.encode(), [r.encode() for r in u.roles]] for u in sorted(table.users.values(),
                                                                                     key=lambda u: u.name)]
        return node.run(listing())
    if action == b"ADD" and len(args) >= 2:
        name, password, roles = args[0], args[1], args[2:]

        async def add() -> Any:
            table = await _read(node)
            if isinstance(table, Error):
                return table
            if not table.users and "root" not in roles and not node.security.auth_required:
                # The first user turns authentication on: without a root user nobody could administer.
                return Error("ERR", "the first user must have the root role (RAFTKV.USER ADD name password root), "
                                    "or the cluster file must set a password")
            hashed = await asyncio.get_running_loop().run_in_executor(None, hash_password, password, os.urandom(16))
            return await _change(node, lambda t: t.put_user(name, hashed, roles))
        return node.run(add())
    if action == b"DEL" and len(args) == 1:
        return node.run(_change(node, lambda t: t.delete_user(args[0])))
    if action == b"GRANT" and len(args) == 2:
        return node.run(_change(node, lambda t: t.grant(args[0], args[1])))
    if action == b"REVOKE" and len(args) == 2:
        return node.run(_change(node, lambda t: t.revoke(args[0], args[1])))
    return Error("ERR", USER_USAGE)


def parse_role(args: list[bytes]) -> tuple[str, list[str], list[bytes], list[bytes]]:
    """``name [CATEGORIES c,c] [READ p ...] [WRITE p ...]`` -> its parts; raises AclError."""
    if not args:
        raise AclError(ROLE_USAGE)
    name = args[0].decode(errors="replace")
    categories: list[str] = []
    sections: dict[bytes, list[bytes]] = {b"READ": [], b"WRITE": []}
    current: list[bytes] | None = None
    i = 1
    while i < len(args):
        word = args[i].upper()
        if word == b"CATEGORIES" and i + 1 < len(args):
            categories = [c for c in args[i + 1].decode(errors="replace").lower().split(",") if c]
            current = None
            i += 2
            continue
        if word in sections:
            current = sections[word]
        elif current is not None:
            current.append(args[i])
        else:
            raise AclError(f"unexpected {args[i]!r}; {ROLE_USAGE}")
        i += 1
    return name, categories, sections[b"READ"], sections[b"WRITE"]


def cmd_role(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    action = req[1].upper()
    if action == b"LIST" and len(req) == 2:
        async def listing() -> Any:
            table = await _read(node)
            if isinstance(table, Error):
                return table
            return [[r.name.encode(), [c.encode() for c in CATEGORIES if c in r.categories], list(r.read),
                     list(r.write)] for r in sorted(table.roles.values(), key=lambda r: r.name)]
        return node.run(listing())
    if action == b"SET":
        try:
            name, categories, read, write = parse_role(req[2:])
        except AclError as e:
            return Error("ERR", str(e))
        return node.run(_change(node, lambda t: t.put_role(name, categories, read, write)))
    if action == b"DEL" and len(req) == 3:
        name = req[2].decode(errors="replace")
        return node.run(_change(node, lambda t: t.delete_role(name)))
    return Error("ERR", ROLE_USAGE)


COMMANDS: dict[bytes, Command] = {
    b"RAFTKV.USER": Command(-2, cmd_user, access=admin_access),
    b"RAFTKV.ROLE": Command(-2, cmd_role, access=admin_access),
}

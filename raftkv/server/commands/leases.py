"""``RAFTKV.LEASE GRANT|KEEPALIVE|REVOKE|TTL`` and ``SET key value LEASE id``: the node side of leases.

State-machine side and the cross-shard design: ``raftkv.leases``.  This module
runs the two-entry attach (``lease_use`` on the lease's home shard, then the
write on the key's shard), fans KEEPALIVE out to the shards that mirror the
lease, and delivers the drops of ended leases (``sweep_loop``) until every
shard has acknowledged them.

==============================================  ==========================================
request                                         reply
==============================================  ==========================================
``RAFTKV.LEASE GRANT ttl_s [FOR key]``          the lease id (home: the shard of ``key``,
                                                else a shard this node leads)
``RAFTKV.LEASE KEEPALIVE id``                   the granted ttl (s), now the time left
``RAFTKV.LEASE REVOKE id``                      OK; the attached keys are deleted
``RAFTKV.LEASE TTL id``                         ``[remaining s, granted s, attached keys]``
``SET key value LEASE id``                      OK; the key dies with the lease
==============================================  ==========================================

Errors: ``-NOLEASE lease N not found`` (unknown, expired or revoked),
``-ERR ...`` for a ttl that is not a positive integer or an id that is not one.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from raftkv.acl import Access
from raftkv.leases import TTL_S_MAX, home_in, no_lease
from raftkv.protocol import OK, Error
from raftkv.results import CmdError
from raftkv.server.api import BadRequest, Command, NodeAPI
from raftkv.server.commands.kv import SESSION_WRITES, SET_EXTENSIONS, Session, to_reply, write
from raftkv.server.conn import Conn

log = logging.getLogger("raftkv.leases")
SWEEP_PERIOD_S = 0.5  # how often a home leader re-sends the drops of ended leases not yet acknowledged
DROP_WAIT_S = 2.0  # how long REVOKE waits for the other shards' drops before leaving them to the sweep


def _int_arg(raw: bytes, what: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n <= 0:
        raise BadRequest(Error("ERR", f"RAFTKV.LEASE: {what} must be a positive integer"))
    return n


def home(node: NodeAPI, lid: int) -> int:
    """The shard holding lease ``lid`` by this node's map (its granting shard, or shard 0 after a removal took
    that one away: ``raftkv.leases.home_in``)."""
    return home_in(lid, node.map.leases_moved)


def parse_lease_id(node: NodeAPI, raw: bytes) -> int:
    """A lease id from a request; ``BadRequest`` (ERR) if not an integer, (NOLEASE) if no shard is its home."""
    lid = _int_arg(raw, "the lease id")
    if home(node, lid) >= node.map.nshards:
        raise BadRequest(to_reply(no_lease(lid)))
    return lid


def _failed(res: Any) -> bool:
    return isinstance(res, Error | CmdError | BaseException)


def attach(node: NodeAPI, shard: int, lid: int, build: Callable[[int | None], tuple], session: Session | None,
           convert: Callable[[Any], Any] | None = None) -> Any:
    """Run ``build(remaining)`` on ``shard`` attached to lease ``lid`` (``raftkv.leases``, two entries).

    On the lease's home shard it is one entry (``remaining`` None); elsewhere the
    home shard first records ``shard`` (so the lease's end reaches it) and says
    how long the lease has left, then ``shard`` applies the command.
    """
    at = home(node, lid)
    if at == shard:
        return write(node, shard, build(None), session, convert)

    async def go() -> Any:
        remaining = await node.execute(at, ("lease_use", lid, shard), idempotent=True)
        if _failed(remaining):
            return to_reply(remaining)
        return await write(node, shard, build(int(remaining)), session, convert)
    return node.run(go())


async def _on_shards(node: NodeAPI, shards: Any, cmd: tuple, budget_s: float | None = None) -> list[int]:
    """Run ``cmd`` on every shard of ``shards`` (idempotent commands); the shards where it failed."""
    shards = list(shards)
    results = await asyncio.gather(*(node.execute(s, cmd, idempotent=True, budget_s=budget_s) for s in shards),
                                   return_exceptions=True)
    return [s for s, r in zip(shards, results, strict=True) if _failed(r)]


async def deliver_drops(node: NodeAPI, home: int, lid: int, ttl_ms: int, shards: Any,
                        budget_s: float | None = None) -> list[int]:
    """Tell ``shards`` that lease ``lid`` ended, acknowledge the ones that applied it; the others."""
    failed = await _on_shards(node, shards, ("lease_drop", lid, ttl_ms), budget_s)
    done = [s for s in shards if s not in failed]
    if done:
        await node.execute(home, ("lease_dropped", lid, tuple(done)), idempotent=True)
    return failed


def _grant(node: NodeAPI, req: list[bytes], session: Session | None) -> Any:
    if len(req) not in (3, 5) or (len(req) == 5 and req[3].upper() != b"FOR"):
        return Error("ERR", "syntax error: RAFTKV.LEASE GRANT ttl_seconds [FOR key]")
    ttl_s = _int_arg(req[2], "ttl")
    if ttl_s > TTL_S_MAX:
        return Error("ERR", f"RAFTKV.LEASE: ttl must be at most {TTL_S_MAX} seconds")
    if len(req) == 5:
        at = node.shard_of(req[4])
    else:  # a shard this node leads saves a hop; any shard will do
        usable = [s for s in range(node.map.nshards) if s != node.map.removing]  # (a shard going away: no)
        led = [s for s in usable if s in node.replicas and node.replicas[s].is_leader()]
        at = random.choice(led or usable)
    floor = node.map.leases_moved.get(at)  # a shard of this number was removed: its ids live on shard 0
    cmd = ("lease_grant", at, ttl_s * 1000) + ((floor,) if floor else ())
    return write(node, at, cmd, session)


def _keepalive(node: NodeAPI, lid: int, session: Session | None) -> Any:
    async def go() -> Any:
        res = await write(node, home(node, lid), ("lease_keepalive", lid), session, tuple)
        if isinstance(res, Error):
            return res
        ttl_ms, shards = res
        failed = await _on_shards(node, shards, ("lease_refresh", lid, ttl_ms))
        if failed:
            return Error("TRYAGAIN", f"lease {lid} was refreshed on its home shard but not on shard(s) "
                                     f"{', '.join(map(str, failed))}; send KEEPALIVE again")
        return ttl_ms // 1000
    return node.run(go())


def _revoke(node: NodeAPI, lid: int, session: Session | None) -> Any:
    async def go() -> Any:
        at = home(node, lid)
        res = await write(node, at, ("lease_revoke", lid), session, tuple)
        if isinstance(res, Error):
            return res
        ttl_ms, shards = res
        failed = await deliver_drops(node, at, lid, ttl_ms, shards, DROP_WAIT_S)
        if failed:  # the sweep keeps trying; each shard's guard deadline bounds the wait
            log.warning("event=lease_drop_pending lease=%d shards=%s", lid, failed)
        return OK
    return node.run(go())


def _ttl(node: NodeAPI, lid: int) -> Any:
    async def go() -> Any:
        res = to_reply(await node.execute(home(node, lid), ("lease_ttl", lid), read=True))
        if isinstance(res, Error):
            return res
        remaining_ms, ttl_ms, keys, shards = res
        for n in await asyncio.gather(*(node.execute(s, ("lease_keys", lid), read=True) for s in shards)):
            keys += n if isinstance(n, int) else 0
        return [(remaining_ms + 999) // 1000, ttl_ms // 1000, keys]
    return node.run(go())


_WRITES = {b"KEEPALIVE": _keepalive, b"REVOKE": _revoke}


def cmd_lease(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    """RAFTKV.LEASE GRANT|KEEPALIVE|REVOKE|TTL ... (see the module doc)."""
    sub = req[1].upper()
    if sub == b"GRANT":
        return _grant(node, req, session)
    if sub not in _WRITES and sub != b"TTL":
        return Error("ERR", "RAFTKV.LEASE GRANT|KEEPALIVE|REVOKE|TTL")
    if len(req) != 3:
        return Error("WRONGARGS", f"wrong number of arguments for 'raftkv.lease {sub.decode().lower()}'")
    lid = parse_lease_id(node, req[2])
    if sub == b"TTL":
        return _ttl(node, lid)
    return _WRITES[sub](node, lid, session)


def cmd_set_lease(node: NodeAPI, req: list[bytes], session: Session | None) -> Any:
    """SET key value LEASE id: write ``key`` attached to lease ``id`` (LEASE takes no other option)."""
    key, value = req[1], req[2]
    shard = node.shard_of(key)
    node.check_value(value)
    lid = parse_lease_id(node, req[4])
    return attach(node, shard, lid, lambda remaining: ("lease_put", key, value, lid, remaining), session,
                  lambda _rev: OK)


async def sweep(node: NodeAPI, shard: int) -> None:
    """Deliver the drops the home ``shard`` still owes (read through the log, so only its leader acts)."""
    pending = await node.execute(shard, ("lease_pending",), read=True)
    if _failed(pending):
        return
    for lid, ttl_ms, shards in pending:
        await deliver_drops(node, shard, lid, ttl_ms, shards)


async def sweep_loop(node: NodeAPI) -> None:
    """The fallback that makes a lost drop harmless: every ``SWEEP_PERIOD_S`` each home leader re-sends
    the drops of ended leases that some shard has not acknowledged yet."""
    while True:
        await asyncio.sleep(SWEEP_PERIOD_S)
        owing = [s for s, r in node.replicas.items() if r.state.leases.dropping and r.is_leader()]
        if owing:
            await asyncio.gather(*(sweep(node, s) for s in owing), return_exceptions=True)


def _lease_access(req: list[bytes]) -> Access:
    return Access("read" if req[1].upper() == b"TTL" else "write")


SET_EXTENSIONS[b"LEASE"] = cmd_set_lease
SESSION_WRITES[b"RAFTKV.LEASE"] = (-3, cmd_lease)

COMMANDS: dict[bytes, Command] = {
    b"RAFTKV.LEASE": Command(-3, cmd_lease, access=_lease_access),
}

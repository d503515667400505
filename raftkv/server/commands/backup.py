"""``RAFTKV.BACKUP``: the node side of online backup and restore (see ``raftkv.backup``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from raftkv.backup import BackupError, decode_block, encode_block
from raftkv.backup_state import owned_rows
from raftkv.protocol import OK, Error
from raftkv.replica import APPLIED, ShardReplica
from raftkv.server.api import Command, NodeAPI, admin_access
from raftkv.server.commands.admin import leader_replica, parse_shard
from raftkv.server.commands.kv import to_reply
from raftkv.server.conn import Conn


def cmd_backup(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.BACKUP FENCE|CHECK|LIFT|DUMP shard id [ttl_ms] | LOAD shard revision block."""
    action = req[1].upper()
    shard = parse_shard(node, "RAFTKV.BACKUP", req[2])
    arg = req[3].decode(errors="replace") if len(req) > 3 else ""
    if action == b"FENCE" and len(req) == 5:
        try:
            ttl_ms = int(req[4])
        except ValueError:
            return Error("ERR", "RAFTKV.BACKUP FENCE: ttl_ms must be an integer")
        return node.run(_sm(node, shard, ("bk_fence", arg, ttl_ms), lambda _r: OK))
    if action == b"CHECK" and len(req) == 4:
        return node.run(_sm(node, shard, ("bk_check", arg), check_reply))
    if action == b"LIFT" and len(req) == 4:
        return node.run(_sm(node, shard, ("bk_lift", arg), lambda r: int(r)))
    if action == b"DUMP" and len(req) == 4:
        return node.run(_dump(node, shard, arg, req, conn.hops))
    if action == b"LOAD" and len(req) == 5:
        try:
            bshard, revision, rows = decode_block(req[4])
        except BackupError as e:
            return Error("ERR", f"RAFTKV.BACKUP LOAD: {e}")
        if bshard != shard:
            return Error("ERR", f"RAFTKV.BACKUP LOAD: block is for shard {bshard}, not {shard}")
        for key, _v, _r in rows:
            if node.map.shard_for_key(key) != shard:
                return Error("ERR", f"RAFTKV.BACKUP LOAD: key {key!r} does not belong to shard {shard} "
                                    "(the backup's shard count or vnodes differ from this cluster's)")
        return node.run(_sm(node, shard, ("bk_load", rows, revision), lambda r: int(r)))
    return Error("ERR", "usage: RAFTKV.BACKUP FENCE shard id ttl_ms | CHECK shard id | LIFT shard id | "
                        "DUMP shard id | LOAD shard revision block")


def check_reply(res: tuple) -> list[int]:
    """``bk_check``'s result as integers: fence up, prepared, keys, revision, unchanged since the fence, then
    the shard's own ring as shards and vnodes (0 0: it never took part in a move)."""
    active, prepared, keys, revision, unchanged, ring = res
    return [int(active), prepared, keys, revision, int(unchanged), *(ring or (0, 0))]


async def _sm(node: NodeAPI, shard: int, cmd: tuple, convert: Callable[[Any], Any]) -> Any:
    """Run a (repeatable) backup command on the shard leader and convert its result."""
    return to_reply(await node.execute(shard, cmd, idempotent=True), convert)


async def _dump(node: NodeAPI, shard: int, bid: str, req: list[bytes], hops: int) -> Any:
    """DUMP on the shard's leader: a read through the log, the state copied right after it applies."""
    replica = await leader_replica(node, shard, req, hops)
    if not isinstance(replica, ShardReplica):
        return replica
    loop = asyncio.get_running_loop()
    deadline = loop.time() + node.timing.request_timeout_s
    fut = loop.create_future()

    def done(kind: str, res: Any) -> None:  # on the Raft tick thread, right after the entry applied
        out: Any
        if kind != APPLIED:
            out = Error("TRYAGAIN", f"shard {shard}: dump not applied ({res}); retry")
        else:
            active, prepared, _keys, _rev, unchanged, _ring = res[0]
            st = replica.state
            if not active:
                out = Error("FENCELOST", f"shard {shard}: backup fence {bid} is not up (expired or never "
                                         "raised); start the backup again")
            elif not unchanged:
                out = Error("SHARDMOVE", f"shard {shard}: a shard move started or ended here since backup "
                                         f"fence {bid} went up; run the backup again after the move")
            elif prepared or st.txns.prepared:
                out = Error("TRYAGAIN", f"shard {shard}: {prepared} transaction(s) still prepared; retry")
            else:
                # a point-in-time view, read off the tick thread below; owner and move are immutable values
                out = (st.revision, st.data.view(), st.owner, st.move)
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(out))

    replica.propose([("bk_check", bid)], replica.log_now_ms(), done)
    try:
        out = await asyncio.wait_for(fut, max(0.1, deadline - loop.time()))
    except TimeoutError:
        return Error("TRYAGAIN", f"shard {shard}: dump timed out; retry")
    if isinstance(out, Error):
        return out
    revision, data, owner, move = out
    return await loop.run_in_executor(None, _block, shard, revision, data, owner, move)


def _block(shard: int, revision: int, data: Any, owner: Any, move: Any) -> bytes:
    """The dump's block: only the keys the shard serves (keys awaiting a move's cleanup belong elsewhere)."""
    return encode_block(shard, revision, list(owned_rows(data.items(), owner, move)))


COMMANDS: dict[bytes, Command] = {b"RAFTKV.BACKUP": Command(-4, cmd_backup, leader_only=True, access=admin_access)}



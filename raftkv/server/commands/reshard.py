"""RAFTKV.RESHARD shard payload: run one ``raftkv.reshard`` state-machine command on a shard (operators).

``payload`` is the command as MessagePack (``raftkv.server.rpc``'s codec: binary-safe, and it never builds
an arbitrary object); the reply is the command's result in the same codec, as a bulk string. Only the
``mv_*`` commands are accepted: writes go through the shard's Raft log, reads (``mv_status``, ``mv_scan``,
``mv_sessions``) are linearizable (ReadIndex). ``raftkv shard add`` (``raftkv.resharder``) is the caller.
"""

from __future__ import annotations

from typing import Any

from raftkv import reshard
from raftkv.protocol import Error
from raftkv.server import rpc
from raftkv.server.api import Command, NodeAPI, admin_access
from raftkv.server.commands.admin import parse_shard
from raftkv.server.conn import Conn


def cmd_reshard(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    shard = parse_shard(node, "RAFTKV.RESHARD", req[1])
    try:
        cmd = rpc.decode(req[2])
    except rpc.MalformedMessage as e:
        return Error("ERR", f"RAFTKV.RESHARD: {e}")
    if not isinstance(cmd, tuple) or not cmd or cmd[0] not in (*reshard.HANDLERS, *reshard.READ_HANDLERS):
        return Error("ERR", "RAFTKV.RESHARD: not a resharding command (mv_*)")
    read = cmd[0] not in reshard.WRITE_OPS

    async def go() -> Any:
        res = await node.execute(shard, cmd, read=read, idempotent=True)
        if isinstance(res, Error):
            return res
        try:
            return rpc.encode(res)
        except (TypeError, ValueError) as e:  # a value the codec does not carry (a session's stored result)
            return Error("ERR", f"RAFTKV.RESHARD: cannot send the result of {cmd[0]}: {e}")
    return node.run(go())


COMMANDS: dict[bytes, Command] = {
    b"RAFTKV.RESHARD": Command(3, cmd_reshard, access=admin_access),
}

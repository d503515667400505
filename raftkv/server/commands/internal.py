"""``RAFTKV.RPC message``: the one internal command, sent by other nodes (``raftkv.server.rpc``).

The reply is always a bulk string holding the encoded result, so errors,
nils and simple strings reach the origin exactly as the leader produced them.
"""

from __future__ import annotations

from typing import Any

from raftkv.protocol import Error
from raftkv.server import rpc
from raftkv.server.api import Command, NodeAPI
from raftkv.server.conn import Conn


def cmd_rpc(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    try:
        msg = rpc.decode_message(req[1])
    except rpc.MalformedMessage as e:
        return Error("ERR", f"RAFTKV.RPC: {e}")
    return node.run(_run(node, conn, msg))


async def _run(node: NodeAPI, conn: Conn, msg: tuple) -> bytes:
    try:
        result = await _handle(node, conn, msg)
    except (ValueError, TypeError, IndexError) as e:
        result = Error("ERR", f"RAFTKV.RPC: malformed {msg[0]} message ({e})")
    return rpc.encode(result)


async def _handle(node: NodeAPI, conn: Conn, msg: tuple) -> Any:
    kind = msg[0]
    if kind == "exec":
        _, shard, cmd, read, idempotent, hops, budget_s = msg
        return await node.execute(int(shard), tuple(cmd), read=bool(read), idempotent=bool(idempotent),
                                  hops=int(hops), budget_s=float(budget_s))
    if kind == "txn":
        _, txid, compares, then_ops, else_ops, hops = msg
        return await node.coordinate_at_home(str(txid), compares, then_ops, else_ops, int(hops))
    # "leader": an operator command, run here on behalf of a node that does not lead the shard
    _, _shard, request, hops = msg
    return await node.run_forwarded([bytes(a) for a in request], int(hops), conn.peer)


COMMANDS: dict[bytes, Command] = {b"RAFTKV.RPC": Command(2, cmd_rpc)}

"""COPY, RENAME and RENAMENX: a key's value (and time to live) to another key, atomically across shards.

Both keys may live on different shards, so each command is a read of the source
and then one transaction (``NodeAPI.coordinate_at_home``: one Raft entry when
both keys share a shard, two-phase commit otherwise) whose compares say "the
source still has the revision read" (and, without REPLACE, "the destination is
missing") and whose ops put the destination with the source's remaining time
to live (and delete the source, for RENAME).  A source changed in between fails
the compare and the command reads again, up to ``ATTEMPTS_MAX`` times, then
answers ``-TRYAGAIN``: nothing is ever half done.  Replies and errors are
Redis's.
"""

from __future__ import annotations

from typing import Any

from raftkv.acl import Access
from raftkv.protocol import OK, Error
from raftkv.server import coordinator
from raftkv.server.api import Command, NodeAPI
from raftkv.server.commands.kv import to_reply
from raftkv.server.conn import Conn
from raftkv.txn import TxnResult

ATTEMPTS_MAX = 8
_NO_SUCH_KEY = Error("ERR", "no such key")


async def _move(node: NodeAPI, src: bytes, dst: bytes, *, keep_src: bool, replace: bool) -> Any:
    """True once done, False when the destination exists (and not ``replace``), None when the source
    is missing; or an ``Error``.  The caller has checked both keys (``shard_of`` raises)."""
    src_shard, dst_shard = node.shard_of(src), node.shard_of(dst)
    for _ in range(ATTEMPTS_MAX):
        entry = to_reply(await node.execute(src_shard, ("getttl", src), read=True))
        if entry is None or isinstance(entry, Error):
            return entry
        value, rev, ttl = entry
        if not replace:
            exists = to_reply(await node.execute(dst_shard, ("exists", [dst]), read=True))
            if isinstance(exists, Error) or exists:
                return exists if isinstance(exists, Error) else False
        compares = [(src, "rev", rev)] + ([] if replace else [(dst, "missing", None)])
        put = ("put", dst, value) if ttl is None else ("put", dst, value, max(1, ttl))
        ops = [put] if keep_src else [put, ("del", src)]
        res = await node.coordinate_at_home(coordinator.new_txid(), compares, ops, [])
        if isinstance(res, Error) and res.code != "TXNCONFLICT":
            return res
        if isinstance(res, TxnResult) and res.succeeded:
            return True
        # The source changed, the destination appeared, or another transaction held a key: look again.
    return Error("TRYAGAIN", f"{src!r} kept changing during {ATTEMPTS_MAX} attempts; retry")


def cmd_copy(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """COPY source destination [DB 0] [REPLACE] -> 1 copied, 0 not (no source, or destination exists)."""
    src, dst, opts = req[1], req[2], [a.upper() for a in req[3:]]
    replace = False
    while opts:
        opt = opts.pop(0)
        if opt == b"REPLACE":
            replace = True
        elif opt == b"DB" and opts:
            if opts.pop(0) != b"0":
                return Error("ERR", "DB index is out of range")
        else:
            return Error("ERR", "syntax error")
    if src == dst:
        return Error("ERR", "source and destination objects are the same")
    for key in (src, dst):
        node.shard_of(key)  # refuses reserved and oversize keys before anything runs

    async def go() -> Any:
        done = await _move(node, src, dst, keep_src=True, replace=replace)
        return done if isinstance(done, Error) else int(bool(done))
    return node.run(go())


def _rename(node: NodeAPI, req: list[bytes], nx: bool) -> Any:
    src, dst = req[1], req[2]
    for key in (src, dst):
        node.shard_of(key)  # refuses reserved and oversize keys before anything runs

    async def go() -> Any:
        if src == dst:  # Redis: a no-op once the key is known to exist
            exists = to_reply(await node.execute(node.shard_of(src), ("exists", [src]), read=True))
            if isinstance(exists, Error) or not exists:
                return exists if isinstance(exists, Error) else _NO_SUCH_KEY
            return 0 if nx else OK
        done = await _move(node, src, dst, keep_src=False, replace=not nx)
        if done is None:
            return _NO_SUCH_KEY
        if isinstance(done, Error):
            return done
        return int(done) if nx else OK
    return node.run(go())


def cmd_rename(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RENAME source destination -> OK (an existing destination is replaced)."""
    return _rename(node, req, nx=False)


def cmd_renamenx(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RENAMENX source destination -> 1 renamed, 0 the destination exists."""
    return _rename(node, req, nx=True)


def _copy_access(req: list[bytes]) -> Access:
    return Access("write", (req[1], req[2]), (req[2],))


def _rename_access(req: list[bytes]) -> Access:
    return Access("write", (req[1], req[2]), (req[1], req[2]))


COMMANDS: dict[bytes, Command] = {
    b"COPY": Command(-3, cmd_copy, access=_copy_access),
    b"RENAME": Command(3, cmd_rename, access=_rename_access),
    b"RENAMENX": Command(3, cmd_renamenx, access=_rename_access),
}

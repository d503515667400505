"""The change feed over RESP: ``RAFTKV.WATCH`` (state-machine side: ``raftkv.changelog``).

::

    RAFTKV.WATCH KEY k    FROM rev|$            [BLOCK ms] [COUNT n]
    RAFTKV.WATCH PREFIX p FROM s=rev,s=rev...|rev|$ [BLOCK ms] [COUNT n]

answers ``[cursor, events]``: every change with a revision after the cursor
given, oldest first per shard, each event ``[shard, revision, "put"|"del",
key, value|nil]``, and the cursor to send as ``FROM`` next time.  Revisions
are per shard: a key watch has one (its shard's), a prefix watch one per shard,
``0=12,1=7,2=30``; ``$`` means "from now", a plain number for a prefix is every
shard's.  Ordering is per shard (per key, in particular), never across shards.

Each read is linearizable (the shard leader's ReadIndex, as GET), so a watch
started after a write was acknowledged sees it, and the cursor moves to the
shard's revision even when no watched key changed.  Delivery does not depend on
which node answers: every replica holds the same change log, so re-sending the
last cursor to any node after a reconnect or a leader change gives no gap and
no duplicate, as long as the shard still retains that revision
(``-COMPACTED oldest=N``, with ``shard=S`` for a prefix, otherwise).

``BLOCK ms`` waits for a change like ``XREAD BLOCK`` (``0``: the longest wait,
``BLOCK_MS_MAX``), in ``raftkv.server.feed``, off the event loop's and the
tick threads' way.  ``COUNT`` bounds the events per shard.
"""

from __future__ import annotations

import asyncio
from typing import Any

from raftkv.acl import RESERVED_PREFIX, Access
from raftkv.changelog import COUNT_MAX, decode_cursors, encode_cursor
from raftkv.protocol import Error
from raftkv.server.api import BadRequest, Command, NodeAPI
from raftkv.server.commands.kv import int_option, to_reply
from raftkv.server.conn import Conn
from raftkv.server.feed import RECHECK_S

BLOCK_MS_MAX = 60_000
COUNT_DEFAULT = 1000
_SYNTAX = Error("ERR", "syntax error: RAFTKV.WATCH KEY k|PREFIX p FROM rev|$ [BLOCK ms] [COUNT n]")


def decode_cursor(raw: bytes, shards: list[int]) -> dict[int, int | None]:
    """``$`` (from now), ``rev`` (every shard's) or ``s=rev,...`` (one per shard, all of them)."""
    if raw == b"$":
        return dict.fromkeys(shards)
    try:
        if b"=" not in raw:
            rev = int(raw)
            if rev < 0:
                raise ValueError
            return dict.fromkeys(shards, rev)
        pairs = decode_cursors(raw)
    except ValueError:
        raise BadRequest(Error("ERR", f"FROM: not a cursor: {raw[:100]!r}")) from None
    if sorted(pairs) != shards or min(pairs.values()) < 0:
        raise BadRequest(Error("ERR", f"FROM: want one revision per shard ({len(shards)} shards)"))
    return dict(pairs)


def event_rows(shard: int, batch: Any) -> list[list]:
    """A shard's ``(revision, key, value)`` events as reply rows; the cluster's own keys left out."""
    return [[shard, rev, b"put" if value is not None else b"del", key, value]
            for rev, key, value in batch if not key.startswith(RESERVED_PREFIX)]


def cmd_watch(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    kind, subject = req[1].upper(), req[2]
    if kind not in (b"KEY", b"PREFIX") or len(req) % 2 == 0 or req[3].upper() != b"FROM":
        return _SYNTAX
    prefix = kind == b"PREFIX"
    shard = node.shard_of(subject)  # refuses reserved and oversize keys
    shards = list(range(node.map.nshards)) if prefix else [shard]
    cursors = decode_cursor(req[4], shards)
    block_ms, count = None, COUNT_DEFAULT
    for name, value in zip(req[5::2], req[6::2], strict=True):
        name = name.upper()
        if name == b"BLOCK":
            block_ms = int_option(value, 0, BLOCK_MS_MAX, "BLOCK") or BLOCK_MS_MAX
        elif name == b"COUNT":
            count = int_option(value, 1, COUNT_MAX, "COUNT")
        else:
            return _SYNTAX

    async def read(s: int) -> Any:
        res = to_reply(await node.execute(s, ("changes", subject, prefix, cursors[s], count), read=True))
        if isinstance(res, Error) and res.code == "COMPACTED" and prefix:
            oldest, _, why = res.message.partition(":")
            return Error("COMPACTED", f"{oldest} shard={s}:{why}")
        return res

    async def go() -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (block_ms or 0) / 1000
        while True:
            found = await asyncio.gather(*(read(s) for s in shards))
            events = []
            for s, res in zip(shards, found, strict=True):
                if isinstance(res, Error):
                    return res
                batch, cursors[s] = res
                events += event_rows(s, batch)
            left = deadline - loop.time()
            if events or left <= 0:
                return [encode_cursor(cursors, prefix), events]  # type: ignore[arg-type]
            await node.wait_applied(cursors, min(left, RECHECK_S))  # type: ignore[arg-type]
    return node.run(go())


def _watch_access(req: list[bytes]) -> Access:
    return Access("read", (req[2],))  # a prefix is allowed when every key under it may be read


COMMANDS: dict[bytes, Command] = {
    b"RAFTKV.WATCH": Command(-5, cmd_watch, read=True, access=_watch_access),
}

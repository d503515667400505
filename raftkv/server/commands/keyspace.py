"""SCAN, KEYS and RAFTKV.RANGE over every shard (state-machine side: ``raftkv.keyspace``).

``SCAN cursor [MATCH pattern] [COUNT n] [TYPE string]``: each call reads one
shard (linearizably) from the cursor's position; the cursor is an integer that
encodes the shard and the last key returned, ``0`` starts and ends a scan.
``KEYS pattern`` reads every shard.  Keys reserved for the cluster are never
listed.  Both need read permission on every key (a key's name is data too).

``RAFTKV.RANGE start end [LIMIT n]`` answers the keys in ``[start, end)`` in
byte order with their values, as a flat array ``key value key value ...``
(``end`` empty: no upper bound), at most ``n`` (default ``RANGE_LIMIT_DEFAULT``)
pairs.  Hash sharding scatters neighbouring keys, so every range asks every
shard in parallel (each a linearizable read of one pass over its keys, as
SCAN) and merges their answers; like MGET, shards are read one by one, not as
one snapshot.  It needs read permission on the narrowest prefix that holds
the whole range.  Continue a long range from the last key + ``\\x00``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from raftkv.acl import RESERVED_PREFIX, Access
from raftkv.keyspace import prefix_end
from raftkv.protocol import Error
from raftkv.server.api import Command, NodeAPI
from raftkv.server.commands.kv import int_option, to_reply
from raftkv.server.conn import Conn

SCAN_COUNT_DEFAULT = 10
SCAN_COUNT_MAX = 10_000
RANGE_LIMIT_DEFAULT = 1000
RANGE_REPLY_BYTES_MAX = 64 * 1024 * 1024  # keys and values in one RAFTKV.RANGE reply


def encode_cursor(nshards: int, shard: int, after: bytes | None) -> int:
    """The cursor of position ``after`` in ``shard`` (``0``: the start of shard 0)."""
    return shard + nshards * (0 if after is None else int.from_bytes(b"\x01" + after, "big"))


def decode_cursor(nshards: int, cursor: int) -> tuple[int, bytes | None]:
    rest, shard = divmod(cursor, nshards)
    if rest == 0:
        return shard, None
    raw = rest.to_bytes((rest.bit_length() + 7) // 8, "big")
    if raw[:1] != b"\x01":
        raise ValueError("not a cursor")
    return shard, raw[1:]


def _visible(keys: list[bytes]) -> list[bytes]:
    return [k for k in keys if not k.startswith(RESERVED_PREFIX)]


def cmd_scan(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    n = node.map.nshards
    try:
        shard, after = decode_cursor(n, int(req[1]))
    except ValueError:
        return Error("ERR", "invalid cursor")
    pattern, count = None, SCAN_COUNT_DEFAULT
    opts = req[2:]
    for i in range(0, len(opts), 2):
        name = opts[i].upper()
        if i + 1 >= len(opts):
            return Error("ERR", "syntax error")
        if name == b"MATCH":
            pattern = opts[i + 1]
        elif name == b"COUNT":
            try:
                count = int(opts[i + 1])
            except ValueError:
                return Error("ERR", "value is not an integer or out of range")
            if not 1 <= count <= SCAN_COUNT_MAX:
                return Error("ERR", f"COUNT must be 1..{SCAN_COUNT_MAX}")
        elif name == b"TYPE":
            if opts[i + 1].lower() != b"string":
                return [b"0", []]  # every raftkv value is a string
        else:
            return Error("ERR", "syntax error")
    if shard >= n:
        return Error("ERR", "invalid cursor")

    async def go() -> Any:
        res = to_reply(await node.execute(shard, ("scan", after, count, pattern), read=True))
        if isinstance(res, Error):
            return res
        keys, last = res
        if last is not None:
            nxt = encode_cursor(n, shard, last)
        else:
            nxt = 0 if shard + 1 == n else encode_cursor(n, shard + 1, None)
        return [str(nxt).encode(), _visible(list(keys))]
    return node.run(go())


def cmd_keys(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    pattern = req[1]

    async def go() -> Any:
        parts = await asyncio.gather(*(node.execute(s, ("keys", pattern), read=True)
                                       for s in range(node.map.nshards)))
        out: list[bytes] = []
        for p in parts:
            p = to_reply(p)
            if isinstance(p, Error):
                return p
            out += _visible(list(p))
        return sorted(out)
    return node.run(go())


def cmd_range(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    start, end = req[1], req[2] or None
    limit = RANGE_LIMIT_DEFAULT
    if len(req) not in (3, 5) or (len(req) == 5 and req[3].upper() != b"LIMIT"):
        return Error("ERR", "syntax error: RAFTKV.RANGE start end [LIMIT n]")
    if len(req) == 5:
        limit = int_option(req[4], 1, SCAN_COUNT_MAX, "LIMIT")

    async def go() -> Any:
        cmd = ("range", start, end, limit, RESERVED_PREFIX)  # the cluster's own keys are never listed
        parts = await asyncio.gather(*(node.execute(s, cmd, read=True) for s in range(node.map.nshards)))
        pairs: list = []
        for p in parts:
            p = to_reply(p)
            if isinstance(p, Error):
                return p
            pairs += p
        pairs = sorted(pairs)[:limit]
        if sum(len(k) + len(v) for k, v in pairs) > RANGE_REPLY_BYTES_MAX:
            return Error("TOOBIG", f"the range holds over {RANGE_REPLY_BYTES_MAX} bytes in {limit} keys; "
                                   "ask for fewer (LIMIT)")
        return [x for kv in pairs for x in kv]
    return node.run(go())


def range_prefix(start: bytes, end: bytes | None) -> bytes:
    """The longest prefix every key in ``[start, end)`` starts with (b"": no common prefix)."""
    if end is None:
        return b""
    for n in range(len(start), 0, -1):
        bound = prefix_end(start[:n])
        if bound is not None and end <= bound:
            return start[:n]
    return b""


def _range_access(req: list[bytes]) -> Access:
    return Access("read", (range_prefix(req[1], req[2] or None),))


def _all_keys(req: list[bytes]) -> Access:
    return Access("read", (b"",))  # allowed only to a role that may read every key


COMMANDS: dict[bytes, Command] = {
    b"SCAN": Command(-2, cmd_scan, read=True, access=_all_keys),
    b"KEYS": Command(2, cmd_keys, read=True, access=_all_keys),
    b"RAFTKV.RANGE": Command(-3, cmd_range, read=True, access=_range_access),
}

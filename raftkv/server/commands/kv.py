"""Key-value commands: GET, SET, DEL, EXISTS, MGET, CAS, RAFTKV.CASNX, RAFTKV.STALEGET, RAFTKV.REQ.

Each handler turns a request into state-machine commands (``raftkv.state``),
runs them through ``NodeAPI.execute`` and turns the results into replies.
``RAFTKV.REQ session seq COMMAND ...`` wraps a write in a client session, so
the state machine applies it at most once however often it is re-sent; the
wrapped command travels to the leader as it is (``raftkv.server.router``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from raftkv.acl import Access
from raftkv.protocol import OK, Error
from raftkv.results import CmdError
from raftkv.server.api import BadRequest, Command, NodeAPI
from raftkv.server.conn import Conn

Session = tuple[bytes, int]


def to_reply(res: Any, convert: Callable[[Any], Any] | None = None) -> Any:
    """A state-machine result (or an ``Error``) as the reply to send."""
    if isinstance(res, CmdError):
        return Error(res.code, res.message)
    if convert is not None and not isinstance(res, Error):
        return convert(res)
    return res


def write(node: NodeAPI, shard: int, cmd: tuple, session: Session | None,
           convert: Callable[[Any], Any] | None = None) -> Any:
    if session is not None:
        cmd = ("session", session[0], session[1], cmd)

    async def go() -> Any:
        return to_reply(await node.execute(shard, cmd, idempotent=session is not None), convert)
    return node.run(go())


def group_by_shard(node: NodeAPI, keys: list[bytes]) -> dict[int, list[bytes]]:
    by_shard: dict[int, list[bytes]] = {}
    for k in keys:
        by_shard.setdefault(node.shard_of(k), []).append(k)
    return by_shard


def cmd_get(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    key = req[1]
    shard = node.shard_of(key)
    if conn.readonly or node.unsafe_local_reads:
        return node.run(node.stale_read(shard, ("get", key)))

    async def go() -> Any:
        return to_reply(await node.execute(shard, ("get", key), read=True))
    return node.run(go())


def cmd_staleget(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    key = req[1]
    return node.run(node.stale_read(node.shard_of(key), ("get", key)))


# SET options served by other modules, taking the whole request: ``SET key value OPTION arg``
# (``LEASE id``: raftkv.server.commands.leases).
SET_EXTENSIONS: dict[bytes, Callable[[NodeAPI, list[bytes], Session | None], Any]] = {}


def cmd_set(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    if len(req) != 3:
        extension = SET_EXTENSIONS.get(req[3].upper())
        if extension is not None:
            return extension(node, req, session) if len(req) == 5 else Error("ERR", "syntax error")
        return _set_with_options(node, req, session)
    key, value = req[1], req[2]
    shard = node.shard_of(key)
    node.check_value(value)
    return write(node, shard, ("set", key, value), session, lambda _rev: OK)


TTL_OPTIONS = {b"EX": ("in", 1000), b"PX": ("in", 1), b"EXAT": ("at", 1000), b"PXAT": ("at", 1)}


def int_option(raw: bytes, low: int, high: int, name: str) -> int:
    """An integer option in ``[low, high]`` (raises ``BadRequest`` with Redis's error for a non-integer)."""
    try:
        n = int(raw)
    except ValueError:
        raise BadRequest(Error("ERR", "value is not an integer or out of range")) from None
    if not low <= n <= high:
        raise BadRequest(Error("ERR", f"{name} must be {low}..{high}"))
    return n


def ttl_ms(option: bytes, amount: bytes, command: str) -> int:
    """Milliseconds from now for ``EX|PX|EXAT|PXAT amount`` (raises ``BadRequest`` with Redis's errors).

    An absolute time becomes "from now" by this node's clock: deadlines live in log time.
    """
    kind, unit = TTL_OPTIONS[option]
    try:
        n = int(amount)
    except ValueError:
        raise BadRequest(Error("ERR", "value is not an integer or out of range")) from None
    if n <= 0:
        raise BadRequest(Error("ERR", f"invalid expire time in '{command}' command"))
    return n * unit - (int(time.time() * 1000) if kind == "at" else 0)


def _set_with_options(node: NodeAPI, req: list[bytes], session: Session | None) -> Any:
    """SET key value [NX | XX] [GET] [EX s | PX ms | EXAT unix-s | PXAT unix-ms | KEEPTTL].

    The reply is OK / nil, or with GET the value before.  Deadlines are kept in the
    shard's log time (``raftkv.expiry``); an absolute one becomes "from now" here.
    """
    key, value = req[1], req[2]
    cond, get, ttl = None, False, None
    opts = [a.upper() for a in req[3:]]
    i = 0
    while i < len(opts):
        opt = opts[i]
        if opt in (b"NX", b"XX") and cond is None:
            cond = opt.decode().lower()
        elif opt == b"GET" and not get:
            get = True
        elif opt == b"KEEPTTL" and ttl is None:
            ttl = "keep"
        elif opt in TTL_OPTIONS and ttl is None and i + 1 < len(opts):
            ttl = ("in", ttl_ms(opt, req[3 + i + 1], "set"))
            i += 1
        else:
            return Error("ERR", "syntax error")
        i += 1
    node.check_value(value)

    def reply(res: tuple) -> Any:
        done, before = res
        if get:
            return before
        return OK if done else None
    cmd = ("setopt", key, value, cond) if ttl is None else ("setopt", key, value, cond, ttl)
    return write(node, node.shard_of(key), cmd, session, reply)


def cmd_del(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    by_shard = group_by_shard(node, req[1:])
    if len(by_shard) == 1:
        ((shard, ks),) = by_shard.items()
        return write(node, shard, ("del", ks), session)
    if session is not None:
        return Error("ERR", "RAFTKV.REQ DEL: keys on several shards; send one DEL per shard")

    # Keys on several shards: one DEL per shard (not atomic across shards; MSET/TXN are).
    async def go() -> Any:
        parts = await asyncio.gather(*[node.execute(s, ("del", ks)) for s, ks in by_shard.items()])
        total = 0
        for p in parts:
            p = to_reply(p)
            if isinstance(p, Error):
                return p
            total += p
        return total
    return node.run(go())


def _multi_read(node: NodeAPI, req: list[bytes], op: str) -> Any:
    keys = req[1:]
    by_shard = group_by_shard(node, keys)

    async def go() -> Any:
        shards = list(by_shard)
        parts = await asyncio.gather(*[node.execute(s, (op, by_shard[s]), read=True) for s in shards])
        results = {}
        for s, p in zip(shards, parts, strict=True):
            p = to_reply(p)
            if isinstance(p, Error):
                return p
            results[s] = p
        if op == "exists":
            return sum(results.values())
        pos = dict.fromkeys(shards, 0)
        out = []
        for k in keys:
            s = node.shard_of(k)
            out.append(results[s][pos[s]])
            pos[s] += 1
        return out
    return node.run(go())


def cmd_mget(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    return _multi_read(node, req, "mget")


def cmd_exists(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    return _multi_read(node, req, "exists")


def _swapped(r: Any) -> int:
    return 1 if r[0] else 0


def cmd_cas(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    """CAS key expected new -> 1 if swapped, else 0."""
    key, expected, new = req[1], req[2], req[3]
    node.check_value(new)
    return write(node, node.shard_of(key), ("cas", key, expected, new), session, _swapped)


def cmd_casnx(node: NodeAPI, conn: Conn, req: list[bytes], session: Session | None = None) -> Any:
    """RAFTKV.CASNX key new -> 1 if the key was absent and is now set, else 0."""
    key, new = req[1], req[2]
    node.check_value(new)
    return write(node, node.shard_of(key), ("cas", key, None, new), session, _swapped)


SESSION_WRITES: dict[bytes, tuple[int, Callable[..., Any]]] = {
    b"SET": (-3, cmd_set), b"DEL": (-2, cmd_del), b"CAS": (4, cmd_cas), b"RAFTKV.CASNX": (3, cmd_casnx),
}


def cmd_req(node: NodeAPI, conn: Conn, req: list[bytes]) -> Any:
    """RAFTKV.REQ session seq COMMAND args...: a de-duplicated write (client library)."""
    sid, seq_b, inner = req[1], req[2], req[3:]
    try:
        seq = int(seq_b)
    except ValueError:
        return Error("ERR", "RAFTKV.REQ: seq must be an integer")
    name = inner[0].upper()
    spec = SESSION_WRITES.get(name)
    if spec is None:
        return Error("ERR", f"RAFTKV.REQ supports {', '.join(sorted(k.decode() for k in SESSION_WRITES))}")
    arity, handler = spec
    if (arity >= 0 and len(inner) != arity) or (arity < 0 and len(inner) < -arity):
        return Error("WRONGARGS", f"wrong number of arguments for '{name.decode().lower()}' command")
    return handler(node, conn, inner, session=(sid, seq))


def _reads_all(req: list[bytes]) -> Access:
    return Access("read", tuple(req[1:]))


def _writes_all(req: list[bytes]) -> Access:
    return Access("write", writes=tuple(req[1:]))


def _read_first(req: list[bytes]) -> Access:
    return Access("read", (req[1],))


def _set_access(req: list[bytes]) -> Access:
    reads = (req[1],) if any(a.upper() == b"GET" for a in req[3:]) else ()  # SET ... GET reads the old value
    return Access("write", reads, (req[1],))


def _swap_first(req: list[bytes]) -> Access:
    return Access("write", (req[1],), (req[1],))  # a compare-and-set reads the key too


def _req_access(req: list[bytes]) -> Access:
    inner = COMMANDS.get(req[3].upper()) if len(req) > 3 else None
    if inner is None or inner.access is None:
        return Access("write")
    return inner.access(req[3:])


COMMANDS: dict[bytes, Command] = {
    b"GET": Command(2, cmd_get, read=True, access=_read_first),
    b"MGET": Command(-2, cmd_mget, read=True, access=_reads_all),
    b"EXISTS": Command(-2, cmd_exists, read=True, access=_reads_all),
    b"RAFTKV.STALEGET": Command(2, cmd_staleget, read=True, access=_read_first),
    b"SET": Command(-3, cmd_set, access=_set_access),
    b"DEL": Command(-2, cmd_del, access=_writes_all),
    b"CAS": Command(4, cmd_cas, access=_swap_first),
    b"RAFTKV.CASNX": Command(3, cmd_casnx, access=_swap_first),
    b"RAFTKV.REQ": Command(-4, cmd_req, access=_req_access),
}

"""``raftkv.aio.AsyncClient``: the asyncio client, with the same guarantees as ``raftkv.Client``.

::

    async with AsyncClient(cluster="cluster.toml") as c:
        await c.put("k", "v")
        assert await c.get("k") == b"v"
        await asyncio.gather(*(c.incr("hits") for _ in range(100)))

Routing and retries are those of the threaded client: keys hash to shards with
the nodes' ring, commands go to the node believed to lead the shard (a leader
cache from ``RAFTKV.SHARDS``), writes carry a session and a sequence number so a
retry after an unknown outcome is applied at most once, and a write whose
outcome stays unknown raises ``IndeterminateError``, never a guess
(``raftkv.client.Attempts`` is shared).  One pipelined connection per node
serves every concurrent call; each write takes a session of its own from a pool,
because a session has at most one request in flight.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import tomllib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from raftkv.aioconnection import AsyncConnection, ConnectionLost
from raftkv.client import (
    Attempts,
    Bytesish,
    LeaseTTL,
    RaftKVError,
    UnavailableError,
    _b,
    _parse_addr,
    _wrongshard_owner,
)
from raftkv.leases import home_in
from raftkv.protocol import ReplyError
from raftkv.watchclient import Start, Watch, WatchEvent
from shards.shardmap import ShardMap


class AsyncClient:
    """An asyncio client for a raftkv cluster (see module doc); use it from one event loop."""

    def __init__(self, nodes: list[str] | None = None, cluster: str | os.PathLike | ShardMap | None = None,
                 timeout: float = 10.0, password: str | None = None, username: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        if cluster is None and not nodes:
            raise ValueError("give a cluster file (cluster=...) or node addresses (nodes=['host:port', ...])")
        self.timeout = timeout
        self.tls = tls
        self.map: ShardMap | None = cluster if isinstance(cluster, ShardMap) else (
            ShardMap.load(cluster) if cluster is not None else None)
        self.username = username
        self.password = (password or os.environ.get("RAFTKV_PASSWORD")
                         or (self.map.security.get("password") if self.map is not None else None))
        self._seeds = [_parse_addr(a) for a in nodes] if nodes else [
            n.client_addr for n in self.map.nodes.values()]  # type: ignore[union-attr]
        self._conns: dict[tuple[str, int], AsyncConnection] = {}
        self._leaders: dict[int, str] = {}
        self._client_id = uuid.uuid4().hex[:16]
        self._free_sessions: list[tuple[bytes, int]] = []
        self._sessions = 0

    async def __aenter__(self) -> AsyncClient:
        if self.map is None:
            self.map = await self._fetch_map()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    # -- data -------------------------------------------------------------------------------
    async def get(self, key: Bytesish) -> bytes | None:
        """The value of ``key`` (linearizable), or None."""
        key = _b(key)
        return await self._request(self._shard(key), [b"GET", key], write=False)

    async def mget(self, keys: list[Bytesish]) -> list[bytes | None]:
        """Values of several keys (each linearizable; not one snapshot across shards)."""
        return list(await asyncio.gather(*(self.get(k) for k in keys)))

    async def put(self, key: Bytesish, value: Bytesish, lease: int | None = None) -> None:
        """Write ``value``; returns once it is committed and durable on a majority.

        ``lease``: attach the key to that lease (deleted when it ends; ``NOLEASE`` if it has).
        """
        key = _b(key)
        extra = [] if lease is None else [b"LEASE", str(lease).encode()]
        await self._write(self._shard(key), [b"SET", key, _b(value), *extra])

    async def delete(self, key: Bytesish) -> bool:
        """Delete ``key``; True if it existed."""
        key = _b(key)
        return bool(await self._write(self._shard(key), [b"DEL", key]))

    async def cas(self, key: Bytesish, expected: Bytesish | None, new: Bytesish) -> bool:
        """Set ``key`` to ``new`` only if its value is ``expected`` (None: only if absent)."""
        key = _b(key)
        if expected is None:
            return bool(await self._write(self._shard(key), [b"RAFTKV.CASNX", key, _b(new)]))
        return bool(await self._write(self._shard(key), [b"CAS", key, _b(expected), _b(new)]))

    async def incr(self, key: Bytesish, by: int = 1) -> int:
        """Add ``by`` to the integer at ``key`` and return the new value; applied once."""
        key = _b(key)
        return int(await self._write(self._shard(key), [b"INCRBY", key, str(by).encode()]))

    async def mset(self, mapping: dict) -> None:
        """Write several keys atomically (one transaction across shards)."""
        args = [x for k, v in mapping.items() for x in (_b(k), _b(v))]
        shard = self._shard(args[0])
        await self._request(shard, [b"MSET", *args], write=True)

    # -- leases (raftkv.leases; the same requests as raftkv.Client's) -----------------------------
    async def lease_grant(self, ttl: int, near: Bytesish | None = None) -> int:
        """Grant a lease of ``ttl`` whole seconds (homed on ``near``'s shard if given); its id."""
        args = [b"RAFTKV.LEASE", b"GRANT", str(int(ttl)).encode()]
        if near is None:
            assert self.map is not None
            return int(await self._write(random.randrange(self.map.nshards), args))
        near = _b(near)
        return int(await self._write(self._shard(near), [*args, b"FOR", near]))

    def _lease_home(self, lease: int) -> int:
        """The shard holding ``lease`` by this client's map (only where to send: the node routes by its own)."""
        return home_in(lease, self.map.leases_moved if self.map is not None else {})

    async def lease_keepalive(self, lease: int) -> int:
        """Push the lease's deadline back to its full ttl; the ttl (``NOLEASE`` once it ended)."""
        return int(await self._write(self._lease_home(lease), [b"RAFTKV.LEASE", b"KEEPALIVE", str(lease).encode()]))

    async def lease_revoke(self, lease: int) -> None:
        """End the lease now; its keys are deleted."""
        await self._write(self._lease_home(lease), [b"RAFTKV.LEASE", b"REVOKE", str(lease).encode()])

    async def lease_ttl(self, lease: int) -> LeaseTTL:
        """Seconds left, the granted ttl and the number of attached keys."""
        reply = await self._request(self._lease_home(lease), [b"RAFTKV.LEASE", b"TTL", str(lease).encode()], write=False)
        return LeaseTTL(*(int(x) for x in reply))

    def lease(self, ttl: int, near: Bytesish | None = None) -> AsyncLease:
        """``async with client.lease(ttl) as lease:``: granted, kept alive by a task every ``ttl/3``
        seconds, revoked on exit (``raftkv.client.Lease`` is the threaded twin)."""
        return AsyncLease(self, int(ttl), None if near is None else _b(near))

    def watch(self, key_or_prefix: Bytesish, prefix: bool = False, start_revision: Start = None,
              block: float | None = None) -> AsyncWatch:
        """``Client.watch`` for asyncio: ``async for event in client.watch(...)``.  The watch long-polls
        on connections of its own; ``await w.aclose()`` closes them."""
        subject = _b(key_or_prefix)
        assert self.map is not None, "use 'async with AsyncClient(...)' (it fetches the cluster map)"
        shards = list(range(self.map.nshards)) if prefix else [self._shard(subject)]
        block_s = min(5.0, self.timeout / 2) if block is None else block
        return AsyncWatch(self, subject, prefix, shards, start_revision, block_s)

    # -- routing and retries ------------------------------------------------------------------
    def _shard(self, key: bytes) -> int:
        assert self.map is not None, "use 'async with AsyncClient(...)' (it fetches the cluster map)"
        return self.map.shard_for_key(key)

    async def _write(self, shard: int, args: list[bytes]) -> Any:
        session = self._free_sessions.pop() if self._free_sessions else self._new_session()
        sid, seq = session[0], session[1] + 1
        try:
            return await self._request(shard, [b"RAFTKV.REQ", sid, str(seq).encode(), *args], write=True)
        finally:
            # The session's next request uses the next sequence number, whatever this one's outcome.
            self._free_sessions.append((sid, seq))

    def _new_session(self) -> tuple[bytes, int]:
        self._sessions += 1
        return f"{self._client_id}-a{self._sessions}".encode(), 0

    async def _request(self, shard: int, args: list[bytes], write: bool,
                       conns: dict[tuple[str, int], AsyncConnection] | None = None) -> Any:
        """``args`` to ``shard``'s leader with retries; ``conns``: connections of the caller's own
        (a long poll must not hold up the replies of the shared, pipelined ones)."""
        loop = asyncio.get_running_loop()
        attempts = Attempts(shard, write, loop.time() + self.timeout)
        while True:
            addr = await self._leader_addr(shard)
            try:
                return await self._call(addr, args, attempts.remaining(loop.time()), conns)
            except (OSError, ConnectionError, ConnectionLost) as e:
                attempts.transport_failed(addr, e, sent=getattr(e, "sent", not isinstance(e, ConnectionRefusedError)))
            except ReplyError as e:
                attempts.refused(e)
                if e.code == "WRONGSHARD":
                    await self._reload_map()  # the key moved shard: route by the map that says so
                    owner = _wrongshard_owner(e.message)
                    if owner is not None and owner != shard and self.map is not None and owner in self.map.groups:
                        shard = owner  # straight to the shard that has it now: no backoff, the route changed
                        continue
            self._leaders.pop(shard, None)
            await asyncio.sleep(attempts.backoff(loop.time()))

    async def _leader_addr(self, shard: int) -> tuple[str, int]:
        assert self.map is not None
        if shard not in self._leaders:
            await self._refresh_leaders()
        name = self._leaders.get(shard)
        if name is not None and name in self.map.nodes:
            return self.map.nodes[name].client_addr
        # (A shard the map no longer has, `raftkv shard remove`: any node routes the request by its own map.)
        replicas = self.map.replicas(shard) if shard in self.map.groups else []
        return random.choice(replicas).client_addr if replicas else random.choice(self._seeds)

    async def _refresh_leaders(self) -> None:
        for addr in random.sample(self._seeds, len(self._seeds)):
            try:
                rows = await self._call(addr, [b"RAFTKV.SHARDS"], 1.0)
            except (OSError, ConnectionError, ConnectionLost, ReplyError):
                continue
            for shard, leader, _term in rows:
                if leader is not None:
                    self._leaders[shard] = leader.decode()
            return

    async def _reload_map(self) -> None:
        """Adopt a newer shard map (higher epoch) from the nodes, if one is there."""
        try:
            new = await self._fetch_map()
        except RaftKVError:
            return
        if self.map is None or new.epoch > self.map.epoch:
            self.map = new

    async def _fetch_map(self) -> ShardMap:
        for addr in self._seeds:
            try:
                text = await self._call(addr, [b"RAFTKV.CLUSTER"], 2.0)
            except (OSError, ConnectionError, ConnectionLost, ReplyError):
                continue
            return ShardMap.from_dict(tomllib.loads(text.decode()), newer_tables=True)
        raise UnavailableError("UNAVAILABLE", f"no node reachable to fetch the cluster map from {self._seeds}")

    async def _call(self, addr: tuple[str, int], args: list[bytes], timeout: float,
                    conns: dict[tuple[str, int], AsyncConnection] | None = None) -> Any:
        conns = self._conns if conns is None else conns
        conn = conns.get(addr)
        if conn is None:
            conn = conns[addr] = AsyncConnection(addr[0], addr[1], self.tls, opening=self._login)
        reply = await conn.call(*args, timeout=timeout)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def _login(self, conn: AsyncConnection) -> None:
        if not self.password:
            return
        creds = [self.username, self.password] if self.username else [self.password]
        reply = await conn.send(b"AUTH", *[c.encode() for c in creds])
        if isinstance(reply, ReplyError):
            conn.close()
            raise RaftKVError(reply.code, reply.message)


class AsyncLease:
    """A lease kept alive by a task while an ``async with`` block runs (``AsyncClient.lease``)."""

    def __init__(self, client: AsyncClient, ttl: int, near: bytes | None) -> None:
        self.client, self.ttl, self.near = client, ttl, near
        self.id: int | None = None
        self.lost = False
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncLease:
        self.id = await self.client.lease_grant(self.ttl, near=self.near)
        self._task = asyncio.create_task(self._keep_alive(self.id))
        return self

    async def _keep_alive(self, lid: int) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.client.lease_keepalive(lid)
            except RaftKVError as e:
                if e.code == "NOLEASE":
                    self.lost = True
                    return

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.id is not None and not self.lost:
            try:
                await self.client.lease_revoke(self.id)
            except RaftKVError as e:
                if e.code != "NOLEASE":
                    raise
        self.id = None

class AsyncWatch(Watch):
    """``raftkv.watchclient.Watch`` driven from asyncio (same cursors, same guarantees)."""

    def __init__(self, client: AsyncClient, subject: bytes, prefix: bool, shards: list[int], start: Start,
                 block_s: float) -> None:
        super().__init__(None, subject, prefix, shards, start, block_s)  # polled with apoll / async for
        self.client = client
        self.conns: dict[tuple[str, int], AsyncConnection] = {}

    async def afetch(self, block: bool = True) -> tuple[list[WatchEvent], dict[int, int]]:
        """One poll: the new events and the cursors after them (``cursors`` is not moved)."""
        try:
            reply = await self.client._request(self.shards[0], self.request(block), write=False, conns=self.conns)
        except RaftKVError as e:
            raise self.refusal(e) from None
        return self.parse(reply)

    async def apoll(self, block: bool = True) -> list[WatchEvent]:
        """The next batch of events (empty when the wait ran out quietly); moves ``cursors`` past it."""
        events, self.cursors = await self.afetch(block)
        return events

    async def __aiter__(self) -> AsyncIterator[WatchEvent]:
        while True:
            events, after = await self.afetch()
            for e in self.handing_out(events, after):
                yield e

    async def aclose(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()

"""``raftkv.Client``: the Python client library.

Routing: the client knows the shard map (from the cluster file, or fetched
from any node with ``RAFTKV.CLUSTER``), hashes each key to its shard with the
same ring as the nodes, and sends the command straight to the node it believes
leads that shard (a leader cache filled from ``RAFTKV.SHARDS``).  A node that
does not lead forwards the command, so a stale cache costs a hop, never an error.

Retries: writes carry a session id and a sequence number
(``RAFTKV.REQ sid seq ...``); the shard's state machine applies each sequence
number at most once, so the client can retry a write whose outcome was unknown
(lost connection, leader change) and get the first result.  When the retry
budget runs out after a request may have reached a leader, the client raises
``IndeterminateError``: the write may or may not have happened.  It never
guesses.

Thread safety: one ``Client`` may be shared by threads.  Each thread gets its
own connections and its own session (a session has one request in flight).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from raftkv import bulk
from raftkv.connection import Connection
from raftkv.errors import IndeterminateError, LockTimeout, RaftKVError, UnavailableError
from raftkv.keyspace import prefix_end
from raftkv.leases import home_in
from raftkv.protocol import ReplyError
from raftkv.txnclient import Txn
from raftkv.watchclient import CompactedError, Start, Watch, WatchEvent
from shards.shardmap import ShardMap

Bytesish = bytes | str
__all__ = ["Client", "CompactedError", "IndeterminateError", "Lease", "LeaseTTL", "Lock", "LockTimeout", "RaftKVError",
           "UnavailableError", "Watch", "WatchEvent"]

# Error codes after which the same request may be sent again unchanged.  ``STORAGE``: that node's engine
# failed (a full disk) and it stopped its Raft groups without proposing; the shard's other replicas elect a
# leader, so the request goes to them.  ``MOVING``: the key is being moved to a new shard (``raftkv shard
# add``); ``WRONGSHARD``: it lives on another shard now: the client adopts a newer map before it retries.
_RETRY_CODES = {"MOVED", "TRYAGAIN", "NOQUORUM", "LOCKED", "BUSY", "STORAGE", "MOVING", "WRONGSHARD"}


class Attempts:
    """What a client may conclude from the attempts of one request so far (pure, shared by both clients).

    A write that may have reached a leader (a transport failure after sending, or
    ``-UNKNOWN``) can only end applied or indeterminate; a refusal that is not
    retryable is raised at once; otherwise the request is re-sent after a
    jittered exponential backoff until the deadline.
    """

    def __init__(self, shard: int, write: bool, deadline: float) -> None:
        self.shard = shard
        self.write = write
        self.deadline = deadline
        self.maybe_applied = False
        self.last = "no attempt"
        self.count = 0

    def remaining(self, now: float) -> float:
        return max(0.1, self.deadline - now)

    def transport_failed(self, addr: tuple[str, int], error: BaseException, sent: bool) -> None:
        """No reply; ``sent``: the request may have reached the node before the connection broke."""
        self.maybe_applied = self.maybe_applied or (self.write and sent)
        self.last = f"{addr[0]}:{addr[1]}: {error}"

    def refused(self, error: ReplyError) -> None:
        """An error reply: raises ``RaftKVError`` unless the request may be sent again."""
        if error.code == "UNKNOWN":
            self.maybe_applied = True
        elif error.code not in _RETRY_CODES:
            raise RaftKVError(error.code, error.message) from None
        self.last = str(error)

    def backoff(self, now: float) -> float:
        """Seconds to wait before the next attempt; raises when the deadline has passed."""
        self.count += 1
        if now + 0.01 > self.deadline:
            if self.maybe_applied:
                raise IndeterminateError("UNKNOWN", f"shard {self.shard}: outcome unknown after {self.count} "
                                                    f"attempts (last: {self.last})")
            raise UnavailableError("UNAVAILABLE", f"shard {self.shard}: not applied after {self.count} attempts "
                                                  f"(last: {self.last})")
        return min(0.5, 0.01 * 2 ** min(self.count, 6)) * random.uniform(0.5, 1.0)


def _wrongshard_owner(message: str) -> int | None:
    """The shard a ``-WRONGSHARD epoch shard ...`` reply says the key belongs to now (None if it names none)."""
    parts = message.split(maxsplit=2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _b(x: Bytesish) -> bytes:
    return x.encode() if isinstance(x, str) else x


@dataclass(frozen=True)
class LeaseTTL:
    """``Client.lease_ttl``: seconds left, the granted ttl in seconds, and the keys attached."""

    remaining: int
    granted: int
    keys: int


class Lease:
    """A granted lease kept alive in the background (``Client.lease``); revoked on exit.

    ``id`` goes into ``Client.put(..., lease=id)``.  ``lost`` turns True when a
    keep-alive finds the lease gone (it expired while this process could not
    refresh it, or someone revoked it): the keys attached to it are gone too.
    """

    def __init__(self, client: Client, ttl: int, near: bytes | None = None) -> None:
        self.client, self.ttl, self.near = client, ttl, near
        self.id: int | None = None
        self.lost = False
        self._stopped = False

    def grant(self) -> int:
        """Grant the lease and start keeping it alive every ``ttl/3`` seconds; its id.

        After ``revoke`` the same object may grant again (a ``Lock`` acquired twice does).
        """
        self.id = self.client.lease_grant(self.ttl, near=self.near)
        self.lost = self._stopped = False
        self.client._keepalives.add(self)
        return self.id

    def keep_alive_once(self) -> None:
        """Send one keep-alive now (the background thread calls this every ``ttl/3`` s).

        Waits at most ``ttl/3`` (at least 1 s).  An unreachable shard is not an
        error here: the lease lapses only ``ttl`` after the last keep-alive that
        arrived, and the next one is due soon.
        """
        lid = self.id
        if lid is None or self._stopped:
            return
        try:
            self.client.lease_keepalive(lid, timeout=max(1.0, self.ttl / 3))
        except RaftKVError as e:
            if e.code == "NOLEASE" and not self._stopped:  # not our own revocation racing this keep-alive
                self.lost = True
                self.client._keepalives.remove(self)

    def abandon(self) -> None:
        """Stop the keep-alive without revoking: the lease (and what it holds) lapses ``ttl`` seconds
        after the last keep-alive, as if this process had stopped."""
        self._stopped = True
        self.client._keepalives.remove(self)

    def revoke(self) -> None:
        """Stop the keep-alive and revoke the lease (its keys are deleted); a lost lease is left alone."""
        self.abandon()
        if self.id is not None and not self.lost:
            try:
                self.client.lease_revoke(self.id)
            except RaftKVError as e:
                if e.code != "NOLEASE":
                    raise
        self.id = None

    def __enter__(self) -> Lease:
        self.grant()
        return self

    def __exit__(self, *exc: object) -> None:
        self.revoke()


class _KeepAlives:
    """Keeps every live ``Lease`` of one ``Client`` alive from one thread, each every ``ttl/3`` seconds.

    etcd's client multiplexes its keep-alives the same way: one thread, and one
    set of connections and sessions (one AUTH per node) for all leases, rather
    than a thread and fresh connections per lease or lock.  Each keep-alive
    waits at most ``ttl/3`` (``Lease.keep_alive_once``), so a shard that does not
    answer delays the others' keep-alives by that much.  The thread ends when
    no lease is left and starts again with the next one.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[Lease, float] = {}  # lease -> monotonic time its next keep-alive is due
        self._running = False

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._due[lease] = time.monotonic() + lease.ttl / 3
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, daemon=True, name="raftkv-keepalive").start()
            self._cond.notify()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._due.pop(lease, None)
            self._cond.notify()

    def _next(self) -> Lease | None:
        """The next lease due, once it is due; None when no lease is left (the thread then ends)."""
        with self._cond:
            while self._due:
                lease, at = min(self._due.items(), key=lambda item: item[1])
                wait = at - time.monotonic()
                if wait <= 0:
                    self._due[lease] = time.monotonic() + lease.ttl / 3
                    return lease
                self._cond.wait(wait)
            self._running = False
            return None

    def _run(self) -> None:
        while (lease := self._next()) is not None:
            lease.keep_alive_once()


class Lock:
    """A held lock (``Client.lock``): ``token`` fences, ``lost`` says the lock's lease was lost.

    The lock key is attached to a lease granted on the lock's own shard and kept
    alive in the background; a holder that dies or stops (SIGSTOP, a long GC
    pause, a partition) loses the lock ``ttl`` seconds after its last keep-alive,
    and the next holder's token is larger.
    """

    def __init__(self, client: Client, name: bytes, ttl: float, wait: float | None) -> None:
        self.client, self.name, self.ttl, self.wait = client, name, ttl, wait
        self.owner = uuid.uuid4().hex.encode()
        self.token: int | None = None
        self.lease = Lease(client, max(1, math.ceil(ttl)), near=name)

    @property
    def lost(self) -> bool:
        """True once the lock's lease was found gone: another holder may have the lock."""
        return self.lease.lost

    def _try(self, lid: int) -> tuple[int, Any]:
        ok, value = self.client._write(self.client._shard(self.name),
                                       [b"RAFTKV.LOCK", self.name, self.owner, b"LEASE", str(lid).encode()])
        return int(ok), value

    def acquire(self) -> int:
        """Block until held (or ``wait`` runs out); the fencing token."""
        deadline = None if self.wait is None else time.monotonic() + self.wait
        lid = self.lease.grant()
        delay = 0.01
        try:
            while True:
                ok, value = self._try(lid)
                if ok:
                    self.token = int(value)
                    return self.token
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockTimeout("LOCKTIMEOUT", f"lock {self.name!r} is held by {value!r}")
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(0.5, delay * 2)
        except BaseException:
            with contextlib.suppress(RaftKVError):  # not revoked: the lease lapses after ttl
                self.lease.revoke()
            raise

    def abandon(self) -> None:
        """Stop keeping the lock's lease alive: the lock lapses ``ttl`` seconds later (``Lease.abandon``)."""
        self.lease.abandon()

    def release(self) -> None:
        """Release the lock by revoking its lease (which deletes the lock key)."""
        self.lease.revoke()
        self.token = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Client:
    """A thread-safe client for a raftkv cluster.

    ``Client(cluster="path/cluster.toml")`` or ``Client(nodes=["127.0.0.1:7001", ...])``.
    ``timeout`` bounds each call including retries (seconds).  ``password`` (and
    ``username`` for ACL-style users) default to ``RAFTKV_PASSWORD`` or the
    cluster file's ``[security] password``.  ``tls=True`` (or an
    ``ssl.SSLContext``) for nodes with TLS on the client port; ``True`` accepts
    self-signed certificates.
    """

    def __init__(self, nodes: list[str] | None = None, cluster: str | os.PathLike | ShardMap | None = None,
                 timeout: float = 10.0, password: str | None = None, username: str | None = None,
                 tls: bool | ssl.SSLContext = False) -> None:
        if cluster is None and not nodes:
            raise ValueError("give a cluster file (cluster=...) or node addresses (nodes=['host:port', ...])")
        self.timeout = timeout
        self.username = username
        if tls is True:
            tls = ssl.create_default_context()
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        self.tls: ssl.SSLContext | None = tls or None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._client_id = uuid.uuid4().hex[:16]
        self._sessions = 0
        self._leaders: dict[int, str] = {}
        self._keepalives = _KeepAlives()
        self._closed = False
        if isinstance(cluster, ShardMap):
            self.map: ShardMap | None = cluster
        elif cluster is not None:
            self.map = ShardMap.load(cluster)
        else:
            self.map = None
        self.password = (password or os.environ.get("RAFTKV_PASSWORD")
                         or (self.map.security.get("password") if self.map is not None else None))
        self._seeds = [_parse_addr(a) for a in nodes] if nodes else [
            n.client_addr for n in self.map.nodes.values()]  # type: ignore[union-attr]
        if self.map is None:
            self.map = self._fetch_map()

    # -- context manager --------------------------------------------------------
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this thread's connections (other threads' close when they exit)."""
        conns = getattr(self._local, "conns", {})
        for c in conns.values():
            c.close()
        conns.clear()

    # -- the API ------------------------------------------------------------------
    def get(self, key: Bytesish) -> bytes | None:
        """Linearizable read: the latest committed value, or None."""
        key = _b(key)
        return self._read(self._shard(key), [b"GET", key])

    def stale_get(self, key: Bytesish) -> bytes | None:
        """Read any replica's local copy (fast, may be stale)."""
        key = _b(key)
        return self._read(self._shard(key), [b"RAFTKV.STALEGET", key])

    def mget(self, keys: list[Bytesish]) -> list[bytes | None]:
        """Linearizable read of each key (not one atomic snapshot across shards; use txn for that)."""
        return [self.get(k) for k in keys]

    def put(self, key: Bytesish, value: Bytesish, ttl: float | None = None, lease: int | None = None) -> None:
        """Write ``value``; returns once it is committed and durable on a majority.

        ``ttl``: seconds after which the key expires (in the shard's log time).
        ``lease``: a lease id (``lease_grant``, ``Client.lease``): the key is deleted when
        the lease expires or is revoked; raises ``RaftKVError`` (code ``NOLEASE``) if it has.
        """
        key = _b(key)
        if ttl is not None and lease is not None:
            raise ValueError("put: give ttl or lease, not both")
        extra = [] if ttl is None else [b"PX", str(max(1, int(ttl * 1000))).encode()]
        if lease is not None:
            extra = [b"LEASE", str(lease).encode()]
        self._write(self._shard(key), [b"SET", key, _b(value), *extra])

    set = put

    def delete(self, key: Bytesish) -> bool:
        """Delete ``key``; True if it existed."""
        key = _b(key)
        return bool(self._write(self._shard(key), [b"DEL", key]))

    def cas(self, key: Bytesish, expected: Bytesish | None, new: Bytesish) -> bool:
        """Set ``key`` to ``new`` only if its value is ``expected`` (None: only if absent)."""
        key = _b(key)
        if expected is None:
            return bool(self._write(self._shard(key), [b"RAFTKV.CASNX", key, _b(new)]))
        return bool(self._write(self._shard(key), [b"CAS", key, _b(expected), _b(new)]))

    def incr(self, key: Bytesish, by: int = 1) -> int:
        """Add ``by`` to the integer at ``key`` (absent counts as 0) and return the new value; applied once."""
        key = _b(key)
        return int(self._write(self._shard(key), [b"INCRBY", key, str(by).encode()]))

    def append(self, key: Bytesish, suffix: Bytesish) -> int:
        """Append ``suffix`` to the value at ``key`` (absent counts as empty); the new length."""
        key = _b(key)
        return int(self._write(self._shard(key), [b"APPEND", key, _b(suffix)]))

    def getdel(self, key: Bytesish) -> bytes | None:
        """Delete ``key`` and return the value it had (None if absent)."""
        key = _b(key)
        return self._write(self._shard(key), [b"GETDEL", key])

    def expire(self, key: Bytesish, seconds: float) -> bool:
        """Make ``key`` expire ``seconds`` from now; False if it does not exist."""
        key = _b(key)
        return bool(self._write(self._shard(key), [b"PEXPIRE", key, str(int(seconds * 1000)).encode()]))

    def ttl(self, key: Bytesish) -> float | None:
        """Seconds until ``key`` expires; ``math.inf`` if it never does; None if it does not exist."""
        key = _b(key)
        ms = int(self._read(self._shard(key), [b"PTTL", key]))
        return None if ms == -2 else (math.inf if ms == -1 else ms / 1000)

    def keys(self, match: Bytesish | None = None, count: int = 100) -> Iterator[bytes]:
        """Every key (matching the Redis glob ``match``), by SCAN: each key present throughout is listed once."""
        cursor = b"0"
        while True:
            args = [b"SCAN", cursor, b"COUNT", str(count).encode()]
            if match is not None:
                args += [b"MATCH", _b(match)]
            cursor, batch = self.command(*args)
            yield from batch
            if cursor == b"0":
                return

    # -- leases (raftkv.leases) --------------------------------------------------------
    def lease_grant(self, ttl: int, near: Bytesish | None = None) -> int:
        """Grant a lease of ``ttl`` whole seconds; its id.  ``near``: a key whose shard becomes the
        lease's home (attaching that key then takes one log entry); else any shard."""
        args = [b"RAFTKV.LEASE", b"GRANT", str(int(ttl)).encode()]
        if near is None:
            assert self.map is not None
            return int(self._write(random.randrange(self.map.nshards), args))
        near = _b(near)
        return int(self._write(self._shard(near), [*args, b"FOR", near]))

    def _lease_home(self, lease: int) -> int:
        """The shard holding ``lease`` by this client's map (only where to send: the node routes by its own)."""
        return home_in(lease, self.map.leases_moved if self.map is not None else {})

    def lease_keepalive(self, lease: int, timeout: float | None = None) -> int:
        """Push lease ``lease``'s deadline back to its full ttl; the ttl in seconds.

        Raises ``RaftKVError`` with code ``NOLEASE`` when it expired or was revoked.
        ``timeout``: seconds to keep trying (default: the client's timeout).
        """
        return int(self._write(self._lease_home(lease), [b"RAFTKV.LEASE", b"KEEPALIVE", str(lease).encode()], timeout))

    def lease_revoke(self, lease: int) -> None:
        """End lease ``lease`` now: every key attached to it is deleted (``NOLEASE`` if it had ended)."""
        self._write(self._lease_home(lease), [b"RAFTKV.LEASE", b"REVOKE", str(lease).encode()])

    def lease_ttl(self, lease: int) -> LeaseTTL:
        """Seconds left, the granted ttl and the number of attached keys (``NOLEASE`` if it ended)."""
        remaining, granted, keys = self._read(self._lease_home(lease), [b"RAFTKV.LEASE", b"TTL", str(lease).encode()])
        return LeaseTTL(int(remaining), int(granted), int(keys))

    def lease(self, ttl: int, near: Bytesish | None = None) -> Lease:
        """A lease kept alive while the ``with`` block runs and revoked after it::

            with client.lease(10) as lease:
                client.put("service/n1", "10.0.0.1:80", lease=lease.id)

        A background thread sends a keep-alive every ``ttl/3`` seconds; if this
        process stops (crash, SIGSTOP, partition) the lease expires ``ttl``
        seconds after the last one and the attached keys are deleted.
        """
        return Lease(self, int(ttl), None if near is None else _b(near))

    def range(self, start: Bytesish, end: Bytesish | None = None, limit: int | None = None,
              page: int = 256) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` for every key in ``[start, end)`` in byte order (``end`` None: to the last
        key), at most ``limit``, fetched ``page`` keys at a time with ``RAFTKV.RANGE``.

        Each page asks every shard (keys are hashed, not ordered, across shards) and each shard's
        read is linearizable; the pages are not one snapshot.
        """
        lower, upper = _b(start), b"" if end is None else _b(end)
        left = math.inf if limit is None else limit
        while left > 0:
            n = int(min(page, left))
            flat = self._read(0, [b"RAFTKV.RANGE", lower, upper, b"LIMIT", str(n).encode()])  # any node fans out
            pairs = list(zip(flat[0::2], flat[1::2], strict=True))
            yield from pairs
            left -= len(pairs)
            if len(pairs) < n:
                return
            lower = pairs[-1][0] + b"\x00"  # the smallest key after the last one

    def get_prefix(self, prefix: Bytesish, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` for every key starting with ``prefix``, in byte order (see ``range``)."""
        p = _b(prefix)
        return self.range(p, prefix_end(p), limit)

    def watch(self, key_or_prefix: Bytesish, prefix: bool = False, start_revision: Start = None,
              block: float | None = None) -> Watch:
        """Every change of a key (or of every key under a prefix) from now, or after ``start_revision``.

        Iterate the result for ``WatchEvent`` s, forever, each change once, in revision order per
        shard (a prefix spans shards: no order between them).  ``start_revision``: a revision
        (each watched shard's), ``{shard: revision}`` (``Watch.cursors`` of an earlier watch, to
        resume without a gap), or None (from now).  Lost connections and leader changes are retried
        within ``timeout``; a revision the shard no longer retains raises ``CompactedError``.
        ``block``: seconds one long poll waits on the node (default: half the timeout, at most 5).
        """
        subject = _b(key_or_prefix)
        assert self.map is not None
        shards = list(range(self.map.nshards)) if prefix else [self._shard(subject)]
        block_s = min(5.0, self.timeout / 2) if block is None else block
        return Watch(lambda args: self._read(shards[0], args), subject, prefix, shards, start_revision, block_s)

    def lock(self, name: Bytesish, ttl: float = 10.0, wait: float | None = None) -> Lock:
        """Acquire lock ``name`` (a key): a context manager whose ``token`` is the fencing token.

        The lock key is attached to a lease of ``ttl`` seconds (rounded up to whole
        seconds) that a background thread keeps alive every ``ttl/3``; a holder that
        dies or stops loses the lock ``ttl`` seconds after its last keep-alive, and
        ``lost`` turns True when it notices.  ``wait``: seconds to keep trying (None:
        forever); raises ``LockTimeout`` when it could not be acquired in time.  Pass
        ``token`` to whatever the lock protects and have it refuse lower tokens
        (``fenced_put``, docs/leases.md).
        """
        return Lock(self, _b(name), ttl, wait)

    def fenced_put(self, key: Bytesish, value: Bytesish, token: int, fence: Bytesish | None = None) -> bool:
        """Write ``key`` on behalf of a lock holder with fencing ``token``, unless a holder with a larger
        token wrote first (Kleppmann's fencing); True if written.

        The highest token seen is kept in ``fence`` (default ``key + b".fence"``); the write and the new
        fence commit together in one transaction that compares the fence it read, so a stale holder
        that resumes after a pause is refused however late its write arrives.
        """
        key = _b(key)
        fence_key = key + b".fence" if fence is None else _b(fence)
        while True:
            seen = self.get(fence_key)
            if seen is not None and int(seen) > token:
                return False
            t = self.txn().if_value(fence_key, seen).then_put(fence_key, str(token)).then_put(key, value)
            if t.commit(retries=10).succeeded:
                return True

    # -- transactions (raftkv.txnclient) ---------------------------------------------
    def txn(self) -> Txn:
        """An etcd-style conditional transaction builder, atomic across shards."""
        # -MOVING and -TRYAGAIN may answer a transaction id aborted for good: Txn.commit retries with a fresh
        # id; _request would resend the same one and meet the same abort until its timeout
        return Txn(self._shard, lambda shard, args: self._request(shard, args, write=True,
                                                                  final=("MOVING", "TRYAGAIN", "RINGCHANGED")),
                   wait_s=self.timeout, ring=lambda: None if self.map is None else self.map.ring_tag)

    def mset(self, mapping: dict, retries: int = 10) -> None:
        """Write every key of ``mapping`` atomically (all or none), across shards."""
        t = self.txn()
        for k, v in mapping.items():
            t.then_put(k, v)
        t.commit(retries=retries)

    def put_many(self, items: Any, parallel: int = 12,
                 progress: Any = None) -> int:
        """Write many keys fast (``items``: a mapping or an iterable of ``(key, value)`` pairs); returns
        how many were written.

        Keys are grouped by shard into one-shard transactions of up to 500 keys, ``parallel`` of them in
        flight (``raftkv.bulk``): each batch is atomic and applied once, the whole is not atomic. If it
        raises, some batches may have been applied; writing the same items again is safe.
        ``progress(n)`` is called with the running count after each batch.
        """
        pairs = items.items() if hasattr(items, "items") else items
        return bulk.load(self, ((_b(k), _b(v)) for k, v in pairs), parallel=parallel, progress=progress)

    def shard_of(self, key: Bytesish) -> int:
        """The shard ``key`` belongs to (the ring of the client's shard map)."""
        return self._shard(_b(key))

    def command(self, *args: Bytesish) -> Any:
        """Run one operator command (``RAFTKV.USER``, ``RAFTKV.ROLE``, ...) on the first node that answers.

        Raises ``RaftKVError`` for an error reply, ``UnavailableError`` when no node answers.
        """
        request = [_b(a) for a in args]
        last = "no node"
        for addr in self._seeds:
            try:
                return self._call_node(addr, request, self.timeout)
            except (OSError, ConnectionError) as e:
                last = f"{addr[0]}:{addr[1]}: {e}"
            except ReplyError as e:
                raise RaftKVError(e.code, e.message) from None
        raise UnavailableError("UNAVAILABLE", f"no node answered ({last})")

    def node_status(self) -> dict[str, Any]:
        """``RAFTKV.STATUS`` of every node: name -> status dict, or an ``error`` entry."""
        import json

        out: dict[str, Any] = {}
        assert self.map is not None
        for name, info in self.map.nodes.items():
            try:
                out[name] = json.loads(self._call_node(info.client_addr, [b"RAFTKV.STATUS"], 2.0))
            except (OSError, ConnectionError, RaftKVError) as e:
                out[name] = {"error": str(e)}
        return out

    # -- routing and retries -------------------------------------------------------
    def _shard(self, key: bytes) -> int:
        assert self.map is not None
        return self.map.shard_for_key(key)

    def _session(self) -> tuple[bytes, list[int]]:
        sess = getattr(self._local, "session", None)
        if sess is None:
            with self._lock:
                self._sessions += 1
                n = self._sessions
            sess = self._local.session = (f"{self._client_id}-{n}".encode(), [0])
        return sess

    def _write(self, shard: int, args: list[bytes], timeout: float | None = None) -> Any:
        sid, counter = self._session()
        counter[0] += 1
        return self._request(shard, [b"RAFTKV.REQ", sid, str(counter[0]).encode(), *args], write=True,
                             timeout=timeout)

    def _read(self, shard: int, args: list[bytes]) -> Any:
        return self._request(shard, args, write=False)

    def _request(self, shard: int, args: list[bytes], write: bool, timeout: float | None = None,
                 final: tuple[str, ...] = ()) -> Any:
        """``args`` to ``shard``'s leader with retries; error codes in ``final`` are raised at once."""
        attempts = Attempts(shard, write, time.monotonic() + (self.timeout if timeout is None else timeout))
        while True:
            addr = self._leader_addr(shard)
            try:
                return self._call_node(addr, args, attempts.remaining(time.monotonic()))
            except (OSError, ConnectionError) as e:
                attempts.transport_failed(addr, e, sent=not isinstance(e, ConnectionRefusedError))
            except ReplyError as e:
                if e.code == "RINGCHANGED":
                    self._reload_map()  # the next attempt (a new id) is planned under the new ring
                    if attempts.maybe_applied:
                        # an earlier send of this id may have run under the old ring: that outcome stands unseen
                        raise IndeterminateError("UNKNOWN", f"shard {shard}: outcome unknown: an earlier attempt "
                                                            f"may have run before the ring changed ({e})") from None
                if e.code in final:
                    raise RaftKVError(e.code, e.message) from None
                attempts.refused(e)
                if e.code == "WRONGSHARD":
                    self._reload_map()  # the key moved shard: route by the map that says so (once nodes have it)
                    owner = _wrongshard_owner(e.message)
                    if owner is not None and owner != shard and self.map is not None and owner in self.map.groups:
                        shard = owner  # straight to the shard that has it now: no backoff, the route changed
                        continue
            self._forget_leader(shard)
            time.sleep(attempts.backoff(time.monotonic()))

    def _leader_addr(self, shard: int) -> tuple[str, int]:
        assert self.map is not None
        name = self._leaders.get(shard)
        if name is None:
            self._refresh_leaders()
            name = self._leaders.get(shard)
        if name is not None and name in self.map.nodes:
            return self.map.nodes[name].client_addr
        # No leader known: any replica of the shard forwards (or says NOQUORUM).
        # (A shard the map no longer has, `raftkv shard remove`: any node routes the request by its own map.)
        replicas = self.map.replicas(shard) if shard in self.map.groups else []
        return random.choice(replicas).client_addr if replicas else random.choice(self._seeds)

    def _forget_leader(self, shard: int) -> None:
        self._leaders.pop(shard, None)

    def _refresh_leaders(self) -> None:
        assert self.map is not None
        for addr in random.sample(self._seeds, len(self._seeds)):
            try:
                rows = self._call_node(addr, [b"RAFTKV.SHARDS"], 1.0)
            except (OSError, ConnectionError, ReplyError):
                continue
            for shard, leader, _term in rows:
                if leader is not None:
                    self._leaders[shard] = leader.decode()
            if any(n not in self.map.nodes for n in self._leaders.values()):
                self._reload_map()  # a leader we do not know: membership changed (raftkv.membership)
            if len(self._leaders) >= self.map.nshards:
                return

    def _reload_map(self) -> None:
        """Adopt a newer shard map (higher epoch) from the nodes; keeps every known node as a seed."""
        try:
            new = self._fetch_map()
        except RaftKVError:
            return
        if self.map is None or new.epoch > self.map.epoch:
            self.map = new
            self._seeds = list(dict.fromkeys([*self._seeds, *(n.client_addr for n in new.nodes.values())]))

    def _fetch_map(self) -> ShardMap:
        import tomllib

        for addr in self._seeds:
            try:
                text = self._call_node(addr, [b"RAFTKV.CLUSTER"], 2.0)
            except (OSError, ConnectionError, ReplyError):
                continue
            return ShardMap.from_dict(tomllib.loads(text.decode()), newer_tables=True)
        raise UnavailableError("UNAVAILABLE", f"no node reachable to fetch the cluster map from {self._seeds}")

    def _call_node(self, addr: tuple[str, int], args: list[bytes], timeout: float) -> Any:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(addr)
        try:
            if conn is None:
                auth = [p.encode() for p in (self.username, self.password) if p] if self.password else None
                try:
                    conn = Connection(addr[0], addr[1], min(timeout, 2.0), self.tls, auth)
                except ReplyError as e:  # AUTH refused
                    raise RaftKVError(e.code, e.message) from None
                conns[addr] = conn
            reply = conn.call(*args, timeout=timeout)
        except OSError:
            conns.pop(addr, None)
            if conn is not None:
                conn.close()
            raise
        _raise_if_error(reply)
        return reply


def _raise_if_error(reply: Any) -> None:
    if isinstance(reply, ReplyError):
        raise reply


def _parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad node address {addr!r}; want host:port")
    return host, int(port)

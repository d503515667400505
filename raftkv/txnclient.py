"""The transaction builder behind ``Client.txn()`` and ``Client.mset()``.

    r = c.txn().if_value("a", "1").then_put("a", "2").then_put("b", "3").else_get("a").commit()
    r.succeeded, r.results

Every commit carries a client-chosen transaction id (``RAFTKV.TXN ID ...``): a
resend after an unknown outcome finds the first attempt's record instead of
running the transaction twice.  A transaction that was definitely not applied
is retried with a fresh id and exponential backoff with jitter: after
``TRYAGAIN`` (a leader change, or an abort that spent its id: a participant did
not vote in time) and ``MOVING`` (a key is being moved to a new shard) until
the client's timeout; after ``TXNCONFLICT`` (a no-wait conflict) up to
``commit(retries=n)`` times.

Every attempt carries the priority of the first (wait-die, ``raftkv.waitdie``):
its PREPAREs wait, bounded, for younger lock holders instead of aborting, and
an abort by an *older* transaction is retried without counting against
``retries`` (for up to half the timeout instead), so a transaction that keeps
losing on a hot key becomes the oldest contender and commits.
``commit(wait_die=False)`` sends plain ids: no-wait only, as before.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raftkv import waitdie
from raftkv.errors import RaftKVError

RETRYABLE = ("TXNCONFLICT", "TRYAGAIN")


def _b(x: bytes | str) -> bytes:
    return x.encode() if isinstance(x, str) else x


@dataclass(frozen=True)
class TxnResponse:
    """``succeeded``: the compares held (then-branch ran); ``results``: one per op of that branch
    (``put`` -> True, ``delete`` -> 1/0, ``get`` -> value or None, ``append`` -> the new length)."""

    succeeded: bool
    results: list


class Txn:
    """An etcd-style conditional transaction; build it, then ``commit()``."""

    def __init__(self, shard_of: Callable[[bytes], int], request: Callable[[int, list[bytes]], Any],
                 wait_s: float = 10.0, ring: Callable[[], str | None] = lambda: None) -> None:
        # The client's routing and its retrying, de-duplicated write path (``Client.txn()`` passes them).
        # ``request`` must raise -MOVING, -TRYAGAIN and -RINGCHANGED at once: the transaction id it carries may be
        # aborted for good (a retry with it meets the same abort), or planned under another ring, so ``commit``
        # retries with a fresh one. ``ring``: the ring tag of the map the client routes by (``RING``).
        self._shard_of = shard_of
        self._request = request
        self._wait_s = wait_s
        self._ring = ring
        self.compares: list[list[bytes]] = []
        self.then_ops: list[list[bytes]] = []
        self.else_ops: list[list[bytes]] = []

    # compares
    def if_value(self, key: bytes | str, value: bytes | str | None) -> Txn:
        """``key`` holds ``value`` (None: ``key`` is missing)."""
        if value is None:
            return self.if_missing(key)
        self.compares.append([_b(key), b"VALUE", _b(value)])
        return self

    def if_revision(self, key: bytes | str, revision: int) -> Txn:
        """``key``'s modification revision is ``revision`` (0: missing)."""
        self.compares.append([_b(key), b"REV", str(int(revision)).encode()])
        return self

    def if_exists(self, key: bytes | str) -> Txn:
        self.compares.append([_b(key), b"EXISTS"])
        return self

    def if_missing(self, key: bytes | str) -> Txn:
        self.compares.append([_b(key), b"MISSING"])
        return self

    # ops
    def then_put(self, key: bytes | str, value: bytes | str) -> Txn:
        self.then_ops.append([b"PUT", _b(key), _b(value)])
        return self

    def then_delete(self, key: bytes | str) -> Txn:
        self.then_ops.append([b"DEL", _b(key)])
        return self

    def then_get(self, key: bytes | str) -> Txn:
        self.then_ops.append([b"GET", _b(key)])
        return self

    def then_append(self, key: bytes | str, suffix: bytes | str) -> Txn:
        """``key`` := its value (empty if missing) + ``suffix``, under the transaction's lock on
        ``key``; the result is the new length, as Redis's APPEND."""
        self.then_ops.append([b"APPEND", _b(key), _b(suffix)])
        return self

    def else_put(self, key: bytes | str, value: bytes | str) -> Txn:
        self.else_ops.append([b"PUT", _b(key), _b(value)])
        return self

    def else_delete(self, key: bytes | str) -> Txn:
        self.else_ops.append([b"DEL", _b(key)])
        return self

    def else_get(self, key: bytes | str) -> Txn:
        self.else_ops.append([b"GET", _b(key)])
        return self

    def else_append(self, key: bytes | str, suffix: bytes | str) -> Txn:
        self.else_ops.append([b"APPEND", _b(key), _b(suffix)])
        return self

    def args(self, txid: str) -> list[bytes]:
        """The ``RAFTKV.TXN`` command for this transaction."""
        ring = self._ring()
        out = [b"RAFTKV.TXN", b"ID", txid.encode(), *([b"RING", ring.encode()] if ring else []),
               str(len(self.compares)).encode()]
        for c in self.compares:
            out += c
        for ops in (self.then_ops, self.else_ops):
            out.append(str(len(ops)).encode())
            for op in ops:
                out += op
        return out

    def first_key(self) -> bytes:
        for c in self.compares:
            return c[0]
        for op in self.then_ops + self.else_ops:
            return op[1]
        raise ValueError("a transaction needs at least one key")

    def commit(self, retries: int = 0, backoff_s: float = 0.01, backoff_max_s: float = 0.5,
               wait_die: bool = True) -> TxnResponse:
        """Run it; on TXNCONFLICT retry up to ``retries`` times with a fresh id. On TRYAGAIN (not applied: a
        leader change, or an abort that spent its id), MOVING (a key is being moved to a new shard, ``raftkv
        shard add``) and RINGCHANGED (a shard was added or removed: planned again under the new map) retry with
        a fresh id for up to ``wait_s`` seconds, not counted against ``retries``. A RINGCHANGED after a send
        whose outcome is unknown raises ``IndeterminateError``: that send may have run under the old ring.

        ``wait_die``: every attempt carries the first one's priority (``raftkv.waitdie``); a TXNCONFLICT from
        an older transaction (a *die*), or one the key's leader queued, is retried for up to half of
        ``wait_s``, not counted either (after that it counts like any conflict)."""
        attempt = waited = tries = 0
        until = time.monotonic() + self._wait_s
        # uncounted dies stop at half the timeout: the counted retries after them, and the attempt in flight,
        # still end inside it (a last attempt cut off by the timeout would leave its outcome unknown)
        dies_until = time.monotonic() + self._wait_s / 2
        prio = waitdie.new_priority(int(time.time() * 1000)) if wait_die else None
        while True:
            txid = uuid.uuid4().hex if prio is None else waitdie.attempt_txid(prio, tries)
            tries += 1
            try:
                # routed (and, with RING, planned) by the client's map as of this attempt
                reply = self._request(self._shard_of(self.first_key()), self.args(txid))
            except RaftKVError as e:
                in_time = time.monotonic() < until
                if e.code in ("MOVING", "TRYAGAIN", "RINGCHANGED") and in_time:
                    waited += 1
                    time.sleep(min(backoff_max_s, backoff_s * 2 ** min(waited, 6)) * random.uniform(0.5, 1.0))
                    continue
                if (e.code == "TXNCONFLICT" and time.monotonic() < dies_until
                        and not waitdie.conflict_charged(txid, waitdie.holder_of(e.message), e.message)):
                    # a die or a queued loss: come back in about a lock's life, with the same priority (a
                    # queued place is kept only while its owner keeps coming back, 0.25 s, and keeps younger
                    # ones off the key meanwhile; sooner, and most attempts would meet the holder again)
                    time.sleep(min(backoff_max_s, 5 * backoff_s) * random.uniform(0.5, 1.5))
                    continue
                if e.code not in RETRYABLE or attempt >= retries:
                    raise
                attempt += 1
                time.sleep(min(backoff_max_s, backoff_s * 2 ** attempt) * random.uniform(0.5, 1.5))
                continue
            return _response(self, reply)


def _response(txn: Txn, reply: Any) -> TxnResponse:
    ok = bool(reply[0])
    ops = txn.then_ops if ok else txn.else_ops
    results = []
    for op, r in zip(ops, reply[1], strict=True):
        results.append(True if op[0] == b"PUT" else (int(r) if op[0] in (b"DEL", b"APPEND") else r))
    return TxnResponse(ok, results)


def build_from_spec(txn: Txn, ifs: list[str], thens: list[str], elses: list[str]) -> Txn:
    """Fill ``txn`` from the CLI's strings (shell-quoted tokens).

    compare: ``KEY = VALUE`` | ``KEY rev N`` | ``KEY exists`` | ``KEY missing``;
    op: ``put KEY VALUE`` | ``del KEY`` | ``get KEY`` | ``append KEY SUFFIX``.  Raises ValueError on bad input.
    """
    import shlex

    for spec in ifs:
        t = shlex.split(spec)
        if len(t) == 3 and t[1] in ("=", "=="):
            txn.if_value(t[0], t[2])
        elif len(t) == 3 and t[1].lower() in ("rev", "rev="):
            txn.if_revision(t[0], int(t[2]))
        elif len(t) == 2 and t[1].lower() == "exists":
            txn.if_exists(t[0])
        elif len(t) == 2 and t[1].lower() == "missing":
            txn.if_missing(t[0])
        else:
            raise ValueError(f"bad compare {spec!r}: want 'KEY = VALUE', 'KEY rev N', 'KEY exists' or 'KEY missing'")
    for specs, put, delete, get, append in ((thens, txn.then_put, txn.then_delete, txn.then_get, txn.then_append),
                                            (elses, txn.else_put, txn.else_delete, txn.else_get, txn.else_append)):
        for spec in specs:
            t = shlex.split(spec)
            kind = t[0].lower() if t else ""
            if kind == "put" and len(t) == 3:
                put(t[1], t[2])
            elif kind in ("del", "delete") and len(t) == 2:
                delete(t[1])
            elif kind == "get" and len(t) == 2:
                get(t[1])
            elif kind == "append" and len(t) == 3:
                append(t[1], t[2])
            else:
                raise ValueError(f"bad op {spec!r}: want 'put KEY VALUE', 'del KEY', 'get KEY' or 'append KEY SUFFIX'")
    return txn

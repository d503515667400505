"""raftkv.server.waitgate: wait-die at a shard's leader, just before it proposes a PREPARE.

The rules are pure (``raftkv.waitdie.gate``); this is their edge on a node. The router calls ``gate_prepare``
before proposing a ``tx_prepare`` on a shard this node leads, and ``ungate`` with what came of it:

* a younger transaction is refused a key an older one is queued for or about to lock (it gets the
  ``tx_refuse`` recovery would send: a final NO that locks nothing, answered as the conflict it stands for);
* a transaction that keeps losing gets a place in its keys' queue, kept across its attempts while it keeps
  coming back (``QUEUE_TTL_S``, at most ``QUEUE_MAX_S``); its NO votes say so (``QUEUED``), so its retry loop
  does not count them;
* a PREPARE on its way in (proposed, not applied) counts as holding its keys.

Nothing is held back here, and the state machine is unchanged (it still votes NO on any lock it meets): every
refusal is one recovery could have made at any moment (docs/transactions.md, "Hot keys"). Event-loop thread only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from raftkv.replica import APPLIED
from raftkv.server.api import NodeAPI
from raftkv.txn import REASON_CONFLICT, REASON_REFUSED, keys_of
from raftkv.waitdie import QUEUED, gate, patient, priority_of

__all__ = ["QUEUE_MAX_S", "QUEUE_TTL_S", "WaitDieGate"]

QUEUE_TTL_S = 0.25  # a queued transaction that has not come back for this long loses its place
QUEUE_MAX_S = 3.0  # nor does it keep its place longer than this (a stuck or lying one cannot block a key)


class WaitDieGate:
    """The wait-die queues and claims of the shards this node leads (module doc)."""

    def __init__(self, node: NodeAPI, service: Any) -> None:
        """``service``: the node's ``TxnService`` (``resolve_if_abandoned`` for the locks of dead holders)."""
        self.node = node
        self._service = service
        self._queued: dict[int, dict[Any, _Waiter]] = {}  # shard -> priority -> its place in the queue
        self._claims: dict[int, dict[bytes, list[tuple[str, int]]]] = {}  # shard -> key -> (txid, home) proposing
        self.waits_total = 0  # transactions ever queued here

    def gate_prepare(self, shard: int, cmd: tuple) -> tuple[tuple, Any]:
        """Wait-die at ``shard``'s leader, before it proposes ``cmd`` (a ``tx_prepare``; ``raftkv.waitdie``).

        Returns ``(command to propose, claim)``: hand the claim and the outcome to ``ungate``.  The command
        is ``cmd``, or, when an older transaction has a place in the queue of one of its keys or is about to
        lock one, the ``tx_refuse`` recovery sends (a final NO that locks nothing), so that a younger one
        cannot take the key ahead of it.  A PREPARE that ``waitdie.gate`` lets wait is *not* held here
        (it would keep the transaction's locks on its other shards meanwhile, and stall everyone on them):
        it takes a place in its keys' queue instead, one per transaction across its attempts, and is
        proposed at once; it meets the younger holder and loses, or gets the key if the holder let go
        first.  Its NO vote says it is queued, so its retry loop does not count it.

        The state machine is unchanged: it still votes NO on any lock it meets.  A refusal is one recovery
        could have made at any moment, which the protocol allows (docs/transactions.md, "Hot keys")."""
        if not self.node.timing.txn_wait_die or cmd[0] != "tx_prepare":
            return cmd, None
        txid = cmd[1]
        try:
            keys = keys_of(cmd[3], cmd[4], cmd[5])
        except (IndexError, TypeError):  # malformed: the state machine refuses it
            return cmd, None
        now = time.monotonic()
        queue = self._queued.setdefault(shard, {})
        for p in [p for p, w in queue.items() if now - w.seen > QUEUE_TTL_S or now - w.since > QUEUE_MAX_S]:
            del queue[p]  # its retries stopped, or it has had its turn long enough
        mine = priority_of(txid)
        verdict = self._verdict(shard, txid, mine, keys)
        if verdict != "queue":
            return self._claim(shard, cmd, keys, verdict)
        place = queue.get(mine)
        if place is None:
            place = queue[mine] = _Waiter(mine, keys, cmd[2], now)
            self.waits_total += 1
        place.seen, place.txid = now, txid
        sent, claim = self._claim(shard, cmd, keys, "go")
        return sent, (*claim[:4], True)

    def _claim(self, shard: int, cmd: tuple, keys: list[bytes], verdict: Any) -> tuple[tuple, Any]:
        """What to propose for ``cmd`` after ``verdict``, and mark it as being proposed: until it is applied
        its keys count as held by it (two PREPAREs that find a key free in the same moment must not both
        go ahead of an older one)."""
        if isinstance(verdict, _Ahead):  # an older transaction is about to lock, or waits for, one of these keys
            if self.node.timing.txn_parallel_commits and len(cmd) == 7:
                # (nodes without tx_refuse run classic 2PC: there the PREPARE goes ahead, as before)
                refuse = ("tx_refuse", cmd[1], cmd[2], cmd[6])
                return refuse, (shard, cmd[1], [], verdict, False)
        self._add_claim(shard, cmd[1], cmd[2], keys)
        return cmd, (shard, cmd[1], keys, None, False)

    def _add_claim(self, shard: int, txid: str, home: int, keys: list[bytes]) -> None:
        claims = self._claims.setdefault(shard, {})
        for k in keys:
            claims.setdefault(k, []).append((txid, home))

    def _unclaim(self, shard: int, txid: str, keys: list[bytes]) -> None:
        claims = self._claims.get(shard, {})
        for k in keys:
            owners = claims.get(k)
            mine = [o for o in owners or () if o[0] == txid]
            if mine:
                owners.remove(mine[0])
                if not owners:
                    del claims[k]

    def ungate(self, claim: Any, kind: str | None = None, result: Any = None) -> Any:
        """The command ``gate_prepare`` returned with ``claim`` was applied (``kind``, ``result``), refused
        or lost: drop the claim; the result to answer (a refusal in an older one's favour is answered as
        the conflict it stands for: the same final NO, naming the older transaction)."""
        if claim is None:
            return result
        shard, txid, keys, older, queued = claim
        self._unclaim(shard, txid, keys)
        if kind == APPLIED and isinstance(result, tuple) and result and result[0] == "yes":
            self._queued.get(shard, {}).pop(priority_of(txid), None)  # it holds the keys: its turn came
        if queued and kind == APPLIED and isinstance(result, tuple) and result[:2] == ("no", REASON_CONFLICT):
            return (*result[:3], QUEUED)  # (nodes of earlier versions read the first three fields only)
        if older is not None and kind == APPLIED and result == ("no", REASON_REFUSED, None):
            # The "lock" it names is the older transaction's, stamped now: not old, so no coordinator
            # (of this version or an earlier one) sets out to resolve it.
            replica = self.node.replicas.get(shard)
            if replica is not None:
                return ("no", REASON_CONFLICT, (older.key, older.txid, older.home, replica.log_now_ms()))
        return result

    def _verdict(self, shard: int, txid: str, mine: Any, keys: list[bytes]) -> Any:
        """``"go"``, ``"queue"`` (queue), or the older transaction (an ``_Ahead``) ``txid`` must not overtake."""
        replica = self.node.replicas.get(shard)
        if replica is None or not replica.is_leader():
            return "go"  # proposing tells it where the leader went
        txns = replica.state.txns  # a racy read: only a trigger, the state machine decides
        if txid in txns.prepared or txid in txns.done:
            return "go"  # a duplicate: answered from the state
        wanted = set(keys)
        queued = [(w.txid, w) for p, w in self._queued.get(shard, {}).items()
                  if p != mine and not wanted.isdisjoint(w.keys)]
        holders = [lock for k in keys if (lock := txns.locks.get(k)) is not None and lock.txid != txid]
        claims = self._claims.get(shard, {})
        claimed = [(k, t, home) for k in keys for t, home in claims.get(k, ()) if t != txid]
        verdict = gate(mine, [priority_of(lock.txid) for lock in holders], [priority_of(t) for _, t, _ in claimed],
                       [w.prio for _, w in queued], may_wait=patient(txid))
        if verdict == "refuse":  # name the oldest one it yields to
            ahead = [(w.prio, t, w.home, next(k for k in keys if k in w.keys)) for t, w in queued]
            ahead += [(p, t, home, k) for k, t, home in claimed if (p := priority_of(t)) is not None]
            return _Ahead(*min(ahead))
        if verdict == "queue":
            for lock in holders:  # a dead holder's lock is resolved as a reader's would be
                self._service.resolve_if_abandoned(shard, lock)
        return verdict


@dataclass(frozen=True)
class _Ahead:
    """The older transaction a refused PREPARE yields to (named in its NO vote)."""

    prio: Any
    txid: str
    home: int
    key: bytes


class _Waiter:
    """A transaction's place in the queue of some keys at their shard's leader (kept across its attempts
    while it keeps coming back)."""

    __slots__ = ("prio", "keys", "home", "since", "seen", "txid")

    def __init__(self, prio: Any, keys: list[bytes], home: int, now: float) -> None:
        self.prio, self.keys, self.home, self.since, self.seen = prio, keys, home, now, now
        self.txid = ""  # its latest attempt (named in the NO votes of those it makes yield)

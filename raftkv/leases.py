"""Leases with etcd semantics, in replicated log time, across shards.  Pure: no I/O, no clock.

Theory of operation
-------------------
A lease is a deadline that clients push back (KEEPALIVE) and keys attached to
it (``SET key value LEASE id``); when the deadline passes, or the lease is
revoked, every attached key is deleted.  Deadlines are points in a shard's
*log time* (``raftkv.logclock``), exactly as key expiry (``raftkv.expiry``):
every entry applied at log time ``t`` first deletes what the leases whose
deadline is ``<= t`` hold, so every replica deletes the same keys at the same
log position and never on its own clock; between entries, reads see a key of an
expired lease as missing at once.

*Home shard.*  A lease lives on the shard that granted it; its id carries that
shard in its low ``SHARD_BITS`` bits (``lease_id(seq, shard)``, ``home_of``),
so any node routes KEEPALIVE / REVOKE / TTL to it without a lookup.  The home
record holds the granted ttl, the deadline, the attached keys of the home shard
and ``shards``: every other shard that may hold keys of the lease.

*Keys on other shards.*  Keys are hash-sharded, so a lease must cover keys on
shards that know nothing of it.  Attaching a key on shard K != home is two
log entries, in this order:

1. on the home shard, ``lease_use``: the lease must be alive; K joins
   ``shards`` and the remaining ttl ``r`` is returned.  From this entry on, the
   home shard will tell K when the lease ends.
2. on K, ``lease_put`` with ``r``: K keeps a *mirror* of the lease (its keys
   there and a guard deadline ``now_K + r``) and writes the key.

When the lease ends on its home (deadline or REVOKE) the home record becomes a
*drop*: ``(ttl, shards still to tell)``.  The home leader's node sends
``lease_drop`` to each of those shards (through each shard's log, via the
node's internal RPC) and acknowledges each success with ``lease_dropped``;
drops are replicated state, so a new leader carries on, and the sweep repeats
until every shard has acknowledged (a lost message is sent again).
``lease_drop`` is idempotent: it deletes the mirror's keys and leaves a
tombstone, so a ``lease_put`` that was still in flight (step 1 done before the
revocation, step 2 applied after the drop) is refused instead of creating a
key nobody would delete.  A tombstone is kept ``ttl + DROPPED_GRACE_MS`` of
log time; a ``lease_put`` delayed longer than that is bounded by its own guard
deadline.

*Keys that move.*  ``raftkv shard add`` and ``shard remove`` move keys with their
leases the same way (``raftkv.reshard``: ``mv_leaseuse`` is ``lease_use`` for the
key's new shard, run on the home; ``mv_attach`` makes that shard's mirror,
``attach_moved`` below) while the old shard is frozen; a key whose lease has
ended is forgotten at the new shard, where it was never served.  After a
removal the homes forget the removed shard (``forget_shard``).

*Homes that move.*  A removal takes its shard ``S`` away with the leases it is
the home of: once ``S`` handed off (it refuses every lease command from then
on, ``-WRONGSHARD``), its home records and pending drops are read
(``homes``) and *adopted* by shard 0 (``ADOPTIVE_HOME``, which no removal
takes away): each becomes a home lease there with the time it had left (a
mirror shard 0 already held of it becomes its home keys), or a drop shard 0
delivers.  The lease keeps its id; the map's ``leases_moved`` says, per removed
shard, the last sequence number it granted, and ``home_in`` routes every id
of that shard up to that number to shard 0.  A shard added again later with
the same number grants from above it (``lease_grant``'s floor), so ids never
collide.  An adoption runs in chunks and is idempotent: shard 0 remembers the
leases of an adoption under way (so a re-run never brings back one that ended
meanwhile) and the epoch of each finished one.

The guard deadline is the fallback that never needs the home shard: a
mirror's keys die when its guard passes even if no drop ever arrives (home
shard partitioned away, messages lost).  KEEPALIVE pushes the guards back
(``lease_refresh`` on every shard in ``shards``; the node answers -TRYAGAIN
when one could not be refreshed, so the caller keeps trying).  Guards only
grow (``max``), so a late refresh never shortens one.

Hazards, named: a mirror's guard is measured in K's log time, which may lag
real time while K has no leader, so on K alone a key may outlive its lease by
K's leaderless time plus one message; the drop normally deletes it first.  A
refresh that cannot reach K for ``ttl`` lets K delete its keys early (the
KEEPALIVE said -TRYAGAIN meanwhile).  A lock held through a lease is attached
on the lease's home shard (``Client.lock`` grants it ``FOR`` the lock name), so
locks never depend on either.

Commands (``HANDLERS``; ``remaining`` is ``None`` when the key's shard is the
lease's home):

==============================================  ====================================
command                                         result
==============================================  ====================================
``("lease_grant", shard, ttl_ms[, floor])``     the new lease id (-BUSY beyond
                                                ``LEASES_MAX``); its sequence
                                                number above ``floor``
``("lease_keepalive", id)``                     ``(ttl_ms, shards)``
``("lease_revoke", id)``                        ``(ttl_ms, shards)`` (home keys gone)
``("lease_ttl", id)``                           ``(remaining_ms, ttl_ms, keys here,
                                                shards)`` (also a read)
``("lease_use", id, shard)``                    remaining ms; ``shard`` recorded
``("lease_put", key, value, id, remaining)``    the key's new revision
``("lease_lock", key, owner, id, remaining)``   ``(1, token)`` or ``(0, holder)``
``("lease_refresh", id, remaining)``            1 if this shard mirrors the lease
``("lease_drop", id, ttl_ms)``                  number of keys deleted here
``("lease_dropped", id, shards)``               shards still to tell
``("lease_keys", id)``                          keys attached here (also a read)
``("lease_pending",)``                          ``((id, ttl_ms, shards), ...)``
                                                drops to deliver (also a read)
==============================================  ====================================

An unknown, expired or revoked lease is ``CmdError("NOLEASE", "lease N not
found")``.  A key locked by a prepared transaction answers ``Locked`` for a
write; when its lease ends it is deleted as soon as the lock is gone (through
``raftkv.expiry``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from raftkv.expiry import Expiries
from raftkv.results import CmdError

SHARD_BITS = 10  # a lease id's low bits name its home shard: up to 1024 shards
SHARD_MASK = (1 << SHARD_BITS) - 1
TTL_S_MAX = 30 * 24 * 3600  # the longest lease a client may grant, seconds
DROPPED_GRACE_MS = 60_000  # how long past its ttl a mirror remembers a dropped lease (log time)
LEASES_MAX = 100_000  # live leases and mirrors on one shard; GRANT beyond it answers -BUSY
ADOPTIVE_HOME = 0  # a removed shard's leases move here: no removal takes shard 0 away


def lease_id(seq: int, shard: int) -> int:
    """The id of the ``seq``-th lease granted by ``shard`` (``seq >= 1``)."""
    assert seq >= 1 and 0 <= shard <= SHARD_MASK, (seq, shard)
    return (seq << SHARD_BITS) | shard


def home_of(lid: int) -> int:
    """The home shard of lease ``lid``."""
    return lid & SHARD_MASK


def home_in(lid: int, moved: Mapping[int, int]) -> int:
    """The shard holding lease ``lid`` now: ``home_of(lid)``, or ``ADOPTIVE_HOME`` when a removal took that
    shard away after granting it. ``moved`` is a map's ``leases_moved``: removed shard -> the last sequence
    number it had granted."""
    born = lid & SHARD_MASK
    last = moved.get(born)
    return ADOPTIVE_HOME if last is not None and lid >> SHARD_BITS <= last else born


def no_lease(lid: int) -> CmdError:
    """The error for an unknown, expired or revoked lease (stable code ``NOLEASE``)."""
    return CmdError("NOLEASE", f"lease {lid} not found")


@dataclass
class Lease:
    """A lease on its home shard (``shards`` is a set) or a mirror on another shard (``shards`` None)."""

    ttl_ms: int  # home: the granted ttl; mirror: the longest remaining it was told
    deadline_ms: int
    keys: set[bytes] = field(default_factory=set)
    shards: set[int] | None = None

    @property
    def home(self) -> bool:
        return self.shards is not None


class LeaseTable:
    """One shard's leases, mirrors, pending drops and tombstones; the bookkeeping only.

    The handlers below change keys through the state (``KVState.write``); this
    table never touches the data.  Invariant: ``key_lease[k] == lid`` exactly
    when ``k in leases[lid].keys``, and every lease in ``leases`` has its
    deadline in ``deadlines``.
    """

    def __init__(self, dump: dict | None = None) -> None:
        self.leases: dict[int, Lease] = {}
        self.key_lease: dict[bytes, int] = {}
        self.deadlines = Expiries()  # lease id -> deadline (the key type of Expiries is any hashable)
        self.dropping: dict[int, tuple[int, set[int]]] = {}  # home: ended lease -> (ttl_ms, shards to tell)
        self.dropped: dict[int, int] = {}  # mirror tombstones: lease id -> log time to forget it
        self.seq = 0
        # shard 0: a removed shard -> (epoch, leases taken so far) while its leases are adopted here, and the
        # epoch of the last adoption finished (``adopt``)
        self.adopting: dict[int, tuple[int, set[int]]] = {}
        self.adopted: dict[int, int] = {}
        if dump:
            self.seq = dump["seq"]
            self.adopting = {o: (e, set(lids)) for o, (e, lids) in dump.get("adopting", {}).items()}
            self.adopted = dict(dump.get("adopted", {}))
            self.dropping = {lid: (ttl, set(shards)) for lid, (ttl, shards) in dump["dropping"].items()}
            self.dropped = dict(dump["dropped"])
            for lid, (ttl, deadline, keys, shards) in dump["leases"].items():
                self._add(lid, Lease(ttl, deadline, set(keys), None if shards is None else set(shards)))
                for k in keys:
                    self.key_lease[k] = lid

    def __bool__(self) -> bool:
        return bool(self.leases)

    def dump(self) -> dict:
        """Plain data for a snapshot (``LeaseTable(dump)`` rebuilds the table)."""
        out: dict = {}
        if self.adopting or self.adopted:  # (absent before any removal moved leases: older dumps alike)
            out = {"adopting": {o: (e, sorted(lids)) for o, (e, lids) in self.adopting.items()},
                   "adopted": dict(self.adopted)}
        return out | {"seq": self.seq, "dropped": dict(self.dropped),
                "dropping": {lid: (ttl, sorted(shards)) for lid, (ttl, shards) in self.dropping.items()},
                "leases": {lid: (le.ttl_ms, le.deadline_ms, sorted(le.keys),
                                 None if le.shards is None else sorted(le.shards))
                           for lid, le in self.leases.items()}}

    def _add(self, lid: int, lease: Lease) -> None:
        self.leases[lid] = lease
        self.deadlines.set(lid, lease.deadline_ms)  # type: ignore[arg-type]

    def check(self) -> None:
        """Assert the table's invariants (tests call it after every step)."""
        attached = {k: lid for lid, le in self.leases.items() for k in le.keys}
        assert attached == self.key_lease, "key_lease and the leases' key sets disagree"
        for lid, le in self.leases.items():
            assert self.deadlines.get(lid) == le.deadline_ms, f"lease {lid}: deadline not indexed"  # type: ignore
            assert lid not in self.dropping and lid not in self.dropped, f"lease {lid} alive and ended"
        assert all(shards for _, shards in self.dropping.values()), "a drop with no shard left to tell"
        assert len(self.deadlines) == len(self.leases)

    # -- queries ---------------------------------------------------------------------------
    def live(self, lid: int, now_ms: int) -> Lease | None:
        """The lease (or mirror) ``lid`` if its deadline has not come at ``now_ms``."""
        lease = self.leases.get(lid)
        return lease if lease is not None and lease.deadline_ms > now_ms else None

    def expired(self, key: bytes, now_ms: int) -> bool:
        """Whether ``key`` is attached to a lease whose deadline has come (no entry deleted it yet)."""
        lid = self.key_lease.get(key)
        return lid is not None and self.leases[lid].deadline_ms <= now_ms

    def earliest(self) -> int | None:
        """A lower bound of the next lease deadline (safe from another thread, like ``Expiries.earliest``)."""
        return self.deadlines.earliest()

    # -- changes ----------------------------------------------------------------------------
    def grant(self, shard: int, ttl_ms: int, now_ms: int, floor: int = 0) -> int:
        """A new home lease of ``shard`` lasting ``ttl_ms``, numbered above ``floor``; its id."""
        assert ttl_ms > 0
        self.seq = max(self.seq, floor) + 1
        lid = lease_id(self.seq, shard)
        self._add(lid, Lease(ttl_ms, now_ms + ttl_ms, set(), set()))
        return lid

    def push_back(self, lease: Lease, lid: int, deadline_ms: int) -> None:
        """Move ``lease``'s deadline to ``deadline_ms`` if that is later (deadlines never shrink)."""
        if deadline_ms > lease.deadline_ms:
            lease.deadline_ms = deadline_ms
            self.deadlines.set(lid, deadline_ms)  # type: ignore[arg-type]

    def mirror(self, lid: int, remaining_ms: int, now_ms: int) -> Lease | None:
        """The mirror of remote lease ``lid`` with its guard at least ``now + remaining``; None if dropped."""
        if lid in self.dropped:
            return None
        lease = self.leases.get(lid)
        if lease is not None and lease.home:  # the key's shard is the lease's home after all
            return lease if lease.deadline_ms > now_ms else None
        if lease is None:
            lease = Lease(remaining_ms, now_ms + remaining_ms)
            self._add(lid, lease)
        else:
            lease.ttl_ms = max(lease.ttl_ms, remaining_ms)
            self.push_back(lease, lid, now_ms + remaining_ms)
        return lease

    def attach(self, key: bytes, lid: int) -> None:
        """Attach ``key`` (already detached from any other lease) to lease ``lid``."""
        assert key not in self.key_lease, key
        self.leases[lid].keys.add(key)
        self.key_lease[key] = lid

    def detach(self, key: bytes) -> None:
        """``key`` was written or deleted: it no longer belongs to its lease (if any)."""
        lid = self.key_lease.pop(key, None)
        if lid is not None:
            self.leases[lid].keys.discard(key)

    def end(self, lid: int, now_ms: int) -> list[bytes]:
        """Forget lease ``lid`` (expired, revoked or dropped); the keys to delete.

        A home lease with keys on other shards becomes a pending drop; a mirror
        leaves a tombstone so a late ``lease_put`` cannot bring it back.
        """
        lease = self.leases.pop(lid)
        self.deadlines.clear(lid)  # type: ignore[arg-type]
        for key in lease.keys:
            del self.key_lease[key]
        if lease.shards:
            self.dropping[lid] = (lease.ttl_ms, set(lease.shards))
        elif not lease.home:
            self.tombstone(lid, lease.ttl_ms, now_ms)
        return sorted(lease.keys)

    def tombstone(self, lid: int, ttl_ms: int, now_ms: int) -> None:
        """Remember that lease ``lid`` ended here; forget old tombstones."""
        self.dropped[lid] = max(self.dropped.get(lid, 0), now_ms + ttl_ms + DROPPED_GRACE_MS)
        for old in [x for x, until in self.dropped.items() if until <= now_ms]:
            del self.dropped[old]

    def due(self, now_ms: int) -> list[int]:
        """Leases and mirrors whose deadline is ``<= now_ms``, in deadline order."""
        return [lid for lid in self.deadlines.due(now_ms) if lid in self.leases]  # type: ignore[misc]


# -- the state-machine side --------------------------------------------------------------------
# ``s`` is a ``raftkv.state.KVState``: ``s.leases`` (a LeaseTable), ``s.write``, ``s.lookup``,
# ``s.txns.lock_of`` and ``s.expiries``.

def delete_keys(s: Any, keys: list[bytes], now_ms: int) -> int:
    """Delete the keys of an ended lease; one held by a prepared transaction expires once it is free."""
    n = 0
    for key in keys:
        if s.txns.lock_of(key) is not None:
            s.expiries.set(key, now_ms)  # raftkv.expiry deletes it as soon as the lock is gone
        elif key in s.data:
            s.write(key, None)
            n += 1
    return n


def reap(s: Any, now_ms: int) -> None:
    """End every lease and mirror whose deadline has come (each entry does, before its commands run)."""
    for lid in s.leases.due(now_ms):
        delete_keys(s, s.leases.end(lid, now_ms), now_ms)


def _home(s: Any, lid: int, now_ms: int) -> Any:
    lease = s.leases.live(lid, now_ms)
    return lease if lease is not None and lease.home else None


def use_for(s: Any, lid: int, shard: int, now_ms: int, home: int | None = None) -> int | None:
    """On ``lid``'s home (``home``; None: the shard its id names): ``shard`` is told when the lease ends from now
    on; the ms it has left, or None if it is not alive here (``lease_use`` without the error: a move's keys of an
    ended lease are simply not kept)."""
    lease = _home(s, lid, now_ms)
    if lease is None:
        return None
    if shard != (home_of(lid) if home is None else home):  # keys moved to the home join its own keys
        lease.shards.add(shard)
    return lease.deadline_ms - now_ms


def forget_shard(s: Any, shard: int) -> int:
    """This shard's leases (and pending drops) stop telling ``shard``, which a removal took away after every
    key it held on a lease moved with its lease; how many leases and drops named it."""
    n = 0
    for lease in s.leases.leases.values():
        if lease.shards and shard in lease.shards:
            lease.shards.discard(shard)
            n += 1
    for lid, (_ttl, shards) in list(s.leases.dropping.items()):
        if shard in shards:
            shards.discard(shard)
            n += 1
            if not shards:
                del s.leases.dropping[lid]
    return n


def homes(s: Any, after: int | None, limit: int, now_ms: int) -> tuple[tuple, int, int | None]:
    """This shard's home leases and pending drops with ids above ``after``, at most ``limit`` of them, in id
    order, as ``(lease id, ttl ms, ms left or None for a drop, shards to tell)``; then the last sequence number
    this shard granted, and the cursor (None at the end). What a removal hands to ``ADOPTIVE_HOME``."""
    t = s.leases
    ids = sorted(lid for lid in (*[x for x, le in t.leases.items() if le.home], *t.dropping)
                 if after is None or lid > after)
    rows = []
    for lid in ids[:limit]:
        lease = t.leases.get(lid)
        if lease is not None:
            rows.append((lid, lease.ttl_ms, lease.deadline_ms - now_ms, tuple(sorted(lease.shards))))
        else:
            ttl, shards = t.dropping[lid]
            rows.append((lid, ttl, None, tuple(sorted(shards))))
    return tuple(rows), t.seq, (ids[limit - 1] if len(ids) > limit else None)


def adopt(s: Any, epoch: int, origin: int, rows: Any, last: bool, now_ms: int) -> int:
    """On ``ADOPTIVE_HOME``: take the leases of ``origin``, which the removal of ``epoch`` takes away (rows of
    ``homes``); ``last``: the adoption is complete. How many leases (alive or ending) were taken.

    A lease alive there becomes a home lease here with the time it had left (its deadline only later, never
    earlier, than there); a mirror of it here becomes its home keys. One that had ended, or has no time left,
    is a pending drop here (this shard tells the shards that may hold its keys) and its mirror here ends.
    Neither ``origin`` nor this shard is among the shards to tell. A lease already taken by this adoption is
    never taken again, so a re-run cannot bring back one that ended here meanwhile."""
    t = s.leases
    if t.adopted.get(origin, -1) >= epoch:
        return 0  # finished already: a re-run
    taking = t.adopting.get(origin)
    if taking is None or taking[0] != epoch:
        taking = t.adopting[origin] = (epoch, set())
    n = 0
    for lid, ttl_ms, remaining, shards in rows:
        if lid in taking[1]:
            continue
        taking[1].add(lid)
        n += 1
        tell = set(shards) - {origin, ADOPTIVE_HOME}
        here = t.leases.get(lid)
        if here is not None and here.home:
            continue  # (cannot happen: ids of other shards are never granted here)
        if remaining is None or remaining <= 0 or lid in t.dropped:
            if here is not None:  # its mirror here ends with it
                delete_keys(s, t.end(lid, now_ms), now_ms)
            if tell:
                ttl, pending = t.dropping.get(lid, (ttl_ms, set()))
                t.dropping[lid] = (ttl, pending | tell)
            continue
        if here is None:
            t._add(lid, Lease(ttl_ms, now_ms + remaining, set(), tell))
        else:  # the mirror becomes the home: its keys are the lease's keys here
            here.ttl_ms, here.shards = ttl_ms, tell
            t.push_back(here, lid, now_ms + remaining)
    if last:
        t.adopted[origin] = epoch
        del t.adopting[origin]
    return n


def attach_moved(s: Any, lid: int, remaining: int | None, keys: list[bytes], now_ms: int) -> int:
    """Attach ``keys``, moved to this shard, to lease ``lid`` with ``remaining`` ms left (its home's answer to
    ``use_for`` for this shard); how many.

    A lease that has ended (``remaining`` None, or a drop already reached this shard: its tombstone) takes
    its keys with it: they are forgotten here, never served, as the lease's end deletes them at the source.
    Attaching again is harmless (the guard only grows), which a move's second round relies on."""
    lease = None if remaining is None or remaining <= 0 else s.leases.mirror(lid, remaining, now_ms)
    for key in keys:
        s.leases.detach(key)
    if lease is None:
        for key in keys:
            s.drop_key(key)
        return 0
    for key in keys:
        s.leases.attach(key, lid)
    return len(keys)


def _grant(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, shard, ttl_ms, *floor = cmd  # floor: the last id an earlier shard of this number granted (``home_in``)
    if len(s.leases.leases) >= LEASES_MAX:
        return CmdError("BUSY", f"shard {shard} holds {LEASES_MAX} leases (LEASES_MAX); revoke some or wait "
                                "for them to expire")
    return s.leases.grant(shard, ttl_ms, now_ms, floor[0] if floor else 0)


def _keepalive(s: Any, cmd: tuple, now_ms: int) -> Any:
    lid = cmd[1]
    lease = _home(s, lid, now_ms)
    if lease is None:
        return no_lease(lid)
    s.leases.push_back(lease, lid, now_ms + lease.ttl_ms)
    return (lease.ttl_ms, tuple(sorted(lease.shards)))


def _revoke(s: Any, cmd: tuple, now_ms: int) -> Any:
    lid = cmd[1]
    lease = _home(s, lid, now_ms)
    if lease is None:
        return no_lease(lid)
    shards = tuple(sorted(lease.shards))
    delete_keys(s, s.leases.end(lid, now_ms), now_ms)
    return (lease.ttl_ms, shards)


def _ttl(s: Any, cmd: tuple, now_ms: int) -> Any:
    lid = cmd[1]
    lease = _home(s, lid, now_ms)
    if lease is None:
        return no_lease(lid)
    return (lease.deadline_ms - now_ms, lease.ttl_ms, len(lease.keys), tuple(sorted(lease.shards)))


def _use(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, lid, shard = cmd
    lease = _home(s, lid, now_ms)
    if lease is None:
        return no_lease(lid)
    lease.shards.add(shard)
    return lease.deadline_ms - now_ms


def _holder(s: Any, lid: int, remaining: int | None, now_ms: int) -> Lease | None:
    """The lease (home) or mirror (``remaining`` given) a key may be attached to now; None: NOLEASE."""
    if remaining is None:
        return _home(s, lid, now_ms)
    if remaining <= 0:
        return None
    return s.leases.mirror(lid, remaining, now_ms)


def _put(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, key, value, lid, remaining = cmd
    lock = s.txns.lock_of(key)
    if lock is not None:
        return lock
    if _holder(s, lid, remaining, now_ms) is None:
        return no_lease(lid)
    rev = s.write(key, value)  # detaches the key from its previous lease, clears its deadline
    s.leases.attach(key, lid)
    return rev


def _lock(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, key, owner, lid, remaining = cmd
    lock = s.txns.lock_of(key)
    if lock is not None:
        return lock
    entry = s.lookup(key, now_ms)
    if entry is not None and entry[0] != owner:
        return (0, entry[0])
    if _holder(s, lid, remaining, now_ms) is None:
        return no_lease(lid)
    if entry is None or s.leases.key_lease.get(key) != lid:
        s.write(key, owner)
        s.leases.attach(key, lid)
    return (1, s.data[key][1])


def _refresh(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, lid, remaining = cmd
    lease = s.leases.leases.get(lid)
    if lease is None or lease.home:
        return 0
    s.leases.mirror(lid, remaining, now_ms)
    return 1


def _drop(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, lid, ttl_ms = cmd
    lease = s.leases.leases.get(lid)
    if lease is not None and lease.home:
        return 0  # a home lease is ended by its own revoke / deadline, never by a drop
    if lease is None:
        s.leases.tombstone(lid, ttl_ms, now_ms)
        return 0
    return delete_keys(s, s.leases.end(lid, now_ms), now_ms)


def _dropped(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, lid, shards = cmd
    pending = s.leases.dropping.get(lid)
    if pending is None:
        return 0
    pending[1].difference_update(shards)
    if not pending[1]:
        del s.leases.dropping[lid]
        return 0
    return len(pending[1])


def _keys(s: Any, cmd: tuple, now_ms: int) -> Any:
    lease = s.leases.live(cmd[1], now_ms)
    return 0 if lease is None else len(lease.keys)


def _pending(s: Any, cmd: tuple, now_ms: int) -> Any:
    return tuple((lid, ttl, tuple(sorted(shards))) for lid, (ttl, shards) in sorted(s.leases.dropping.items()))


HANDLERS = {"lease_grant": _grant, "lease_keepalive": _keepalive, "lease_revoke": _revoke, "lease_ttl": _ttl,
            "lease_use": _use, "lease_put": _put, "lease_lock": _lock, "lease_refresh": _refresh,
            "lease_drop": _drop, "lease_dropped": _dropped, "lease_keys": _keys, "lease_pending": _pending}
READ_HANDLERS = {"lease_ttl": _ttl, "lease_keys": _keys, "lease_pending": _pending}

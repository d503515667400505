"""Moving keys between shards when one is added or removed (``raftkv shard add|remove``): which keys
move, and what a shard refuses when.

Theory of operation
-------------------
Adding shard ``N`` to a ring of shards ``0..N-1`` moves to it exactly the keys
the new ring (``0..N``, same vnodes) gives it; no other key changes shard
(``shards.ring``: adding a shard only inserts ring points).  Removing the last
shard ``S = N-1`` is the mirror image: every key of ``S`` moves to the shard
the ring ``0..N-2`` gives it, and no other key changes shard (removing a shard
only deletes its ring points).  A move is one ring change seen from one shard:
a *source* gives keys away (every source of an add; the removed shard of a
removal), a *destination* receives them (the new shard of an add; every
remaining shard of a removal).  Every shard's part runs through its own Raft
log, as replicated state of its ``KVState``:

* ``owner`` (``Owner``): the ring this shard serves under since its last move.
  A key the ring does not give this shard is refused with ``-WRONGSHARD``: a
  client or node with an old map can never read or write it here again.
  ``None`` on a shard that never took part in a move (nothing is checked).
* ``move`` (``Move``): the move under way, keyed by the map ``epoch`` whose
  ring is the new one.  A source shard goes ``frozen`` -> ``handoff``
  -> (done: ``owner`` becomes the new ring, ``move`` None; a removed shard's
  group is deleted instead); a destination is ``incoming`` until it opens
  (``owner`` = the new ring, ``move`` None).

What each phase refuses (``refusal``).  On a source, ``moving(key)``: the new
ring takes the key away from it (an add: gives it to the new shard; a removal:
every key of the removed shard).  On a destination, ``arriving(key)``: the key
is one it receives (an add: every key, the new shard has none of its own; a
removal: the keys the removed shard held; its own keys stay served):

=============  ========================================  =====================
phase          reads of a moving key                     writes of a moving key
=============  ========================================  =====================
(none)         served                                    served
``frozen``     served (the value no longer changes)      ``-MOVING`` (retry)
``handoff``    ``-WRONGSHARD epoch shard``               ``-WRONGSHARD ...``
``incoming``   ``-MOVING`` (arriving keys: not open yet)  ``-MOVING``
=============  ========================================  =====================

A 2PC PREPARE of a new transaction touching a refused key votes NO (a
retryable conflict), and is remembered as aborted, as under a backup fence.
The state-machine commands (handlers below, replicated, idempotent by epoch):

A removal's commands carry one more element, ``removing`` (True): ``mv_freeze``
``(..., vnodes, True)`` with ``shard == dest`` (the removed shard freezes
itself), ``mv_install`` ``(..., sessions, removed)`` where ``dest`` is the
installing shard and ``removed`` the shard going away.  Commands without it
are an add's, as before removals existed (logs and snapshots written then
replay and load unchanged).

=================================================  ==================================================
``("mv_freeze", epoch, shard, dest, vnodes)``      source: start refusing writes of moving keys
``("mv_handoff", epoch)``                          source: refuse reads of moving keys too
``("mv_purge", epoch, keys)``                      source, after handoff: delete those moving keys
``("mv_done", epoch)``                             source: the new ring is now the owner
``("mv_abort", epoch)``                            source, while frozen: forget the move (also a
                                                   removal's destination holding none of its keys)
``("mv_install", epoch, dest, vnodes, revision,    destination: store moved keys and merge the
items, sessions)``                                 sources' client sessions (higher seq wins)
``("mv_discard", epoch, source, after, limit)``   destination: forget keys from ``source`` (a slice)
``("mv_open", epoch)``                             destination: serve (the new ring is the owner)
``("mv_status",)`` (read)                          ``status`` below
``("mv_scan", epoch, after, limit)`` (read)        moving keys after ``after``, with value, deadline
``("mv_keys", epoch, after, limit)`` (read)        the same, keys only (a cleanup's)
``("mv_sessions", after, limit)`` (read)           client sessions after ``after``
``("mv_leases", epoch, after, limit)`` (read)      frozen source: moving keys on leases, with the lease
``("mv_leaseuse", pairs[, home])``                 a lease's home: tell each ``(lease, shard)`` pair's
                                                   shard when the lease ends; the ms each has left
``("mv_attach", epoch, source, rows)``             destination: attach moved keys to their leases
                                                   (a mirror, as ``lease_put`` makes); a key of an
                                                   ended lease is forgotten
``("mv_leaseforget", epoch, shard)``               every shard that stays, once a removed ``shard``
                                                   handed off: its leases stop telling ``shard``
``("mv_leasehomes", epoch, after, limit)`` (read)  the removed shard, handed off: its home leases and
                                                   pending drops (``leases.homes``)
``("mv_leaseadopt", epoch, origin, rows, last)``   shard 0: take the removed ``origin``'s leases
                                                   (``leases.adopt``)
=================================================  ==================================================

Everything here is pure and deterministic: ``KVState`` calls it while applying
entries.  ``raftkv.resharder`` is the edge that runs the steps against a live
cluster; docs/scale-out.md has the protocol and why no write is lost or applied
twice and no read is stale.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from raftkv import leases
from raftkv.results import CmdError
from raftkv.txn import COMMITTED
from shards.ring import VNODES_MAX, Ring

COPYING, FROZEN, HANDOFF, INCOMING = "copying", "frozen", "handoff", "incoming"
PHASES = (COPYING, FROZEN, HANDOFF, INCOMING)
SCAN_LIMIT_MAX = 10_000  # moving keys per mv_scan / sessions per mv_sessions answer
DISCARD_LOOK_MAX = 5_000  # keys one mv_discard entry looks at (about 10 ms of the driver thread)
SCAN_WORK_FACTOR = 50  # an mv_scan looks at up to this many keys per key it may return
# Keys and values per mv_scan answer: the next mv_install carries them in one request, which must stay under
# the node's request limit (1.5 MiB); one key and value alone may exceed this (a value is at most 1 MiB).
SCAN_BYTES_MAX = 1024 * 1024


@lru_cache(maxsize=16)
def ring_of(nshards: int, vnodes: int) -> Ring:
    """The ring of shards ``0..nshards-1`` (cached: every move check of a command uses one)."""
    return Ring(range(nshards), vnodes)


@dataclass(frozen=True)
class Owner:
    """The ring shard ``shard`` serves under (``0..nshards-1``), since map ``epoch``."""

    shard: int
    nshards: int
    vnodes: int
    epoch: int

    def owns(self, key: bytes) -> bool:
        return ring_of(self.nshards, self.vnodes).shard_for(key) == self.shard

    def dump(self) -> tuple:
        return (self.shard, self.nshards, self.vnodes, self.epoch)


@dataclass(frozen=True)
class Move:
    """A move under way on shard ``shard``, keyed by ``epoch``.

    ``dest`` is the shard the ring changes by: the one added (the ring goes ``0..dest-1`` -> ``0..dest``)
    or, with ``removing``, the one removed (``0..dest`` -> ``0..dest-1``).  The phase says which side this
    shard is on: ``frozen``/``handoff`` a source, ``incoming`` a destination.
    """

    epoch: int
    shard: int
    dest: int
    vnodes: int
    phase: str
    removing: bool = False

    @property
    def old_shards(self) -> int:
        """Shards in the ring before the move."""
        return self.dest + 1 if self.removing else self.dest

    @property
    def new_shards(self) -> int:
        """Shards in the ring after the move."""
        return self.dest if self.removing else self.dest + 1

    def moving(self, key: bytes) -> bool:
        """(A source.) Does the new ring take ``key`` away from this shard?  An add: it gives it to the new
        shard.  A removal: every key of the removed shard."""
        if self.removing:
            return self.shard == self.dest or ring_of(self.dest, self.vnodes).shard_for(key) != self.shard
        return ring_of(self.dest + 1, self.vnodes).shard_for(key) == self.dest

    def arriving(self, key: bytes) -> bool:
        """(A destination.) Is ``key`` one this shard receives, refused until it opens?  An add: every key
        (the new shard has none of its own).  A removal: the keys the removed shard held."""
        return not self.removing or ring_of(self.dest + 1, self.vnodes).shard_for(key) == self.dest

    def new_owner(self) -> Owner:
        return Owner(self.shard, self.new_shards, self.vnodes, self.epoch)

    def dump(self) -> tuple:
        # An add's move dumps as before removals existed: snapshots and status replies keep their form.
        base = (self.epoch, self.shard, self.dest, self.vnodes, self.phase)
        return (*base, True) if self.removing else base


def load(extra: dict | None) -> tuple[Owner | None, Move | None]:
    """``(owner, move)`` from a snapshot's extra state (absent before resharding existed: none)."""
    if not extra:
        return None, None
    owner, move = extra.get("owner"), extra.get("move")
    return (None if owner is None else Owner(*owner)), (None if move is None else Move(*move))


def removal_refusal(nshards: int, shard: int | None) -> str | None:
    """Why shard ``shard`` (None: the last) cannot be removed from a ring of ``nshards`` shards; None: it can.

    Only the last shard: shard ids are ``0..nshards-1`` (the ring, the map and the nodes' Raft ports number
    shards by position), so removing another id would renumber a shard, which would mean moving every key of
    it, and the keys of every shard whose id changes, not just the removed shard's.
    """
    if nshards < 2:
        return "the cluster has one shard: its keys would have nowhere to go"
    last = nshards - 1
    if shard is None or shard == last:
        return None
    if shard < 0 or shard > last:
        return f"there is no shard {shard} (shards 0..{last})"
    return (f"only the last shard ({last}) can be removed: shard ids must stay 0..{last - 1} afterwards (the ring "
            f"and every node's Raft ports number shards by position), so removing shard {shard} would renumber "
            f"shard {last}; to shrink the cluster, remove shard {last} (its keys go to the others)")


def version_refusal(versions: dict[str, int | None]) -> str | None:
    """Why keys must not move while the nodes report these state machine versions (node -> version, None: the
    node reports none, as one older than the field does); None: they may.

    A move runs commands through every replica of the shards it touches, and replicas of one group stay alike
    only if they apply them alike; during a rolling upgrade they may not (``raftkv.state.STATE_MACHINE_VERSION``).
    """
    old = sorted(n for n, v in versions.items() if v is None)
    if old:
        return (f"node(s) {', '.join(old)} report no state machine version: they run a raftkv older than the "
                "others, and replicas of different versions may apply a move's commands differently; upgrade "
                "every node to one version first, then run it again (nothing changed)")
    if len(set(versions.values())) > 1:
        seen = ", ".join(f"{n}: {v}" for n, v in sorted(versions.items()))
        return (f"the nodes run different state machine versions ({seen}), as during a rolling upgrade; replicas "
                "of different versions may apply a move's commands differently: finish the upgrade (every node on "
                "one version), then run it again (nothing changed)")
    return None


# -- which keys a command touches --------------------------------------------------------------

# Commands whose cmd[1] is the one key they touch (reads and writes); READS are the ones that change nothing.
_ONE_KEY = frozenset({"get", "getrev", "watchrev", "set", "cas", "incrby", "append", "getdel", "setopt",
                      "incrbyfloat", "getex", "expire", "pttl", "persist", "getttl", "lock", "unlock",
                      "lease_put", "lease_lock"})
_KEY_LIST = frozenset({"mget", "exists", "del", "entries"})
_READS = frozenset({"get", "getrev", "watchrev", "pttl", "getttl", "mget", "exists", "entries"})


def _txn_keys(compares: Any, then_ops: Any, else_ops: Any) -> list[bytes]:
    keys = [c[0] for c in compares]
    keys += [op[1] for op in (*then_ops, *else_ops)]
    return keys


def keys_of(cmd: tuple) -> tuple[list[bytes], bool]:
    """``(keys, write)``: the keys a state-machine command reads or writes, and whether it may write.

    Commands that name no key (leases' own, 2PC outcomes, backups, ``mv_*``) answer ``([], False)``:
    nothing of theirs is refused.  ``tx_prepare`` answers its keys as a write.
    """
    op = cmd[0] if cmd else None
    try:
        if op in _ONE_KEY:
            return [cmd[1]], op not in _READS
        if op in _KEY_LIST:
            return list(cmd[1]), op not in _READS
        if op == "session":
            return keys_of(cmd[3])
        if op == "txn":
            return _txn_keys(cmd[1], cmd[2], cmd[3]), True
        if op == "txn_once":
            return _txn_keys(cmd[2], cmd[3], cmd[4]), True
        if op == "tx_prepare":
            return _txn_keys(cmd[3], cmd[4], cmd[5]), True
    except (IndexError, TypeError):
        return [], False  # malformed: its own handler refuses it
    return [], False


# -- what is refused ---------------------------------------------------------------------------


def moving_error(epoch: int) -> CmdError:
    return CmdError("MOVING", f"the key is moving to another shard (map epoch {epoch}); not applied, retry")


def wrong_shard(epoch: int, shard: int) -> CmdError:
    return CmdError("WRONGSHARD", f"{epoch} {shard} the key now belongs to shard {shard} (map epoch {epoch}); "
                                  "not applied: refresh the map and retry")


def refusal(owner: Owner | None, move: Move | None, key: bytes, write: bool) -> CmdError | None:
    """Why this shard refuses to read (``write`` False) or write ``key`` now; None: it serves it."""
    if owner is not None and not owner.owns(key):
        return wrong_shard(owner.epoch, ring_of(owner.nshards, owner.vnodes).shard_for(key))
    if move is None:
        return None
    if move.phase == INCOMING:
        return moving_error(move.epoch) if move.arriving(key) else None
    if move.phase == COPYING or not move.moving(key):
        return None  # a source being pre-copied refuses nothing
    if move.phase == FROZEN:
        return moving_error(move.epoch) if write else None
    return wrong_shard(move.epoch, move.dest if not move.removing
                       else ring_of(move.new_shards, move.vnodes).shard_for(key))


def serves(owner: Owner | None, move: Move | None, key: bytes) -> bool:
    """Is ``key`` this shard's to read now?  (Scans and ranges leave the others out.)"""
    return refusal(owner, move, key, write=False) is None


# What a removed shard refuses once it handed off: its leases are adopted by ``leases.ADOPTIVE_HOME`` from then on.
LEASE_HOME_OPS = frozenset({"lease_grant", "lease_keepalive", "lease_revoke", "lease_ttl", "lease_use",
                            "lease_pending", "lease_dropped"})


def check(s: Any, cmd: tuple) -> CmdError | None:
    """The refusal of ``cmd`` on state ``s`` (a ``KVState`` with ``owner``/``move``), or None."""
    move = s.move
    if move is not None and move.removing and move.phase == HANDOFF and move.shard == move.dest:
        inner = cmd[3] if cmd and cmd[0] == "session" and len(cmd) > 3 else cmd
        if inner and inner[0] in LEASE_HOME_OPS:
            return CmdError("WRONGSHARD", f"{move.epoch} {leases.ADOPTIVE_HOME} shard {move.shard} is being "
                                          f"removed: its leases live on shard {leases.ADOPTIVE_HOME} from map epoch "
                                          f"{move.epoch} on; send it again with that map")
    keys, write = keys_of(cmd)
    for key in keys:
        why = refusal(s.owner, s.move, key, write)
        if why is not None:
            return why
    return None


# -- the state-machine commands ----------------------------------------------------------------


def _valid_move(epoch: Any, shard: Any, dest: Any, vnodes: Any, removing: Any = False) -> None:
    """Raise ValueError unless these make a move every later check can use (a bad marker would make
    every command of the shard fail)."""
    for name, v in (("epoch", epoch), ("shard", shard), ("dest", dest), ("vnodes", vnodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if not (shard <= dest and 1 <= vnodes <= VNODES_MAX):
        raise ValueError(f"want shard <= dest and vnodes in 1..{VNODES_MAX}, got {shard}, {dest}, {vnodes}")
    if not isinstance(removing, bool):
        raise ValueError(f"removing must be a bool, got {removing!r}")
    if removing and dest < 1:
        raise ValueError("the last shard of a ring cannot be removed")


def _source_step(phase: str, name: str) -> Callable[[Any, tuple, int], Any]:
    """``mv_precopy`` / ``mv_freeze epoch shard dest vnodes [removing]``: mark a source (an add's, or the shard
    a removal takes away) ``copying`` (it refuses nothing, but names the move, so its moving keys can be
    scanned and copied while it serves them) or ``frozen`` (writes of moving keys refused). A phase only goes
    forward, so a re-run answers where the source stands."""
    def run(s: Any, cmd: tuple, now_ms: int) -> Any:
        if len(cmd) not in (5, 6):
            raise ValueError(f"want ({name}, epoch, shard, dest, vnodes[, removing])")
        _, epoch, shard, dest, vnodes, *rest = cmd
        removing = rest[0] if rest else False
        _valid_move(epoch, shard, dest, vnodes, removing)
        if removing and shard != dest:
            raise ValueError("a removal moves the removed shard's keys only")
        if not removing and shard == dest:
            raise ValueError("a source shard is not the new shard")
        move = s.move
        if move is not None:
            if move.epoch == epoch and move.phase == COPYING and phase == FROZEN:
                s.move = dataclasses.replace(move, phase=FROZEN)  # the pre-copy is done: now refuse writes
                return FROZEN
            if move.epoch == epoch and move.phase != INCOMING:
                return move.phase  # a re-run: where it stands
            return CmdError("ERR", f"{name}: another move (epoch {move.epoch}, {move.phase}) is under way")
        if s.owner is not None and s.owner.epoch >= epoch:
            return "done"  # this move finished here already (a re-run after mv_done)
        s.move = Move(epoch, shard, dest, vnodes, phase, removing)
        return phase
    return run


def _handoff(s: Any, cmd: tuple, now_ms: int) -> Any:
    move = s.move
    if move is None or move.epoch != cmd[1]:
        return "done" if s.owner is not None and s.owner.epoch >= cmd[1] else CmdError(
            "ERR", f"mv_handoff: no move of epoch {cmd[1]} here")
    if move.phase == FROZEN:
        s.move = dataclasses.replace(move, phase=HANDOFF)
        # The moving keys' leases now reach them at their new shard (mv_attach): a lease ending here must not
        # delete this shard's stale copies (a change no reader of the key should see twice).
        for key in [k for k in s.leases.key_lease if move.moving(k)]:
            s.leases.detach(key)
    return s.move.phase


def _purge(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, epoch, keys = cmd
    move = s.move
    if move is None or move.epoch != epoch or move.phase != HANDOFF:
        return 0
    n = 0
    for key in keys:
        # Only keys the new ring takes away: the purge never touches a key this shard keeps.
        if move.moving(key) and key in s.data:
            s.drop_key(key)
            n += 1
    return n


def _done(s: Any, cmd: tuple, now_ms: int) -> Any:
    move = s.move
    if move is None or move.epoch != cmd[1]:
        return "done" if s.owner is not None and s.owner.epoch >= cmd[1] else CmdError(
            "ERR", f"mv_done: no move of epoch {cmd[1]} here")
    if move.phase != HANDOFF:
        return CmdError("ERR", f"mv_done: the move is {move.phase}, not handed off")
    s.owner, s.move = move.new_owner(), None
    return "done"


def _abort(s: Any, cmd: tuple, now_ms: int) -> Any:
    move = s.move
    if move is None or move.epoch != cmd[1]:
        return "none"
    if move.phase == INCOMING and move.removing:
        # A remaining shard of a removal given up before the copy: nothing of the removed shard is here (it
        # would be stale once that shard serves again), so it just stops refusing those keys. Walks the keys
        # (a rare command), unless none ever arrived.
        if s.arrived != 0 and any(move.arriving(k) for k in s.data.keys_between()):
            return CmdError("ERR", "mv_abort: keys of the removed shard were copied here already; the removal "
                                   "can only be finished")
        s.move = None
        return "aborted"
    if move.phase not in (COPYING, FROZEN):
        return CmdError("ERR", f"mv_abort: the move is {move.phase}; only a copying or frozen move (or a "
                               "removal's destination before the copy) can be abandoned")
    s.move = None
    return "aborted"


def _install(s: Any, cmd: tuple, now_ms: int) -> Any:
    if len(cmd) not in (7, 8):
        raise ValueError("want (mv_install, epoch, dest, vnodes, revision, items, sessions[, removed])")
    epoch, shard, vnodes, revision, items, sessions = cmd[1:7]
    removed = cmd[7] if len(cmd) == 8 else None
    # An add installs into the new shard (the move's dest); a removal into a remaining shard, from ``removed``.
    want = (Move(epoch, shard, shard, vnodes, INCOMING) if removed is None
            else Move(epoch, shard, removed, vnodes, INCOMING, True))
    _valid_move(epoch, want.shard, want.dest, vnodes, want.removing)
    if want.removing and shard == removed:
        raise ValueError("the removed shard receives no keys")
    items, sessions = tuple(items), tuple(sessions)
    new_ring = ring_of(want.new_shards, vnodes)
    for row in items:
        if len(row) != 3 or not isinstance(row[0], bytes) or not isinstance(row[1], bytes) \
                or not (row[2] is None or (isinstance(row[2], int) and not isinstance(row[2], bool))):
            raise ValueError("items must be (key bytes, value bytes, deadline int or None)")
        if want.removing and not (want.arriving(row[0]) and new_ring.shard_for(row[0]) == shard):
            raise ValueError(f"key {row[0]!r} does not move from shard {removed} to shard {shard}")
    for row in sessions:
        if len(row) != 3 or not isinstance(row[0], bytes) or isinstance(row[1], bool) or not isinstance(row[1], int):
            raise ValueError("sessions must be (client bytes, seq int, result)")
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise ValueError("revision must be an int")
    move = s.move
    if move is None:
        if s.owner is not None and s.owner.epoch >= epoch:
            return CmdError("ERR", f"mv_install: shard {shard} is open already (epoch {s.owner.epoch})")
        if not want.removing and len(s.data):
            return CmdError("ERR", f"mv_install: shard {shard} holds keys and no incoming move")
        s.move = move = want
        s.arrived = 0  # nothing received yet: a discard has nothing to look for (``_discard``)
    elif move != want:
        return CmdError("ERR", f"mv_install: shard {shard} has another move ({move.epoch}, {move.phase})")
    # Every revision here exceeds every revision the sources had: a WATCH taken there can never match.
    if revision > s.revision:
        s.revision = revision
    for key, value, deadline in items:
        s.install_key(key, value, deadline)
    for client, seq, result in sessions:
        known = s.sessions.get(client)
        if known is None or known[0] < seq:
            s.sessions[client] = (seq, result, now_ms)
    s.del_rev = max(s.del_rev, s.revision)
    s.changes.compact_to(s.revision)  # moved keys are not changes a watcher here saw
    return len(items)


def _open(s: Any, cmd: tuple, now_ms: int) -> Any:
    move = s.move
    if move is None or move.epoch != cmd[1]:
        return "open" if s.owner is not None and s.owner.epoch >= cmd[1] else CmdError(
            "ERR", f"mv_open: no incoming move of epoch {cmd[1]} here")
    if move.phase != INCOMING:
        return CmdError("ERR", f"mv_open: the move here is {move.phase}")
    s.owner, s.move = move.new_owner(), None
    return "open"


def status(s: Any) -> tuple:
    """``(owner, move, moving keys locked by transactions, moving keys on leases, keys held, revision,
    committed transactions homed here not yet finished everywhere)``; owner and move as plain tuples or
    None.  Cheap: it never walks the keys (the poll of step 2 runs it).

    On a shard being removed, and on a shard with no move (what a removal would meet), the leases count is
    the leases homed there, alive or still telling other shards of their end: a removal moves them to shard 0
    (``mv_leasehomes``/``mv_leaseadopt``; before state machine version 5 they stopped it).  The last number is what
    must reach 0 before a removed shard hands off (``home_removed``).
    """
    move = s.move
    locked = leased = 0
    if move is None or move.removing:
        leased = homed_leases(s)
    if move is not None and move.phase != INCOMING:
        locked = sum(1 for k in s.txns.locks if move.moving(k))
        if not move.removing:
            leased = sum(1 for k in s.leases.key_lease if move.moving(k))
    unsettled = sum(1 for r in s.txns.records.values() if r.state == COMMITTED and not r.acked)
    return (None if s.owner is None else s.owner.dump(), None if move is None else move.dump(), locked, leased,
            len(s.data), s.revision, unsettled)


def homed_leases(s: Any) -> int:
    """Leases whose home is this shard: alive, or ended with shards still to tell (a removal waits for them)."""
    return sum(1 for le in s.leases.leases.values() if le.home) + len(s.leases.dropping)


def home_removed(owner: Owner | None, move: Move | None, home: int) -> bool:
    """Is ``home`` (a transaction's home shard, the shard of its first key) a shard this shard's ring lost?

    Then a lock this shard holds for that transaction can be finished as ABORTED without asking the home:
    the removed shard refused every PREPARE from its freeze on (every key of it was moving), and a removal
    opens the remaining shards only once the removed one held no lock and every transaction it committed
    had finished everywhere (``status``).  So no transaction homed there that is still unfinished here can
    have committed.  Only after this shard opened under the smaller ring (no move under way): during an add
    a source's ring is the old one until its move ends, and a transaction homed at the new shard is real.
    """
    return move is None and owner is not None and home >= owner.nshards


def _status(s: Any, cmd: tuple, now_ms: int) -> Any:
    return status(s)


def _scan(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``(items, cursor)``: up to ``limit`` moving keys after ``after`` as ``(key, value, deadline or None)``,
    of ``SCAN_BYTES_MAX`` bytes at most (or one key); ``cursor`` None once the whole shard was looked at."""
    return _walk(s, cmd, "mv_scan", True)


def _keys(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_keys epoch after limit``: ``(keys, cursor)``, ``mv_scan`` without the values (a cleanup purges
    keys: reading their values was most of its scan with large values)."""
    got = _walk(s, cmd, "mv_keys", False)
    return got if isinstance(got, CmdError) else ([k for k, _v, _d in got[0]], got[1])


def _walk(s: Any, cmd: tuple, name: str, values: bool) -> Any:
    _, epoch, after, limit = cmd
    move = s.move
    if move is None or move.epoch != epoch or move.phase == INCOMING:
        return CmdError("ERR", f"{name}: no outgoing move of epoch {epoch} here")
    limit = max(1, min(int(limit), SCAN_LIMIT_MAX))
    items: list[tuple] = []
    looked = size = 0
    last = None
    for key, value in s.data.values_where(move.moving, b"" if after is None else after + b"\0", values):
        looked += 1
        if value is not None:  # a moving key
            if items and size + len(key) + len(value) > SCAN_BYTES_MAX:
                return items, last  # this key starts the next answer
            size += len(key) + len(value)
            items.append((key, value, s.expiries.get(key) if values and s.expiries else None))
            if len(items) >= limit:
                return items, key
        last = key
        if looked >= limit * SCAN_WORK_FACTOR:
            return items, last
    return items, None


# -- the final copy after a pre-copy (an add): replay the source's changes since, not every key ---------------


def _frozen_source(s: Any, epoch: int, name: str) -> Move | CmdError:
    move = s.move
    if move is None or move.epoch != epoch or move.phase not in (FROZEN, HANDOFF):
        return CmdError("ERR", f"{name}: no frozen move of epoch {epoch} here")
    return move


def _get(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_get epoch keys``: ``(key, value, deadline)`` of those of ``keys`` that move and are here."""
    _, epoch, keys = cmd
    move = _frozen_source(s, epoch, "mv_get")
    if isinstance(move, CmdError):
        return move
    return [(k, s.data[k][0], s.expiries.get(k) if s.expiries else None)
            for k in keys if move.moving(k) and k in s.data]


def _delta(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_delta epoch since after limit``: ``(rows, cursor)``, the changes of moving keys with revisions
    above ``after`` (at least ``since``), from the shard's change log, oldest first, as ``(key, value or None
    for a deletion, deadline)``, up to ``limit`` rows or ``SCAN_BYTES_MAX`` bytes; ``cursor`` None at the end.
    ``"compacted"`` when the log no longer holds every change since ``since`` (more were made than it keeps,
    or a backup was loaded): the caller copies every key again instead."""
    _, epoch, since, after, limit = cmd
    move = _frozen_source(s, epoch, "mv_delta")
    if isinstance(move, CmdError):
        return move
    changes = s.changes
    if since < changes.floor:
        return "compacted"
    limit = max(1, min(int(limit), SCAN_LIMIT_MAX))
    events = list(changes.events)
    start = bisect.bisect_right(events, max(since, after), key=lambda e: e[0])
    rows: list[tuple] = []
    size = 0
    prev = max(since, after)
    for rev, key, value in itertools.islice(events, start, None):
        if not move.moving(key):
            continue
        cost = len(key) + (0 if value is None else len(value))
        if rows and (size + cost > SCAN_BYTES_MAX or len(rows) >= limit):
            return rows, prev
        size += cost
        # the deadline now: a later change of the key overrides this row, and EXPIRE changes no revision
        rows.append((key, value, None if value is None or not s.expiries else s.expiries.get(key)))
        prev = rev
    return rows, None


def _ttls(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_ttls epoch``: ``(key, deadline)`` of every moving key with a deadline, or ``"too many"`` above
    ``SCAN_LIMIT_MAX`` of them (one ``mv_ttlsync`` carries them all)."""
    move = _frozen_source(s, cmd[1], "mv_ttls")
    if isinstance(move, CmdError):
        return move
    out = [(k, t) for k, t in (s.expiries.deadlines.items() if s.expiries else ()) if move.moving(k)]
    return "too many" if len(out) > SCAN_LIMIT_MAX else sorted(out)


def _receiving(s: Any, epoch: int, name: str) -> Move | CmdError:
    move = s.move
    if move is None or move.epoch != epoch or move.phase != INCOMING:
        return CmdError("ERR", f"{name}: no move of epoch {epoch} coming into this shard")
    return move


def _from_source(move: Move, key: bytes, source: int) -> bool:
    """(A destination.) Did ``key`` come here from ``source``?  An add's new shard: ``source`` is the key's
    shard in the ring before the add.  A removal's remaining shard: ``source`` is the removed shard and the
    key one of those arriving from it."""
    if move.removing:
        return source == move.dest and move.arriving(key)
    return ring_of(move.dest, move.vnodes).shard_for(key) == source


def _apply_delta(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_apply epoch revision rows``: a destination replays a frozen source's changes since its pre-copy
    (``mv_delta``): a value is installed, a deletion drops the key."""
    _, epoch, revision, rows = cmd
    move = _receiving(s, epoch, "mv_apply")
    if isinstance(move, CmdError):
        return move
    if move.removing and not all(move.arriving(row[0]) for row in rows):
        raise ValueError("a row of a key that does not arrive from the removed shard")
    if revision > s.revision:
        s.revision = revision  # every revision here exceeds the sources': a WATCH taken there never matches
    for key, value, deadline in rows:
        if value is None:
            s.drop_key(key)
        else:
            s.install_key(key, value, deadline)
    s.del_rev = max(s.del_rev, s.revision)
    s.changes.compact_to(s.revision)
    return len(rows)


def _ttl_sync(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_ttlsync epoch source rows``: a destination's keys from ``source`` get exactly the deadlines of
    ``rows`` (every key it receives from the frozen source that has one: ``mv_ttls``); returns the listed keys it
    does not hold (expired here first, on this shard's clock), whose values the caller then sends."""
    _, epoch, source, rows = cmd
    move = _receiving(s, epoch, "mv_ttlsync")
    if isinstance(move, CmdError):
        return move
    listed = dict(rows)
    for key in [k for k in (s.expiries.deadlines if s.expiries else ()) if k not in listed]:
        if _from_source(move, key, source):
            s.expiries.clear(key)  # e.g. PERSIST at the source after the pre-copy
    missing = []
    for key, deadline in listed.items():
        if key not in s.data:
            missing.append(key)
        elif s.expiries.get(key) != deadline:
            s.expiries.set(key, deadline)
    return missing


def _discard(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_discard epoch source after limit``: a destination forgets the keys it holds from ``source`` (what
    an earlier run's pre-copy left, a pre-copy the source's change log cannot bring up to date, or a removal
    given up: every key is then copied again, or none), looking at ``limit`` keys after ``after`` (None: from
    the first) at most; ``(forgotten, cursor)``, ``cursor`` None once every key was looked at.

    In slices because a removal's destination walks its own keys too: one walk over all of them in one entry
    held the node's driver thread, so every group's heartbeats, for 110-180 ms per 67,000 keys, long enough
    for elections (``raftMinTimeout`` 120 ms) and a second-long write at the start of every removal.  The
    form without ``after limit`` (version 2) walks every key and answers the count."""
    if len(cmd) == 3:
        (_, epoch, source), after, limit = cmd, None, None
    else:
        _, epoch, source, after, limit = cmd
        limit = max(1, min(int(limit), DISCARD_LOOK_MAX))
    move = _receiving(s, epoch, "mv_discard")
    if isinstance(move, CmdError):
        return move
    if s.arrived == 0:  # no key was installed since the move began here: none to forget, no walk (a removal's
        return 0 if limit is None else (0, None)  # destination would walk all of its own keys for nothing)
    walk = s.data.keys_between(b"" if after is None else after + b"\0")
    looked = list(walk if limit is None else itertools.islice(walk, limit))
    gone = [k for k in looked if _from_source(move, k, source)]
    for key in gone:
        s.drop_key(key)
    if limit is None:
        return len(gone)
    return len(gone), (looked[-1] if len(looked) == limit else None)


def _leased(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_leases epoch after limit`` (a frozen source): ``(rows, cursor)``, its moving keys attached to leases
    after ``after``, in key order, as ``(key, lease id)``; ``cursor`` None at the end."""
    _, epoch, after, limit = cmd
    move = _frozen_source(s, epoch, "mv_leases")
    if isinstance(move, CmdError):
        return move
    limit = max(1, min(int(limit), SCAN_LIMIT_MAX))
    keys = sorted(k for k in s.leases.key_lease if (after is None or k > after) and move.moving(k))
    rows = [(k, s.leases.key_lease[k]) for k in keys[:limit]]
    return rows, (keys[limit - 1] if len(keys) > limit else None)


def _lease_use(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_leaseuse pairs [home]``: on the leases' home shard (``home``, this shard; without it, the shard each
    id names), for each ``(lease id, shard)``, ``shard`` is told when the lease ends from now on; the ms each has
    left, None for one not alive here (``leases.use_for``)."""
    _, pairs, *home = cmd
    out = []
    for lid, shard in pairs:
        if isinstance(lid, bool) or not isinstance(lid, int) or isinstance(shard, bool) or not isinstance(shard, int):
            raise ValueError("pairs must be (lease id int, shard int)")
        out.append(leases.use_for(s, lid, shard, now_ms, home[0] if home else None))
    return tuple(out)


def _lease_homes(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_leasehomes epoch after limit`` (the removed shard, handed off): ``(rows, seq, cursor)``, its home
    leases and pending drops for ``leases.ADOPTIVE_HOME`` to adopt (``leases.homes``)."""
    _, epoch, after, limit = cmd
    move = s.move
    if move is None or move.epoch != epoch or move.phase != HANDOFF or not move.removing or move.shard != move.dest:
        return CmdError("ERR", f"mv_leasehomes: this shard is not the handed-off shard of removal {epoch}")
    return leases.homes(s, after, max(1, min(int(limit), SCAN_LIMIT_MAX)), now_ms)


def _lease_adopt(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_leaseadopt epoch origin rows last``: ``leases.ADOPTIVE_HOME`` takes the removed ``origin``'s leases
    (rows of ``mv_leasehomes``; ``last``: the adoption is complete); how many were taken (``leases.adopt``)."""
    _, epoch, origin, rows, last = cmd
    for v in (epoch, origin):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError("epoch and origin must be non-negative ints")
    if origin == leases.ADOPTIVE_HOME:
        raise ValueError(f"shard {leases.ADOPTIVE_HOME} adopts the others' leases, never its own")
    for lid, ttl_ms, remaining, shards in rows:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lid, ttl_ms, *shards)) or not (
                remaining is None or isinstance(remaining, int) and not isinstance(remaining, bool)):
            raise ValueError("rows must be (lease id, ttl ms, ms left or None, shards)")
    return leases.adopt(s, epoch, origin, rows, bool(last), now_ms)


def _lease_forget(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_leaseforget epoch shard``: on every shard that stays, after ``shard`` (removed) handed off: its leases
    stop telling ``shard`` of their end (KEEPALIVE, REVOKE, expiry), which holds nothing of theirs any more
    (its keys on leases moved with them, ``mv_attach``); leases and drops touched."""
    _, _epoch, shard = cmd
    if isinstance(shard, bool) or not isinstance(shard, int):
        raise ValueError("shard must be an int")
    return leases.forget_shard(s, shard)


def _attach(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``mv_attach epoch source rows``: a destination attaches the keys it received from ``source`` to their
    leases, rows ``(lease id, ms left or None, keys)`` (``mv_leases`` at the source, ``mv_leaseuse`` at each
    lease's home); a key of a lease that has ended is forgotten (``leases.attach_moved``). Keys attached."""
    _, epoch, source, rows = cmd
    move = _receiving(s, epoch, "mv_attach")
    if isinstance(move, CmdError):
        return move
    n = 0
    for lid, remaining, keys in rows:
        if remaining is not None and (isinstance(remaining, bool) or not isinstance(remaining, int)):
            raise ValueError("remaining must be an int or None")
        mine = [k for k in keys if _from_source(move, k, source) and k in s.data]
        n += leases.attach_moved(s, lid, remaining, mine, now_ms)
    return n


def _sessions(s: Any, cmd: tuple, now_ms: int) -> Any:
    """``(rows, cursor)``: up to ``limit`` sessions after ``after`` as ``(client, seq, result)``."""
    _, after, limit = cmd
    limit = max(1, min(int(limit), SCAN_LIMIT_MAX))
    ids = sorted(c for c in s.sessions if after is None or c > after)[:limit]
    rows = [(c, s.sessions[c][0], s.sessions[c][1]) for c in ids]
    return rows, (ids[-1] if len(ids) == limit else None)


def _checked(handler: Callable[[Any, tuple, int], Any]) -> Callable[[Any, tuple, int], Any]:
    """A malformed command (an operator's RAFTKV.RESHARD payload) is refused, the same on every replica."""
    @functools.wraps(handler)
    def run(s: Any, cmd: tuple, now_ms: int) -> Any:
        try:
            return handler(s, cmd, now_ms)
        except (ValueError, TypeError, IndexError, KeyError) as e:
            return CmdError("ERR", f"{cmd[0]}: malformed command: {e}")
    return run


HANDLERS = {name: _checked(h) for name, h in {
    "mv_precopy": _source_step(COPYING, "mv_precopy"), "mv_freeze": _source_step(FROZEN, "mv_freeze"),
    "mv_handoff": _handoff, "mv_purge": _purge, "mv_done": _done,
    "mv_abort": _abort, "mv_install": _install, "mv_apply": _apply_delta, "mv_ttlsync": _ttl_sync,
    "mv_discard": _discard, "mv_open": _open, "mv_status": _status, "mv_leaseuse": _lease_use,
    "mv_attach": _attach, "mv_leaseforget": _lease_forget, "mv_leaseadopt": _lease_adopt}.items()}
READ_HANDLERS = {name: _checked(h) for name, h in {
    "mv_status": _status, "mv_scan": _scan, "mv_get": _get, "mv_delta": _delta, "mv_ttls": _ttls,
    "mv_sessions": _sessions, "mv_leases": _leased, "mv_keys": _keys, "mv_leasehomes": _lease_homes}.items()}
WRITE_OPS = frozenset(HANDLERS) - {"mv_status"}

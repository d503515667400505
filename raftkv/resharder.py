"""``raftkv shard add|remove``: add one shard to a live cluster, or remove the last one, moving the keys the ring
change moves (the edge of ``raftkv.reshard``).

Theory of operation
-------------------
The per-key rules and the replicated commands are pure (``raftkv.reshard``); this module runs them,
in order, against the cluster of a cluster file, through ``RAFTKV.RESHARD`` (one ``mv_*`` command on
one shard's leader), ``RAFTKV.MAP`` pushes and ``RAFTKV.STATUS``. With ``E`` the map's epoch and
``N`` its shard count:

1. map ``E+1``: shard ``N``'s group is placed on the ``replication`` least loaded nodes (``adding =
   N``: hosted, not on the ring), saved and pushed; the nodes start the group. Once it has a
   leader, ``mv_install`` with no keys marks it ``incoming`` (it refuses every key).
2. every source: ``mv_precopy`` (``copying``: it refuses nothing), its revision ``R``, then its moving
   keys in chunks (``mv_scan``, linearizable reads) into the new shard (``mv_install``, through its
   log), while it keeps serving them; the sources in parallel.
3. every source shard ``0..N-1``: ``mv_freeze`` (writes of moving keys refused from that entry on),
   then wait until no prepared transaction holds a moving key (new PREPAREs are refused).
4. every source, in parallel: the copy is made exact: its changes of moving keys since ``R``, from its
   change log (``mv_delta``), replayed into the new shard (``mv_apply``: values written, deletions
   dropped), then the deadlines (``mv_ttls``/``mv_ttlsync``: EXPIRE changes no revision). When the log
   no longer holds every change since ``R``, or the source had no pre-copy to the end, the new shard
   forgets its keys from that source (``mv_discard``) and every key is copied again. Then its moving keys
   on leases are attached to their leases in the new shard (``mv_leases``, ``mv_leaseuse`` at each lease's
   home, ``mv_attach``), then its client sessions (higher sequence wins). Writes of moving keys wait only
   for this step.
5. every source: ``mv_handoff`` (reads of moving keys refused too, with ``-WRONGSHARD``).
6. the new shard: ``mv_open``; then map ``E+2`` (``shards = N+1``: the ring includes it) is saved
   and pushed.
7. every source: the moved keys are deleted in chunks (``mv_purge``), then ``mv_done``: the new
   ring owns the shard's keys from then on (a key it does not own is refused for good).

Every command is idempotent and keyed by epoch ``E+2``, and every step reads where the shard stands
first, so a run that died anywhere is finished by running ``raftkv shard add`` again: the map still
says ``adding`` (steps 1-6 resume), or a source still has its move in ``handoff`` (step 7 resumes).
Keys attached to leases move with their leases (step 4, ``_leases``): each lease's home shard is told
the new shard (so the lease's end reaches it) and the new shard keeps a mirror of the lease with those keys,
as ``SET ... LEASE`` makes on a shard other than the lease's home. Neither an add nor a removal starts (or resumes) while the nodes reachable report different
state machine versions, or one reports none (``reshard.version_refusal``): a rolling upgrade is finished first.

Removing the last shard ``S = N-1`` (``remove``) is the mirror image, keyed the same way by epoch ``E+2``:

1. map ``E+1``: ``removing = S`` (the ring still includes ``S``), saved and pushed.
2. every remaining shard ``d`` in ``0..S-1``: ``mv_install`` with no keys and ``removed = S`` marks it
   ``incoming`` for the keys arriving from ``S`` (refused until it opens); its own keys stay served.
3. ``S``: ``mv_freeze`` (every key of it is moving: writes refused), then wait until no prepared
   transaction holds one of its keys.
4. every ``d``: an empty ``mv_install`` carrying ``S``'s revision first (so every key installed there
   gets a revision above any ``S`` had), then ``S``'s keys in chunks, each to the shard the ring
   without ``S`` gives it, then ``S``'s client sessions into every ``d``.
5. ``S``: ``mv_handoff`` (every key refused with ``-WRONGSHARD``, and every lease command); shard 0 adopts
   the leases ``S`` granted and the drops it owed (``mv_leasehomes`` on ``S``, ``mv_leaseadopt`` on 0, in
   chunks; ``_adopt_leases``); every ``d``: ``mv_open``, then
   ``mv_leaseforget`` (its leases stop telling ``S`` of their end: ``S``'s keys on leases moved with their
   leases in step 4, as an add's do); then map ``E+2`` (``shards = N-1``, ``S``'s placement dropped, and in
   ``leases_moved`` the last lease id ``S`` granted: those ids now live on shard 0) is saved
   and pushed: the nodes stop ``S``'s
   group and reclaim its data (``Node.install_map``; a node takes the smaller map only once the removal
   was marked, ``member.shrink_allowed``).

A run that died anywhere is finished by running ``raftkv shard remove S`` again: while the map says
``removing`` steps 2-5 resume where the shards stand; once the map of ``E+2`` was saved, ``remove S``
finds ``S`` gone, pushes that map again and stops (without an id, a re-run would remove the next
last shard). The one undo, only while a node runs a state machine older than version 5 (which cannot move a
lease's home): leases homed on ``S`` found in step 3 (before any key is copied) abandon the removal: ``S`` and
every destination ``mv_abort``, and a map without the mark is saved.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import queue
import statistics
import time
from collections.abc import Callable
from typing import Any

from raftkv import leases, reshard
from raftkv.client import Client, RaftKVError
from raftkv.membership import MembershipError, Operator
from raftkv.progress import Progress
from raftkv.results import CmdError
from raftkv.server import rpc
from raftkv.state import LEASE_HOMES_VERSION
from shards.plan import key_movement

__all__ = ["ReshardError", "ReshardResult", "Resharder"]

#: Keys per Raft entry of the parts of a move that run while the keys are served (the pre-copy, the cleanup).
#: Every replica applies an entry on its node's one driver thread, holding that node's other requests: a
#: 1,000-key entry held them for tens of ms (the clients' p99 during a 50,000-key add: 7-14x steady state),
#: a 250-key one a quarter of that (docs/scale-out.md, "Measured").
CHUNK_KEYS = 100
#: The fraction of the time the pre-copy and the cleanup keep the cluster busy (``Pacer``; one source at a
#: time): with 100-key chunks, resting as long as each took kept the writers' p99 during a 40,000-key
#: add within 1.8-1.9x of before it, against 6.6-7.0x for 250-key chunks without rest; the add took 18-21 s
#: instead of 5-6 s
#: (docs/scale-out.md, "Measured"). ``raftkv shard add --pace 1 --chunk 250`` moves faster.
PACE = 0.5
#: Keys (or sessions) per entry while moving keys are frozen (writes of them wait): fewer, larger entries.
FROZEN_CHUNK_KEYS = 1_000
#: Chunks of one source's pre-copy being installed at once (each on a connection of its own) while the next is
#: read; the chunks hold distinct keys, so their order does not matter (the replay after the freeze makes the copy
#: exact whatever it was). 1: the next chunk is read while the last is installed. Deeper did not copy faster on
#: the shared 2-core machine (its disk and cores were the bound) and raised the clients' p99 (docs/scale-out.md).
PRECOPY_DEPTH = 1
POLL_S = 0.1


class ReshardError(MembershipError):
    """``shard add`` could not go on; the message says why and what to do (usually: run it again)."""


@dataclasses.dataclass
class ReshardResult:
    """What a run did: the new shard, keys moved, keys the sources held, per-step seconds."""

    shard: int
    epoch: int
    moved: int
    total: int
    purged: int
    seconds: dict[str, float]

    @property
    def fraction(self) -> float:
        return self.moved / self.total if self.total else 0.0


def place(m: Any) -> tuple[str, ...]:
    """The nodes for a new shard: the ``replication`` nodes holding fewest replicas (ties: by name)."""
    load = sorted(m.nodes, key=lambda n: (len(m.shards_on(n)), n))
    return tuple(load[: m.replication])


def _by_dest(rows: list, dest_of: Callable[[bytes], int]) -> list[tuple[int, tuple]]:
    """``rows`` (each a key first) grouped by the shard ``dest_of`` their key goes to, in shard order, each
    group a tuple of tuples (what an ``mv_install``/``mv_apply`` carries)."""
    batches: dict[int, list] = {}
    for row in rows:
        batches.setdefault(dest_of(row[0]), []).append(tuple(row))
    return [(d, tuple(part)) for d, part in sorted(batches.items())]


def _batches(items: list, size: int) -> list[list]:
    """``items`` in consecutive pieces of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def _batches_of_keys(rows: list[tuple], size: int) -> list[list[tuple]]:
    """``mv_attach`` rows ``(lease, left, keys)`` in consecutive groups of about ``size`` keys at most (a row is
    never split; each holds ``size`` keys at most), so one command stays under the request limit."""
    groups: list[list[tuple]] = [[]]
    count = 0
    for row in rows:
        if groups[-1] and count + len(row[2]) > size:
            groups.append([])
            count = 0
        groups[-1].append(row)
        count += len(row[2])
    return groups


def _median_ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.0f} ms" if seconds else "-"


class Pacer:
    """How long the background parts of a move (the pre-copy, the cleanup) rest between chunks, so that they
    keep the cluster busy at most ``duty`` of the time (1: never rest). Pure: the caller measures.

    Each chunk is a Raft entry every replica applies on its node's one driver thread: while it applies, that
    node's other requests wait. Resting as long as the chunk took (``duty`` 0.5) leaves the clients every
    other slice; what waits for the frozen part of a move (the replay) is never paced.
    """

    def __init__(self, duty: float = 1.0) -> None:
        if not 0 < duty <= 1:
            raise ValueError(f"pace must be in (0, 1], got {duty}")
        self.duty = duty

    def rest(self, busy_s: float) -> float:
        """Seconds to rest after a chunk that took ``busy_s``."""
        return max(0.0, busy_s) * (1 - self.duty) / self.duty


class Resharder:
    """Runs ``shard add`` (``run``) or ``shard remove`` (``remove``) against the cluster of ``op`` (module doc)."""

    def __init__(self, op: Operator, step_timeout: float = 120.0, chunk: int = CHUNK_KEYS,
                 say: Callable[[str], None] | None = None, pace: float = PACE, depth: int = PRECOPY_DEPTH,
                 progress: Callable[[Progress], None] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.op = op
        self.step_timeout = step_timeout
        self.version = LEASE_HOMES_VERSION  # the nodes' state machine version (``_check_versions``)
        self.chunk = chunk
        self.depth = depth
        self.pacer = Pacer(pace)
        self.say = say or op.say
        #: told how far each source's copy and clean-up have come, after every chunk (``raftkv.progress``)
        self.progress = progress
        self._copied: dict[int, int] = {}  # keys pre-copied per source in this run (the clean-up's estimate)
        self._client: Client | None = None
        self._client_epoch = -1
        self.rerun = "raftkv shard add"  # the command that finishes what a failed run left (said in errors)

    # -- talking to shards ------------------------------------------------------------------------------
    def _c(self) -> Client:
        if self._client is None or self._client_epoch != self.op.map.epoch:
            if self._client is not None:
                self._client.close()
            self._client = self._new_client()
            self._client_epoch = self.op.map.epoch
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _new_client(self) -> Client:
        return Client(cluster=self.op.map, timeout=self.step_timeout, **self.op.client_kw)

    def call(self, shard: int, *cmd: Any, client: Client | None = None) -> Any:
        """One ``mv_*`` command on ``shard`` (its leader; retried while it has none): its result. ``client``:
        a connection of a worker thread's own (the default one is the calling thread's)."""
        payload = rpc.encode(tuple(cmd))
        try:
            raw = (client or self._c())._request(shard, [b"RAFTKV.RESHARD", str(shard).encode(), payload],
                                                 write=False)
        except RaftKVError as e:
            raise ReshardError(f"shard {shard}: {cmd[0]} failed: {e}; run '{self.rerun}' again") from None
        res = rpc.decode(raw)
        if isinstance(res, CmdError):
            raise ReshardError(f"shard {shard}: {cmd[0]}: {res.code} {res.message}")
        return res

    def status(self, shard: int) -> dict:
        owner, move, locked, leased, keys, revision, *rest = self.call(shard, "mv_status")
        return {"owner": owner, "move": None if move is None else reshard.Move(*move), "locked": locked,
                "leased": leased, "keys": keys, "revision": revision, "unsettled": rest[0] if rest else 0}

    def _report(self, what: str, done: int, total: int | None, nbytes: int | None, started: float) -> None:
        if self.progress is not None:
            self.progress(Progress(what, done, total, nbytes, time.monotonic() - started))

    def _publish(self, new: Any) -> None:
        self.op._save(new, verbose=False)
        missed = self.op.push_map(verbose=False)
        if missed:
            self.say(f"map epoch {new.epoch}: not installed on {', '.join(missed)} (unreachable); a node reads "
                     "the cluster file when it starts (until it has this map, it answers -WRONGSHARD for moved keys)")

    def _wait_leader(self, shard: int) -> str:
        deadline = time.monotonic() + self.step_timeout
        while True:
            view = self.op.leader_view(self.op.statuses(), shard)
            if view is not None:
                return view[0]
            if time.monotonic() > deadline:
                raise ReshardError(f"shard {shard}: no leader after {self.step_timeout:.0f} s; check the nodes "
                                   f"and run '{self.rerun}' again")
            time.sleep(POLL_S)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> ReshardResult:
        """Add shard N (or finish the add a failed run left), moving its keys; see the module doc."""
        try:
            return self._run()
        finally:
            self.close()

    def _check_versions(self) -> None:
        """Refuse to move keys unless every node reachable runs one state machine version (``reshard``)."""
        statuses = self.op.statuses()
        unreached = sorted(set(self.op.map.nodes) - set(statuses))
        if unreached:
            self.say(f"could not check the state machine version of {', '.join(unreached)} (unreachable)")
        versions = {n: st.get("state_machine_version") for n, st in statuses.items()}
        why = reshard.version_refusal(versions)
        if why is not None:
            raise ReshardError(why)
        self.version = min((v for v in versions.values() if v is not None), default=LEASE_HOMES_VERSION)

    def _run(self) -> ReshardResult:
        times: dict[str, float] = {}
        t = time.monotonic()
        self._check_versions()
        m = self.op.map
        if m.removing is not None:
            raise ReshardError(f"shard {m.removing} is being removed; finish that first ('raftkv shard remove "
                               f"{m.removing}')")
        if m.adding is None:
            unfinished = self._unfinished_cleanup()
            if unfinished is not None:
                self.say(f"finishing the move of epoch {unfinished.epoch} to shard {unfinished.dest} "
                         "(an earlier run stopped before the cleanup ended)")
                self.op.push_map(verbose=False)  # that run may have died between saving the map and pushing it
                purged = self._cleanup(unfinished.epoch, times)
                return ReshardResult(unfinished.dest, unfinished.epoch, 0, 0, purged, times)
            dest = m.nshards
            nodes = place(m)
            # born: a new group, never one a node may still hold from an earlier shard of this id
            m = dataclasses.replace(m, epoch=m.epoch + 1, adding=dest, placement={**m.placement, dest: nodes},
                                    born={**m.born, dest: m.epoch + 1})
            self._publish(m)
            self.say(f"epoch {m.epoch}: shard {dest}'s group placed on {', '.join(nodes)} (not on the ring yet)")
        else:
            dest = m.adding
            self.say(f"resuming the add of shard {dest} (epoch {m.epoch}: its group is placed, not on the ring)")
            self.op.push_map(verbose=False)
        self._wait_leader(dest)
        epoch = self._move_epoch(m, dest)  # every mv_* command of this add is keyed by it
        sources = list(range(m.nshards))
        # The destination refuses every key until it opens, whatever map a node has.
        opened = self._mark_incoming(epoch, dest, m.vnodes)
        times["place"] = time.monotonic() - t
        moved = total = 0
        if not opened:
            t = time.monotonic()
            since = self._precopy(epoch, dest, m.vnodes, sources)
            times["precopy"] = time.monotonic() - t
            t = time.monotonic()
            phases = {s: self.call(s, "mv_freeze", epoch, s, dest, m.vnodes) for s in sources}
            self.say(f"frozen: {', '.join(f'shard {s} {p}' for s, p in phases.items())}")
            frozen = [s for s, p in phases.items() if p == reshard.FROZEN]
            stats = self._wait_unlocked(epoch, frozen)
            times["freeze"] = time.monotonic() - t
            t = time.monotonic()

            def install(d: int, rev: int, items: tuple, rows: tuple) -> tuple:
                return ("mv_install", epoch, d, m.vnodes, rev, items, rows)

            def finish(s: int) -> None:  # one source on a connection of its own: the sources go in parallel
                with self._new_client() as client:
                    how = self._catch_up(s, epoch, [dest], lambda _key: dest, install, stats[s]["revision"],
                                         since.get(s), client)
                    self.say(f"shard {s} -> shard {dest}: {how}")
                    self.call(s, "mv_handoff", epoch, client=client)

            if frozen:  # moving keys wait for the slowest source's final copy, not for the sum of them
                with concurrent.futures.ThreadPoolExecutor(len(frozen)) as pool:
                    list(pool.map(finish, frozen))
                moved = self.status(dest)["keys"]  # the new shard holds exactly the keys moved so far
                total = sum(stats[s]["keys"] for s in frozen)
            for s in sources:  # the ones a failed run froze and streamed already: handed off now if not yet
                if phases[s] != reshard.FROZEN:
                    self.call(s, "mv_handoff", epoch)
            times["copy"] = time.monotonic() - t
            self.call(dest, "mv_open", epoch)
        self.say(f"shard {dest} open; every source handed off: the map of epoch {epoch} puts it on the ring")
        t = time.monotonic()
        # The map whose ring includes the new shard: at the move's epoch, unless another change of the cluster
        # file (a node added or removed while the add was stopped) took the file past it: a map never goes back.
        m = dataclasses.replace(self.op.map, epoch=max(epoch, self.op.map.epoch + 1), nshards=dest + 1,
                                adding=None)
        self._publish(m)
        times["map"] = time.monotonic() - t
        self.say(f"epoch {m.epoch}: shard {dest} is on the ring ({dest + 1} shards)")
        purged = self._cleanup(epoch, times)
        return ReshardResult(dest, m.epoch, moved, total, purged, times)

    def remove(self, shard: int | None = None) -> ReshardResult:
        """Remove the last shard (``shard``: it, or None), moving its keys to the others, or finish the removal
        a failed run left; see the module doc."""
        try:
            return self._remove(shard)
        finally:
            self.close()

    def _remove(self, want: int | None) -> ReshardResult:
        times: dict[str, float] = {}
        t = time.monotonic()
        self._check_versions()
        m = self.op.map
        if m.adding is not None:
            raise ReshardError(f"shard {m.adding} is being added; finish that first ('raftkv shard add')")
        if m.removing is None:
            if want is not None and want == m.nshards:
                self.op.push_map(verbose=False)  # the run that removed it may have died before pushing this map
                self.say(f"there is no shard {want} (epoch {m.epoch}: shards 0..{m.nshards - 1}): removed already "
                         "(the map without it pushed again), or never added")
                return ReshardResult(want, m.epoch, 0, 0, 0, times)
            why = reshard.removal_refusal(m.nshards, want)
            if why is not None:
                raise ReshardError(f"cannot remove shard {want if want is not None else m.nshards - 1}: {why}")
            if self._unfinished_cleanup() is not None:
                raise ReshardError("an earlier 'raftkv shard add' stopped before its cleanup ended; run "
                                   "'raftkv shard add' again to finish it first")
            gone = m.nshards - 1
            leased = self.status(gone)["leased"]
            if leased and self.version < LEASE_HOMES_VERSION:  # (on a shard with no move: the leases homed there)
                raise ReshardError(f"shard {gone} is the home of {leased} lease(s) (alive, or telling other shards "
                                   "of their end); a lease's home shard cannot move: revoke those leases or let "
                                   "them expire, then run it again (nothing changed)")
            m = dataclasses.replace(m, epoch=m.epoch + 1, removing=gone)
            self.rerun = f"raftkv shard remove {gone}"
            self._publish(m)
            self.say(f"epoch {m.epoch}: shard {gone} is being removed (still on the ring while its keys move)")
        else:
            gone = m.removing
            self.rerun = f"raftkv shard remove {gone}"
            if want is not None and want != gone:
                raise ReshardError(f"shard {gone} is being removed; finish that first ('{self.rerun}')")
            self.say(f"resuming the removal of shard {gone} (epoch {m.epoch})")
            self.op.push_map(verbose=False)
        dests = list(range(gone))
        vnodes = m.vnodes
        epoch = self._removal_epoch(m, gone)  # every mv_* command of this removal is keyed by it

        def install(d: int, rev: int, items: tuple, rows: tuple) -> tuple:
            return ("mv_install", epoch, d, vnodes, rev, items, rows, gone)

        # The remaining shards refuse the keys arriving from the removed one until they open, whatever map a
        # node or client has; their own keys stay served.
        opened = {d for d in dests if self._is_open(d, epoch)}
        for d in dests:
            if d not in opened:
                self.call(d, *install(d, 0, (), ()))
        times["mark"] = time.monotonic() - t
        moved = total = 0
        ring = reshard.ring_of(gone, vnodes)
        t = time.monotonic()
        # Copy the removed shard's keys while it still serves them; once frozen, only what changed since is sent.
        since = None
        if self.call(gone, "mv_precopy", epoch, gone, gone, vnodes, True) == reshard.COPYING:
            for d in dests:  # what an earlier run's pre-copy left may hold keys deleted since
                self._discard(d, epoch, gone)
            gone_status = self.status(gone)
            since = gone_status["revision"]
            # One answer's keys go to every remaining shard: read as many per answer as there are shards, so that
            # each install still carries about a chunk (at one chunk per answer the removal's pre-copy ran 10x
            # slower: six round trips of ~17 keys each per answer).
            self._precopy_source(gone, epoch, since, ring.shard_for, install, f"shard {gone} -> shards 0..{gone - 1}",
                                 per_answer=self.chunk * len(dests), expect=gone_status["keys"])
        times["precopy"] = time.monotonic() - t
        t = time.monotonic()
        phase = self.call(gone, "mv_freeze", epoch, gone, gone, vnodes, True)
        self.say(f"frozen: shard {gone} {phase}")
        def undo() -> None:  # the destinations forget what was pre-copied and stop refusing; the mark goes
            for d in dests:
                self._discard(d, epoch, gone)
                self.call(d, "mv_abort", epoch)
            self._publish(dataclasses.replace(self.op.map, epoch=self.op.map.epoch + 1, removing=None))
            self.say(f"epoch {self.op.map.epoch}: the removal of shard {gone} was given up; nothing changed")

        if phase == reshard.FROZEN:
            stats = self._wait_unlocked(epoch, [gone], undo)
            times["freeze"] = time.monotonic() - t
            t = time.monotonic()
            revision = stats[gone]["revision"]
            for d in dests:  # revisions above the removed shard's before any key lands
                if d not in opened:
                    self.call(d, *install(d, revision, (), ()))
            with self._new_client() as client:
                how = self._catch_up(gone, epoch, dests, ring.shard_for, install, revision, since, client)
            total = stats[gone]["keys"]
            moved = total  # every key of the removed shard moves
            self.say(f"shard {gone} -> shards 0..{gone - 1}: {how}")
            self.call(gone, "mv_handoff", epoch)
            times["copy"] = time.monotonic() - t
        elif phase != reshard.HANDOFF:
            raise ReshardError(f"shard {gone}: mv_freeze answered {phase!r}; run '{self.rerun}' again")
        t = time.monotonic()
        adopted, last_seq = self._adopt_leases(epoch, gone)
        for d in dests:
            self.call(d, "mv_open", epoch)
        # Its keys on leases moved with their leases: no lease need tell the removed shard of its end any more.
        forgot = sum(self.call(d, "mv_leaseforget", epoch, gone) for d in dests)
        self.say(f"shard {gone} handed off; shards 0..{gone - 1} open"
                 + (f" ({forgot} lease(s) no longer tell it of their end)" if forgot else "")
                 + f": the map of epoch {epoch} drops it")
        # Nodes take the smaller map only from the one marking the removal: give it again to any that missed it.
        self.op.push_map(verbose=False)
        placement = {s: names for s, names in self.op.map.placement.items() if s != gone}
        born = {s: b for s, b in self.op.map.born.items() if s != gone}
        homes = dict(self.op.map.leases_moved)
        if last_seq > homes.get(gone, 0):  # ids it granted up to here live on shard 0 (raftkv.leases.home_in)
            homes[gone] = last_seq
        m = dataclasses.replace(self.op.map, epoch=max(epoch, self.op.map.epoch + 1), nshards=gone, removing=None,
                                placement=placement, born=born, leases_moved=homes)
        self._publish(m)
        times["map"] = time.monotonic() - t
        self.say(f"epoch {m.epoch}: shard {gone} removed ({gone} shard(s)); its group stops on every node"
                 + (f"; its {adopted} lease(s) live on shard {leases.ADOPTIVE_HOME}" if adopted else ""))
        return ReshardResult(gone, m.epoch, moved, total, 0, times)

    def _adopt_leases(self, epoch: int, gone: int) -> tuple[int, int]:
        """Once ``gone`` handed off (it refuses lease commands from then on), shard 0 adopts its home leases and
        pending drops, in chunks; returns how many were taken and the last sequence number ``gone`` granted (the
        new map's ``leases_moved``). Idempotent: a re-run takes none twice (``raftkv.leases.adopt``)."""
        if self.version < LEASE_HOMES_VERSION:
            return 0, 0
        after, taken, seq = None, 0, 0
        while True:
            rows, seq, after = self.call(gone, "mv_leasehomes", epoch, after, FROZEN_CHUNK_KEYS)
            taken += self.call(leases.ADOPTIVE_HOME, "mv_leaseadopt", epoch, gone, rows, after is None)
            if after is None:
                return taken, seq

    def _removal_epoch(self, m: Any, gone: int) -> int:
        """The epoch keying the removal of ``gone`` that map ``m`` marks: the one the shards already took part
        under (an earlier run stopped after marking a remaining shard or freezing the removed one), else
        ``m.epoch + 1`` (see ``_move_epoch``)."""
        move = self.status(gone)["move"]
        if move is not None and move.removing:
            return move.epoch
        for d in range(gone):
            st = self.status(d)
            if st["move"] is not None and st["move"].removing and st["move"].dest == gone:
                return st["move"].epoch
        # (A remaining shard opens only after the removed one handed off, which keeps its move until its group
        # is gone with the map of that epoch: so no open shard is missed here.)
        return m.epoch + 1

    def _is_open(self, shard: int, epoch: int) -> bool:
        owner = self.status(shard)["owner"]
        return owner is not None and owner[3] >= epoch

    def _move_epoch(self, m: Any, dest: int) -> int:
        """The epoch keying the add of ``dest`` that map ``m`` places: the one the shards already took part
        under (an earlier run stopped after marking the new shard or freezing a source), else ``m.epoch + 1``
        (nothing started yet: the map that puts the new shard on the ring). Not simply ``m.epoch + 1``: another
        change of the cluster file since that run (a node added or removed) raised the file's epoch, and a move
        keyed by a new epoch would re-mark an open new shard incoming and be refused by the frozen sources."""
        st = self.status(dest)
        if st["owner"] is not None:
            return st["owner"][3]
        if st["move"] is not None:
            return st["move"].epoch
        for s in range(m.nshards):
            move = self.status(s)["move"]
            if move is not None and move.dest == dest:
                return move.epoch
        return m.epoch + 1

    def _mark_incoming(self, epoch: int, dest: int, vnodes: int) -> bool:
        """Make the new shard refuse every key until it opens; True if it is open already (a re-run)."""
        st = self.status(dest)
        if st["owner"] is not None and st["owner"][3] >= epoch:
            return True
        self.call(dest, "mv_install", epoch, dest, vnodes, 0, (), ())
        return False

    def _wait_unlocked(self, epoch: int, frozen: list[int],
                       undo: Callable[[], None] | None = None) -> dict[int, dict]:
        """Until no prepared transaction holds a moving key of a frozen source. On nodes older than state machine
        version 5 a removal (``undo`` given) is abandoned if its shard is the home of a lease, running ``undo``;
        from version 5 its leases move to shard 0 (``_adopt_leases``); keys on leases move with their leases
        (``_leases``). Returns each source's last status."""
        deadline = time.monotonic() + self.step_timeout
        while True:
            stats = {s: self.status(s) for s in frozen}
            leased = {s: st["leased"] for s, st in stats.items() if st["leased"]}
            if leased and undo is not None and self.version < LEASE_HOMES_VERSION:
                for s in frozen:
                    self.call(s, "mv_abort", epoch)
                undo()
                raise ReshardError(f"the removed shard is the home of leases ({leased}); a lease's home shard "
                                   "cannot move, so the removal was abandoned (nothing was copied); revoke those "
                                   f"leases or let them expire, then run '{self.rerun}' again")
            locked = {s: st["locked"] for s, st in stats.items() if st["locked"]}
            # A removed shard is the home of the transactions whose first key it held: every one it committed
            # must have finished on all its shards first (after the removal a lock of one is finished as
            # aborted, reshard.home_removed).
            unsettled = {s: st["unsettled"] for s, st in stats.items()
                         if st["unsettled"] and st["move"] is not None and st["move"].removing}
            if not locked and not unsettled:
                return stats
            if time.monotonic() > deadline:
                raise ReshardError(f"transactions still hold moving keys ({locked}) or are committed and not yet "
                                   f"finished everywhere ({unsettled}) after {self.step_timeout:.0f} s; run "
                                   f"'{self.rerun}' again")
            time.sleep(POLL_S)

    # -- an add's copy: before the freeze, then what changed since ------------------------------------------
    def _precopy(self, epoch: int, dest: int, vnodes: int, sources: list[int]) -> dict[int, int]:
        """An add's sources, copied into ``dest`` while they still serve their keys (``copying``), so that once
        they are frozen only what changed since is sent. Returns, per source copied to the end here, the
        revision read before its copy began.

        The sources are copied one after another, each at the move's pace: every chunk lands on the one new
        shard, so copied in parallel they queued behind each other there, and each source, resting in
        proportion to a chunk's time including that queueing, left the new shard idle most of the time
        (docs/scale-out.md, "One source at a time")."""
        marked = {s: self.call(s, "mv_precopy", epoch, s, dest, vnodes) for s in sources}
        copying = [s for s, phase in marked.items() if phase == reshard.COPYING]
        # (a source frozen or handed off by an earlier run is copied in full, once frozen.) An earlier run's
        # pre-copy may have left keys the source deleted since: the new shard forgets them before this one.
        for s in copying:
            self._discard(dest, epoch, s)
        status = {s: self.status(s) for s in copying}
        since = {s: st["revision"] for s, st in status.items()}
        old = reshard.ring_of(dest, vnodes)
        shares = key_movement(old, old.with_shard(dest)).source_shares()

        def install(d: int, rev: int, items: tuple, rows: tuple) -> tuple:
            return ("mv_install", epoch, d, vnodes, rev, items, rows)

        for s in since:
            self._precopy_source(s, epoch, since[s], lambda _key: dest, install, f"shard {s} -> shard {dest}",
                                 expect=round(status[s]["keys"] * shares.get(s, 0.0)))
        return since

    def _precopy_source(self, source: int, epoch: int, revision: int, dest_of: Callable[[bytes], int],
                        install: Callable[[int, int, tuple, tuple], tuple], what: str,
                        per_answer: int | None = None, expect: int | None = None) -> None:
        """Copy ``source``'s moving keys (each to ``dest_of(key)``) while it serves them, reading its next chunk
        while the last is installed; says how much, and how fast."""
        started = time.monotonic()
        copied = size = 0
        scans: list[float] = []  # seconds per mv_scan answer
        installs: list[float] = []  # seconds per chunk installed (its mv_install commands)

        idle: queue.SimpleQueue[Client] = queue.SimpleQueue()  # the installers' connections not in use

        def put(batches: list[tuple[int, tuple]]) -> None:
            client = idle.get()
            try:
                t0 = time.monotonic()
                for d, rows in batches:
                    self.call(d, *install(d, revision, rows, ()), client=client)
                installs.append(time.monotonic() - t0)
            finally:
                idle.put(client)

        with contextlib.ExitStack() as stack:
            scanner = stack.enter_context(self._new_client())
            for _ in range(self.depth):
                idle.put(stack.enter_context(self._new_client()))
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(self.depth))
            after = None
            pending: collections.deque[concurrent.futures.Future] = collections.deque()
            while True:
                t0 = time.monotonic()
                items, after = self.call(source, "mv_scan", epoch, after, per_answer or self.chunk, client=scanner)
                scans.append(time.monotonic() - t0)
                if len(pending) >= self.depth:  # at most ``depth`` chunks in flight: wait for the oldest
                    pending.popleft().result()
                    time.sleep(self.pacer.rest(time.monotonic() - t0))
                if items:
                    pending.append(pool.submit(put, _by_dest(items, dest_of)))
                    copied += len(items)
                    size += sum(len(k) + len(v) for k, v, _d in items)
                    self._report(what, copied, expect, size, started)
                if after is None:
                    break
            while pending:
                pending.popleft().result()
        took = time.monotonic() - started
        self._copied[source] = copied
        self.say(f"{what}: pre-copied {copied} keys, {size / 1e6:.1f} MB of keys and values in {took:.1f} s "
                 f"({size / 1e6 / max(took, 1e-3):.1f} MB/s; still serving them); {len(installs)} chunk(s), "
                 f"median scan {_median_ms(scans)}, install {_median_ms(installs)}")

    def _catch_up(self, source: int, epoch: int, dests: list[int], dest_of: Callable[[bytes], int],
                  install: Callable[[int, int, tuple, tuple], tuple], revision: int, since: int | None,
                  client: Client) -> str:
        """Make the destinations' copy of frozen ``source``'s moving keys exact, and merge its sessions into
        them; what was done. After a pre-copy (``since``), replay the source's changes since then; else (no
        pre-copy to the end, or changes the log no longer holds) the destinations forget what they hold from
        ``source`` and every key is copied again."""
        replayed = None if since is None else self._replay(source, epoch, dests, dest_of, revision, since, client)
        if isinstance(replayed, int):
            leased = self._leases(source, epoch, dest_of, client)
            sessions = self._sessions(source, revision, dests, install, client)
            return (f"keys copied, {replayed} change(s) since the pre-copy replayed, {leased}, "
                    f"{sessions} session(s)")
        dropped = sum(self._discard(d, epoch, source, client) for d in dests)
        n, sessions = self._stream(source, epoch, revision, dest_of, dests, install, client)
        leased = self._leases(source, epoch, dest_of, client)
        why = "" if since is None else f" ({replayed}: {dropped} pre-copied key(s) dropped first)"
        return f"{n} keys copied{why}, {leased}, {sessions} session(s)"

    def _discard(self, dest: int, epoch: int, source: int, client: Client | None = None) -> int:
        """``dest`` forgets every key it holds from ``source``, one ``mv_discard`` slice per entry (a removal's
        destination walks its own keys too); how many it forgot."""
        n, after = 0, None
        while True:
            dropped, after = self.call(dest, "mv_discard", epoch, source, after, reshard.DISCARD_LOOK_MAX,
                                       client=client)
            n += dropped
            if after is None:
                return n

    def _leases(self, source: int, epoch: int, dest_of: Callable[[bytes], int], client: Client) -> str:
        """Attach the frozen ``source``'s moving keys that are on leases to the same leases at their destinations;
        what was done.

        Per lease and destination: the lease's home shard records the destination (from then on the lease's end
        reaches it, as for a key attached there by ``SET ... LEASE``) and says how long the lease has left; the
        destination then keeps a mirror of the lease with those keys (``mv_attach``; a key of a lease that has
        ended is forgotten, as its end deletes it at the source). Twice: a KEEPALIVE between the first
        ``mv_leaseuse`` and the first ``mv_attach`` could not refresh a mirror that did not exist yet; one after
        the first ``mv_attach`` refreshes it, and the second ``mv_leaseuse`` comes after that, so the mirror's
        guard is never behind the lease."""
        keys_of: dict[tuple[int, int], list[bytes]] = collections.defaultdict(list)  # (lease, dest) -> keys
        after = None
        while True:
            rows, after = self.call(source, "mv_leases", epoch, after, reshard.SCAN_LIMIT_MAX, client=client)
            for key, lid in rows:
                keys_of[(lid, dest_of(key))].append(key)
            if after is None:
                break
        if not keys_of:
            return "no key on a lease"
        by_home: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for lid, d in keys_of:
            by_home[leases.home_in(lid, self.op.map.leases_moved)].append((lid, d))
        attached = 0
        for _round in range(2):
            left: dict[tuple[int, int], int | None] = {}
            for home, pairs in by_home.items():
                for part in _batches(pairs, FROZEN_CHUNK_KEYS):
                    cmd = ("mv_leaseuse", tuple(part)) + ((home,) if self.version >= LEASE_HOMES_VERSION else ())
                    left.update(zip(part, self.call(home, *cmd, client=client), strict=True))
            by_dest: dict[int, list[tuple]] = collections.defaultdict(list)
            for (lid, d), keys in keys_of.items():
                for part in _batches(keys, FROZEN_CHUNK_KEYS):
                    by_dest[d].append((lid, left[(lid, d)], tuple(part)))
            attached = 0
            for d, rows in by_dest.items():
                for part in _batches_of_keys(rows, FROZEN_CHUNK_KEYS):
                    attached += self.call(d, "mv_attach", epoch, source, tuple(part), client=client)
        moved = sum(len(k) for k in keys_of.values())
        ended = len({lid for (lid, _d), v in left.items() if v is None})
        return (f"{attached} of {moved} moving key(s) on {len({lid for lid, _d in keys_of})} lease(s) attached "
                f"at the destination" + (f" ({ended} lease(s) had ended: their keys go with them)" if ended else ""))

    def _replay(self, source: int, epoch: int, dests: list[int], dest_of: Callable[[bytes], int], revision: int,
                since: int, client: Client) -> int | str:
        """Replay into the destinations the frozen ``source``'s changes of moving keys since ``since`` (its
        change log: ``mv_delta``, ``mv_apply``), then give their keys from it the source's deadlines
        (``mv_ttlsync``: EXPIRE and PERSIST change no revision). The rows replayed, or why not: ``"compacted"``
        (the log no longer holds every change since), ``"too many"`` deadlines for one command."""
        def apply(rows: list) -> None:
            for d, part in _by_dest(rows, dest_of):
                self.call(d, "mv_apply", epoch, revision, part, client=client)

        after = since
        replayed = 0
        while after is not None:
            got = self.call(source, "mv_delta", epoch, since, after, reshard.SCAN_LIMIT_MAX, client=client)
            if got == "compacted":
                return got
            rows, after = got
            apply(rows)
            replayed += len(rows)
        ttls = self.call(source, "mv_ttls", epoch, client=client)
        if ttls == "too many":
            return ttls
        missing: list = []
        for d in dests:  # every destination, even with none listed: it may hold deadlines the source dropped
            mine = tuple(tuple(row) for row in ttls if dest_of(row[0]) == d)
            missing += self.call(d, "mv_ttlsync", epoch, source, mine, client=client)
        if missing:  # copied, then expired at a destination before the source: its value, from the frozen source
            apply(self.call(source, "mv_get", epoch, tuple(missing), client=client))
        return replayed

    def _stream(self, source: int, epoch: int, revision: int, dest_of: Callable[[bytes], int], dests: list[int],
                install: Callable[[int, int, tuple, tuple], tuple],
                client: Client | None = None) -> tuple[int, int]:
        """Copy ``source``'s moving keys (each to ``dest_of(key)``), then its client sessions (to every shard of
        ``dests``); (keys, sessions). ``install(dest, revision, items, sessions)`` is the ``mv_install``
        command of this move."""
        keys = 0
        after = None
        while True:
            items, after = self.call(source, "mv_scan", epoch, after, max(self.chunk, FROZEN_CHUNK_KEYS),
                                     client=client)
            for dest, rows in _by_dest(items, dest_of):
                self.call(dest, *install(dest, revision, rows, ()), client=client)
                keys += len(rows)
            if after is None:
                break
        return keys, self._sessions(source, revision, dests, install, client)

    def _sessions(self, source: int, revision: int, dests: list[int],
                  install: Callable[[int, int, tuple, tuple], tuple], client: Client | None) -> int:
        """Merge ``source``'s client sessions into every shard of ``dests`` (higher sequence wins); how many."""
        sessions = 0
        after = None
        while True:
            rows, after = self.call(source, "mv_sessions", after, max(self.chunk, FROZEN_CHUNK_KEYS),
                                    client=client)
            if rows:
                for dest in dests:
                    self.call(dest, *install(dest, revision, (), tuple(rows)), client=client)
                sessions += len(rows)
            if after is None:
                return sessions

    def _unfinished_cleanup(self) -> reshard.Move | None:
        """A source whose move was handed off but not cleaned up (a run died after the map went out)."""
        for s in range(self.op.map.nshards):
            move = self.status(s)["move"]
            if move is not None and move.phase == reshard.HANDOFF:
                return move
        return None

    def _cleanup(self, epoch: int, times: dict[str, float]) -> int:
        """Delete the moved keys from every source, then make the new ring their owner; keys deleted."""
        t = time.monotonic()
        purged = 0
        for s in range(self.op.map.nshards):
            move = self.status(s)["move"]
            if move is None or move.epoch != epoch or move.phase != reshard.HANDOFF:
                continue
            after = None
            started, deleted = time.monotonic(), 0
            while True:
                t0 = time.monotonic()
                keys, after = self.call(s, "mv_keys", epoch, after, self.chunk)
                if keys:
                    purged += self.call(s, "mv_purge", epoch, tuple(keys))
                    deleted += len(keys)
                    self._report(f"shard {s}: deleting moved keys", deleted, self._copied.get(s), None, started)
                if after is None:
                    break
                time.sleep(self.pacer.rest(time.monotonic() - t0))
            self.call(s, "mv_done", epoch)
        times["cleanup"] = time.monotonic() - t
        return purged

"""Run one state-machine command on its shard's leader, and account for every attempt.

Theory of operation
-------------------
``execute(shard, cmd)`` proposes ``cmd`` locally when this node's replica leads
the shard, and otherwise sends the *same command* to the leader's node over the
internal RPC (``raftkv.server.rpc``), which runs ``execute`` there.  A command
never changes form on its way: a session-wrapped write stays session-wrapped,
so the state machine de-duplicates it wherever it lands.

An attempt ends in one of three ways: *applied* (the result), *not applied*
(nothing happened: retry anywhere) or *unknown* (the entry may still commit).
The answer accounts for every attempt, not just the last:

* a read may be retried after any failure;
* a write the state machine de-duplicates (``idempotent``: session-wrapped,
  2PC messages) may be retried after an unknown outcome too;
* any other write answers ``-UNKNOWN`` as soon as an attempt ends unknown;
* once any attempt of a write *may* have applied, the final answer is the
  applied result or ``-UNKNOWN`` -- never ``-TRYAGAIN``/``-NOQUORUM``, which
  promise "not applied, safe to retry".

Keys locked by a prepared transaction make a command wait (and resolve the
lock at its home shard once it is old), up to the request timeout.  So do keys
being moved to a new shard (``-MOVING``, ``raftkv.reshard``): nothing was
applied, and the move ends soon (``-LOCKED`` too: nothing was applied).  ``-WRONGSHARD`` (the key lives on another
shard now) is answered at once: the command must be routed again with a newer
map; like every refusal, it becomes ``-UNKNOWN`` if an earlier attempt may have
applied.

A command waits for ``-MOVING`` keys, and for locked keys, on the node it came
in to, not on the leader it was forwarded to: the leader answers a forwarded
one at once (``-MOVING``, ``-LOCKED``; it still starts resolving an old lock)
and the first node sends it again (after ``retry_sleep_s``) until the move
ends, the lock goes, or its time is up.  A node forwards all its commands for
one peer over one link, whose replies come back in order
(``raftkv.server.conn``): a command waiting seconds at the leader held the
reply of every command forwarded after it (seen: a shard add's freeze of one
source, forwarded behind a write of a key another source had just frozen,
answered 4.5 s later, when that write's time ran out; and a transaction's
PREPARE vote, forwarded behind a read of a key that very PREPARE had locked:
the coordinator heard nothing until its prepare timeout, 1.5 s, and every
command on those keys waited with it).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from raftkv import reshard
from raftkv.protocol import Error
from raftkv.replica import APPLIED, NOT_APPLIED, UNKNOWN
from raftkv.results import CmdError, Locked
from raftkv.server.batch import Proposer, Reader
from raftkv.server.peer import PeerLink, PeerRefused, PeerUnreachable

if TYPE_CHECKING:
    from raftkv.replica import ShardReplica
    from raftkv.server.api import NodeAPI

HOPS_MAX = 2  # origin -> a replica node -> its leader; never further, so forwarding cannot loop
# Errors a forwarded attempt answers when nothing ran there: retry (after re-resolving the leader).
_NOT_RUN = {"MOVED", "TRYAGAIN", "NOQUORUM", "STORAGE"}
# State-machine refusals of a key being moved between shards (raftkv.reshard): nothing was applied.
_MOVE_CODES = {"MOVING", "WRONGSHARD"}


class Attempts:
    """Outcome accounting over all attempts of one command (pure; see module doc)."""

    def __init__(self, shard: int, read: bool, idempotent: bool) -> None:
        self.shard = shard
        self.read = read
        self.retry_unknown = read or idempotent
        self.maybe_applied = False  # some attempt of this write may have been applied
        self.doubt = ""  # why, for the message
        self.last = "no attempt"

    def unknown(self, why: str) -> Error | None:
        """An attempt ended unknown: the final answer now, or None to retry."""
        self.last = why
        if not self.read:
            self.maybe_applied = True
            self.doubt = self.doubt or why
        if self.retry_unknown:
            return None
        return Error("UNKNOWN", f"shard {self.shard}: outcome unknown ({why}); the write may or may not "
                                "have been applied")

    def not_applied(self, why: str) -> None:
        self.last = why

    def give_up(self, code: str, message: str) -> Error:
        """The answer when time is up: ``code`` unless an earlier attempt may have applied."""
        if self.maybe_applied:
            return Error("UNKNOWN", f"shard {self.shard}: outcome unknown: an earlier attempt may have been "
                                    f"applied ({self.doubt}); then: {self.last}")
        return Error(code, message)


class Router:
    """The request path below the command handlers: local batchers, leader lookup, forwarding."""

    def __init__(self, node: NodeAPI) -> None:
        self.node = node
        self.proposers: dict[int, Proposer] = {}
        self.readers: dict[int, Reader] = {}
        self.peers: dict[str, PeerLink] = {}
        self.forwarded = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for s, r in self.node.replicas.items():
            self.adopt(s, r)

    def adopt(self, shard: int, replica: ShardReplica) -> None:
        """Batch ``shard``'s commands through ``replica`` (a group started here); before ``start``, ``start`` does it."""
        if self.loop is None:
            return
        limit = self.node.limits.batch_cmds_max
        self.proposers[shard] = Proposer(replica, self.loop, limit, self.node.metrics.proposals)
        self.readers[shard] = Reader(replica, self.loop, limit)

    def drop(self, shard: int) -> None:
        """Forget ``shard``'s batchers (its group stopped here): its commands go to its leader's node, and those
        waiting on this node's member are answered now (they would wait for their request timeout)."""
        for batchers in (self.proposers, self.readers):
            batcher = batchers.pop(shard, None)
            if batcher is not None:
                batcher.close(f"shard {shard}'s group stopped on node {self.node.name}")

    # -- leaders ----------------------------------------------------------------------------
    def leader_node(self, shard: int) -> str | None:
        """The node to send ``shard``'s commands to, as this node believes (None: no leader known)."""
        node = self.node
        replica = node.replicas.get(shard)
        if replica is not None:
            addr = replica.leader_addr()
            return None if addr is None else node.map.node_for_raft_addr(addr)
        # Not hosted here: a replica node forwards on to its leader (none: a shard the map no longer has).
        if shard not in node.map.groups:
            return None
        names = [n.name for n in node.map.replicas(shard)]
        return names[0] if names else None

    def link(self, target: str) -> PeerLink:
        link = self.peers.get(target)
        if link is None:
            info = self.node.map.nodes[target]
            node = self.node

            def identify(nonce: bytes) -> list[bytes]:
                mac = node.security.node_mac(node.map.name, nonce, node.name)
                return [b"RAFTKV.NODEAUTH", node.name.encode(), mac]

            link = self.peers[target] = PeerLink(info.host, info.client_port, identify, node.security.peer_ssl())
        return link

    # -- the core ---------------------------------------------------------------------------
    async def execute(self, shard: int, cmd: tuple, *, read: bool = False, idempotent: bool = False,
                      hops: int = 0, budget_s: float | None = None) -> Any:
        """Run ``cmd`` on ``shard``'s leader: its result, or an ``Error`` (see module doc).

        ``read``: the command changes nothing.  ``idempotent``: the state machine
        de-duplicates it (session-wrapped, 2PC message), so it may be re-sent even
        after an unknown outcome.  ``budget_s``: the caller's remaining time.
        """
        node = self.node
        timing = node.timing
        loop = asyncio.get_running_loop()
        budget = timing.request_timeout_s if budget_s is None else min(budget_s, timing.request_timeout_s)
        deadline = loop.time() + budget
        acc = Attempts(shard, read, idempotent)
        no_leader_since: float | None = None
        locked: str | None = None  # the leader's LOCKED message while the last attempt met a lock
        while True:
            now = loop.time()
            if now > deadline:
                if locked is not None:  # time ran out waiting for a lock (the sleep overshot): say so
                    return acc.give_up("LOCKED", locked)
                return acc.give_up("TRYAGAIN", f"shard {shard}: not applied ({acc.last}); retry")
            replica = node.replicas.get(shard)
            if replica is not None and replica.is_leader():
                failure = node.storage_failure()
                if failure is not None:  # a frozen leader: its groups stopped, nothing proposed here would commit
                    return Error("STORAGE", f"node {node.name} stopped its Raft groups: {failure}; not applied "
                                            "(free disk space and restart the node)")
                no_leader_since = None
                if cmd[0] == "tx_prepare":  # wait-die: a younger one may not overtake an older (raftkv.waitdie)
                    sent, claim = node.txns.gate_prepare(shard, cmd)
                    try:
                        kind, res = await self._local(shard, sent, read, deadline - loop.time())
                    except BaseException:
                        node.txns.ungate(claim)
                        raise
                    res = node.txns.ungate(claim, kind, res)
                else:
                    kind, res = await self._local(shard, cmd, read, deadline - now)
                locked = None
                if kind == APPLIED:
                    if isinstance(res, Locked):
                        locked = f"key {res.key!r} is locked by transaction {res.txid}"
                        if hops > 0:  # a forwarded command waits at the node it came in to (see module doc)
                            node.txns.lock_met(shard, res)  # an old lock is resolved from here all the same
                            acc.not_applied(locked)
                            return acc.give_up("LOCKED", locked)
                        if loop.time() > deadline:
                            return acc.give_up("LOCKED", locked)
                        await node.txns.wait_for_lock(shard, res, deadline - loop.time())
                        continue
                    if isinstance(res, CmdError) and res.code in _MOVE_CODES:
                        acc.not_applied(f"{res.code} {res.message}")
                        # A forwarded command waits at the node it came in to (see module doc), never here.
                        if res.code == "WRONGSHARD" or hops > 0 or loop.time() + timing.retry_sleep_s > deadline:
                            return acc.give_up(res.code, res.message)
                        await asyncio.sleep(timing.retry_sleep_s)  # the freeze ends when the keys have moved
                        continue
                    return res
                if kind == UNKNOWN:
                    answer = acc.unknown(str(res))
                    if answer is not None:
                        return answer
                else:
                    acc.not_applied(str(res))
                await asyncio.sleep(timing.retry_sleep_s)
                continue
            target = self.leader_node(shard)
            if target is not None and target != node.name and hops < HOPS_MAX:
                no_leader_since = None
                reply = await self._forward(target, shard, cmd, read, idempotent, hops, deadline - now)
                locked = None
                if isinstance(reply, PeerUnreachable):
                    if reply.sent:
                        answer = acc.unknown(f"lost contact with leader {target} after sending: {reply}")
                        if answer is not None:
                            return answer
                    else:
                        acc.not_applied(f"leader {target} unreachable: {reply}")
                elif isinstance(reply, Error) and reply.code == "UNKNOWN":
                    if acc.unknown(f"{target}: {reply.message}") is not None:
                        return reply  # the leader's own account of it
                elif isinstance(reply, Error) and reply.code in _NOT_RUN:
                    acc.not_applied(f"{target}: {reply}")
                elif isinstance(reply, Error) and reply.code == "LOCKED":
                    acc.not_applied(f"{target}: LOCKED {reply.message}")
                    locked = reply.message
                    # Locked: wait here, where the command came in (re-sent until the lock goes or time is up),
                    # as for MOVING; a node that was itself forwarded to answers at once, as the leader did.
                    if hops > 0 or loop.time() + timing.retry_sleep_s > deadline:
                        return acc.give_up("LOCKED", reply.message)
                elif isinstance(reply, (Error, CmdError)) and reply.code in _MOVE_CODES:
                    acc.not_applied(f"{target}: {reply.code} {reply.message}")
                    # MOVING: wait here, where the command came in (it is re-sent until the move ends or time is
                    # up); a node that was itself forwarded to answers at once, as the leader did.
                    if reply.code == "WRONGSHARD" or hops > 0 or loop.time() + timing.retry_sleep_s > deadline:
                        return acc.give_up(reply.code, reply.message)
                elif isinstance(reply, PeerRefused):
                    # Nothing ran there, and re-sending cannot help until the nodes' maps agree (this node
                    # was just removed, or added and the leader has not heard yet): the client goes to the
                    # leader itself.  An earlier attempt may still have applied.
                    acc.not_applied(f"{target} refused the forwarded request: {reply}")
                    return acc.give_up("TRYAGAIN", f"shard {shard}: not applied: leader {target} refused this "
                                                   f"node's forwarded request ({reply}); retry on the leader")
                elif isinstance(reply, Error) and acc.maybe_applied:
                    # The leader's refusal covers this attempt only: an earlier one may have applied.
                    return acc.give_up(reply.code, reply.message)
                else:
                    return reply
                await asyncio.sleep(timing.retry_sleep_s)
                continue
            if hops >= HOPS_MAX or (target == node.name and replica is None):
                return acc.give_up("MOVED", f"{shard} this node does not lead shard {shard}")
            if replica is None and shard not in node.map.groups:
                # (a transaction's home shard that `raftkv shard remove` took away, named by an older message)
                return acc.give_up("WRONGSHARD", f"{node.map.epoch} {shard} shard {shard} is not in this node's "
                                                 f"map (epoch {node.map.epoch}); not applied")
            # No leader known (an election is under way, or no majority).
            if no_leader_since is None:
                no_leader_since = now
            if now - no_leader_since > timing.leader_wait_s:
                return acc.give_up("NOQUORUM", f"shard {shard} has no leader (waited "
                                               f"{now - no_leader_since:.1f} s); is a majority of its replicas "
                                               "up and connected?")
            acc.not_applied("no leader")
            await asyncio.sleep(timing.retry_sleep_s)

    async def _local(self, shard: int, cmd: tuple, read: bool, timeout: float) -> tuple[str, Any]:
        faults = self.node.faults
        # Fault points (tests only): exec.unknown takes precedence over exec.not_applied.
        report_unknown = not read and faults.fire("exec.unknown", cmd) is not None
        if not read and not report_unknown and faults.fire("exec.not_applied", cmd):
            return NOT_APPLIED, "fault point exec.not_applied"
        fut = (self.readers if read else self.proposers)[shard].submit(cmd)
        try:
            async with asyncio.timeout(max(0.05, timeout)):  # on expiry the reply future is cancelled
                kind, res = await fut
        except TimeoutError:
            return UNKNOWN, "timeout"
        if kind == APPLIED and report_unknown:
            return UNKNOWN, "fault point exec.unknown (the entry was applied)"
        return kind, res

    async def _forward(self, target: str, shard: int, cmd: tuple, read: bool, idempotent: bool, hops: int,
                       timeout: float) -> Any:
        self.forwarded += 1
        # The leader gets a little less time than we have, so its answer arrives before our deadline.
        budget = max(0.05, timeout * 0.9 - 0.02)
        try:
            return await self.link(target).rpc(("exec", shard, cmd, read, idempotent, hops + 1, budget), timeout)
        except (PeerUnreachable, PeerRefused) as e:
            return e

    # -- commands that must act on the leader's replica itself --------------------------------
    async def leader_elsewhere(self, shard: int, req: list[bytes], hops: int) -> Any:
        """None once this node's replica of ``shard`` leads; otherwise the reply of running
        ``req`` on the leader's node (or an error when there is none in time).

        For commands that act on the leader's replica rather than through a log entry
        (membership, backup dumps, leadership transfer).
        """
        node = self.node
        loop = asyncio.get_running_loop()
        deadline = loop.time() + node.timing.request_timeout_s
        while True:
            replica = node.replicas.get(shard)
            if replica is not None and replica.is_leader():
                return None
            leader = self.leader_node(shard)
            if leader is not None and leader != node.name and hops < HOPS_MAX:
                try:
                    return await self.link(leader).rpc(("leader", shard, tuple(req), hops + 1),
                                                       max(0.1, deadline - loop.time()))
                except PeerUnreachable as e:
                    code = "UNKNOWN" if e.sent else "TRYAGAIN"
                    return Error(code, f"shard {shard}: leader {leader} unreachable ({e}); retry")
                except PeerRefused as e:
                    return Error("TRYAGAIN", f"shard {shard}: not run: leader {leader} refused this node's "
                                             f"forwarded request ({e}); retry on the leader")
            if loop.time() > deadline:
                return Error("NOQUORUM", f"shard {shard} has no leader; retry")
            await asyncio.sleep(0.05)

    async def stale_read(self, shard: int, cmd: tuple) -> Any:
        """``cmd`` (a get) on the local copy, without proving leadership: may be stale."""
        replica = self.node.replicas.get(shard)
        if replica is None:
            return await self.execute(shard, cmd, read=True)
        state = replica.state
        if state.owner is not None or state.move is not None:  # moved to another shard: no value, even stale
            refused = reshard.refusal(state.owner, state.move, cmd[1], write=False)
            if refused is not None and refused.code == "WRONGSHARD":
                return Error(refused.code, refused.message)
        entry = state.lookup(cmd[1], replica.log_now_ms())
        if cmd[0] == "get":
            return None if entry is None else entry[0]
        return entry

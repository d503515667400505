"""What command modules and plug-ins may use of a node: ``NodeAPI``, limits, timing, faults.

Command handlers (``raftkv.server.commands``), the transaction coordinator and
the leader balancer see a node only through ``NodeAPI``; they never reach into
its members.  Everything here is plain data or a protocol: no I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from raftkv.acl import Access, AclTable
from raftkv.heap import FREEZE_PERIOD_S, HeapFreezer
from raftkv.protocol import Error
from raftkv.results import Locked

if TYPE_CHECKING:
    from raftkv.engine import Engine
    from raftkv.replica import ShardReplica
    from raftkv.security import Security
    from shards.shardmap import NodeInfo, ShardMap


@dataclass(frozen=True)
class Limits:
    """Protective limits of a node; every one answers with a clear error."""

    request_bytes_max: int = 1536 * 1024  # like etcd's --max-request-bytes (1.5 MiB)
    args_max: int = 1024 * 1024  # arguments in one request (Redis: 1M)
    key_bytes_max: int = 64 * 1024
    value_bytes_max: int = 1024 * 1024
    clients_max: int = 10_000
    pipeline_depth_max: int = 1024  # in-flight commands per connection (back-pressure beyond)
    idle_timeout_s: float = 0.0  # 0 = never close idle connections (Redis default)
    batch_cmds_max: int = 2048


@dataclass(frozen=True)
class Timing:
    """How long a node waits for things; every wait ends with an answer."""

    request_timeout_s: float = 5.0  # give up (unknown/noquorum) after this long (`raftkv serve --request-timeout`)
    leader_wait_s: float = 3.0  # how long to wait for a shard to elect a leader
    retry_sleep_s: float = 0.02
    balance_period_s: float = 0.0  # leader balancer period; 0 = off
    # Cross-shard writes in one consensus round (parallel commits).  Off: classic 2PC in three rounds,
    # the only protocol nodes of earlier versions understand (turn off while any such node remains).
    txn_parallel_commits: bool = True
    # Wait-die for transactions that carry a priority (raftkv.waitdie): a PREPARE is held back for younger
    # lock holders, and the node's own retries (MSET, EXEC) carry one.  Off: no-wait only, as before.
    txn_wait_die: bool = True
    # Freeze the survivors of the garbage collector this often (raftkv.heap: short full collections in a node
    # with a large long-lived heap; `raftkv serve --gc-freeze-period`); 0: never.
    gc_freeze_period_s: float = FREEZE_PERIOD_S


class BadRequest(Exception):
    """A request refused before it ran; ``error`` is the reply."""

    def __init__(self, error: Error) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Command:
    """One entry of the command table: arity as in Redis (n exact, -n at least n, name included)."""

    arity: int
    handler: Callable[..., Any]  # (node: NodeAPI, conn: Conn, req: list[bytes]) -> reply | future
    leader_only: bool = False  # acts on the shard leader's replica; may be run there for another node
    internal: bool = False  # node to node only: refused (-NOPERM) unless the connection proved it is a node
    # What the request needs of a user's roles (raftkv.acl); None: a connection command, always allowed.
    access: Callable[[list[bytes]], Access] | None = None
    read: bool = False  # served by ReadIndex (or locally when stale): waits for the connection's writes
    no_auth: bool = False  # allowed before AUTH


def admin_access(req: list[bytes]) -> Access:
    """Operator commands: the ``admin`` category, no keys."""
    return Access("admin")


# -- fault points ---------------------------------------------------------------------------------

FAULT_POINTS = {
    "txn.after_prepare": "coordinator sleeps VALUE seconds once every participant voted",
    "txn.after_decide": "coordinator sleeps VALUE seconds once the decision is applied",
    "txn.partial_prepare": "a parallel-commit coordinator sends the record and the home shard's PREPARE only, "
                           "then sleeps VALUE seconds before the other PREPAREs",
    "exec.unknown": "a local proposal is applied, then reported as an unknown outcome",
    "exec.not_applied": "a local proposal is refused (not proposed, reported as not applied)",
    "clock.skew_ms": "the node's clock for log time (leases, expiry) reads VALUE ms ahead (negative: behind); "
                     "RAFTKV.FAULT CLOCK.SKEW_MS changes it at run time",
    "disk.slow_ms": "every durable commit of the node's storage engine takes VALUE ms longer (a slow fsync); "
                    "RAFTKV.FAULT DISK.SLOW_MS changes it at run time",
    "compact.now": "allows RAFTKV.FAULT COMPACT.NOW SHARD: the node's replica of SHARD (-1: every replica) "
                   "checkpoints and compacts its log at its next tick, caught-up followers or not (VALUE unused)",
    "status.state_machine_version": "RAFTKV.STATUS reports state machine version VALUE (negative: none, as a node "
                                    "older than the field does), as a node of another version would",
}


@dataclass
class Fault:
    """One armed fault point: fires for commands whose text contains ``match``, ``count`` times (0 = always)."""

    point: str
    value: float = 0.0
    count: int = 0
    match: str = ""
    fired: int = 0

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """``POINT[:VALUE[:COUNT[:MATCH]]]``, e.g. ``txn.after_prepare:60:1:k1``."""
        point, *rest = spec.split(":", 3)
        if point not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {point!r}; known: {', '.join(sorted(FAULT_POINTS))}")
        rest += [""] * (3 - len(rest))
        try:
            return cls(point, float(rest[0] or 0), int(rest[1] or 0), rest[2])
        except ValueError:
            raise ValueError(f"bad fault spec {spec!r}: want POINT[:VALUE[:COUNT[:MATCH]]]") from None


@dataclass
class Faults:
    """Fault points a test or the fault harness armed when it started the node (none in production)."""

    armed: list[Fault] = field(default_factory=list)

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...]) -> Faults:
        return cls([Fault.parse(s) for s in specs])

    def fire(self, point: str, subject: Any) -> Fault | None:
        """The fault armed at ``point`` for ``subject`` (a command or txid), counting the firing; else None."""
        if not self.armed:
            return None
        text = subject if isinstance(subject, str) else repr(subject)
        for f in self.armed:
            if f.point == point and f.match in text and (f.count == 0 or f.fired < f.count):
                f.fired += 1
                return f
        return None


# -- the node as plug-ins see it ---------------------------------------------------------------------

class TxnsAPI(Protocol):
    """The node's transaction service as plug-ins use it (``raftkv.server.coordinator.TxnService``)."""

    tasks: dict[str, asyncio.Task]  # txid -> the run this node drives for it

    def spawn(self, txid: str, coro: Any) -> None: ...

    def resolve_soon(self, shard: int, lock: Locked) -> asyncio.Task: ...

    def settling(self, txid: str, keys: list[bytes]) -> None: ...

    def settled(self, txid: str) -> None: ...

    async def wait_settled(self, keys: list[bytes], timeout: float) -> None: ...

    async def wait_for_lock(self, shard: int, lock: Locked, remaining_s: float) -> None: ...

    def lock_met(self, shard: int, lock: Locked) -> None: ...

    def gate_prepare(self, shard: int, cmd: tuple) -> tuple[tuple, Any]: ...

    def ungate(self, claim: Any, kind: str | None = None, result: Any = None) -> Any: ...


class MetricsAPI(Protocol):
    """The node's counters as the request path uses them (``raftkv.server.metrics.NodeMetrics``;
    each is a prometheus_client metric)."""

    requests: Any
    errors: Any
    proposals: Any
    leader_changes: Any
    txn_outcomes: Any
    audit: Any
    client_gone: Any


class NodeAPI(Protocol):
    """A node's surface for command modules, the coordinator and the balancer.

    Concurrency contract: every method runs on the node's event loop.
    """

    name: str
    map: ShardMap
    info: NodeInfo
    limits: Limits
    timing: Timing
    faults: Faults
    security: Security
    metrics: MetricsAPI
    txns: TxnsAPI
    unsafe_local_reads: bool
    unsafe_watch_miss: bool  # DANGEROUS, testing only: EXEC misses writes to watched keys
    engine: Engine  # the node's one storage engine (only the fault command touches it)
    heap: HeapFreezer  # the process's garbage collections, timed (metrics read its stats)

    @property
    def replicas(self) -> dict[int, ShardReplica]: ...

    def storage_failure(self) -> str | None:
        """Why this node's Raft groups stopped (a durable commit of its storage engine failed), or None."""
        ...

    def shard_of(self, key: bytes) -> int:
        """The key's shard; raises ``BadRequest`` (TOOBIG) for an oversize key."""
        ...

    def check_value(self, value: bytes) -> None:
        """Raises ``BadRequest`` (TOOBIG) for an oversize value."""
        ...

    def run(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future:
        """Start ``coro`` now (so replies keep their order) and return its future."""
        ...

    async def execute(self, shard: int, cmd: tuple, *, read: bool = False, idempotent: bool = False,
                      hops: int = 0, budget_s: float | None = None) -> Any:
        """Run a state-machine command on ``shard``'s leader (see ``raftkv.server.router``)."""
        ...

    def leader_node(self, shard: int) -> str | None:
        """The node believed to lead ``shard`` (or a replica node that knows), None when unknown."""
        ...

    async def rpc(self, target: str, message: tuple, timeout: float) -> Any:
        """One internal RPC to node ``target`` (``raftkv.server.rpc``); raises ``PeerUnreachable`` (no reply) or
        ``PeerRefused`` (the peer refused the RPC itself, so nothing ran)."""
        ...

    async def wait_applied(self, revisions: dict[int, int], timeout: float) -> None:
        """Return once a local replica of a shard in ``revisions`` (shard -> revision) applied a newer
        revision, or after ``timeout`` seconds: a hint to read again, never an answer (``server.feed``)."""
        ...

    async def stale_read(self, shard: int, cmd: tuple) -> Any:
        """Read the local replica's copy without proving leadership (asked for explicitly)."""
        ...

    async def leader_elsewhere(self, shard: int, req: list[bytes], hops: int) -> Any:
        """None once this node leads ``shard``; else the leader node's reply to ``req``."""
        ...

    async def coordinate_at_home(self, txid: str, compares: Any, then_ops: Any, else_ops: Any,
                                 hops: int = 0, ring: str | None = None) -> Any:
        """Run a transaction, handing it to its home shard's leader node when that is elsewhere (``ring``: the
        ``ShardMap.ring_tag`` it must be planned under, if the client named one)."""
        ...

    async def run_forwarded(self, req: list[bytes], hops: int, peer: str) -> Any:
        """Run a ``leader_only`` command another node handed over (its reply value)."""
        ...

    def install_map(self, new: ShardMap) -> None:
        """Adopt a newer shard map (routing, status)."""
        ...

    def acl(self) -> AclTable:
        """The replicated user/role table as this node last applied it."""
        ...

    def auth_required(self) -> bool:
        """Whether a connection must AUTH before running commands."""
        ...

    def audit(self, action: str, conn: Any, outcome: str, detail: str = "") -> None:
        """Record an administrative action or a refused identity (log line + metric)."""
        ...

    def status(self) -> dict:
        """This node's view of itself and its shards (RAFTKV.STATUS)."""
        ...

"""Leases: the state machines of several shards against a one-table model, then a live cluster.

The pure part runs three ``KVState`` shards behind the node's own lease code
(``raftkv.server.commands.leases``: ``lease_use`` on the home shard before a remote attach,
refreshes and drops fanned out to the shards that mirror a lease, the sweep) in one process and
checks every key against a model that knows nothing of shards.
Drops may be lost; the model then allows a key to outlive a *revoked* lease only until the next
sweep or its lease's deadline, never an *expired* one, and never lets a key die early.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv import Client, RaftKVError, leases
from raftkv.aio import AsyncClient
from raftkv.cli import main
from raftkv.cluster import LocalCluster
from raftkv.leases import DROPPED_GRACE_MS, home_of
from raftkv.protocol import OK, Error
from raftkv.results import CmdError
from raftkv.server.api import BadRequest
from raftkv.server.commands.kv import cmd_set
from raftkv.server.commands.leases import cmd_lease, sweep
from raftkv.state import KVState
from tests.conftest import examples, redis_to, start_cluster

SHARDS = 3
KEYS = {b"a0": 0, b"a1": 0, b"b0": 1, b"b1": 1, b"c0": 2}


@dataclass
class Model:
    """Leases as one table: id -> deadline; a key is alive with its lease (or with none)."""

    deadlines: dict[int, int] = field(default_factory=dict)
    ttl: dict[int, int] = field(default_factory=dict)
    alive: dict[bytes, int | None] = field(default_factory=dict)  # key -> its lease (None: no lease)
    # keys a revoked lease killed whose shard may not have heard yet: key -> (lease, its deadline then)
    unheard: dict[bytes, tuple[int, int]] = field(default_factory=dict)

    def live(self, lid: int, now: int) -> bool:
        return self.deadlines.get(lid, 0) > now

    def end(self, lid: int, now: int, revoked: bool) -> None:
        for key, held in list(self.alive.items()):
            if held == lid:
                del self.alive[key]
                if revoked and KEYS[key] != home_of(lid):
                    self.unheard[key] = (lid, self.deadlines[lid])
        del self.deadlines[lid]

    def advance(self, now: int) -> None:
        for lid in [lid for lid, t in self.deadlines.items() if t <= now]:
            self.end(lid, now, revoked=False)
        self.unheard = {k: (lid, t) for k, (lid, t) in self.unheard.items() if t > now}


LOOP = asyncio.new_event_loop()  # the simulated node's event loop (one for every example)


class Cluster:
    """Three shards' state machines behind the node's own lease code (``raftkv.server.commands.leases``,
    through the ``NodeAPI`` surface it uses): every command applies at once, in one process, at log
    time ``now``; while ``losing``, every ``lease_drop`` is refused, as a message that never arrives."""

    HOME_KEYS = {shard: key for key, shard in sorted(KEYS.items(), reverse=True)}  # a key on each shard

    def __init__(self) -> None:
        self.shards = [KVState() for _ in range(SHARDS)]
        self.now = 1000
        self.losing = False
        self.map = SimpleNamespace(nshards=SHARDS, leases_moved={}, removing=None)
        self.replicas: dict = {}
        self.loop = LOOP

    # -- the NodeAPI surface ---------------------------------------------------------------------
    def shard_of(self, key: bytes) -> int:
        return KEYS[key]

    def check_value(self, value: bytes) -> None:
        pass

    def run(self, coro: Any) -> asyncio.Future:
        return asyncio.ensure_future(coro)

    async def execute(self, shard: int, cmd: tuple, *, read: bool = False, idempotent: bool = False,
                      hops: int = 0, budget_s: float | None = None) -> Any:
        if self.losing and cmd[0] == "lease_drop":
            return Error("TRYAGAIN", "the message was lost")
        state = self.shards[shard]
        return state.read(cmd, self.now) if read else state.apply(cmd, self.now)

    # -- driving it -------------------------------------------------------------------------------
    def apply(self, shard: int, cmd: tuple) -> Any:
        """One state-machine command on ``shard``, directly."""
        return self.shards[shard].apply(cmd, self.now)

    def request(self, handler: Any, *args: Any) -> Any:
        """A client request through the node's handler: its reply."""
        req = [a if isinstance(a, bytes) else str(a).encode() for a in args]

        async def go() -> Any:
            try:
                reply = handler(self, None, req)
            except BadRequest as e:
                return e.error
            return await reply if asyncio.isfuture(reply) else reply
        return self.loop.run_until_complete(go())

    def grant(self, home: int, ttl_s: int) -> int:
        return self.request(cmd_lease, "RAFTKV.LEASE", "GRANT", ttl_s, "FOR", self.HOME_KEYS[home])

    def attach(self, key: bytes, lid: int) -> Any:
        return self.request(cmd_set, "SET", key, b"v", "LEASE", lid)

    def keepalive(self, lid: int) -> Any:
        return self.request(cmd_lease, "RAFTKV.LEASE", "KEEPALIVE", lid)

    def revoke(self, lid: int, lost: bool) -> Any:
        self.losing = lost
        try:
            return self.request(cmd_lease, "RAFTKV.LEASE", "REVOKE", lid)
        finally:
            self.losing = False

    def sweep(self) -> None:
        for home in range(SHARDS):
            self.loop.run_until_complete(sweep(self, home))

    def advance(self, ms: int) -> None:
        self.now += ms
        for s in range(SHARDS):
            self.apply(s, ("noop",))  # the reaper's empty entry

    def alive(self, key: bytes) -> bool:
        return self.shards[KEYS[key]].read(("get", key), self.now) is not None


def no_lease(res: Any) -> bool:
    return isinstance(res, Error) and res.code == "NOLEASE"


lease_ops = st.one_of(
    st.tuples(st.just("grant"), st.integers(0, SHARDS - 1), st.sampled_from([1, 2, 5])),
    st.tuples(st.just("attach"), st.sampled_from(sorted(KEYS)), st.integers(0, 5)),
    st.tuples(st.just("keepalive"), st.integers(0, 5)),
    st.tuples(st.just("revoke"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("put"), st.sampled_from(sorted(KEYS))),
    st.tuples(st.just("delete"), st.sampled_from(sorted(KEYS))),
    st.tuples(st.just("advance"), st.integers(1, 2500)),
    st.tuples(st.just("sweep")),
    st.tuples(st.just("restart")),
)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(lease_ops, max_size=40))
def test_keys_live_and_die_with_their_leases_across_shards(ops: list[tuple]) -> None:
    c, m = Cluster(), Model()
    granted: list[int] = []
    for op in ops:
        kind = op[0]
        lid = None
        if kind in ("attach", "keepalive", "revoke") and granted:
            lid = granted[op[2 if kind == "attach" else 1] % len(granted)]
        if kind == "grant":
            lid = c.grant(op[1], op[2])
            assert lid not in m.deadlines and home_of(lid) == op[1]
            granted.append(lid)
            m.deadlines[lid], m.ttl[lid] = c.now + op[2] * 1000, op[2] * 1000
        elif kind == "attach" and lid is not None:
            res = c.attach(op[1], lid)
            assert (res == OK) == m.live(lid, c.now) and (res == OK or no_lease(res)), (res, op)
            if m.live(lid, c.now):
                m.alive[op[1]] = lid
                m.unheard.pop(op[1], None)
        elif kind == "keepalive" and lid is not None:
            res = c.keepalive(lid)
            if m.live(lid, c.now):
                assert res == m.ttl[lid] // 1000
                m.deadlines[lid] = c.now + m.ttl[lid]
            else:
                assert res == Error("NOLEASE", f"lease {lid} not found")
        elif kind == "revoke" and lid is not None:
            res = c.revoke(lid, lost=op[2])
            assert (res == OK) == m.live(lid, c.now) and (res == OK or no_lease(res)), (res, op)
            if m.live(lid, c.now):
                m.end(lid, c.now, revoked=True)
                if not op[2]:  # the drops were delivered
                    m.unheard = {k: v for k, v in m.unheard.items() if v[0] != lid}
        elif kind == "put":
            c.apply(KEYS[op[1]], ("set", op[1], b"plain"))
            m.alive[op[1]] = None
            m.unheard.pop(op[1], None)
        elif kind == "delete":
            c.apply(KEYS[op[1]], ("del", [op[1]]))
            m.alive.pop(op[1], None)
            m.unheard.pop(op[1], None)
        elif kind == "advance":
            c.advance(op[1])
            m.advance(c.now)
        elif kind == "sweep":
            c.sweep()
            m.unheard.clear()
        elif kind == "restart":  # every shard reloads from a snapshot
            c.shards = [KVState.restore(s.snapshot()) for s in c.shards]
        for shard in c.shards:
            shard.leases.check()
        for key in KEYS:
            if key in m.alive:
                assert c.alive(key), f"{key!r} died before its lease {m.alive[key]} ended, after {op}"
            elif key not in m.unheard:
                assert not c.alive(key), f"{key!r} outlived its lease, after {op}"


def test_an_attach_in_flight_when_the_lease_is_revoked_is_refused() -> None:
    """lease_use on the home shard, then the revocation and its drop, then the attach arrives: refused."""
    c = Cluster()
    lid = c.grant(0, 1)
    remaining = c.apply(0, ("lease_use", lid, 1))
    c.revoke(lid, lost=False)
    assert c.apply(1, ("lease_put", b"b0", b"v", lid, remaining)) == CmdError("NOLEASE", f"lease {lid} not found")
    assert not c.alive(b"b0")
    c.advance(1000 + DROPPED_GRACE_MS)  # a tombstone is kept ttl + grace of log time, then forgotten
    c.apply(1, ("lease_drop", lid + (1 << 10), 10))
    assert list(c.shards[1].leases.dropped) == [lid + (1 << 10)]


def test_a_lost_drop_is_delivered_by_the_sweep_and_bounded_by_the_guard() -> None:
    c = Cluster()
    lid = c.grant(0, 1)
    c.attach(b"b0", lid)
    c.attach(b"c0", lid)
    c.revoke(lid, lost=True)
    assert c.alive(b"b0") and c.alive(b"c0")  # not yet told
    assert c.shards[0].read(("lease_pending",), c.now) == ((lid, 1000, (1, 2)),)
    c.sweep()
    assert not c.alive(b"b0") and not c.alive(b"c0")
    assert c.shards[0].read(("lease_pending",), c.now) == ()

    lid = c.grant(0, 1)
    c.attach(b"b1", lid)
    c.revoke(lid, lost=True)
    c.advance(1000)  # no sweep ever: the mirror's guard deadline deletes it
    assert not c.alive(b"b1")


def test_errors_and_a_plain_write_detaches() -> None:
    s = KVState()
    assert s.apply(("lease_keepalive", 5 << 10), 0) == CmdError("NOLEASE", f"lease {5 << 10} not found")
    lid = s.apply(("lease_grant", 0, 1000), 0)
    s.apply(("lease_put", b"k", b"v", lid, None), 0)
    assert s.apply(("lease_ttl", lid), 100) == (900, 1000, 1, ())
    s.apply(("set", b"k", b"mine"), 200)  # detached, as a put without a lease in etcd
    assert s.apply(("lease_ttl", lid), 300) == (700, 1000, 0, ())
    s.apply(("noop",), 1000)
    assert s.read(("get", b"k"), 1000) == b"mine"


def test_grants_are_limited_per_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases, "LEASES_MAX", 2)
    s = KVState()
    first = s.apply(("lease_grant", 0, 1000), 0)
    s.apply(("lease_grant", 0, 1000), 0)
    assert s.apply(("lease_grant", 0, 1000), 0).code == "BUSY"
    s.apply(("lease_revoke", first), 10)
    assert not isinstance(s.apply(("lease_grant", 0, 1000), 20), CmdError)


def test_a_lease_lock_keeps_its_token_for_its_holder_and_fences_the_next() -> None:
    s = KVState()
    a = s.apply(("lease_grant", 0, 1000), 0)
    b = s.apply(("lease_grant", 0, 1000), 0)
    ok, t1 = s.apply(("lease_lock", b"L", b"A", a, None), 10)
    assert ok == 1
    assert s.apply(("lease_lock", b"L", b"B", b, None), 20) == (0, b"A")
    assert s.apply(("lease_lock", b"L", b"A", a, None), 30) == (1, t1)  # re-acquire: same token
    s.apply(("lease_keepalive", b), 500)
    ok, t2 = s.apply(("lease_lock", b"L", b"B", b, None), 1000)  # A's lease ended at 1000
    assert ok == 1 and t2 > t1


# -- a live cluster ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The module's shared 3-node cluster, with the clock fault point armed (offset 0 until a test sets it)."""
    lc = start_cluster(str(tmp_path_factory.mktemp("cluster")), node_args=["--fault", "clock.skew_ms:0"])
    yield lc
    lc.stop()


@pytest.fixture
def lc(cluster: LocalCluster) -> LocalCluster:
    return cluster


def _keys_on_every_shard(c: Client, prefix: str) -> list[str]:
    keys, shards = [], set()
    i = 0
    while len(shards) < c.map.nshards:
        k = f"{prefix}{i}"
        if c.map.shard_for_key(k.encode()) not in shards:
            shards.add(c.map.shard_for_key(k.encode()))
            keys.append(k)
        i += 1
    return keys


def _wait_gone(c: Client, keys: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(c.get(k) is not None for k in keys):
        assert time.monotonic() < deadline, f"keys of an ended lease still there: {keys}"
        time.sleep(0.1)


def test_revoke_deletes_the_keys_of_a_lease_on_every_shard(lc: LocalCluster) -> None:
    with Client(cluster=lc.config) as c:
        keys = _keys_on_every_shard(c, "lease:rev")
        with c.lease(30) as lease:
            for k in keys:
                c.put(k, "v", lease=lease.id)
            assert c.lease_ttl(lease.id).keys == len(keys) and c.lease_ttl(lease.id).granted == 30
            assert c.lease_keepalive(lease.id) == 30
            c.put(keys[0], "mine")  # a plain write detaches
            lid = lease.id
        assert c.get(keys[0]) == b"mine"
        assert [c.get(k) for k in keys[1:]] == [None] * (len(keys) - 1)  # REVOKE answers after the drops
        with pytest.raises(RaftKVError) as e:
            c.lease_ttl(lid)
        assert e.value.code == "NOLEASE" and str(lid) in e.value.message


def test_a_lease_is_kept_alive_in_the_background(lc: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with Client(cluster=lc.config) as c:
        answers: list[int] = []
        keepalive = c.lease_keepalive
        monkeypatch.setattr(c, "lease_keepalive", lambda lid, **kw: answers.append(keepalive(lid, **kw)) or 1)
        with c.lease(3) as lease, c.lease(4) as other:  # one thread keeps both alive, every ttl/3
            c.put("lease:kept", "v", lease=lease.id)
            deadline = time.monotonic() + 60
            while answers.count(3) < 5 or answers.count(4) < 1:  # past the first lease's ttl
                assert time.monotonic() < deadline, answers
                time.sleep(0.05)
            assert c.get("lease:kept") == b"v" and not lease.lost and not other.lost
        assert c.get("lease:kept") is None


def test_an_expired_lease_takes_its_keys_and_refuses_new_ones(lc: LocalCluster) -> None:
    with Client(cluster=lc.config) as c:
        keys = _keys_on_every_shard(c, "lease:exp")
        lid = c.lease_grant(1)
        for k in keys:
            c.put(k, "v", lease=lid)
        _wait_gone(c, keys)  # nobody keeps it alive
        with pytest.raises(RaftKVError) as e:
            c.put("lease:late", "v", lease=lid)
        assert e.value.code == "NOLEASE"
        assert c.get("lease:late") is None


def test_a_clock_step_back_is_harmless_and_one_forward_ends_leases_early(lc: LocalCluster) -> None:
    """The ``clock.skew_ms`` fault point reaches log time (what the harness's clock nemeses rely on).

    A leader whose clock steps back 60 s keeps the lease's deadline where it was (log time stands
    still, never goes back); the step forward that follows (the offset set back to 0) advances its log
    time by 60 s at once, which ends a 30 s lease early: the hazard logclock's assumption (monotonic
    clocks tick at the real rate) excludes, shown here so that it stays known."""
    with Client(cluster=lc.config) as c:
        key = "lease:clock"
        lid = c.lease_grant(30, near=key)
        leader = lc.leader_of(c.map.shard_for_key(key.encode()))
        assert leader is not None
        try:
            assert lc.call(leader, "RAFTKV.FAULT", "CLOCK.SKEW_MS", "-60000") == 0
            c.put(key, "after the step back")  # an entry stamped with the stepped clock
            assert c.lease_ttl(lid).remaining >= 25
            assert lc.call(leader, "RAFTKV.FAULT", "CLOCK.SKEW_MS", "0") == -60000
            deadline = time.monotonic() + 10
            while True:
                c.put(key, "after the step forward")
                try:
                    c.lease_ttl(lid)
                except RaftKVError as e:
                    assert e.code == "NOLEASE"
                    break
                assert time.monotonic() < deadline, "a 60 s step forward did not end a 30 s lease"
                time.sleep(0.1)
        finally:
            for name in lc.map.nodes:
                lc.call(name, "RAFTKV.FAULT", "CLOCK.SKEW_MS", "0")
        refused = lc.call(leader, "RAFTKV.FAULT", "DISK.FULL", "1")
        assert "unknown fault 'DISK.FULL'; known: CLOCK.SKEW_MS, CLOCK.RATE_PCT" in str(refused), refused


def test_a_slow_clock_makes_log_time_lag_and_a_ttl_last_longer(lc: LocalCluster) -> None:
    """``CLOCK.RATE_PCT`` reaches log time: with every node's clock at 25 % of real time, a key written with
    a 1 s ttl is still there 1.5 s later (log time advanced ~0.4 s), and it expires once the clocks are back
    at real time and that much more time has passed. Slow clocks are inside the fault model (log time may lag)."""
    with Client(cluster=lc.config) as c:
        key = "ttl:slow-clock"
        try:
            for name in lc.map.nodes:
                assert lc.call(name, "RAFTKV.FAULT", "CLOCK.RATE_PCT", "25") == 100
            c.put(key, "v", ttl=1.0)
            time.sleep(1.5)
            assert c.get(key) == b"v"
        finally:
            for name in lc.map.nodes:
                assert lc.call(name, "RAFTKV.FAULT", "CLOCK.RATE_PCT", "100") == 25
        deadline = time.monotonic() + 10
        while c.get(key) is not None:
            assert time.monotonic() < deadline, "the key never expired once the clocks ran at real time"
            time.sleep(0.1)


def test_clock_faults_are_refused_unless_armed() -> None:
    from raftkv.server.api import Faults
    from raftkv.server.commands.admin import cmd_fault

    node = SimpleNamespace(name="n1", faults=Faults())
    with pytest.raises(BadRequest, match="fault injection is off on this node"):
        cmd_fault(node, None, [b"RAFTKV.FAULT", b"CLOCK.SKEW_MS", b"5000"])
    node.faults = Faults.parse(["clock.skew_ms:0"])
    with pytest.raises(BadRequest, match="want an integer"):
        cmd_fault(node, None, [b"RAFTKV.FAULT", b"CLOCK.SKEW_MS", b"soon"])
    with pytest.raises(BadRequest, match="beyond"):
        cmd_fault(node, None, [b"RAFTKV.FAULT", b"CLOCK.SKEW_MS", str(10**10).encode()])


def test_slow_disk_faults_are_refused_unless_armed_and_set_the_engine_delay() -> None:
    from raftkv.server.api import Faults
    from raftkv.server.commands.admin import cmd_fault

    node = SimpleNamespace(name="n1", faults=Faults.parse(["clock.skew_ms:0"]), engine=SimpleNamespace(delay_s=0.0))
    with pytest.raises(BadRequest, match=r"DISK.SLOW_MS: not armed on this node \(start it with --fault disk.slow_ms:0"):
        cmd_fault(node, None, [b"RAFTKV.FAULT", b"DISK.SLOW_MS", b"100"])
    node.faults = Faults.parse(["disk.slow_ms:0"])
    with pytest.raises(BadRequest, match="CLOCK.SKEW_MS: not armed"):
        cmd_fault(node, None, [b"RAFTKV.FAULT", b"CLOCK.SKEW_MS", b"100"])
    with pytest.raises(BadRequest, match="unknown fault 'DISK.FULL'; known: CLOCK.SKEW_MS, CLOCK.RATE_PCT, DISK.SLOW_MS"):
        cmd_fault(node, None, [b"RAFTKV.FAULT", b"DISK.FULL", b"1"])
    for bad in (b"-1", b"60001"):
        with pytest.raises(BadRequest, match="beyond 0..60000 ms"):
            cmd_fault(node, None, [b"RAFTKV.FAULT", b"DISK.SLOW_MS", bad])
    assert cmd_fault(node, None, [b"RAFTKV.FAULT", b"disk.slow_ms", b"250"]) == 0
    assert node.engine.delay_s == 0.25
    assert cmd_fault(node, None, [b"RAFTKV.FAULT", b"DISK.SLOW_MS", b"0"]) == 250 and node.engine.delay_s == 0


def test_resp_errors(lc: LocalCluster) -> None:
    """Through redis-py (which strips an ERR code, keeps the others)."""
    r = redis_to(lc, protocol=2)
    for args, prefix in [(("GRANT", "0"), "RAFTKV.LEASE: ttl must be a positive integer"),
                         (("GRANT", "x"), "RAFTKV.LEASE: ttl must be"),
                         (("KEEPALIVE", "abc"), "RAFTKV.LEASE: the lease id must be"),
                         (("TTL", str(99 << 10)), f"NOLEASE lease {99 << 10} not found"),  # no shard 99
                         (("FROB", "1"), "RAFTKV.LEASE GRANT|KEEPALIVE|REVOKE|TTL")]:
        with pytest.raises(Exception) as e:
            r.execute_command("RAFTKV.LEASE", *args)
        assert str(e.value).startswith(prefix), (args, str(e.value))
    lid = int(r.execute_command("RAFTKV.LEASE", "GRANT", "10"))
    assert r.execute_command("SET", "lease:resp", "v", "LEASE", str(lid)) is True
    assert r.execute_command("RAFTKV.LEASE", "TTL", str(lid))[1:] == [10, 1]
    assert r.execute_command("RAFTKV.LEASE", "REVOKE", str(lid)) == b"OK"
    assert r.get("lease:resp") is None
    with pytest.raises(Exception) as e:
        r.execute_command("SET", "lease:resp", "v", "LEASE", str(lid))
    assert str(e.value) == f"NOLEASE lease {lid} not found"


def test_cli_lease_commands(lc: LocalCluster) -> None:
    run = lambda *a: CliRunner().invoke(main, [*a, "--cluster", str(lc.config)])  # noqa: E731
    res = run("lease", "grant", "20")
    assert res.exit_code == 0, res.output
    lid = res.output.strip()
    assert run("put", "lease:cli", "v", "--lease", lid).exit_code == 0
    res = run("lease", "ttl", lid)
    assert res.exit_code == 0 and "granted 20" in res.output and "keys 1" in res.output, res.output
    assert run("lease", "keepalive", lid).output.strip() == "20"
    assert run("lease", "revoke", lid).exit_code == 0
    assert run("get", "lease:cli").exit_code == 1
    res = run("lease", "keepalive", lid)
    assert res.exit_code == 1 and "not found" in res.output


def test_async_client_lease(lc: LocalCluster) -> None:
    async def go() -> None:
        async with AsyncClient(cluster=lc.config) as c:
            async with c.lease(30, near="lease:aio") as lease:
                await c.put("lease:aio", "v", lease=lease.id)
                assert (await c.lease_ttl(lease.id)).keys == 1
                assert await c.lease_keepalive(lease.id) == 30
            assert await c.get("lease:aio") is None
    asyncio.run(go())


def test_keys_on_shards_no_drop_reaches_die_at_their_guard_deadline(tmp_path: Path) -> None:
    """Every node refuses every lease_drop (a fault point): REVOKE still answers, the home shard's key
    goes at once, and the other shards' keys go when their guard deadline passes, with no message."""
    lc = start_cluster(str(tmp_path / "c"), node_args=["--fault", "exec.not_applied:0:0:lease_drop"])
    try:
        with Client(cluster=lc.config) as c:
            keys = _keys_on_every_shard(c, "lease:lost")
            lid = c.lease_grant(3, near=keys[0])
            for k in keys:
                c.put(k, "v", lease=lid)
            c.lease_revoke(lid)
            assert c.get(keys[0]) is None
            _wait_gone(c, keys[1:])
    finally:
        lc.stop()

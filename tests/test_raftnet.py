"""The node's multiplexed Raft network and driver, in one process: several nodes' worth of groups on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.node import Node

from raftkv.driver import RaftDriver
from raftkv.engine import Engine
from raftkv.raftnet import _FRAME, MuxTransport, RaftNetwork, endpoint_of, member_id, wire_tag
from raftkv.replica import APPLIED, ShardReplica

KEY = b"test-cluster-key"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class _Node:
    """One node's network, driver and replicas, in this process.

    ``commit_point``: the groups share one pipelined engine (as ``raftkv.server.node`` runs them) whose
    crash-point hook is this; without it each replica opens a private engine that commits synchronously.
    """

    def __init__(self, port: int, key: bytes, data_dir: Path, commit_point: Any = None) -> None:
        self.port = port
        self.network = RaftNetwork("127.0.0.1", port, cluster="t", key=key, encrypt=True, timeout_s=1.0)
        self.driver = RaftDriver(self.network, period_s=0.01)
        self.replicas: dict[int, ShardReplica] = {}
        self.data_dir = data_dir
        self.engine: Engine | None = None
        if commit_point is not None:
            self.engine = Engine(str(data_dir / f"{port}-engine"), map_size=1 << 26, point=commit_point)
            self.engine.start_committer(self.driver.on_durable)
        self.driver.start()

    def add_group(self, shard: int, ports: list[int]) -> ShardReplica:
        peers = [member_id(f"127.0.0.1:{p}", shard) for p in ports if p != self.port]
        r = ShardReplica(shard, member_id(f"127.0.0.1:{self.port}", shard), peers,
                         str(self.data_dir / f"{self.port}-{shard}"), driver=self.driver, engine=self.engine)
        self.replicas[shard] = r
        self.driver.add(r)
        return r

    def close(self) -> None:
        self.driver.stop()
        for r in self.replicas.values():
            r.destroy()
        if self.engine is not None:
            self.engine.close()  # stops the committer, whose on_commit wakes the driver
        self.driver.close()
        self.network.close()


def _leaders(nodes: list[_Node], shard: int) -> list[_Node]:
    return [n for n in nodes if shard in n.replicas and n.replicas[shard].is_leader()]


def _wait(cond, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _propose(replica: ShardReplica, key: bytes, value: bytes) -> tuple[threading.Event, list[str]]:
    done = threading.Event()
    out: list[str] = []

    def cb(kind: str, _result: object) -> None:
        out.append(kind)
        done.set()

    replica.propose([("set", key, value)], replica.log_now_ms(), cb)
    return done, out


def _put(replica: ShardReplica, key: bytes, value: bytes) -> str:
    done, out = _propose(replica, key, value)
    assert done.wait(10)
    return out[0]


_THREADS_BEFORE: set[threading.Thread] = set()


@pytest.fixture
def three(tmp_path: Path) -> Iterator[list[_Node]]:
    global _THREADS_BEFORE
    _THREADS_BEFORE = set(threading.enumerate())  # threads earlier tests left behind are not these nodes'
    ports = _free_ports(3)
    nodes = [_Node(p, KEY, tmp_path) for p in ports]
    for shard in range(4):
        for n in nodes:
            n.add_group(shard, ports)
    yield nodes
    for n in nodes:
        n.close()


def test_member_ids_map_to_the_node_endpoint() -> None:
    assert endpoint_of("10.0.0.1:7105", 5) == "10.0.0.1:7100"
    assert member_id("10.0.0.1:7100", 5) == "10.0.0.1:7105"
    assert endpoint_of(member_id("h:9000", 63), 63) == "h:9000"


def test_a_groups_transport_takes_appendentries_from_a_non_member_and_nothing_else() -> None:
    """Raft processes a leader's AppendEntries whatever the receiver's configuration says (thesis 4.1): a
    follower whose log holds an uncommitted change removing the leader of a later term must still hear it,
    or that change is never truncated and the group cannot commit again. Votes, pre-votes and replies from a
    non-member are still dropped."""

    class Net:
        def refresh(self, transport: Any) -> None:
            pass

    member = Node(member_id("127.0.0.2:9000", 1))
    transport = MuxTransport(Net(), 1, None, Node(member_id("127.0.0.1:9000", 1)), [member])  # type: ignore[arg-type]
    got: list[tuple[str, str]] = []
    transport.setOnMessageReceivedCallback(lambda node, message: got.append((node.id, message["type"])))
    stranger = "127.0.0.3:9000"
    for mtype in ("append_entries", "request_vote", "raftfix_prevote", "next_node_idx", "response_vote"):
        transport.deliver(stranger, {"type": mtype, "term": 5})
    transport.deliver("127.0.0.2:9000", {"type": "request_vote", "term": 5})
    assert got == [(member_id(stranger, 1), "append_entries"), (member.id, "request_vote")]


def test_frames_reach_only_the_incarnation_of_a_shard_they_were_sent_by() -> None:
    """A shard removed and added again is a new group (``ShardMap.born``): a node still running the old one
    must not vote in it or feed it the old log, so each incarnation's frames carry a tag of their own."""
    import pickle
    from types import SimpleNamespace

    assert wire_tag(3) == 3  # groups of the first map: the bare shard id, as before incarnations existed
    tags = {wire_tag(3, born) for born in (0, 4, 5, 65535, 65536)}
    assert len(tags) == 5 and all(t & 0xFFFF == 3 for t in tags)
    network = RaftNetwork("127.0.0.1", 1, cluster="t", key=KEY, encrypt=True)  # never started
    try:
        new = network.transport_class(3, 5)(None, None, [])
        network.attach(new)
        got: list[Any] = []
        new.deliver = lambda endpoint, message: got.append(message)  # type: ignore[method-assign]

        def frame(tag: int, message: Any) -> bytes:
            data = pickle.dumps(message)
            return _FRAME.pack(tag, len(data)) + data

        active: set[int] = set()
        conn = SimpleNamespace(peer="127.0.0.2:9000")
        network._on_record(conn, frame(wire_tag(3), "old group") + frame(wire_tag(3, 5), "new group"),
                           active)  # type: ignore[arg-type]
        assert got == ["new group"] and active == {3}
    finally:
        network.close()


def test_groups_elect_and_commit_over_one_connection_per_peer(three: list[_Node]) -> None:
    _wait(lambda: all(len(_leaders(three, s)) == 1 for s in range(4)))
    for s in range(4):
        leader = _leaders(three, s)[0].replicas[s]
        assert _put(leader, b"k%d" % s, b"v") == APPLIED
    _wait(lambda: all(n.replicas[s].state.peek(b"k%d" % s) is not None for n in three for s in range(4)))
    for n in three:
        # Every group talks over the node's one connection per peer; nothing listens per group.
        assert len(n.network.open) == 2
        assert len(n.network.conns) == 2
        assert n.network.stats["frames_in"] > n.network.stats["records_in"] > 0
    ours = set(threading.enumerate()) - _THREADS_BEFORE
    assert sum(t.name.startswith("raft") or "Thread" in t.name for t in ours) < 12, sorted(t.name for t in ours)


def test_group_added_and_removed_at_runtime(three: list[_Node]) -> None:
    ports = [n.port for n in three]
    for n in three:
        n.add_group(7, ports)
    _wait(lambda: len(_leaders(three, 7)) == 1)
    assert _put(_leaders(three, 7)[0].replicas[7], b"late", b"1") == APPLIED
    victim = three[0].replicas.pop(7)
    victim.destroy()  # on the driver thread; the others keep a majority
    assert 7 not in three[0].driver.groups and 7 not in three[0].network.groups
    _wait(lambda: len(_leaders(three[1:], 7)) == 1)
    assert _put(_leaders(three[1:], 7)[0].replicas[7], b"after", b"2") == APPLIED


def test_a_peer_without_the_key_is_refused(tmp_path: Path, three: list[_Node]) -> None:
    _wait(lambda: all(len(_leaders(three, s)) == 1 for s in range(4)))
    # A node with the wrong key in a group with the others: whichever side dials, the handshake fails.
    ports = [n.port for n in three]
    (port,) = _free_ports(1)
    intruder = _Node(port, b"wrong key", tmp_path / "intruder")
    try:
        for n in [*three, intruder]:
            n.add_group(9, [*ports, port])
        refused_before = sum(n.network.stats["refused"] for n in three)
        _wait(lambda: sum(n.network.stats["refused"] for n in three) + intruder.network.stats["refused"]
              > refused_before, timeout=10)
        assert not intruder.network.open
        assert all(f"127.0.0.1:{port}" not in n.network.open for n in three)
        assert intruder.network.stats["frames_in"] == 0
    finally:
        intruder.close()


def test_lost_connection_is_redialed_and_groups_told(three: list[_Node]) -> None:
    _wait(lambda: all(len(_leaders(three, s)) == 1 for s in range(4)))
    smallest = min(three, key=lambda n: n.network.endpoint)
    peer = max(three, key=lambda n: n.network.endpoint)
    # Cut the link from the side that does not dial: the larger endpoint must redial.
    conn = smallest.network.open[peer.network.endpoint]
    conn.sock.shutdown(socket.SHUT_RDWR)
    _wait(lambda: peer.network.stats["lost"] >= 1, timeout=10)
    _wait(lambda: peer.network.endpoint in smallest.network.open and smallest.network.endpoint in peer.network.open)
    _wait(lambda: all(smallest.replicas[s].peer_connected(member_id(peer.network.endpoint, s)) for s in range(4)))


class _FailingGroup:
    """A group whose durable sync fails (a disk error): the driver must send nothing after it."""

    group_id = 3

    def __init__(self, network: RaftNetwork) -> None:
        self.transport = network.transport_class(self.group_id)(None, None, [])
        self.ticks = 0

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802,N803 - pysyncobj's names
        self.ticks += 1

    def needs_flush(self) -> bool:
        return False

    def postponeElection(self, seconds: float) -> None:  # noqa: N802
        pass

    def _rf_flush_if_needed(self) -> None:
        pass

    def _rf_sync(self) -> None:
        raise OSError("EIO")

    def mux_transport(self):  # noqa: ANN201
        return self.transport

    def destroy_now(self) -> None:
        self.transport.destroy()


def test_a_failed_sync_stops_the_driver_and_sends_nothing(tmp_path: Path) -> None:
    (port,) = _free_ports(1)
    network = RaftNetwork("127.0.0.1", port, cluster="t", key=KEY, encrypt=True)
    driver = RaftDriver(network, period_s=0.01)
    group = _FailingGroup(network)
    driver.add(group)
    driver.start()
    _wait(lambda: not driver.alive(), timeout=5)
    assert group.ticks >= 1
    assert network.stats["records_out"] == 0
    with pytest.raises(OSError):  # the listener is closed: peers see this node as down
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    driver.stop()
    driver.close()


def test_a_wake_up_during_the_drain_is_never_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread that wakes the driver while it drains the wake pipe (the byte it writes is read by that very
    drain) must not leave the driver deaf to later wake-ups: the pipe holds a byte whenever the flag says a
    wake-up is pending. Before the fix the flag was cleared before the read, and every later wake-up waited
    for the period timer (10 ms reads after a 32-client load)."""
    import os
    import select

    import raftkv.driver as driver_mod

    port = _free_ports(1)[0]
    network = RaftNetwork("127.0.0.1", port, cluster="t", key=KEY, encrypt=True)
    driver = RaftDriver(network, period_s=0.01)  # not started: the test plays the driver thread
    try:
        driver.wake(1)
        real_read = os.read
        raced = []

        def read_with_a_wake_in_between(fd: int, n: int) -> bytes:
            if not raced:
                raced.append(True)
                driver.wake(2)  # another thread, right as the driver reads
            return real_read(fd, n)

        monkeypatch.setattr(driver_mod.os, "read", read_with_a_wake_in_between)
        driver._drain()
        monkeypatch.setattr(driver_mod.os, "read", real_read)
        assert raced
        driver.wake(3)  # a later wake-up must reach the pipe
        poller = select.poll()  # not select.select: the suite may already hold fds above FD_SETSIZE
        poller.register(driver._wake_r, select.POLLIN)
        assert poller.poll(0), "a wake-up after the drain left nothing in the pipe: the driver would sleep through it"
    finally:
        driver.close()
        network.close()


class _CommitGate:
    """An engine crash-point hook that holds every commit at ``engine.commit.before`` while closed."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.holding = threading.Event()  # a commit is being held right now

    def close(self) -> None:
        self.holding.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def __call__(self, name: str) -> None:
        if name == "engine.commit.before" and not self._open.is_set():
            self.holding.set()
            self._open.wait(30)


HELD_S = 0.5  # how long a commit is held; well under leaderFallbackTimeout (1 s), so the leader stays


def test_pipelined_commits_release_nothing_before_it_is_durable(tmp_path: Path) -> None:
    """With one pipelined engine per node, a commit held on the committer thread holds back exactly what
    depends on it: a follower's ack (so no majority), and the leader's own vote for its entry, while every
    driver keeps looping (receiving, ticking, sending) meanwhile. Released, the write commits."""
    ports = _free_ports(3)
    gates = {p: _CommitGate() for p in ports}
    nodes = [_Node(p, KEY, tmp_path, commit_point=gates[p]) for p in ports]
    try:
        for n in nodes:
            n.add_group(0, ports)
        _wait(lambda: len(_leaders(nodes, 0)) == 1)
        leader = _leaders(nodes, 0)[0]
        a, b = [n for n in nodes if n is not leader]
        assert _put(leader.replicas[0], b"k", b"0") == APPLIED

        # 1. Both followers' commits held: the leader's copy alone is durable, no majority acked.
        gates[a.port].close()
        gates[b.port].close()
        loops = [n.driver.stats["loops"] for n in (a, b)]
        done, out = _propose(leader.replicas[0], b"k", b"1")
        assert gates[a.port].holding.wait(10) and gates[b.port].holding.wait(10)
        assert not done.wait(HELD_S), "applied while no follower's copy was durable"
        assert all(n.driver.stats["loops"] > before + 5 for n, before in zip((a, b), loops, strict=True)), (
            "a driver sat idle while its commit was held")
        gates[a.port].open()
        assert done.wait(10) and out == [APPLIED]
        gates[b.port].open()

        # 2. The leader's own commit held, one follower's too: the other follower's durable ack plus the
        # leader's non-durable copy is not a majority.
        _wait(lambda: all((n.replicas[0].state.peek(b"k") or (None,))[0] == b"1" for n in (leader, a)))
        gates[leader.port].close()
        gates[b.port].close()
        done, out = _propose(leader.replicas[0], b"k", b"2")
        assert gates[leader.port].holding.wait(10)
        assert not done.wait(HELD_S), "the leader counted its own entry before it was durable"
        gates[leader.port].open()
        assert done.wait(10) and out == [APPLIED]
        gates[b.port].open()
    finally:
        for g in gates.values():
            g.open()
        for n in nodes:
            n.close()


def test_a_loop_of_ours_busy_past_the_timeout_does_not_drop_a_peer_whose_frames_wait_unread() -> None:
    """Silence is the peer's only if, once we read its socket, nothing had come for ``timeout_s``: a loop that
    spent longer than that on other work (installing a snapshot chunk) finds the frames waiting and keeps it."""
    ports = _free_ports(2)
    nets = [RaftNetwork("127.0.0.1", p, cluster="t", key=KEY, encrypt=True, timeout_s=0.5) for p in ports]
    received: list[Any] = []
    transports = []
    for net, me in zip(nets, ports, strict=True):
        (peer,) = [p for p in ports if p != me]
        t = net.transport_class(0)(None, None, [Node(member_id(f"127.0.0.1:{peer}", 0))])
        t.setOnMessageReceivedCallback(lambda _node, msg: received.append(msg))
        net.attach(t)
        transports.append(t)
    try:
        a, b = nets
        deadline = time.monotonic() + 10
        while not (a.open and b.open):
            assert time.monotonic() < deadline, "never connected"
            for net in nets:
                net.poll(0.01)
                net.flush()
        (a_to_b,) = a.open
        a.send(wire_tag(0), a_to_b, {"type": "hello"})
        a.flush()
        time.sleep(0.8)  # b is busy elsewhere for longer than its timeout; a's frame waits in b's socket
        b.poll(0.0)
        assert received == [{"type": "hello"}] and b.open and b.stats["lost"] == 0
    finally:
        for net in nets:
            net.close()

"""Guarantees under crashes: failover, durability across kill -9 of every node, catch-up.

Fault injection checks itself: ``kill_node`` returns once the process is gone and
``pause_node`` once the kernel reports it stopped, or they raise; the first tests
below run them against a stand-in process, with signals that land and with signals
that are silently dropped (the negative control).
"""

from __future__ import annotations

import functools
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jepsen_like.nemesis import Nemesis
from jepsen_like.netns import Firewall
from raftkv import Client
from raftkv.cluster import ClusterError, LocalCluster, _proc_state

from .conftest import PutWriter, dump_logs, unique_keys


def _keys_on(lc: LocalCluster, shard: int, prefix: str) -> Iterator[str]:
    """Unique keys that all live on ``shard``."""
    return (k for k in unique_keys(prefix) if lc.map.shard_for_key(k) == shard)


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[LocalCluster, subprocess.Popen]]:
    """A one-node cluster file whose node ``n1`` is a ``sleep`` process (signals only, no server)."""
    lc = LocalCluster.create(tmp_path, nodes=1, shards=1)
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)
    lc.pid_file("n1").write_text(str(p.pid))
    yield lc, p
    p.kill()  # a no-op if the test has reaped it
    p.wait()


def drop_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken build: SIGKILL and SIGSTOP are sent to nowhere (os.kill returns, nothing happens)."""
    real = os.kill

    def kill(pid: int, sig: int) -> None:
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            real(pid, sig)

    monkeypatch.setattr(os, "kill", kill)


class NoRulesFirewall(Firewall):
    """A broken build: every iptables call "succeeds" and installs nothing."""

    def _ipt(self, *args: str) -> str:
        return ""


def test_kill_and_pause_wait_until_the_process_is_gone_or_stopped(stand_in) -> None:
    lc, p = stand_in
    lc.pause_node("n1")
    assert _proc_state(p.pid) in ("T", "t")
    lc.resume_node("n1")
    assert _proc_state(p.pid) not in ("T", "t")
    lc.kill_node("n1")
    assert lc.pid("n1") is None and p.wait(5) == -signal.SIGKILL
    lc.kill_node("n1")  # already gone: nothing to do, no error
    with pytest.raises(ClusterError, match="not running"):
        lc.pause_node("n1")


def test_a_signal_that_does_not_land_is_an_error(stand_in, monkeypatch: pytest.MonkeyPatch) -> None:
    lc, p = stand_in
    drop_signals(monkeypatch)
    with pytest.raises(ClusterError, match="still running 0.5 s after SIGKILL"):
        lc.kill_node("n1", timeout=0.5)
    with pytest.raises(ClusterError, match="not stopped 0.5 s after SIGSTOP"):
        lc.pause_node("n1", timeout=0.5)
    assert p.poll() is None


def test_nemesis_records_a_fault_only_when_it_happened(stand_in, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    lc, p = stand_in
    t0 = time.monotonic()
    nem = Nemesis(lc, random.Random(1), lambda: time.monotonic() - t0)
    f = nem.start_fault("pause")
    assert _proc_state(p.pid) in ("T", "t") and f.nodes == ["n1"]
    nem.end_fault(f)
    assert _proc_state(p.pid) not in ("T", "t") and f.error == ""
    drop_signals(monkeypatch)  # a pause that does not happen is an error, not a recorded fault
    monkeypatch.setattr(lc, "pause_node", functools.partial(lc.pause_node, timeout=0.5))
    nem.run([(0.0, "pause", 0.1)], threading.Event())
    assert [(x.detail, "not stopped" in x.error) for x in nem.faults[1:]] == [("could not inject pause", True)]
    # A partition whose rules never took effect: the probe connection gets through (refused).
    three = LocalCluster.create(tmp_path / "three", nodes=3, shards=1)
    nem = Nemesis(three, random.Random(2), lambda: time.monotonic() - t0, firewall=NoRulesFirewall("true"))
    nem.run([(0.0, "partition", 0.1)], threading.Event())
    assert len(nem.faults) == 1 and "partition not in effect" in nem.faults[0].error, nem.faults


def _put_all(c: Client, keys: list[str]) -> None:
    """``put(k, k)`` for every key, six in flight at a time (the leaders batch them into fewer fsyncs);
    returns once every write was acknowledged, and raises if one was not."""
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda k: c.put(k, k), keys))


def _all_readable(lc: LocalCluster, keys: list[str]) -> None:
    with Client(cluster=lc.config, timeout=30.0) as c, ThreadPoolExecutor(6) as pool:
        missing = [k for k, v in zip(keys, pool.map(c.get, keys), strict=True) if v != k.encode()]
    assert missing == [], f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def test_kill_leader_under_writes_fails_over_and_loses_nothing(fresh_cluster: LocalCluster) -> None:
    lc = fresh_cluster
    shard = 1
    w = PutWriter(lc.config, _keys_on(lc, shard, "fo"), timeout=5.0)
    w.start()
    try:
        deadline = time.monotonic() + 30
        while len(w.acked) < 20:  # the writer is under way before the kill
            assert time.monotonic() < deadline, "fewer than 20 writes acknowledged in 30 s before the kill"
            time.sleep(0.02)
        victim = lc.leader_of(shard)
        assert victim is not None
        before = len(w.acked)
        killed_at = time.monotonic()
        lc.kill_node(victim)  # returns once the process is gone
        assert lc.pid(victim) is None and victim not in lc.running()
        with pytest.raises(ConnectionRefusedError):  # and nothing listens on its port any more
            socket.create_connection(lc.map.nodes[victim].client_addr, timeout=5).close()
        deadline = time.monotonic() + 20
        # A write sent after the kill has to be committed by a new leader.
        while not any(sent > killed_at for _, sent, _ in w.acked[before:]):
            assert time.monotonic() < deadline, "no write succeeded within 20 s of killing the leader"
            time.sleep(0.01)
        print(f"failover: a write sent {time.monotonic() - killed_at:.3f} s or less after kill -9 of {victim} "
              "succeeded")
        while lc.leader_of(shard) in (None, victim):
            assert time.monotonic() < deadline, "no new leader reported"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        w.stop.set()
        w.join(30)
    lc.start_node(victim)
    lc.wait_ready(60)
    assert len(w.acked) > 10
    print("failover writes:", w.check(lc.config))


def test_acknowledged_writes_survive_kill_9_of_every_node(fresh_cluster: LocalCluster) -> None:
    lc = fresh_cluster
    keys = [f"durable-{i}" for i in range(300)]
    with Client(cluster=lc.config) as c:
        _put_all(c, keys)  # all 300 acknowledged
    for name in lc.map.nodes:  # as close to simultaneous as a test can make it
        lc.signal_node(name, 9)
    for name in lc.map.nodes:
        lc.kill_node(name)
    assert lc.running() == []
    lc.start()
    try:
        lc.wait_ready(60)
    except Exception:
        dump_logs(lc)
        raise
    _all_readable(lc, keys)


def test_restarted_node_catches_up_and_later_leads(fresh_cluster: LocalCluster) -> None:
    lc = fresh_cluster
    victim = "n3"
    with Client(cluster=lc.config) as c:
        c.put("before-crash", "1")
        lc.kill_node(victim)
        written = [f"while-down-{i}" for i in range(200)]
        _put_all(c, written)
    lc.start_node(victim)
    # It catches up from the leaders' logs (or snapshots) and then leads every shard.
    # A shard handed over can still move on (an election right after a transfer),
    # so hand over again until one look at the cluster shows it leading them all.
    deadline = time.monotonic() + 60
    while (leaders := lc.leaders()) and set(leaders.values()) != {victim}:
        assert time.monotonic() < deadline, f"{victim} never led every shard at once: {leaders}"
        for shard, leader in leaders.items():
            if leader != victim:
                lc.transfer_leader(shard, victim, timeout=30)
    assert set(leaders.values()) == {victim}
    node = lc.map.nodes[victim]
    import redis

    r = redis.Redis(host=node.host, port=node.client_port, protocol=2)
    r.execute_command("READONLY")  # its local copy, read directly: it must come to hold everything
    deadline = time.monotonic() + 30  # a new leader may still be applying committed entries
    while missing := [k for k in ["before-crash", *written] if r.get(k) is None]:
        assert time.monotonic() < deadline, f"{victim}'s copy still lacks {len(missing)} keys, e.g. {missing[:5]}"
        time.sleep(0.1)
    assert r.get("before-crash") == b"1"
    assert all(r.get(k) == k.encode() for k in written)
    _all_readable(lc, written)

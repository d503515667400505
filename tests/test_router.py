"""The router's outcome accounting over a forwarded write's attempts (``raftkv.server.router``).

A write whose first attempt may have applied can end applied or unknown, never "not applied":
whatever a later attempt hears, and however the leader refuses it.  (Seen in the harness's member
nemesis: a node just removed from the cluster forwarded a retry to the leader, whose map no longer
knew it; the leader's ``NOPERM`` went back to the client as the write's answer, though the first
attempt had applied it.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from raftkv.protocol import Error
from raftkv.server.api import Timing
from raftkv.server.peer import PeerRefused, PeerUnreachable
from raftkv.server.router import Router


class ScriptedRouter(Router):
    """A router on a node that hosts no replica: every attempt is forwarded to ``n1``, whose
    answers (or failures) come from ``script``, one per attempt."""

    def __init__(self, script: list[Any]) -> None:
        node = SimpleNamespace(name="n3", replicas={}, timing=Timing(request_timeout_s=2.0, retry_sleep_s=0.001))
        super().__init__(node)  # type: ignore[arg-type]
        self.script = list(script)
        self.sent: list[tuple] = []

    def leader_node(self, shard: int) -> str | None:
        return "n1"

    async def _forward(self, target: str, shard: int, cmd: tuple, read: bool, idempotent: bool, hops: int,
                       timeout: float) -> Any:
        self.sent.append(cmd)
        return self.script.pop(0) if self.script else Error("TRYAGAIN", "no leader")


def in_background(request: Any) -> tuple[threading.Thread, list[Any]]:
    """Start ``request()`` on a thread of its own: the thread, and the list its reply (or exception) lands in."""
    out: list[Any] = []

    def go() -> None:
        try:
            out.append(request())
        except Exception as e:  # noqa: BLE001 - the test checks what came back
            out.append(e)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def run(router: Router, *, read: bool = False, idempotent: bool = True) -> Any:
    return asyncio.run(router.execute(0, ("set", b"k", b"v"), read=read, idempotent=idempotent))


REFUSED = PeerRefused("NOPERM", "RAFTKV.RPC is an internal command: only nodes of this cluster may send it")


@pytest.mark.parametrize("first", [
    Error("UNKNOWN", "shard 0: outcome unknown (leader changed)"),
    PeerUnreachable("127.0.0.1:1: connection reset", sent=True),
], ids=["unknown-reply", "lost-after-send"])
@pytest.mark.parametrize("then", [REFUSED, Error("NOPERM", "user u may not write k")], ids=["link-refused", "error"])
def test_a_write_that_may_have_applied_is_never_answered_with_a_refusal(first: Any, then: Any) -> None:
    router = ScriptedRouter([first, then])
    reply = run(router)
    assert len(router.sent) == 2
    assert isinstance(reply, Error) and reply.code == "UNKNOWN", reply


def test_a_refused_forward_is_not_run_and_sends_the_client_to_the_leader() -> None:
    """Nothing ran anywhere: a retryable 'not applied' answer at once (not NOPERM, which a client
    takes as the write's final answer), without retrying a refusal that will not change."""
    router = ScriptedRouter([REFUSED, "never sent"])
    reply = run(router)
    assert router.sent == [("set", b"k", b"v")]
    assert isinstance(reply, Error) and reply.code == "TRYAGAIN", reply
    assert "refused" in reply.message and "NOPERM" in reply.message


def test_a_read_refused_by_the_leader_is_retryable() -> None:
    reply = run(ScriptedRouter([REFUSED]), read=True)
    assert isinstance(reply, Error) and reply.code == "TRYAGAIN", reply


def test_the_leaders_error_is_the_answer_when_no_earlier_attempt_may_have_applied() -> None:
    reply = run(ScriptedRouter([Error("TRYAGAIN", "election"), Error("WRONGTYPE", "not a string")]))
    assert reply == Error("WRONGTYPE", "not a string")


def test_a_write_applied_on_a_retry_answers_its_result() -> None:
    reply = run(ScriptedRouter([Error("UNKNOWN", "leader changed"), b"OK"]))
    assert reply == b"OK"


def test_commands_waiting_on_a_group_that_stops_here_are_answered_at_once() -> None:
    """A group stopped on this node (a removed shard, a replica moved off) never calls back the commands it was
    given: they are answered when the router drops it, not at their request timeout (seen: writes held 5 s
    during ``raftkv shard remove``). A proposed write may still commit elsewhere: unknown; a read did not
    happen: not applied. Commands arriving afterwards are answered the same way at once."""
    from raftkv.replica import NOT_APPLIED, UNKNOWN
    from raftkv.server.batch import Proposer, Reader

    class Silent:  # a replica whose answers never come
        shard = 2

        def log_now_ms(self) -> int:
            return 0

        def propose(self, cmds: list, now_ms: int, done: Any) -> None:
            pass

        def read_barrier(self, confirmed: Any) -> None:
            pass

    async def scenario() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        node = SimpleNamespace(name="n3", replicas={}, limits=SimpleNamespace(batch_cmds_max=10),
                               metrics=SimpleNamespace(proposals=None), timing=Timing())
        router = Router(node)  # type: ignore[arg-type]
        router.loop = loop
        router.proposers[2] = Proposer(Silent(), loop, 10)  # type: ignore[arg-type]
        router.readers[2] = Reader(Silent(), loop, 10)  # type: ignore[arg-type]
        write = router.proposers[2].submit(("set", b"k", b"v"))
        read = router.readers[2].submit(("get", b"k"))
        queued = router.proposers[2].submit(("set", b"k", b"w"))  # not yet handed to the replica
        await asyncio.sleep(0)  # this turn's batch goes to the replica
        stale_proposer = router.proposers[2]
        router.drop(2)
        later = stale_proposer.submit(("set", b"k", b"x"))
        return write.done() and write.result(), read.done() and read.result(), queued.result(), later.result()

    write, read, queued, later = asyncio.run(scenario())
    assert write[0] == UNKNOWN and "stopped on node n3" in write[1]
    assert read[0] == NOT_APPLIED
    assert queued[0] == UNKNOWN and later[0] == UNKNOWN


def test_a_forwarded_request_is_answered_while_a_write_of_a_frozen_key_waits(tmp_path: Any) -> None:
    """A node forwards every request for a shard it does not lead over its one link to the leader's node,
    whose replies come back in order. A write of a key frozen by a move waits until the move hands the key
    off; it must wait where it came in, not at the leader: there it held every later reply on the link.

    Seen in ``bench/reshard_bench.py`` (about 1 run in 20): after a leadership change, the writer and
    ``raftkv shard add`` both still sent to the old leader, which forwarded. Once shard 0 was frozen, the
    writer's write of one of its moving keys waited at the new leader for its whole budget (4.5 s), and the
    freeze of shard 1, forwarded behind it, was answered only then: the freeze step took 4.2-4.6 s.

    Here n1 leads both shards and requests go through n2; the nodes' request timeout is 20 s, so the write
    waits far longer than the freeze may take."""
    from raftkv.cluster import call
    from raftkv.reshard import Move
    from raftkv.server import rpc

    from .conftest import dump_logs, start_cluster

    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2, node_args=["--request-timeout", "20"])
    try:
        for shard in (0, 1):
            lc.transfer_leader(shard, "n1")
        epoch, vnodes = lc.map.epoch + 1, lc.map.vnodes

        def reshard(node: str, shard: int, *cmd: Any) -> Any:
            return rpc.decode(lc.call(node, "RAFTKV.RESHARD", str(shard), rpc.encode(cmd), timeout=10.0))

        move = Move(epoch, 0, 2, vnodes, "frozen", False)
        moving = next(k for i in range(100_000) if lc.map.shard_for_key(k := f"k{i}".encode()) == 0
                      and move.moving(k))
        assert reshard("n1", 0, "mv_freeze", epoch, 0, 2, vnodes) == "frozen"
        n2 = lc.map.nodes["n2"].client_addr
        # a session write of a frozen key, through n2: waits until the move ends
        writer, written = in_background(
            lambda: call(n2, "RAFTKV.REQ", b"frozen-writer", b"1", "SET", moving, "v", timeout=60.0))
        time.sleep(1.0)  # the write reaches the leader and waits there (or at n2)
        assert writer.is_alive() and not written, written
        # The freeze of the other source, through the same node: answered while the write still waits.
        assert reshard("n2", 1, "mv_freeze", epoch, 1, 2, vnodes) == "frozen"
        assert writer.is_alive() and not written, written
        # The move given up: the write goes through.
        for shard in (0, 1):
            assert reshard("n1", shard, "mv_abort", epoch) == "aborted"
        writer.join(30.0)
        assert written == [b"OK"]
    except BaseException:
        dump_logs(lc)
        raise
    finally:
        lc.stop()


def test_a_command_the_leader_answered_locked_waits_at_the_node_it_came_in_to() -> None:
    """The leader answers a forwarded command that meets a transaction's lock ``-LOCKED`` at once (see the
    next test); the node it came in to sends it again until the lock is gone or its time is up."""
    locked = Error("LOCKED", "key b'k' is locked by transaction t1")
    router = ScriptedRouter([locked, locked, b"v"])
    assert run(router, read=True) == b"v"
    assert len(router.sent) == 3
    router = ScriptedRouter([locked] * 10_000)  # never unlocked: LOCKED when its time is up (not applied)
    reply = run(router, read=True)
    assert isinstance(reply, Error) and reply.code == "LOCKED", reply


def test_time_running_out_while_a_lock_is_waited_out_is_answered_locked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry sleep after a LOCKED answer can end past the request's deadline (a busy machine oversleeps):
    the answer is still LOCKED, not TRYAGAIN. Seen in CI: the test above got TRYAGAIN."""
    real_sleep = asyncio.sleep

    async def oversleep(seconds: float) -> None:
        await real_sleep(seconds + 0.1)  # past the whole budget below

    monkeypatch.setattr("raftkv.server.router.asyncio.sleep", oversleep)
    router = ScriptedRouter([Error("LOCKED", "key b'k' is locked by transaction t1")] * 10)
    router.node.timing = Timing(request_timeout_s=0.05, retry_sleep_s=0.001)
    reply = run(router, read=True)
    assert isinstance(reply, Error) and reply.code == "LOCKED" and "locked by transaction t1" in reply.message, reply
    assert len(router.sent) == 1


def test_a_forwarded_request_is_answered_while_a_read_of_a_locked_key_waits(tmp_path: Any) -> None:
    """A read of a key locked by a prepared transaction waits for the lock; it must wait where it came in,
    not at the leader, whose replies on the link from that node come back in order: waiting there, it held
    every later reply on the link, the PREPARE votes of the transaction holding the lock among them.

    Seen in the fault harness's bank workload (8 clients transferring between 6 accounts): a node
    coordinating a transfer forwarded its PREPARE for another shard to that shard's leader over the link
    that also carried its clients' reads of the same accounts. A read that met the lock (taken by that very
    PREPARE) held the vote's reply, so the coordinator heard nothing until its prepare timeout (1.5 s) and
    every transfer and read of those accounts stalled with it, again and again: 85-140 ok operations in 8 s
    instead of 400-600.

    Here n1 leads both shards and requests go through n2; a transaction on n1 is paused after its PREPAREs
    (fault point ``txn.after_prepare``) for longer than the test, holding its keys' locks, and the nodes'
    request timeout is 60 s: the read waits all that time. Another request through n2 gets 10 s (it takes
    milliseconds): held behind the read, it got its answer only when the read's time ran out."""
    from raftkv.cluster import call

    from .conftest import dump_logs, start_cluster

    lc = start_cluster(str(tmp_path / "c"), nodes=3, shards=2,
                       node_args=["--request-timeout", "60", "--fault", "txn.after_prepare:600:1:hold-lock"])
    try:
        for shard in (0, 1):
            lc.transfer_leader(shard, "n1")

        def key_on(shard: int, prefix: str) -> str:
            return next(k for i in range(10_000) if lc.map.shard_for_key((k := f"{prefix}{i}").encode()) == shard)

        a, b, free = key_on(0, "a"), key_on(1, "b"), key_on(0, "free")
        n1, n2 = lc.map.nodes["n1"].client_addr, lc.map.nodes["n2"].client_addr
        # Answered once both PREPAREs are in (parallel commits); the coordinator then pauses, a and b locked.
        assert call(n1, "RAFTKV.TXN", "ID", "hold-lock", "0", "2", "PUT", a, "1", "PUT", b, "1", "0",
                    timeout=20.0) is not None
        # a read of a locked key, through n2: waits until the lock goes or its time is up
        reader, read = in_background(lambda: call(n2, "GET", a, timeout=120.0))
        time.sleep(1.0)  # the read reaches the leader and waits there (or at n2)
        assert reader.is_alive() and not read, read
        # Another key of the same shard, through the same node: answered while the read still waits.
        assert call(n2, "SET", free, "v", timeout=10.0) == b"OK"
        assert reader.is_alive() and not read, read
    except BaseException:
        dump_logs(lc)
        raise
    finally:
        lc.stop()

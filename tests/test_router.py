"""The router's outcome accounting over a forwarded write's attempts (``raftkv.server.router``).

A write whose first attempt may have applied can end applied or unknown, never "not applied":
whatever a later attempt hears, and however the leader refuses it.  (Seen in the harness's member
nemesis: a node just removed from the cluster forwarded a retry to the leader, whose map no longer
knew it; the leader's ``NOPERM`` went back to the client as the write's answer, though the first
attempt had applied it.)
"""

from __future__ import annotations

import asyncio
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

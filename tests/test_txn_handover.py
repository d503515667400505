"""A transaction handed over to its home leader whose reply was lost: the answer can never be "not applied".

Seen in the soak (counter workload, member nemesis): a node being removed handed a WATCH/EXEC transaction
over to the home shard's leader, which committed it; the reply was lost as the node left the groups; the
node then coordinated the same transaction id itself, found no leader of the shard and answered
``-NOQUORUM``, which promises "not applied", so the client counted an increment that had happened as
failed (the lost-update check: final value 27 for 26 acknowledged increments).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from raftkv.protocol import Error
from raftkv.server import coordinator
from raftkv.server.api import Timing
from raftkv.server.peer import PeerRefused, PeerUnreachable
from raftkv.txn import TxnResult


def _node(handover: Any) -> SimpleNamespace:
    """A node that does not lead the home shard: it hands the transaction over to ``n1``, whose RPC does
    ``handover`` (raise it, or return it)."""

    async def rpc(target: str, msg: tuple, timeout: float) -> Any:
        if isinstance(handover, BaseException):
            raise handover
        return handover

    return SimpleNamespace(name="n3", replicas={}, timing=Timing(request_timeout_s=2.0), shard_of=lambda k: 0,
                           leader_node=lambda shard: "n1", rpc=rpc)


def _exec(node: SimpleNamespace, here: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    async def run_here(*_args: Any) -> Any:
        return here

    monkeypatch.setattr(coordinator, "_run_here", run_here)
    return asyncio.run(coordinator.coordinate(node, "tx1", [(b"k", "value", b"1")], [("put", b"k", b"2")], []))


@pytest.mark.parametrize("here", [Error("NOQUORUM", "shard 0 has no leader (waited 3.0 s)"),
                                  Error("TRYAGAIN", "not applied"), Error("MOVED", "0 elsewhere")],
                         ids=["noquorum", "tryagain", "moved"])
def test_a_handover_lost_after_sending_turns_a_not_applied_answer_into_unknown(
        here: Error, monkeypatch: pytest.MonkeyPatch) -> None:
    reply = _exec(_node(PeerUnreachable("127.0.0.1:7001: connection reset", sent=True)), here, monkeypatch)
    assert isinstance(reply, Error) and reply.code == "UNKNOWN", reply
    assert "tx1" in reply.message and here.code in reply.message


def test_a_handover_lost_after_sending_keeps_a_result_found_by_the_same_id(monkeypatch: pytest.MonkeyPatch) -> None:
    found = TxnResult(True, (True,))  # the local run with the same id found the first attempt's outcome
    assert _exec(_node(PeerUnreachable("reset", sent=True)), found, monkeypatch) == found


@pytest.mark.parametrize("handover", [PeerUnreachable("refused", sent=False), PeerRefused("NOPERM", "unknown node"),
                                      Error("NOQUORUM", "no leader there")],
                         ids=["never-sent", "refused", "not-run-there"])
def test_a_handover_that_did_not_run_leaves_the_local_answer_as_it_is(
        handover: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    here = Error("NOQUORUM", "shard 0 has no leader (waited 3.0 s)")
    assert _exec(_node(handover), here, monkeypatch) == here

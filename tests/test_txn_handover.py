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
                           leader_node=lambda shard: "n1", rpc=rpc, map=SimpleNamespace(ring_tag="3.0"))


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


@pytest.mark.parametrize("sent", [True, False], ids=["lost-after-sending", "never-sent"])
def test_a_handover_that_failed_while_the_ring_changed_is_not_run_again_here(
        sent: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same id must not be planned under two rings (its record lives on the home shard of its ring): when
    the ring changed while the handover failed, the node does not run it itself. If the handover may have run
    it, the outcome is unknown; if it was never sent, nothing ran (-RINGCHANGED: retry with a new id)."""
    node = _node(None)

    async def rpc(target: str, msg: tuple, timeout: float) -> Any:
        assert msg[-1] == "3.0"  # the ring the transaction was planned under travels with it
        node.map.ring_tag = "4.9"  # a shard add lands meanwhile
        raise PeerUnreachable("127.0.0.1:7001: connection reset", sent=sent)

    node.rpc = rpc
    reply = _exec(node, TxnResult(True, (True,)), monkeypatch)  # (a local run would have "succeeded")
    assert isinstance(reply, Error) and reply.code == ("UNKNOWN" if sent else "RINGCHANGED"), reply


def test_a_transaction_for_another_ring_is_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _node(AssertionError("never handed over"))
    reply = asyncio.run(coordinator.coordinate(node, "tx1", [], [("put", b"k", b"2")], [], ring="2.0"))
    assert isinstance(reply, Error) and reply.code == "RINGCHANGED" and "not 2.0" in reply.message

"""A node whose storage engine failed a durable commit (a full disk) stops its Raft groups (raftkv.driver);
its request path then refuses, with a clear error and without proposing, what its frozen leader replicas
would otherwise take and never commit.  The end-to-end case is the fault harness's ``disk`` nemesis
(docs/jepsen.md)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from raftkv.protocol import Error
from raftkv.server.api import Timing
from raftkv.server.router import Router


class FrozenLeader:
    """A replica that still believes it leads (its driver stopped, so nothing tells it otherwise)."""

    def is_leader(self) -> bool:
        return True


def test_a_node_whose_engine_failed_refuses_instead_of_proposing() -> None:
    failure = "storage engine commit failed in /d/n1/engine: mdb_txn_commit: No space left on device"
    node = SimpleNamespace(name="n1", timing=Timing(request_timeout_s=1.0), replicas={0: FrozenLeader()},
                           storage_failure=lambda: failure)
    router = Router(node)  # type: ignore[arg-type]  # no proposers: a proposal would raise KeyError
    for read in (False, True):
        reply = asyncio.run(router.execute(0, ("set", b"k", b"v"), read=read))
        assert isinstance(reply, Error) and reply.code == "STORAGE", reply
        assert reply.message == (f"node n1 stopped its Raft groups: {failure}; not applied "
                                 "(free disk space and restart the node)")


def test_clients_take_a_storage_refusal_elsewhere() -> None:
    """``-STORAGE`` says nothing ran and the node will not serve until restarted: the client library retries
    (on the leader it finds next) instead of raising it as the request's answer; at the deadline it is
    'unavailable', or 'unknown' if an earlier attempt may have applied."""
    from raftkv.client import Attempts
    from raftkv.errors import IndeterminateError, UnavailableError
    from raftkv.protocol import ReplyError

    storage = ReplyError("STORAGE node n1 stopped its Raft groups: ...; not applied")
    a = Attempts(0, write=True, deadline=0.0)
    a.refused(storage)  # no raise: retryable
    try:
        a.backoff(1.0)
    except UnavailableError:
        pass
    else:
        raise AssertionError("past the deadline, a refused-only write is unavailable")
    b = Attempts(0, write=True, deadline=0.0)
    b.refused(ReplyError("UNKNOWN shard 0: outcome unknown"))
    b.refused(storage)
    try:
        b.backoff(1.0)
    except IndeterminateError:
        pass
    else:
        raise AssertionError("after an unknown attempt, the write stays indeterminate")


def test_a_frozen_node_names_no_leader() -> None:
    """RAFTKV.SHARDS on a node whose groups stopped: its replicas' belief that they lead is stale."""
    from raftkv.server.commands.admin import cmd_shards
    from shards.shardmap import local_cluster

    class Replica(FrozenLeader):
        def leader_addr(self) -> str:
            return "127.0.0.1:8001"  # n1's member of shard 0 in local_cluster(3, 2)

        def term(self) -> int:
            return 4

    m = local_cluster(3, 2)
    node = SimpleNamespace(map=m, replicas={0: Replica(), 1: Replica()}, storage_failure=lambda: None)
    assert [row[1] for row in cmd_shards(node, None, [b"RAFTKV.SHARDS"])] == [b"n1", b"n1"]  # type: ignore[arg-type]
    node.storage_failure = lambda: "mdb_txn_commit: No space left on device"
    assert cmd_shards(node, None, [b"RAFTKV.SHARDS"]) == [[0, None, 4], [1, None, 4]]  # type: ignore[arg-type]

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

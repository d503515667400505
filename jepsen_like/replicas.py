"""The ``replicas`` check: after the heal, every replica of a shard holds the same data.

Linearizability checks what clients saw; a replica that silently diverged (a lost fsync on one node, a
snapshot installed wrong, an entry applied twice on a follower) can pass them while it is a follower and
surface only after a later failover. So, once the cluster has recovered and the load has stopped, the
harness asks every node for its replica's ``RAFTKV.HASHKV`` of each shard: ``[revision, digest]``
(``raftkv.state.hash_kv``). Replicas at the same revision have applied the same writes and must have equal
digests (etcd's corruption check compares HashKV the same way).

:func:`judge` is pure: it reads one round of answers. A round where a shard's replicas are at different
revisions (a follower still catching up, a leader's expiry write in flight) says nothing: :func:`check`
asks again until every shard has one revision in a round, or its time is up (verdict unknown, never a
pass). Equal revisions with different digests fail the check, naming the shard and the digests.

The load has stopped when the check runs, so a replica that is behind has nothing to wait for but its
leader's entries (sent within a heartbeat, a peer link redialed within ``raftnet.RECONNECT_MAX_S``). When
every replica of the unsettled shards answers, and neither its answer nor its Raft progress (``progress``)
has changed for ``stall`` seconds, nothing is catching up: the check gives up then (verdict unknown, as at
its timeout) instead of polling a stuck follower for the rest of ``timeout``. A replica that does not answer
(a node still starting) never counts as stalled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

__all__ = ["judge", "check", "ask_node", "describe_node", "progress_of"]

Answer = tuple[int, str] | str
"""A replica's ``(revision, digest)``, or why it did not answer."""


def judge(answers: dict[int, dict[str, Answer]]) -> dict[str, Any] | None:
    """The check's result from one round (``shard -> node -> answer``), or None: not settled, ask again."""
    diverged = []
    for shard, by_node in sorted(answers.items()):
        if any(isinstance(a, str) for a in by_node.values()):
            return None
        revisions = {a[0] for a in by_node.values()}  # type: ignore[index]
        if len(revisions) > 1:
            return None
        digests = {a[1] for a in by_node.values()}  # type: ignore[index]
        if len(digests) > 1:
            diverged.append(f"shard {shard} at revision {revisions.pop()}: "
                            + ", ".join(f"{n} {a[1][:12]}" for n, a in sorted(by_node.items())))  # type: ignore[index]
    n = sum(len(b) for b in answers.values())
    if diverged:
        return {"valid": False, "verdict": "diverged", "summary": "replicas diverged: " + "; ".join(diverged)}
    return {"valid": True, "verdict": "ok",
            "summary": f"{n} replicas of {len(answers)} shards: equal digests at equal revisions"}


def check(ask: Callable[[str, int], Answer], placement: dict[int, list[str]], timeout: float = 20.0,
          sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
          describe: Callable[[str, int], str] | None = None, stall: float = 5.0,
          progress: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """Ask every replica (``ask(node, shard)``) in rounds until :func:`judge` settles, ``timeout`` passes, or
    the unsettled shards' replicas all answer and stay as they are for ``stall`` seconds (see the module doc;
    ``progress(node, shard)``: the replica's Raft progress, e.g. its commit index and log length).

    When it does not settle, ``describe(node, shard)`` (e.g. the replica's Raft status) is added for every
    replica of the unsettled shards: what a reader needs to tell a stuck follower from a slow one."""
    start = clock()
    deadline = start + timeout
    rounds = 0
    last: Any = None
    still_since = start
    while True:
        answers = {s: {n: ask(n, s) for n in nodes} for s, nodes in placement.items()}
        rounds += 1
        result = judge(answers)
        if result is not None:
            result["summary"] += f" ({rounds} round{'s' if rounds > 1 else ''}, {clock() - start:.1f} s)"
            return result
        now = clock()
        unsettled_raw = {s: b for s, b in answers.items() if judge({s: b}) is None}
        answered = all(not isinstance(a, str) for b in unsettled_raw.values() for a in b.values())
        state = (unsettled_raw, {(n, s): progress(n, s) for s, b in unsettled_raw.items() for n in b}
                 if progress is not None and answered else None)
        if not answered or state != last:
            last, still_since = state, now
        stalled = answered and now - still_since >= stall
        if now > deadline or stalled:
            unsettled = {s: {n: (a if isinstance(a, str) else f"revision {a[0]}") for n, a in b.items()}
                         for s, b in unsettled_raw.items()}
            if stalled:
                summary = (f"replicas did not settle on one revision per shard: {unsettled}, and none of them "
                           f"moved in {now - still_since:.1f} s (gave up after {now - start:.1f} s)")
            else:
                summary = f"replicas did not settle on one revision per shard in {timeout:g} s: {unsettled}"
            if describe is not None:
                summary += "; " + "; ".join(f"shard {s} {n}: {describe(n, s)}" for s in sorted(unsettled)
                                            for n in sorted(unsettled[s]))
            return {"valid": None, "verdict": "unknown", "summary": summary}
        sleep(0.3)


def ask_node(cluster: Any) -> Callable[[str, int], Answer]:
    """``ask`` for :func:`check` through a ``LocalCluster`` (RAFTKV.HASHKV)."""

    def ask(node: str, shard: int) -> Answer:
        try:
            reply = cluster.call(node, "RAFTKV.HASHKV", str(shard), timeout=5.0)
        except Exception as e:  # noqa: BLE001 - a node that does not answer is reported, and asked again
            return f"{type(e).__name__}: {e}"
        if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], int):
            digest = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
            return (reply[0], digest)
        return f"unexpected reply {reply!r}"

    return ask


def describe_node(cluster: Any) -> Callable[[str, int], str]:
    """``describe`` for :func:`check`: a replica's Raft status (role, term, leader, commit, applied, log)."""

    def describe(node: str, shard: int) -> str:
        try:
            status = json.loads(cluster.call(node, "RAFTKV.STATUS", timeout=5.0))
            st = status["shards"][str(shard)]
        except Exception as e:  # noqa: BLE001 - described as it failed
            return f"status unavailable ({type(e).__name__}: {e})"
        keys = ("role", "term", "leader", "commit_idx", "last_applied", "log_len")
        return " ".join(f"{k}={st.get(k)}" for k in keys)

    return describe


def progress_of(cluster: Any) -> Callable[[str, int], Any]:
    """``progress`` for :func:`check`: a replica's Raft term, commit and applied indexes and log length (None
    when its status is unavailable, which then counts as a change only if it was available before)."""

    def progress(node: str, shard: int) -> Any:
        try:
            st = json.loads(cluster.call(node, "RAFTKV.STATUS", timeout=5.0))["shards"][str(shard)]
        except Exception:  # noqa: BLE001 - a replica without a status shows no progress either
            return None
        return tuple(st.get(k) for k in ("role", "term", "leader", "commit_idx", "last_applied", "log_len"))

    return progress

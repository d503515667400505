"""The ``elections`` check: at most one leader per term in every shard (Raft's Election Safety, §5.2).

Two leaders in one term can commit two different entries at one index, which no client history may show
until much later (a lost vote after a power loss, a vote not persisted before it was sent, a membership
change that let two majorities form). Every node logs each role change of each shard replica as
``event=role_change shard=S old=candidate new=leader term=T``; after the run the harness reads every
node's log and :func:`judge` (pure) reports any shard and term with two different leaders.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

__all__ = ["leaders_in", "judge"]

_LEADER = re.compile(r"event=role_change shard=(\d+) old=\w+ new=leader term=(\d+)")


def leaders_in(node: str, lines: Iterable[str]) -> list[tuple[int, int, str]]:
    """``(shard, term, node)`` for each time ``node``'s log says one of its replicas became leader."""
    out = []
    for line in lines:
        m = _LEADER.search(line)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), node))
    return out


def judge(elected: Iterable[tuple[int, int, str]]) -> dict[str, Any]:
    """The check's result: invalid if any (shard, term) had two different leaders."""
    by_term: dict[tuple[int, int], set[str]] = defaultdict(set)
    for shard, term, node in elected:
        by_term[(shard, term)].add(node)
    twice = {k: sorted(v) for k, v in sorted(by_term.items()) if len(v) > 1}
    if twice:
        return {"valid": False, "verdict": "two leaders in a term",
                "summary": "; ".join(f"shard {s} term {t}: leaders {', '.join(ns)}" for (s, t), ns in twice.items())}
    shards = {s for s, _ in by_term}
    return {"valid": True, "verdict": "ok",
            "summary": f"{len(by_term)} elections in {len(shards)} shards, one leader per term"}

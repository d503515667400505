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
_MAP = re.compile(r"event=map_installed node=\S+ epoch=(\d+) .*\bgroups=(\d+)")
_SERVING = re.compile(r"event=serving .*\bepoch=(\d+)")


def leaders_in(node: str, lines: Iterable[str]) -> list[tuple[int, int, str]]:
    """``(shard, term, node)`` for each time ``node``'s log says one of its replicas became leader."""
    return [(shard, term, n) for shard, term, n, _epoch in _scan(node, lines)[0]]


def _scan(node: str, lines: Iterable[str]) -> tuple[list[tuple[int, int, str, int]], dict[int, set[int]]]:
    """This node's leaders as ``(shard, term, node, epoch)``, ``epoch`` being its map's then (from its
    ``event=serving ... epoch=E`` and ``event=map_installed ... epoch=E ... groups=N`` lines), and per shard the
    epochs of the maps it installed that had no group of that shard any more after one did (a removal)."""
    out = []
    removals: dict[int, set[int]] = defaultdict(set)
    epoch = 0
    groups: int | None = None
    for line in lines:
        m = _LEADER.search(line)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), node, epoch))
            continue
        m = _MAP.search(line)
        if m:
            epoch, now = int(m.group(1)), int(m.group(2))
            for shard in range(now, groups or 0):
                removals[shard].add(epoch)
            groups = now
            continue
        m = _SERVING.search(line)
        if m:
            epoch, groups = int(m.group(1)), None  # a restart: the groups its file places are not logged
    return out, removals


def elected(logs: dict[str, Iterable[str]]) -> list[tuple[tuple[int, int], int, str]]:
    """``((shard, incarnation), term, node)`` for every leader in every node's log.

    A shard id can name several Raft groups in one run: ``raftkv shard remove`` destroys the last shard's group
    and a later ``shard add`` creates a new one under the same id, whose terms start again at 1. A leader
    belongs to the incarnation numbered by the removals of that id (seen in any node's log) at or before the
    map its node had when it was elected: a node only hosts the new group once a map places it again."""
    scanned = [_scan(node, lines) for node, lines in logs.items()]
    removals: dict[int, set[int]] = defaultdict(set)
    for _leaders, rem in scanned:
        for shard, epochs in rem.items():
            removals[shard] |= epochs
    return [((shard, sum(1 for e in removals[shard] if e <= epoch)), term, node)
            for leaders, _rem in scanned for shard, term, node, epoch in leaders]


def _label(key: Any) -> str:
    shard, incarnation = key if isinstance(key, tuple) else (key, 0)
    return f"shard {shard}" + (f" (its group re-created {incarnation}x)" if incarnation else "")


def judge(elected: Iterable[tuple[Any, int, str]]) -> dict[str, Any]:
    """The check's result: invalid if any shard's group (a shard id, or ``(id, incarnation)``) had two
    different leaders in one term."""
    by_term: dict[tuple[Any, int], set[str]] = defaultdict(set)
    for shard, term, node in elected:
        by_term[((shard, 0) if not isinstance(shard, tuple) else shard, term)].add(node)
    twice = {k: sorted(v) for k, v in sorted(by_term.items()) if len(v) > 1}
    if twice:
        return {"valid": False, "verdict": "two leaders in a term",
                "summary": "; ".join(f"{_label(s)} term {t}: leaders {', '.join(ns)}" for (s, t), ns in twice.items())}
    shards = {s for s, _ in by_term}
    return {"valid": True, "verdict": "ok",
            "summary": f"{len(by_term)} elections in {len(shards)} shards, one leader per term"}

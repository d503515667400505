"""Linearizability checker: Wing & Gong search with Lowe's memo cache (Porcupine's algorithm).

Theory of operation
===================

Input: a list of :class:`~jepsen_like.history.Op` (invocation/completion
pairs) and a pure model (:mod:`jepsen_like.models`).

1. *Clean-up.*  ``fail`` ops are dropped: they had no effect (a failed CAS did
   not apply, a failed or timed-out read returned nothing), so they constrain
   nothing.  Indeterminate ops (``info``, never completed) keep
   ``ret = +inf`` and ``output = UNKNOWN``: they may take effect anywhere after
   their invocation, or never (which is the same as "last", since nothing
   observes the state after the end).  ``model.encode`` drops ops that can
   neither change nor observe the state (an indeterminate read).

2. *P-compositionality.*  ``model.partition`` splits the history (per key for
   the kv models, connected components of keys for transactions); the history
   is linearizable iff every partition is (Herlihy & Wing locality; Horn &
   Kroening).  Partitions are searched smallest first, round-robin in slices
   of ``SLICE_STEPS`` search steps, so a violation that is cheap to find in
   one partition is not stuck behind an expensive partition (Porcupine gets
   the same effect from goroutines); the first violation stops everything.

3. *Search (per partition).*  Every op contributes a call entry and a return
   entry, sorted by position (calls before returns on ties: intervals are
   closed).  They form a doubly linked list over integer node ids with head
   and tail sentinels (arrays ``nxt``/``prv``; no objects, no recursion).
   Walking from the head: at a call entry, try to linearize that op now:
   ``new = trans[e](state)`` (a precompiled closure of the model's step).  If
   legal and ``(linearized | bit, new)`` is not in the memo cache, add it,
   push ``(e, state)`` on an explicit stack, *lift* the call and its return
   out of the list and restart from the head.  Otherwise try the next entry.
   Reaching a return entry means its op had to be linearized before that
   point but was not: pop the stack, restore the state, *unlift* and continue
   after the popped call.  An empty list means every op is linearized (the
   stack is a linearization); a return with an empty stack means none exists.
   The linearized set is a Python ``int`` bitset; the cache is a ``set`` of
   ``(bitset, state)`` tuples (Lowe's just-in-time linearization: configurations
   already explored are never re-explored).

4. *Limits.*  ``timeout_s`` (checked between slices against ``clock``, which
   defaults to ``time.monotonic``: the one place with a clock, documented
   exception to the pure-core rule) and ``max_states`` (total cache entries)
   turn the answer into ``unknown``, never into a pass.

5. *Explanation.*  The search remembers the deepest stack it reached (the
   longest linearizable prefix) and the ops whose return entries blocked the
   search at that depth (the frontier: ops that could not be linearized).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .history import Op, read_history
from .models import ILLEGAL, Model, default_model_for, get_model

__all__ = ["CheckResult", "check", "check_file", "LINEARIZABLE", "NOT_LINEARIZABLE", "UNKNOWN_VERDICT"]

LINEARIZABLE = "linearizable"
NOT_LINEARIZABLE = "not_linearizable"
UNKNOWN_VERDICT = "unknown"

SLICE_STEPS = 20_000
"""Search steps (pushes + pops) given to a partition before moving to the next one."""

FRONTIER_MAX = 16

_RUNNING, _OK, _ILLEGAL = 0, 1, 2


@dataclass
class CheckResult:
    """Outcome of :func:`check`.

    ``verdict`` is ``"linearizable"``, ``"not_linearizable"`` or ``"unknown"``
    (time or state limit reached: never a pass).  On a violation
    ``failing_ops`` are the ops the search could not linearize at its deepest
    point and ``longest_prefix`` is the longest linearizable sequence found,
    both for the partition that failed (``failed_partition`` holds its ops).
    """

    verdict: str
    failing_ops: list[Op] = field(default_factory=list)
    longest_prefix: list[Op] = field(default_factory=list)
    partitions: int = 0
    partitions_checked: int = 0
    elapsed: float = 0.0
    states: int = 0
    reason: str = ""
    failed_partition: list[Op] = field(default_factory=list, repr=False)
    model: str = ""

    @property
    def ok(self) -> bool:
        """True only for a proven linearizable history."""
        return self.verdict == LINEARIZABLE

    def summary(self) -> str:
        """One line for humans."""
        return (
            f"{self.verdict}: {self.partitions_checked}/{self.partitions} partitions checked, "
            f"{self.states} states, {self.elapsed * 1000:.1f} ms" + (f" ({self.reason})" if self.reason else "")
        )


class _Search:
    """Resumable WGL/Lowe search over one partition (see the module docstring, step 3)."""

    def __init__(self, ops: Sequence[Op], model: Model) -> None:
        enc = []
        for op in ops:
            if op.status == "fail":
                continue
            io = model.encode(op)
            if io is not None:
                enc.append((op, io))
        self.ops = [op for op, _ in enc]
        m = len(enc)
        self.size = m
        points = []
        for i, (op, _) in enumerate(enc):
            points.append((op.call, 0, i))
            points.append((op.ret, 1, i))
        points.sort()
        n = 2 * m
        head, tail = n, n + 1
        self.head, self.tail = head, tail
        # nodes 0..n-1 are the entries in order, then the head and tail sentinels
        order = [head, *range(n), tail]
        nxt = [0] * (n + 2)
        prv = [0] * (n + 2)
        for a, b in zip(order, order[1:], strict=False):
            nxt[a] = b
            prv[b] = a
        nxt[tail], prv[head] = -1, -1
        self.nxt, self.prv = nxt, prv
        self.match = [-1] * (n + 2)
        self.trans: list[Callable[[Any], Any] | None] = [None] * (n + 2)
        self.bit = [0] * (n + 2)
        self.opid = [0] * (n + 2)
        call_pos = {}
        for pos, (_, kind, i) in enumerate(points):
            self.opid[pos] = i
            if kind == 0:
                call_pos[i] = pos
                inp, out = enc[i][1]
                self.trans[pos] = model.compile(inp, out)
                self.bit[pos] = 1 << i
            else:
                self.match[call_pos[i]] = pos
        # search state (saved between slices)
        self.entry = nxt[head]
        self.state = model.init()
        self.bits = 0
        self.stack: list[tuple[int, Any]] = []
        self.cache: set[tuple[int, Any]] = set()
        self.best = 0
        self.best_seq: list[int] = []
        self.frontier: set[int] = set()
        self.done = _OK if n == 0 else _RUNNING

    def run(self, budget: int) -> int:
        """Advance by at most ``budget`` pushes+pops; return _RUNNING, _OK or _ILLEGAL."""
        if self.done != _RUNNING:
            return self.done
        nxt, prv, match, trans, bit = self.nxt, self.prv, self.match, self.trans, self.bit
        cache = self.cache
        add = cache.add
        stack = self.stack
        push, pop = stack.append, stack.pop
        head, tail = self.head, self.tail
        illegal = ILLEGAL
        entry, state, bits = self.entry, self.state, self.bits
        best, depth = self.best, len(stack)
        frontier = self.frontier
        result = _RUNNING
        while True:
            t = trans[entry]
            if t is not None:  # a call entry: try to linearize its op here
                ns = t(state)
                if ns is not illegal:
                    nb = bits | bit[entry]
                    k = (nb, ns)
                    if k not in cache:
                        add(k)
                        push((entry, state))
                        state, bits = ns, nb
                        r = match[entry]
                        p = prv[entry]
                        n = nxt[entry]
                        nxt[p] = n
                        prv[n] = p
                        p = prv[r]
                        n = nxt[r]
                        nxt[p] = n
                        prv[n] = p
                        entry = nxt[head]
                        depth += 1
                        if depth > best:
                            best = depth
                            self.best_seq = [e for e, _ in stack]
                            frontier = set()
                        if entry == tail:
                            result = _OK
                            break
                        budget -= 1
                        if budget <= 0:
                            break
                        continue
                entry = nxt[entry]
            else:  # a return entry: its op should already be linearized; backtrack
                if depth == best and len(frontier) < FRONTIER_MAX:
                    frontier.add(self.opid[entry])
                if not depth:
                    result = _ILLEGAL
                    break
                entry, state = pop()
                depth -= 1
                bits ^= bit[entry]
                r = match[entry]
                p = prv[r]
                nxt[p] = r
                prv[nxt[r]] = r
                nxt[prv[entry]] = entry
                prv[nxt[entry]] = entry
                entry = nxt[entry]
                budget -= 1
                if budget <= 0:
                    break
        self.entry, self.state, self.bits = entry, state, bits
        self.best, self.frontier = best, frontier
        self.done = result
        return result

    def linearization(self) -> list[Op]:
        """The linearization found (after _OK), in order."""
        return [self.ops[self.opid[e]] for e, _ in self.stack]

    def longest_prefix(self) -> list[Op]:
        return [self.ops[self.opid[e]] for e in self.best_seq]

    def failing_ops(self) -> list[Op]:
        return sorted((self.ops[i] for i in self.frontier), key=lambda op: op.index)


def check(
    history_ops: Sequence[Op],
    model: Model,
    timeout_s: float | None = None,
    max_states: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CheckResult:
    """Check a history for linearizability against ``model``.

    ``timeout_s`` (wall time, via ``clock``) and ``max_states`` (memo-cache
    entries over all partitions) bound the search; reaching either gives
    verdict ``"unknown"``.  Stops at the first partition found not
    linearizable.
    """
    t0 = clock()
    deadline = t0 + timeout_s if timeout_s is not None else math.inf
    state_cap = max_states if max_states is not None else math.inf
    ops = [op for op in history_ops if op.status != "fail"]
    searches = sorted((_Search(p, model) for p in model.partition(ops)), key=lambda s: s.size)
    res = CheckResult(LINEARIZABLE, partitions=len(searches), model=getattr(model, "name", ""))
    pending = searches
    explored = 0
    while pending:
        still = []
        for s in pending:
            before = len(s.cache)
            budget = int(min(SLICE_STEPS, state_cap - explored + 1))
            r = s.run(budget) if budget > 0 else _RUNNING
            explored += len(s.cache) - before
            if r == _ILLEGAL:
                res.verdict = NOT_LINEARIZABLE
                res.failing_ops = s.failing_ops()
                res.longest_prefix = s.longest_prefix()
                res.failed_partition = list(s.ops)
                res.partitions_checked += 1
                res.reason = f"partition of {s.size} ops has no linearization"
                break
            if r == _OK:
                res.partitions_checked += 1
            else:
                still.append(s)
            if explored > state_cap:
                res.verdict, res.reason = UNKNOWN_VERDICT, f"state limit reached ({max_states} states)"
                break
            if clock() > deadline:
                res.verdict, res.reason = UNKNOWN_VERDICT, f"time limit reached ({timeout_s} s)"
                break
        if res.verdict != LINEARIZABLE:
            break
        pending = still
    res.states = explored
    res.elapsed = clock() - t0
    return res


def check_file(
    path: str | Path,
    model: Model | str | None = None,
    fmt: str = "auto",
    timeout_s: float | None = None,
    max_states: int | None = None,
) -> tuple[CheckResult, list[Op], str]:
    """Read a history file and check it; return ``(result, ops, detected_format)``.

    ``model`` may be a model, a model name, or ``None`` for the format's default
    (jepsen-log -> etcd, porcupine-kv -> kv-append, jsonl -> kv).
    """
    ops, fmt = read_history(path, fmt)
    if model is None:
        model = default_model_for(fmt)
    elif isinstance(model, str):
        model = get_model(model)
    return check(ops, model, timeout_s=timeout_s, max_states=max_states), ops, fmt

"""Benchmark the Elle checker on a generated, strictly serializable list-append history.

Usage: ``python bench/elle_bench.py [--txns 100000] [--clients 10] [--seed 1] [--repeat 1]``

The history is simulated: ``--clients`` processes each keep one transaction in
flight (1-4 micro-ops: appends of unique elements, or reads of whole lists)
over 8 active keys; a key retires after 32 appends and a fresh one takes its
place (as Elle's generator does).  Each transaction takes effect atomically
between its invocation and its completion, so the history is strictly
serializable; 1 % of transactions fail (no effect) and 1 % are indeterminate
(info: applied or not, never completed; the process then continues under a new
id).  Prints the generation and check times and the verdict (must be valid).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from typing import Any

from jepsen_like.elle import check
from jepsen_like.history import Op

KEYS_ACTIVE = 8
APPENDS_PER_KEY = 32


def generate(txns: int, clients: int, seed: int) -> list[Op]:
    """A strictly serializable list-append history of ``txns`` transactions."""
    rng = random.Random(seed)
    state: dict[str, list[int]] = {}
    appended: dict[str, int] = {}
    active = [f"k{i}" for i in range(KEYS_ACTIVE)]
    next_key = KEYS_ACTIVE
    procs = list(range(clients))
    inflight: dict[int, dict[str, Any]] = {}
    ops: list[Op] = []
    started = t = 0
    while started < txns or inflight:
        t += 1
        c = rng.randrange(clients)
        cur = inflight.get(c)
        if cur is None:
            if started >= txns:
                continue
            mops = []
            for _ in range(rng.randint(1, 4)):
                k = rng.choice(active)
                if rng.random() < 0.5:
                    mops.append(["r", k, None])
                else:
                    appended[k] = appended.get(k, 0) + 1
                    mops.append(["append", k, appended[k]])
                    if appended[k] >= APPENDS_PER_KEY:
                        active[active.index(k)] = f"k{next_key}"
                        next_key += 1
            r = rng.random()
            status = "fail" if r < 0.01 else "info" if r < 0.02 else "ok"
            inflight[c] = {"mops": mops, "call": t, "status": status, "out": None, "applied": False}
            started += 1
        elif not cur["applied"]:
            cur["applied"] = True
            if cur["status"] == "fail" or (cur["status"] == "info" and rng.random() < 0.5):
                continue
            out = []
            for f, k, v in cur["mops"]:
                if f == "append":
                    state.setdefault(k, []).append(v)
                    out.append([f, k, v])
                else:
                    out.append([f, k, list(state.get(k, ()))])
            cur["out"] = out
        else:
            del inflight[c]
            st = cur["status"]
            ret = math.inf if st == "info" else t
            ops.append(Op(len(ops), procs[c], "txn", None, cur["mops"], cur["out"] if st == "ok" else None,
                          cur["call"], ret, st))
            if st == "info":
                procs[c] += clients
    ops.sort(key=lambda op: op.call)
    return [Op(i, op.client, op.f, op.key, op.input, op.output, op.call, op.ret, op.status)
            for i, op in enumerate(ops)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--txns", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    t0 = time.perf_counter()
    ops = generate(args.txns, args.clients, args.seed)
    gen_s = time.perf_counter() - t0
    print(f"generated {len(ops)} txns ({args.clients} clients) in {gen_s:.1f} s")
    best = math.inf
    res = None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        res = check(ops, "list-append")
        best = min(best, time.perf_counter() - t0)
    assert res is not None
    print(f"check: {best:.1f} s (best of {args.repeat}), {len(ops) / best:,.0f} txn/s; {res.summary()}")
    return 0 if res.verdict == "valid" else 1


if __name__ == "__main__":
    sys.exit(main())

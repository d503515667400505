"""bench/work_per_put.py on one tiny cluster (1 shard, 4 clients, 1 s): every counter it reads from the nodes'
status moves and the per-put figures come out. No speed checks."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("work_per_put", os.path.join(ROOT, "bench", "work_per_put.py"))
work = importlib.util.module_from_spec(_spec)
sys.modules["work_per_put"] = work
_spec.loader.exec_module(work)


@pytest.mark.slow
def test_work_per_put_reads_every_counter_from_the_nodes() -> None:
    m = work.measure(1, 4, 1.0)
    assert m["shards"] == 1 and m["puts"] > 0 and m["puts_s"] > 0
    # every put is a Raft entry's worth of work: entries, loops, ticks, frames, records and durable commits
    for k in ("entries", "loops", "ticks", "frames_out", "records_out", "commits"):
        assert m[k] > 0, k
    assert m["entries"] <= m["puts"] + 50  # a few no-ops and leader entries beside the puts' batches

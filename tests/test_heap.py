"""raftkv.heap: survivors leave the garbage collector's reach; every collection is timed."""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections.abc import Iterator

import pytest

from raftkv import Client
from raftkv.heap import HeapFreezer

from .conftest import start_cluster


@pytest.fixture
def freezer() -> Iterator[HeapFreezer]:
    h = HeapFreezer()
    h.install()
    yield h
    h.uninstall()
    gc.unfreeze()  # the rest of the test process keeps a normal collector


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_a_freeze_takes_the_survivors_out_of_every_later_collection(freezer: HeapFreezer) -> None:
    history = {f"txid-{i}": _Node() for i in range(1000)}  # long-lived, tracked, acyclic: what a node keeps
    before = gc.get_freeze_count()
    assert freezer.freeze() >= before + len(history)
    assert not any(o is history for o in gc.get_objects()), "a full collection still walks the frozen dict"
    assert freezer.stats()["freezes"] == 1
    # Reference counting still frees what the history drops, frozen or not.
    ref = weakref.ref(history["txid-0"])
    del history["txid-0"]
    assert ref() is None


def test_young_garbage_cycles_are_collected_not_frozen(freezer: HeapFreezer) -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b  # unreachable, but a cycle: only the collector frees it
    freezer.freeze()
    assert ref() is None


def test_every_collection_is_counted_timed_and_a_slow_one_logged(freezer: HeapFreezer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    freezer.slow_s = 0.0  # every collection counts as slow
    with caplog.at_level(logging.WARNING, logger="raftkv.heap"):
        gc.collect()
    st = freezer.stats()
    assert st["collections"][2] >= 1 and st["pause_s"][2] > 0 and st["max_pause_ms"][2] > 0
    assert any("event=slow_gc generation=2" in r.getMessage() for r in caplog.records)
    freezer.uninstall()
    gc.collect()
    assert freezer.stats()["collections"][2] == st["collections"][2], "counted after uninstall"


@pytest.mark.parametrize("period", ["0.2", "0"])
def test_a_node_freezes_on_its_period_and_reports_its_collections(tmp_path, period: str) -> None:  # noqa: ANN001
    lc = start_cluster(str(tmp_path / "c"), nodes=1, shards=1, node_args=["--gc-freeze-period", period])
    try:
        deadline = time.monotonic() + 20
        while True:
            heap = lc.shard_views()["n1"]["heap"]
            if period == "0" or heap["freezes"] >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if period == "0":
            with Client(cluster=lc.config) as c:  # allocations enough for the collector to run by itself
                for i in range(300):
                    c.put(f"k{i}", "v")
            heap = lc.shard_views()["n1"]["heap"]
            assert heap["freezes"] == 0 and heap["frozen_objects"] == 0
        else:
            assert heap["freezes"] >= 3 and heap["frozen_objects"] > 10_000, heap
        assert sum(heap["collections"]) > 0 and len(heap["max_pause_ms"]) == 3, heap
    finally:
        lc.stop()

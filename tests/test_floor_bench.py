"""bench/floor.py in a tiny mode (0.5 s, 2 clients): its leader, followers and clients run and answer every
request in order, with each store. No speed checks: the figures it prints are measurements."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from raftkv.bench.systems import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("floor_bench", os.path.join(ROOT, "bench", "floor.py"))
floor = importlib.util.module_from_spec(_spec)
sys.modules["floor_bench"] = floor
_spec.loader.exec_module(floor)


@pytest.mark.parametrize("store", ["lmdb", "file"])
def test_the_floor_replicates_and_answers(store: str, tmp_path) -> None:  # noqa: ANN001
    rate, lat = floor.run(store, 2, 0.5, free_ports(3), str(tmp_path))
    assert rate > 0 and lat and lat == sorted(lat) and all(x > 0 for x in lat)
    assert not os.listdir(tmp_path), "the stores are removed afterwards"


def test_frames_are_taken_whole_and_a_partial_one_waits() -> None:
    buf = bytearray(floor._LEN.pack(3) + b"abc" + floor._LEN.pack(2) + b"de" + floor._LEN.pack(5) + b"fg")
    assert floor._frames(buf) == [b"abc", b"de"]
    assert bytes(buf) == floor._LEN.pack(5) + b"fg"

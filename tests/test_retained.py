"""``raftkv.retained.Retained``: a dict whose snapshots re-pickle only the segments that changed."""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv import retained
from raftkv.retained import Retained

KEYS = st.integers(0, 40)
OPS = st.lists(st.one_of(
    st.tuples(st.just("set"), KEYS, st.integers()),
    st.tuples(st.just("del"), KEYS, st.none()),
    st.tuples(st.just("pop"), KEYS, st.none()),
    st.tuples(st.just("bump"), KEYS, st.none()),  # a value changed in place, then touch()
    st.tuples(st.just("snap"), st.none(), st.none()),
), max_size=120)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_a_retained_dict_is_a_dict_and_its_segments_rebuild_it_at_every_moment(ops: list) -> None:
    old, retained.SEGMENT = retained.SEGMENT, 4
    try:
        model: dict = {}
        r = Retained()
        for kind, k, v in ops:
            if kind == "set":
                r[k] = [v]
                model[k] = [v]
            elif kind in ("del", "pop") and k in model:
                del model[k]
                if kind == "del":
                    del r[k]
                else:
                    r.pop(k)
            elif kind == "bump" and k in model:
                r[k].append(0)  # in place: the segment is stale until touched
                r.touch(k)
                model[k] = model[k] + [0]
            elif kind == "snap":
                now = r.segments()
                rebuilt = Retained.from_segments(now)
                assert rebuilt == model and list(rebuilt) == list(r)  # same items, same order
                again = r.segments()
                assert all(a is b for a, b in zip(now, again, strict=True))  # unchanged: not pickled again
            assert r == model
        assert Retained.from_segments(r.segments()) == model
        assert pickle.loads(pickle.dumps(r)) == model and isinstance(pickle.loads(pickle.dumps(r)), Retained)
    finally:
        retained.SEGMENT = old


def test_a_change_repickles_only_its_own_segment() -> None:
    old, retained.SEGMENT = retained.SEGMENT, 10
    try:
        r = Retained((i, i) for i in range(100))
        before = r.segments()
        r[55] = -1
        del r[3]
        after = r.segments()
        changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a is not b]
        assert changed == [0, 5]
        for i in range(10, 20):
            del r[i]
        assert len(r.segments()) == 9  # a segment whose keys are all gone is dropped
    finally:
        retained.SEGMENT = old

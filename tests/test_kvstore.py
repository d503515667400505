"""A shard's data in the engine (``raftkv.kvstore.EngineStore``) behaves as a dict, and a crash keeps exactly the
last checkpoint: a property test against a dict model."""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftkv.engine import Engine
from raftkv.kvstore import EngineStore
from raftkv.state import Store

from .conftest import examples

KEYS = st.sampled_from([b"", b"a", b"ab", b"b", b"k\x00", b"k\xff", b"z" * 40])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, st.binary(max_size=20), st.integers(0, 2**40)),
        st.tuples(st.just("pop"), KEYS),
        st.tuples(st.just("checkpoint")),
        st.tuples(st.just("crash")),
    ),
    max_size=60,
)
_dirs = itertools.count()


def _checkpoint(engine: Engine, store: EngineStore) -> None:
    engine.commit_now(store.write_checkpoint)
    store.checkpointed()


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, lo=KEYS, hi=st.one_of(st.none(), KEYS))
def test_engine_store_is_a_dict_that_survives_crashes_as_of_its_last_checkpoint(
        tmp_path: Path, ops: list, lo: bytes, hi: bytes | None) -> None:
    engine = Engine(str(tmp_path / f"e{next(_dirs)}"))
    try:
        other = EngineStore(engine, 8)  # a neighbour shard: never disturbed
        other[b"a"] = (b"neighbour", 1)
        _checkpoint(engine, other)
        store, model, durable = EngineStore(engine, 7), Store(), Store()
        for op in ops:
            if op[0] == "set":
                store[op[1]] = (op[2], op[3])
                model[op[1]] = (op[2], op[3])
            elif op[0] == "pop":
                assert store.pop(op[1], None) == model.pop(op[1], None)
            elif op[0] == "checkpoint":
                _checkpoint(engine, store)
                durable = model.copy()
            else:  # the process dies: the overlay is gone, the engine keeps its last commit
                store = EngineStore(engine, 7, count=len(durable))
                model = durable.copy()
            assert len(store) == len(model)
        for key in [b"", b"a", b"ab", b"b", b"k\x00", b"k\xff", b"z" * 40, b"nope"]:
            assert store.get(key) == model.get(key)
            assert (key in store) == (key in model)
        assert list(store.keys_between(lo, hi)) == list(model.keys_between(lo, hi))
        # a move's scan: every key from lo on, with the value of the wanted ones only
        def want(k: bytes) -> bool:
            return len(k) % 2 == 0
        expected = [(k, model[k][0] if want(k) else None) for k in model.keys_between(lo)]
        assert list(store.values_where(want, lo)) == list(model.values_where(want, lo)) == expected
        keys_only = [(k, None if v is None else b"") for k, v in expected]  # a cleanup's scan: no value read
        assert list(store.values_where(want, lo, False)) == list(model.values_where(want, lo, False)) == keys_only
        assert dict(store.items()) == dict(model.items())
        view = store.view()
        store[b"after-view"] = (b"x", 1)  # a view is frozen at its creation
        assert dict(view.items()) == dict(model.items())
        assert other.get(b"a") == (b"neighbour", 1) and len(other) == 1
    finally:
        engine.close()


def test_a_full_engine_says_so_and_how_to_fix_it(tmp_path: Path) -> None:
    import pytest

    from raftkv.engine import EngineError

    engine = Engine(str(tmp_path / "small"), map_size=1 << 20, kind="lmdb")  # the map size is LMDB's limit
    try:
        store = EngineStore(engine, 0)
        for i in range(20_000):
            store[b"k%06d" % i] = (b"v" * 100, i)
        with pytest.raises(EngineError, match="is full .* larger --engine-map-gib"):
            engine.commit_now(store.write_checkpoint)
        engine.put(b"x", b"y" * 2_000_000)
        with pytest.raises(EngineError, match="is full .* larger --engine-map-gib"):
            engine.sync()
    finally:
        engine.close()


def test_a_commit_request_never_waits_for_a_checkpoint_holding_the_writer(tmp_path: Path) -> None:
    """The driver asks for its loop's commit with ``request_commit``: while a checkpoint commits on its own
    thread the request returns at once (what depends on it waits in raftfix's gate) and a later one commits."""
    import threading

    engine = Engine(str(tmp_path / "e"))
    try:
        seq = engine.put(b"L1", b"entry")
        held, release = threading.Event(), threading.Event()

        def slow_checkpoint(batch: object) -> None:
            held.set()
            assert release.wait(30)

        t = threading.Thread(target=engine.commit_now, args=(slow_checkpoint,))
        t.start()
        assert held.wait(30)
        engine.request_commit()  # returns although the writer is busy
        assert not engine.covers(seq) and engine.stats().deferred == 1
        release.set()
        t.join()
        engine.request_commit()
        assert engine.covers(seq) and engine.get(b"L1") == b"entry"
    finally:
        engine.close()

"""Key expiry in log time: the state machine against a model, then Redis clients on a live cluster."""

from __future__ import annotations

import time

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.cluster import LocalCluster
from raftkv.expiry import Expiries
from raftkv.state import KVState
from tests.conftest import examples, redis_to

KEYS = [b"a", b"b"]


def model_apply(m: dict, dl: dict, cmd: tuple, now: int) -> object:
    """Redis semantics on a dict of values and a dict of deadlines, at time ``now``."""
    for k in [k for k, t in dl.items() if t <= now]:
        m.pop(k, None)
        del dl[k]
    op, key = cmd[0], cmd[1]
    if op == "set":
        m[key] = cmd[2]
        dl.pop(key, None)
        return None
    if op == "setopt":
        m[key] = cmd[2]
        ttl = cmd[4]
        if ttl == "keep":
            return None
        dl.pop(key, None)
        deadline = now + ttl[1]
        if deadline <= now:
            m.pop(key)
        else:
            dl[key] = deadline
        return None
    if op == "expire":
        if key not in m:
            return 0
        cur, deadline, cond = dl.get(key), now + cmd[2], cmd[4]
        if ((cond == "nx" and cur is not None) or (cond == "xx" and cur is None)
                or (cond == "gt" and (cur is None or deadline <= cur)) or (cond == "lt" and cur is not None
                                                                          and deadline >= cur)):
            return 0
        if deadline <= now:
            m.pop(key)
            dl.pop(key, None)
        else:
            dl[key] = deadline
        return 1
    if op == "persist":
        return 1 if key in m and dl.pop(key, None) is not None else 0
    if op == "pttl":
        return -2 if key not in m else (dl[key] - now if key in dl else -1)
    if op == "get":
        return m.get(key)
    raise AssertionError(op)


commands = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.sampled_from([b"x", b"y"])),
    st.tuples(st.just("setopt"), st.sampled_from(KEYS), st.just(b"t"), st.none(),
              st.one_of(st.just("keep"), st.tuples(st.just("in"), st.integers(-5, 30)))),
    st.tuples(st.just("expire"), st.sampled_from(KEYS), st.integers(-5, 30), st.just(False),
              st.sampled_from([None, "nx", "xx", "gt", "lt"])),
    st.tuples(st.just("persist"), st.sampled_from(KEYS)),
    st.tuples(st.just("pttl"), st.sampled_from(KEYS)),
    st.tuples(st.just("get"), st.sampled_from(KEYS)),
)


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(st.tuples(commands, st.integers(0, 10), st.booleans()), max_size=30))
def test_expiry_matches_a_model(steps: list) -> None:
    """Each step: a command at a later log time, sometimes read between entries (the ReadIndex path)."""
    s, m, dl, now = KVState(), {}, {}, 0
    for cmd, advance, read_between in steps:
        now += advance
        if read_between:
            # Between entries: an expired key reads as missing although no entry deleted it yet.
            for k in KEYS:
                want = model_apply(dict(m), dict(dl), ("get", k), now)
                assert s.read(("get", k), now) == want, (k, now)
            continue
        want = model_apply(m, dl, cmd, now)
        got = s.apply(cmd, now)
        if cmd[0] in ("expire", "persist", "pttl", "get"):
            assert got == want, (cmd, now, got, want)
        live = {k: v for k, (v, _r) in s.data.items() if not s.expiries.expired(k, now)}
        assert live == m, (cmd, now)
        assert {k: t for k, t in s.expiries.deadlines.items() if k in s.data} == dl


def test_expired_keys_are_deleted_by_the_next_entry_and_survive_a_snapshot() -> None:
    s = KVState()
    s.apply(("setopt", b"k", b"v", None, ("in", 100)), 1000)
    s.apply(("setopt", b"j", b"w", None, ("in", 5000)), 1000)
    rev = s.revision
    blob = s.snapshot()
    s.apply(("noop",), 1100)  # an entry at the deadline deletes the key, as a DEL would
    assert b"k" not in s.data and s.revision == rev + 1 and s.del_rev == s.revision
    restored = KVState.restore(blob)
    assert restored.expiries.get(b"j") == 6000 and restored.read(("get", b"k"), 1100) is None


def test_expiries_heap_skips_superseded_deadlines() -> None:
    e = Expiries()
    e.set(b"k", 10)
    e.set(b"k", 30)
    e.set(b"j", 20)
    assert e.due(25) == [b"j"] and e.next_deadline() == 30


# -- live ------------------------------------------------------------------------------------------

@pytest.fixture
def lc(cluster: LocalCluster) -> LocalCluster:
    return cluster  # the module's shared 3-node cluster (conftest)


def wait_for(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_redis_expiry_commands(lc: LocalCluster) -> None:
    r = redis_to(lc, "n2")
    assert r.set("tmp", "v", px=400) and r.get("tmp") == b"v"
    assert 0 < r.pttl("tmp") <= 400 and r.ttl("tmp") in (0, 1)
    wait_for(lambda: r.get("tmp") is None)
    assert r.pttl("tmp") == -2 and r.exists("tmp") == 0
    r.set("keep", "1")
    assert r.ttl("keep") == -1 and r.expire("keep", 100) and 99 <= r.ttl("keep") <= 100
    assert r.expire("keep", 50, gt=True) is False and r.expire("keep", 50, lt=True) is True
    assert r.set("keep", "2", keepttl=True) and 49 <= r.ttl("keep") <= 50
    assert r.persist("keep") and r.ttl("keep") == -1
    r.set("gone", "x")
    assert r.pexpire("gone", -1) and r.get("gone") is None
    # Absolute deadlines are Unix times (log time starts near 0 on a new cluster: they are converted).
    r.set("at", "x")
    assert r.expireat("at", int(time.time()) + 100) and 98 <= r.ttl("at") <= 100
    assert r.set("at2", "y", pxat=int(time.time() * 1000) + 50_000) and 48_000 <= r.pttl("at2") <= 50_000
    assert r.pexpireat("at", int(time.time() * 1000) - 1000) and r.get("at") is None
    with pytest.raises(redis.ResponseError, match="invalid expire time"):
        r.set("bad", "x", ex=0)
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("SET", "bad", "x", "EX", "10", "PX", "10")


def test_expired_keys_are_reclaimed_through_the_log(lc: LocalCluster) -> None:
    """With no other writes, the leaders' reaper deletes expired keys: every replica's count of stored
    keys drops (RAFTKV.STATUS counts what a replica stores; DBSIZE already leaves expired keys out)."""
    import json

    def stored(node: str) -> int:
        return sum(sh["keys"] for sh in json.loads(lc.call(node, "RAFTKV.STATUS"))["shards"].values())

    host, port = lc.map.nodes["n1"].client_addr
    r = redis.Redis(host=host, port=port)
    before = {n: stored(n) for n in lc.map.nodes}
    for i in range(20):
        r.set(f"reap-{i}", "v", px=300)
    wait_for(lambda: all(stored(n) <= before[n] for n in lc.map.nodes))


def test_client_and_cli_expiry_counters_and_keys(lc: LocalCluster) -> None:
    import math

    from click.testing import CliRunner

    from raftkv import Client
    from raftkv.cli import main

    with Client(cluster=lc.config) as c:
        c.put("lib-ttl", "v", ttl=100)
        assert 99 <= c.ttl("lib-ttl") <= 100
        c.put("lib-forever", "v")
        assert c.ttl("lib-forever") == math.inf and c.ttl("lib-none") is None
        assert c.expire("lib-forever", 50) and not c.expire("lib-none", 5)
        assert {b"lib-ttl", b"lib-forever"} <= set(c.keys("lib-*"))

    def run(*args: str) -> tuple[int, str]:
        res = CliRunner().invoke(main, [*args, "--cluster", str(lc.config)])
        return res.exit_code, res.output.strip()

    assert run("put", "cli-ttl", "v", "--ttl", "30") == (0, "OK")
    code, out = run("ttl", "cli-ttl")
    assert code == 0 and 29 <= float(out) <= 30
    assert run("incr", "cli-cnt", "--by", "5") == (0, "5") and run("incr", "cli-cnt") == (0, "6")
    assert run("expire", "cli-cnt", "100") == (0, "1") and run("ttl", "cli-missing")[0] == 1
    code, out = run("keys", "cli-*")
    assert code == 0 and set(out.split()) == {"cli-ttl", "cli-cnt"}

"""String commands: the state machine against a dict model, then Redis clients on a live cluster."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv import Client
from raftkv.cluster import LocalCluster
from raftkv.results import CmdError
from raftkv.state import KVState
from raftkv.strings import INT64_MAX, INT64_MIN
from tests.conftest import examples, redis_to

KEYS = [b"a", b"b"]
VALUES = [b"0", b"7", b"-3", b"x", b"", b"007", b"+1", b" 1", str(INT64_MAX).encode(), str(INT64_MIN).encode()]


def model_step(m: dict, cmd: tuple) -> object:
    """What Redis does, on a plain dict of bytes."""
    op, key = cmd[0], cmd[1]
    if op == "set":
        m[key] = cmd[2]
        return "rev"
    if op == "incrby":
        raw = m.get(key, b"0")
        try:
            cur = int(raw)
        except ValueError:
            return "ERR"
        if raw != str(cur).encode() or not INT64_MIN <= cur <= INT64_MAX:
            return "ERR"  # Redis takes only the canonical base-10 form
        new = cur + cmd[2]
        if not INT64_MIN <= new <= INT64_MAX:
            return "ERR"
        m[key] = str(new).encode()
        return new
    if op == "append":
        m[key] = m.get(key, b"") + cmd[2]
        return len(m[key])
    if op == "getdel":
        return m.pop(key, None)
    if op == "setopt":
        before = m.get(key)
        if (cmd[3] == "nx" and before is not None) or (cmd[3] == "xx" and before is None):
            return (False, before)
        m[key] = cmd[2]
        return (True, before)
    raise AssertionError(op)


commands = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.sampled_from(VALUES)),
    st.tuples(st.just("incrby"), st.sampled_from(KEYS), st.sampled_from([1, -1, 5, INT64_MAX, INT64_MIN])),
    st.tuples(st.just("append"), st.sampled_from(KEYS), st.sampled_from([b"z", b"1", b""]), st.just(1 << 20)),
    st.tuples(st.just("getdel"), st.sampled_from(KEYS)),
    st.tuples(st.just("setopt"), st.sampled_from(KEYS), st.sampled_from(VALUES), st.sampled_from([None, "nx", "xx"])),
)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(commands, max_size=30))
def test_string_commands_match_a_dict_model(cmds: list[tuple]) -> None:
    state, model = KVState(), {}
    for i, cmd in enumerate(cmds):
        got = state.apply(cmd, now_ms=i)
        want = model_step(model, cmd)
        if want == "ERR":
            assert isinstance(got, CmdError) and got.code == "ERR", (cmd, got)
        elif want != "rev":
            assert got == want, (cmd, got, want)
        assert {k: v for k, (v, _r) in state.data.items()} == model


def test_append_refuses_to_grow_past_the_value_limit() -> None:
    s = KVState()
    assert s.apply(("append", b"k", b"12345", 8), 0) == 5
    got = s.apply(("append", b"k", b"6789", 8), 0)
    assert isinstance(got, CmdError) and got.code == "TOOBIG"
    assert s.data[b"k"][0] == b"12345"


# -- live ------------------------------------------------------------------------------------------

@pytest.fixture
def lc(cluster: LocalCluster) -> LocalCluster:
    return cluster  # the module's shared 3-node cluster (conftest)


def test_redis_string_commands(lc: LocalCluster) -> None:
    r = redis_to(lc, "n2")
    assert r.incr("cnt") == 1 and r.incrby("cnt", 41) == 42 and r.decr("cnt") == 41 and r.decrby("cnt", 40) == 1
    r.set("word", "x")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        r.incr("word")
    r.set("big", str(INT64_MAX))
    with pytest.raises(redis.ResponseError, match="overflow"):
        r.incr("big")
    assert r.append("s", "ab") == 2 and r.append("s", "cd") == 4 and r.strlen("s") == 4 and r.strlen("none") == 0
    assert r.getdel("s") == b"abcd" and r.get("s") is None and r.getdel("s") is None
    assert r.setnx("nx", "1") is True and r.setnx("nx", "2") is False and r.get("nx") == b"1"
    assert r.set("opt", "a", nx=True) is True and r.set("opt", "b", nx=True) is None
    assert r.set("opt", "c", xx=True) is True and r.set("missing", "c", xx=True) is None
    assert r.set("opt", "d", get=True) == b"c" and r.get("opt") == b"d"
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("SET", "opt", "e", "NX", "XX")
    assert r.msetnx({"m1": "1", "m2": "2", "m3": "3"}) is True
    assert r.msetnx({"m3": "x", "m4": "4"}) is False and r.get("m4") is None and r.get("m3") == b"3"


def test_client_counters_apply_once(lc: LocalCluster) -> None:
    with Client(cluster=lc.config) as c:
        assert [c.incr("lib-cnt") for _ in range(5)] == [1, 2, 3, 4, 5]
        assert c.incr("lib-cnt", -10) == -5
        assert c.append("lib-s", "x") == 1 and c.getdel("lib-s") == b"x"
    # A re-sent session INCR (same session and seq) is answered from the session table, not applied again.
    for _ in range(3):
        assert lc.call("n1", "RAFTKV.REQ", "strings-s1", "1", "INCR", "dedup") == 1
    assert lc.call("n3", "GET", "dedup") == b"1"


# -- INCRBYFLOAT, GETSET, GETEX, COPY, RENAME, RENAMENX ---------------------------------------------

@pytest.mark.parametrize(("before", "increment", "after"), [
    (b"10.50", b"0.1", b"10.6"),  # the examples of Redis's documentation
    (b"10.6", b"-5", b"5.6"),
    (b"5.0e3", b"2.0e2", b"5200"),
    (b"0.1", b"0.2", b"0.3"),  # decimal with a long double's digits, not binary doubles
    (None, b"3", b"3"),
    (b"1", b"-1", b"0"),
    (b"7", b"1e-18", b"7"),  # below the 17 decimals printed
    (b"-.5", b"+1.25", b"0.75"),
])
def test_incrbyfloat_prints_what_redis_prints(before: bytes | None, increment: bytes, after: bytes) -> None:
    s = KVState()
    if before is not None:
        s.apply(("set", b"f", before), 0)
    assert s.apply(("incrbyfloat", b"f", increment), 0) == after
    assert s.data[b"f"][0] == after


@pytest.mark.parametrize(("value", "increment", "error"), [
    (b"abc", b"1", "value is not a valid float"),
    (b"1", b"1 ", "value is not a valid float"),
    (b"1", b"nan", "value is not a valid float"),
    (b"1", b"inf", "increment would produce NaN or Infinity"),
    (b"1e4932", b"1e4932", "increment would produce NaN or Infinity"),
])
def test_incrbyfloat_refuses_like_redis(value: bytes, increment: bytes, error: str) -> None:
    s = KVState()
    s.apply(("set", b"f", value), 0)
    got = s.apply(("incrbyfloat", b"f", increment), 0)
    assert isinstance(got, CmdError) and (got.code, got.message) == ("ERR", error)
    assert s.data[b"f"][0] == value  # unchanged


def test_incrbyfloat_keeps_and_getex_sets_or_clears_the_deadline() -> None:
    s = KVState()
    s.apply(("setopt", b"k", b"1", None, ("in", 1000)), 0)
    s.apply(("incrbyfloat", b"k", b"0.5"), 10)
    assert s.apply(("pttl", b"k"), 10) == 990
    assert s.apply(("getex", b"k", "persist"), 20) == b"1.5" and s.apply(("pttl", b"k"), 20) == -1
    assert s.apply(("getex", b"k", ("in", 50)), 30) == b"1.5" and s.apply(("pttl", b"k"), 30) == 50
    assert s.apply(("getex", b"k", ("in", -1)), 40) == b"1.5" and b"k" not in s.data  # a past EXAT deletes
    assert s.apply(("getex", b"missing", ("in", 50)), 50) is None and b"missing" not in s.expiries.deadlines


def test_redis_getset_getex_incrbyfloat(lc: LocalCluster) -> None:
    r = redis_to(lc, "n1")
    assert r.getset("gs", "a") is None and r.getset("gs", "b") == b"a" and r.get("gs") == b"b"
    r.set("gx", "v")
    assert r.getex("gx") == b"v" and r.ttl("gx") == -1
    assert r.getex("gx", ex=100) == b"v" and 0 < r.ttl("gx") <= 100
    assert r.getex("gx", persist=True) == b"v" and r.ttl("gx") == -1
    assert r.getex("gx", pxat=1) == b"v" and r.get("gx") is None  # a time long past deletes the key
    assert r.getex("nothing", ex=5) is None
    with pytest.raises(redis.ResponseError, match="invalid expire time in 'getex' command"):
        r.execute_command("GETEX", "gx", "EX", "0")
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("GETEX", "gx", "EX", "1", "PERSIST")
    r.set("fl", "10.50")
    assert r.incrbyfloat("fl", 0.1) == 10.6 and r.get("fl") == b"10.6"
    r.set("fl", "x")
    with pytest.raises(redis.ResponseError, match="value is not a valid float"):
        r.incrbyfloat("fl", 1)


def _on_other_shards(lc: LocalCluster, prefix: str) -> tuple[str, str]:
    keys = [f"{prefix}{i}" for i in range(50)]
    a = keys[0]
    b = next(k for k in keys if lc.map.shard_for_key(k.encode()) != lc.map.shard_for_key(a.encode()))
    return a, b


def test_redis_copy_rename_renamenx_across_shards(lc: LocalCluster) -> None:
    r = redis_to(lc, "n2")
    src, dst = _on_other_shards(lc, "mv")
    r.set(src, "payload", ex=1000)
    assert r.copy(src, dst) is True and r.get(dst) == b"payload" and 0 < r.ttl(dst) <= 1000
    assert r.copy(src, dst) is False  # the destination exists
    r.set(src, "newer")
    assert r.copy(src, dst, replace=True) is True and r.get(dst) == b"newer" and r.ttl(dst) == -1
    assert r.copy("no-such-key", dst) is False
    with pytest.raises(redis.ResponseError, match="source and destination objects are the same"):
        r.copy(src, src)
    r.expire(src, 500)
    assert r.rename(src, dst) is True
    assert r.get(src) is None and r.get(dst) == b"newer" and 0 < r.ttl(dst) <= 500
    with pytest.raises(redis.ResponseError, match="no such key"):
        r.rename(src, dst)
    assert r.rename(dst, dst) is True and r.renamenx(dst, dst) is False  # the same key: Redis's no-ops
    r.set(src, "other")
    assert r.renamenx(src, dst) is False and r.get(src) == b"other"
    assert r.renamenx(dst, "mv-fresh") is True and r.get("mv-fresh") == b"newer" and r.get(dst) is None
    with pytest.raises(redis.ResponseError, match="no such key"):
        r.renamenx("no-such-key", "mv-x")

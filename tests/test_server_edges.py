"""The server's edges, against real node processes: forwarding keeps sessions, an unknown
outcome stays unknown, and bad frames are refused at their header without costing an election.

The nodes are started with fault points armed for a few dedicated keys (``raftkv serve
--fault``, see raftkv.server.api.FAULT_POINTS), so the "applied but reported unknown"
and "refused" outcomes happen exactly when a test needs them; every other key is served
normally.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest

from raftkv import Client, IndeterminateError
from raftkv.cluster import LocalCluster
from raftkv.protocol import ReplyError, encode_command
from tests.conftest import running

pytestmark = pytest.mark.slow

FAULTS = [
    # the first proposal of these keys applies but is reported unknown (a leader change after append)
    "exec.unknown:0:1:('cas', b'fx-cas", "exec.unknown:0:1:fx-req", "exec.unknown:0:1:fx-client",
    "exec.unknown:0:1:fx-mset",
    # ... and every later proposal of these is refused (not applied), until the request times out
    "exec.not_applied:0:0:fx-req", "exec.not_applied:0:0:fx-client", "exec.not_applied:0:0:fx-mset",
]


#: ``raftkv serve --request-timeout`` of the cluster the unknown-outcome tests use: each of their requests keeps
#: being refused until the node gives up, so they last as long as this (the default, 5 s, for the others).
SHORT_REQUEST_TIMEOUT_S = 1.5


def _fault_args() -> list[str]:
    args: list[str] = []
    for f in FAULTS:
        args += ["--fault", f]
    return args


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(LocalCluster.create(str(tmp_path_factory.mktemp("edges")), node_args=_fault_args())) as c:
        yield c


@pytest.fixture(scope="module")
def lc_short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The same fault points, nodes that give up on a request after ``SHORT_REQUEST_TIMEOUT_S``."""
    args = [*_fault_args(), "--request-timeout", str(SHORT_REQUEST_TIMEOUT_S)]
    with running(LocalCluster.create(str(tmp_path_factory.mktemp("edges-short")), node_args=args)) as c:
        yield c


def key_on(lc: LocalCluster, prefix: str, shard: int) -> str:
    i = 0
    while lc.map.shard_for_key(f"{prefix}{i}".encode()) != shard:
        i += 1
    return f"{prefix}{i}"


def non_leader(lc: LocalCluster, shard: int) -> str:
    leader = lc.leader_of(shard)
    return next(n for n in lc.map.nodes if n != leader)


def call(lc: LocalCluster, node: str, *args: bytes | str, timeout: float = 15.0) -> object:
    try:
        return lc.call(node, *args, timeout=timeout)
    except ReplyError as e:
        return e


def terms(lc: LocalCluster) -> dict[tuple[str, int], int]:
    out = {}
    for name in lc.map.nodes:
        for shard, _leader, term in lc.call(name, "RAFTKV.SHARDS"):
            out[(name, shard)] = term
    return out


# -- bug 1: a session write forwarded by a non-leader keeps its session ----------------------------

def test_session_cas_through_a_non_leader_applies_once_and_answers_truthfully(lc: LocalCluster) -> None:
    """The leader applies the CAS but reports an unknown outcome (fault point), so the
    forwarding node re-sends it.  With the session kept, the retry is de-duplicated and the
    answer is the first attempt's: swapped.  (Before: the session was stripped on the way,
    the retry ran as a second CAS, found the new value and answered 0 though it swapped.)"""
    key = key_on(lc, "fx-cas", 0)
    via = non_leader(lc, 0)
    assert call(lc, via, "SET", key, "v0") == b"OK"
    reply = call(lc, via, "RAFTKV.REQ", "edge-session-1", "1", "CAS", key, "v0", "v1")
    assert reply == 1, f"the CAS swapped but the answer was {reply!r}"
    assert call(lc, via, "GET", key) == b"v1"
    # The same session and sequence number again, through another node: the stored answer, no second apply.
    other = next(n for n in lc.map.nodes if n != via)
    assert call(lc, other, "RAFTKV.REQ", "edge-session-1", "1", "CAS", key, "v0", "v1") == 1
    assert call(lc, via, "GET", key) == b"v1"


def test_session_writes_through_non_leaders_while_leaders_move(lc: LocalCluster) -> None:
    """Session CAS chains sent to non-leaders while the shard's leadership moves: every
    answer matches what the register shows (a swap answered 1 happened exactly once)."""
    key = key_on(lc, "mv-cas", 1)
    assert call(lc, "n1", "SET", key, "0") == b"OK"
    value = 0
    for seq in range(1, 13):
        if seq % 3 == 0:
            leader = lc.leader_of(1)
            target = next(n for n in lc.map.nodes if n != leader)
            call(lc, leader or "n1", "RAFTKV.TRANSFER", "1", target)  # best effort, no wait
        via = non_leader(lc, 1)
        reply = call(lc, via, "RAFTKV.REQ", "edge-session-2", str(seq), "CAS", key, str(value), str(value + 1))
        if isinstance(reply, ReplyError):
            assert reply.code in ("UNKNOWN", "TRYAGAIN", "NOQUORUM"), reply
            now = int(call(lc, via, "GET", key))
            assert now in (value, value + 1), (reply, now, value)
            value = now
            continue
        assert reply == 1, f"seq {seq}: CAS {value}->{value + 1} answered {reply!r}"
        value += 1
        assert int(call(lc, via, "GET", key)) == value


# -- bug 2: an unknown outcome is never later reported as "not applied" -----------------------------

def test_an_unknown_attempt_is_never_reported_as_not_applied(lc_short: LocalCluster) -> None:
    """First attempt: applied, reported unknown.  Every later attempt: refused.  The node
    must answer UNKNOWN (the write happened), not TRYAGAIN ("not applied, safe to retry")."""
    lc = lc_short
    key = key_on(lc, "fx-req", 2)
    via = non_leader(lc, 2)
    reply = call(lc, via, "RAFTKV.REQ", "edge-session-3", "1", "SET", key, "applied", timeout=30)
    assert isinstance(reply, ReplyError) and reply.code == "UNKNOWN", reply
    assert call(lc, via, "GET", key) == b"applied"  # it was applied, so UNKNOWN was the truthful answer


def test_a_single_shard_mset_after_an_unknown_attempt_answers_unknown(lc_short: LocalCluster) -> None:
    """A single-shard MSET is one session-wrapped entry retried internally; a Redis client
    that heard TRYAGAIN would resend it with a new transaction id and apply it twice."""
    lc = lc_short
    key = key_on(lc, "fx-mset", 0)
    reply = call(lc, "n1", "MSET", key, "m1", timeout=30)
    assert isinstance(reply, ReplyError) and reply.code == "UNKNOWN", reply
    assert call(lc, "n1", "GET", key) == b"m1"


def test_client_library_raises_indeterminate_not_unavailable(lc_short: LocalCluster) -> None:
    """The client's first attempt is answered UNKNOWN when the node gives up on it, its second TRYAGAIN
    (every later proposal is refused); a client that trusted the TRYAGAIN would raise "unavailable"."""
    lc = lc_short
    key = key_on(lc, "fx-client", 1)
    # Long enough for two whole attempts (the UNKNOWN, then a TRYAGAIN) with room to spare on a loaded machine.
    with Client(cluster=lc.config, timeout=4 * SHORT_REQUEST_TIMEOUT_S) as c:
        with pytest.raises(IndeterminateError) as raised:
            c.put(key, "c1")
        assert c.get(key) == b"c1"
    assert "after 1 attempts" not in str(raised.value), raised.value  # it did not end at the first attempt


# -- bug 3: declared sizes are checked at the header -------------------------------------------------

def raw_exchange(lc: LocalCluster, node: str, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data``, then read until the node closes: (reply bytes, closed by the node)."""
    host, port = lc.map.nodes[node].client_addr
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return out, False
            if not chunk:
                return out, True
            out += chunk
        return out, False


BAD_HEADERS = [
    (b"*2147483648\r\n$3\r\nabc\r\n", b"-PROTO Protocol error: invalid multibulk length"),
    (b"*1\r\n$1073741824\r\n", b"-TOOBIG request exceeds"),
    (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2000000\r\n", b"-TOOBIG request exceeds"),
    (b"*2\r\n$-7\r\n", b"-PROTO Protocol error: invalid bulk length"),
    (b"*abc\r\n", b"-PROTO Protocol error: invalid multibulk length"),
    (b"*1\r\n+PING\r\n", b"-PROTO Protocol error: expected $"),
    (b"$" + b"9" * 100, b"-PROTO Protocol error: expected *"),
]


def test_bad_headers_are_refused_at_once_and_cost_no_election(lc: LocalCluster) -> None:
    before = terms(lc)
    log_sizes = {n: lc.log_file(n).stat().st_size for n in lc.map.nodes}
    for _round in range(5):
        for node in lc.map.nodes:
            for frame, answer in BAD_HEADERS:
                started = time.monotonic()
                # a valid PING first: requests before the bad header are still served
                out, closed = raw_exchange(lc, node, encode_command("PING") + frame)
                assert out.startswith(b"+PONG\r\n" + answer), (frame, out[:200])
                assert closed, f"{node} kept the connection open after {frame[:30]!r}"
                assert time.monotonic() - started < 4.0, f"{frame[:30]!r} was not answered at its header"
    assert terms(lc) == before, "a malformed frame cost a leader election"
    for n in lc.map.nodes:
        with open(lc.log_file(n), "rb") as f:
            f.seek(log_sizes[n])
            new = f.read().decode(errors="replace")
        assert "Traceback" not in new and "socket.send() raised" not in new, new[-2000:]


def test_clients_vanishing_mid_pipeline_do_not_flood_the_log(lc: LocalCluster) -> None:
    log_sizes = {n: lc.log_file(n).stat().st_size for n in lc.map.nodes}
    burst = b"".join(encode_command("SET", f"gone-{i}", "v") + encode_command("GET", f"gone-{i}")
                     for i in range(50))
    for i in range(30):
        host, port = lc.map.nodes[f"n{i % 3 + 1}"].client_addr
        s = socket.create_connection((host, port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        s.sendall(burst)
        s.close()
    for n in lc.map.nodes:
        # PING on a fresh connection is answered after the abandoned requests were dispatched
        assert lc.call(n, "PING", timeout=10) == b"PONG"
    time.sleep(1.0)  # let the abandoned replies reach the closed sockets
    for n in lc.map.nodes:
        with open(lc.log_file(n), "rb") as f:
            f.seek(log_sizes[n])
            # Role changes and slow driver loops come from the machine's load, not from the vanished clients.
            new = [ln for ln in f.read().decode(errors="replace").splitlines()
                   if "event=role_change" not in ln and "event=driver_slow_iteration" not in ln]
        assert not any("socket.send" in ln or "Traceback" in ln for ln in new), "\n".join(new[-20:])
        assert len(new) < 5, f"{n} logged {len(new)} lines for vanished clients:\n" + "\n".join(new[-20:])


# -- a RESP fuzz: thousands of mutated, random and oversize frames ------------------------------------

def _mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:  # flip a byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:  # truncate
            del b[rng.randrange(len(b)):]
        elif op == 2:  # insert a huge or negative declared length
            b[rng.randrange(len(b) + 1):0] = rng.choice([b"*%d\r\n", b"$%d\r\n"]) % rng.choice(
                [2**31, 2**63, -2, 10**9, 1 << 20, 0])
        elif op == 3 and b:  # duplicate a slice
            i = rng.randrange(len(b))
            b[i:i] = b[i:i + rng.randint(1, 16)]
        else:  # random bytes
            b[rng.randrange(len(b) + 1):0] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    return bytes(b)


def test_resp_fuzz_keeps_every_node_up_every_ack_and_every_term(lc: LocalCluster) -> None:
    rng = random.Random(20261201)
    before = terms(lc)
    acked: dict[str, str] = {}
    nodes = list(lc.map.nodes)
    n_inputs = 2400
    for i in range(n_inputs):
        node = nodes[i % len(nodes)]
        key, value = f"fz-{i}", f"v{i}"
        valid = encode_command("SET", key, value)
        kind = rng.random()
        if kind < 0.25:
            data = valid  # a valid write: must be acknowledged and kept
        elif kind < 0.8:
            data = _mutate(rng, rng.choice([valid, encode_command("GET", key), encode_command("MSET", key, "x", "y", "z"),
                                            encode_command("RAFTKV.TXN", "0", "1", "PUT", key, "t", "0")]))
        else:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        host, port = lc.map.nodes[node].client_addr
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the node sees EOF: it answers what it can, then closes
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        if data is valid:
            assert out == b"+OK\r\n", (i, out)
            acked[key] = value
    for node in nodes:
        assert lc.call(node, "PING") == b"PONG", f"{node} does not answer after the fuzz"
    with Client(cluster=lc.config, timeout=20.0) as c:
        keys = sorted(acked)
        for lo in range(0, len(keys), 100):
            chunk = keys[lo:lo + 100]
            assert c.mget(chunk) == [acked[k].encode() for k in chunk]
    assert terms(lc) == before, "the fuzz cost a leader election"

"""Locks with fencing tokens: the state machine's rules, then Client.lock and `raftkv lock` on a live cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from raftkv import Client
from raftkv.cli import main
from raftkv.client import LockTimeout
from raftkv.cluster import LocalCluster
from raftkv.state import KVState
from tests.conftest import ROOT


def test_tokens_increase_strictly_and_a_lapsed_lock_goes_to_the_next_owner() -> None:
    s = KVState()
    ok, t1 = s.apply(("lock", b"L", b"a", 100), 1000)
    assert ok == 1
    assert s.apply(("lock", b"L", b"b", 100), 1050) == (0, b"a")  # held
    assert s.apply(("lock", b"L", b"a", 100), 1080) == (1, t1)  # re-acquire = refresh, same token
    s.apply(("set", b"other", b"x"), 1090)
    ok, t2 = s.apply(("lock", b"L", b"b", 100), 1181)  # a's lock lapsed at 1180
    assert ok == 1 and t2 > t1
    assert s.apply(("unlock", b"L", b"a"), 1190) == 0  # a no longer holds it
    assert s.apply(("unlock", b"L", b"b"), 1190) == 1
    ok, t3 = s.apply(("lock", b"L", b"a", 100), 1200)
    assert ok == 1 and t3 > t2


@pytest.fixture
def lc(cluster: LocalCluster) -> LocalCluster:
    return cluster  # the module's shared 3-node cluster (conftest)


def test_client_lock_excludes_and_fences(lc: LocalCluster) -> None:
    """Four threads take turns; inside the lock, no one else is inside, and tokens only grow."""
    inside, tokens, errors = [], [], []
    mutex = threading.Lock()

    def worker() -> None:
        with Client(cluster=lc.config) as c:
            for _ in range(5):
                with c.lock("lock:jobs", ttl=5.0) as held:
                    with mutex:
                        inside.append(1)
                        if len(inside) > 1:
                            errors.append("two holders at once")
                        tokens.append(held.token)
                    time.sleep(0.01)
                    with mutex:
                        inside.pop()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(tokens) == 20
    assert tokens == sorted(tokens) and len(set(tokens)) == 20


def test_a_held_lock_times_out_a_waiter_then_lapses(lc: LocalCluster) -> None:
    with Client(cluster=lc.config) as c:
        first = c.lock("lock:lapse", ttl=1.0)
        first.acquire()
        first.abandon()  # stop the keep-alive, as a paused holder would
        with pytest.raises(LockTimeout):
            c.lock("lock:lapse", ttl=1.0, wait=0.2).acquire()
        with c.lock("lock:lapse", ttl=1.0, wait=10) as second:
            assert second.token > first.token  # the stale holder's token is now fenced off
            token = second.token
        with second:  # a Lock may be taken again once released: a new lease, kept alive again
            assert second.token > token and second.lease.id is not None and not second.lost


def test_cli_runs_a_command_under_the_lock(lc: LocalCluster) -> None:
    code = "import os, sys; sys.exit(0 if int(os.environ['RAFTKV_FENCING_TOKEN']) > 0 else 1)"
    res = CliRunner().invoke(main, ["lock", "lock:cli", "--cluster", str(lc.config), "--", sys.executable, "-c", code])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["lock", "lock:cli", "--cluster", str(lc.config), "--", sys.executable, "-c",
                                    "import sys; sys.exit(7)"])
    assert res.exit_code == 7


def test_cli_fenced_put_refuses_a_lower_token(lc: LocalCluster) -> None:
    put = lambda token: CliRunner().invoke(main, ["put", "fenced:cli", f"by-{token}", "--fencing-token",  # noqa: E731
                                                  str(token), "--cluster", str(lc.config)])
    assert put(5).exit_code == 0
    assert put(7).exit_code == 0
    res = put(6)
    assert res.exit_code == 1 and "refused" in res.output
    with Client(cluster=lc.config) as c:
        assert c.get("fenced:cli") == b"by-7"


HOLDER = """
import sys
from raftkv import Client

c = Client(cluster=sys.argv[1])
lock = c.lock("lock:paused", ttl=1)
lock.acquire()
print(lock.token, flush=True)
sys.stdin.readline()  # the test stops this process here, and lets it go on later
print("written" if c.fenced_put("fenced:resource", "A", lock.token) else "refused", flush=True)
"""


def test_a_paused_holder_loses_the_lock_and_its_fenced_write_is_refused(lc: LocalCluster) -> None:
    """Kleppmann's scenario: A is stopped (SIGSTOP) past its lease, B takes the lock with a larger
    token and writes; A resumes, still believing it holds the lock, and its write is refused."""
    a = subprocess.Popen([sys.executable, "-c", HOLDER, str(lc.config)], cwd=ROOT, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": ROOT})
    try:
        token_a = int(a.stdout.readline())
        os.kill(a.pid, signal.SIGSTOP)  # A and its keep-alive thread stop: its lease lapses after 1 s
        with Client(cluster=lc.config) as c, c.lock("lock:paused", ttl=1, wait=60) as b:
            assert b.token > token_a
            assert c.fenced_put("fenced:resource", "B", b.token)
            os.kill(a.pid, signal.SIGCONT)
            out, _ = a.communicate("go\n", timeout=60)
            assert out.strip() == "refused"
            assert c.get("fenced:resource") == b"B"
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
        a.wait()

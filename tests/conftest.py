"""Shared fixtures: real clusters of node processes on loopback."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

import pytest

from raftkv import Client, IndeterminateError, RaftKVError
from raftkv.cluster import LocalCluster, call
from shards.shardmap import ShardMap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def in_ci() -> bool:
    """True under ``CI=true`` (the CI job sets it; GitHub Actions and most others do too)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


#: Under ``CI=true`` the heavy property tests run this share of their examples (see :func:`examples`).
CI_EXAMPLES_SHARE = 1 / 3


def examples(local: int) -> int:
    """``max_examples`` for a heavy property test: ``local`` on a developer machine (``make test``), a third of
    it (at least 10) under ``CI=true``, which keeps the CI job inside its time budget.

    Hypothesis loads its own ``ci`` profile there (derandomized, no example database), so CI checks the same
    fixed examples on every run, a regression set; the full, random count runs on every local ``make test``.
    Negative controls (a broken build that must be caught) keep their full count: fewer examples could miss it.
    """
    return min(local, max(10, round(local * CI_EXAMPLES_SHARE))) if in_ci() else local


def missing_capability(reason: str) -> NoReturn:
    """A system capability a test needs is missing: skip with the reason on a developer
    machine, fail under CI, where installing it is part of the job (``make sysdeps``)."""
    if in_ci():
        pytest.fail(f"{reason} [CI=true: a missing capability fails the test instead of skipping it]")
    pytest.skip(reason)


def start_cluster(directory: str, nodes: int = 3, shards: int = 3, node_args: list[str] | None = None,
                  timeout: float = 60.0) -> LocalCluster:
    """A fresh cluster in ``directory`` on a free port range, every shard with a leader."""
    lc = LocalCluster.create(directory, nodes=nodes, shards=shards, node_args=node_args)
    lc.start()
    try:
        lc.wait_ready(timeout)
    except Exception:
        dump_logs(lc)
        lc.stop()
        raise
    return lc


@contextlib.contextmanager
def running(lc: LocalCluster, timeout: float = 60.0) -> Iterator[LocalCluster]:
    """Start ``lc``, wait until every shard has a leader, stop it afterwards; node logs on failure."""
    lc.start()
    try:
        lc.wait_ready(timeout)
        yield lc
    except BaseException:
        dump_logs(lc)
        raise
    finally:
        lc.stop()


def redis_to(lc: LocalCluster, node: str = "n1", **kw: object) -> Any:
    """A redis-py client of node ``node`` (RESP3 unless ``protocol=`` says otherwise)."""
    import redis

    host, port = lc.map.nodes[node].client_addr
    return redis.Redis(host=host, port=port, **{"protocol": 3, **kw})


def no_retry() -> Any:
    """``retry=`` for a redis-py client whose request is expected to be refused (bad password, no AUTH,
    plain text to a TLS port): redis-py 6+ retries a connection error, and an AuthenticationError is
    one, up to 10 times with backoff (~5 s here) before raising the same error."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def dump_logs(lc: LocalCluster, lines: int = 40) -> None:
    for name in lc.map.nodes:
        path = lc.log_file(name)
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {name}.log (last {len(tail)} lines)\n" + "\n".join(tail))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One 3-node, 3-shard cluster shared by a test module (tests must not kill nodes)."""
    lc = start_cluster(str(tmp_path_factory.mktemp("cluster")))
    yield lc
    lc.stop()


@pytest.fixture
def fresh_cluster(tmp_path) -> Iterator[LocalCluster]:
    """A cluster of its own, for tests that kill or restart nodes."""
    lc = start_cluster(str(tmp_path / "c"))
    yield lc
    lc.stop()


def unique_keys(prefix: str) -> Iterator[str]:
    """``prefix-0``, ``prefix-1``, ... without end."""
    return (f"{prefix}-{i}" for i in itertools.count())


class PutWriter(threading.Thread):
    """Writes ``keys`` (value = key) one after another until stopped; records every outcome.

    ``acked``: ``(key, sent, acknowledged)`` monotonic times; ``unknown``: keys whose
    write may or may not have happened; ``failed``: keys whose write was definitely not
    applied.  :meth:`check` reads them all back and holds each list to its promise.
    """

    def __init__(self, cluster_file: str | os.PathLike, keys: Iterable[str], timeout: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.client = Client(cluster=cluster_file, timeout=timeout)
        self.keys = keys
        self.acked: list[tuple[str, float, float]] = []
        self.unknown: list[str] = []
        self.failed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for k in self.keys:
            if self.stop.is_set():
                break
            sent = time.monotonic()
            try:
                self.client.put(k, k)
                self.acked.append((k, sent, time.monotonic()))
            except IndeterminateError:
                self.unknown.append(k)
            except RaftKVError:
                self.failed.append(k)

    def check(self, cluster_file: str | os.PathLike, timeout: float = 30.0) -> str:
        """After the writer stopped: every acknowledged key holds its value, every ``failed``
        key is absent (raises AssertionError otherwise); ``unknown`` keys may be either, and
        the one-line report returned says how many were applied."""
        with Client(cluster=cluster_file, timeout=timeout) as c:
            lost = [k for k, _, _ in self.acked if c.get(k) != k.encode()]
            phantom = [k for k in self.failed if c.get(k) is not None]
            applied = [k for k in self.unknown if c.get(k) is not None]
        assert lost == [], f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
        assert phantom == [], f"{len(phantom)} writes reported failed were applied, e.g. {phantom[:5]}"
        return (f"{len(self.acked)} acked (none lost), {len(self.failed)} failed (none applied), "
                f"{len(self.unknown)} unknown ({len(applied)} applied)")


def free_port() -> int:
    """A TCP port free on loopback right now (for a node added to a running cluster)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_writes(writers: list[PutWriter], count: int, when: str, timeout: float = 60.0) -> None:
    """Until ``count`` more writes are acknowledged (over all writers)."""
    want = sum(len(w.acked) for w in writers) + count
    deadline = time.monotonic() + timeout
    while sum(len(w.acked) for w in writers) < want:
        assert time.monotonic() < deadline, f"fewer than {count} writes acknowledged in {timeout:g} s {when}"
        time.sleep(0.05)


@contextlib.contextmanager
def writers_running(lc: LocalCluster, count: int) -> Iterator[list[PutWriter]]:
    """``count`` PutWriters (keys ``w0-0``, ``w1-0``, ...) writing while the block runs; stopped after it.

    If the block fails, the nodes' logs (of the cluster file as it is then) are printed first.
    """
    writers = [PutWriter(lc.config, unique_keys(f"w{i}")) for i in range(count)]
    for w in writers:
        w.start()
    try:
        yield writers
    except Exception:
        dump_logs(LocalCluster(lc.dir))
        raise
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(30)


def replicas_agree(m: ShardMap, shard: int, timeout: float = 20.0) -> None:
    """Every replica of ``shard`` in map ``m`` reaches one revision with one digest (``RAFTKV.HASHKV``);
    fails on two digests at one revision (diverged replicas) or when they never meet within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        answers = {}
        for name in m.placement[shard]:
            try:
                answers[name] = tuple(call(m.nodes[name].client_addr, "RAFTKV.HASHKV", str(shard), timeout=10.0))
            except (OSError, RaftKVError) as e:  # a node still starting, or its member not yet built
                answers[name] = (None, str(e))
        if len({a[0] for a in answers.values()}) == 1 and None not in {a[0] for a in answers.values()}:
            assert len({a[1] for a in answers.values()}) == 1, f"shard {shard}: replicas diverged: {answers}"
            return
        assert time.monotonic() < deadline, f"shard {shard}: replicas never at one revision: {answers}"
        time.sleep(0.2)

"""The power nemesis: a power loss undoes exactly the writes that were not yet fsynced.

Three layers, from the pure part out:

* the undo records (what the shim logs) undone on bytes give back the file as it was before the writes,
  whatever the writes were (hypothesis, against a plain bytes model of a file);
* the preloaded shim in a real process: after kill -9 and :func:`rollback`, a file is as of its last fsync,
  writes through an ``O_DSYNC`` descriptor stay, a deleted file's log is dropped; an LMDB environment that
  fsyncs keeps every commit, one opened without sync loses them (the model has teeth);
* the harness: ``--nemesis power`` passes on the real build and catches ``--unsafe-no-sync`` (nodes that
  acknowledge writes they never fsync).

The shim needs a C compiler: without one the shim tests skip with the reason on a developer machine and
fail under ``CI=true`` (``make test`` installs gcc where it is missing, as root).
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jepsen_like import power
from jepsen_like.nemesis import FAULT_KINDS, parse_nemesis

from .conftest import missing_capability
from .test_jepsen_harness import assert_pass, common, harness, needs_netns

ROOT = Path(__file__).resolve().parents[1]


# -- pure: records and their undoing ---------------------------------------------------------------

def _apply(content: bytearray, op: tuple) -> tuple[str, int, int, bytes]:
    """Apply one write or truncate to ``content``; return the undo record the shim would log for it."""
    size = len(content)
    if op[0] == "W":
        _, off, data = op
        old = bytes(content[off:off + len(data)]) if off < size else b""
        if off > size:
            content.extend(b"\0" * (off - size))
        content[off:off + len(data)] = data
        return ("W", off, size, old)
    _, length = op
    old = bytes(content[length:]) if length < size else b""
    del content[length:]
    content.extend(b"\0" * (length - len(content)))
    return ("T", length, size, old)


ops = st.lists(st.one_of(
    st.tuples(st.just("W"), st.integers(0, 64), st.binary(min_size=0, max_size=24)),
    st.tuples(st.just("T"), st.integers(0, 80))), max_size=20)


@settings(max_examples=300, deadline=None)
@given(start=st.binary(max_size=64), writes=ops)
def test_undoing_the_records_gives_back_the_file_before_the_writes(start: bytes, writes: list) -> None:
    content = bytearray(start)
    records = [_apply(content, op) for op in writes]
    assert power.undo_bytes(bytes(content), records) == start


def _encode(path: str, records: list[tuple[str, int, int, bytes]]) -> bytes:
    out = b"P" + struct.pack("<I", len(path.encode())) + path.encode()
    for kind, off, size, old in records:
        out += kind.encode() + struct.pack("<QQI", off, size, len(old)) + old
    return out


@settings(max_examples=100, deadline=None)
@given(writes=ops, cut=st.integers(1, 30))
def test_the_log_parses_back_and_a_torn_last_record_is_ignored(writes: list, cut: int) -> None:
    content = bytearray(b"x" * 16)
    records = [_apply(content, op) for op in writes]
    data = _encode("/d/f", records)
    log = power.parse_undo(data)
    assert (log.path, log.records, log.torn) == ("/d/f", records, False)
    if records:  # a kill while the last record was appended: the write it announces never happened
        torn = power.parse_undo(data[:-min(cut, 20 + len(records[-1][3]))])
        assert torn.torn and torn.records == records[:-1]


# -- the shim in real processes --------------------------------------------------------------------

@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = power.shim_error()
    if why:
        missing_capability(why)
    return power.build_shim(tmp_path_factory.mktemp("shim"))


def _run_killed(shim: Path, root: Path, log: Path, script: str) -> None:
    """Run ``script`` under the shim; it must end by killing itself (as the nemesis kills a node)."""
    env = dict(os.environ, **power.shim_env(shim, root, log))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr


def test_a_file_is_rolled_back_to_its_last_fsync(shim: Path, tmp_path: Path) -> None:
    root, log = tmp_path / "data", tmp_path / "undo"
    _run_killed(shim, root, log, """
        import os, signal
        fd = os.open("f", os.O_RDWR | os.O_CREAT)
        os.write(fd, b"a" * 100)
        os.pwrite(fd, b"b" * 10, 50)
        os.fsync(fd)                      # durable: 50 a, 10 b, 40 a
        os.pwrite(fd, b"c" * 30, 90)      # over the end: grows the file to 120
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"d" * 5)
        os.writev(fd, [b"e", b"f"])
        os.ftruncate(fd, 20)
        os.pwrite(fd, b"g", 200)
        sync = os.open("s", os.O_WRONLY | os.O_CREAT | os.O_DSYNC)
        os.write(sync, b"synchronous")    # durable when it returns
        gone = os.open("gone", os.O_RDWR | os.O_CREAT)
        os.write(gone, b"never synced")
        os.unlink("gone")                 # a deletion is durable at once: nothing to undo
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert (root / "f").stat().st_size == 201  # what the page cache held at the kill
    cut = power.rollback(log, root)
    assert (root / "f").read_bytes() == b"a" * 50 + b"b" * 10 + b"a" * 40
    assert (root / "s").read_bytes() == b"synchronous"
    assert not (root / "gone").exists()
    assert cut.files == 1 and cut.writes == 5, cut
    assert not list(log.glob("*.undo"))


def test_a_file_written_outside_the_root_is_not_tracked(shim: Path, tmp_path: Path) -> None:
    root, log, other = tmp_path / "data", tmp_path / "undo", tmp_path / "other"
    other.mkdir()
    _run_killed(shim, root, log, f"""
        import os, signal
        with open({str(other / "f")!r}, "wb") as f:
            f.write(b"kept")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert not list(log.glob("*.undo"))
    assert power.rollback(log, root).files == 0 and (other / "f").read_bytes() == b"kept"


def test_a_rename_moves_the_log_with_the_file(shim: Path, tmp_path: Path) -> None:
    root, log = tmp_path / "data", tmp_path / "undo"
    _run_killed(shim, root, log, """
        import os, signal
        with open("tmp", "wb") as f:
            f.write(b"old")
            f.flush()
            os.fsync(f.fileno())
        with open("tmp", "ab") as f:
            f.write(b" and unsynced")
        os.replace("tmp", "final")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    power.rollback(log, root)
    assert (root / "final").read_bytes() == b"old"


_LMDB = """
    import lmdb, os, signal
    env = lmdb.open("db", map_size=1 << 26, sync={sync})
    for i in range(50):
        with env.begin(write=True) as t:
            t.put(b"k%d" % i, b"v" * 200)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("sync, kept", [(True, 50), (False, 0)])
def test_lmdb_commits_survive_a_power_loss_only_when_fsynced(shim: Path, tmp_path: Path, sync: bool,
                                                             kept: int) -> None:
    import lmdb

    root, log = tmp_path / "data", tmp_path / "undo"
    _run_killed(shim, root, log, _LMDB.format(sync=sync))
    cut = power.rollback(log, root)
    env = lmdb.open(str(root / "db"), map_size=1 << 26)
    try:
        assert env.stat()["entries"] == kept, cut.summary()
    finally:
        env.close()
    if not sync:
        assert cut.writes >= 50, cut.summary()


def test_forget_under_drops_only_that_directory(shim: Path, tmp_path: Path) -> None:
    root, log = tmp_path / "data", tmp_path / "undo"
    (root / "n1").mkdir(parents=True)
    (root / "n2").mkdir(parents=True)
    _run_killed(shim, root, log, """
        import os, signal
        for n in ("n1", "n2"):
            with open(os.path.join(n, "f"), "wb") as f:
                f.write(b"unsynced")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert power.forget_under(log, root / "n1") == 1
    cut = power.rollback(log, root)
    assert cut.files == 1 and (root / "n1" / "f").read_bytes() == b"unsynced" and (root / "n2" / "f").read_bytes() == b""


# -- the nemesis in the harness --------------------------------------------------------------------

#: Seed 1's schedule in 7 s of load: one power window from 2 s, cutting every node's power (the nemesis draws
#: its targets from its own generator, so the window is the first of the 10 s schedule, without the second).
POWER_RUN_TIME = 7


def test_power_is_a_fault_kind_in_all() -> None:
    assert "power" in FAULT_KINDS and "power" in parse_nemesis("all")


@pytest.mark.slow
def test_power_loss_run_passes_on_the_real_build(shim: Path, tmp_path: Path) -> None:
    needs_netns()
    rc, res, out = harness(tmp_path, "--nemesis", "power", *common(1, POWER_RUN_TIME))
    assert_pass(rc, res, out)
    faults = [f for f in res["faults"] if f["kind"] == "power"]
    assert faults and all("unsynced writes" in f["detail"] and not f["error"] for f in faults), faults


@pytest.mark.slow
def test_power_loss_catches_nodes_that_acknowledge_before_fsync(shim: Path, tmp_path: Path) -> None:
    """The negative control: nodes that never fsync must lose acknowledged writes to a power loss, and the
    checks must say so (seed 1: the first fault cuts every node's power)."""
    needs_netns()
    rc, res, out = harness(tmp_path, "--nemesis", "power", "--unsafe-no-sync", *common(1, POWER_RUN_TIME))
    assert rc == 1 and res["verdict"] == "fail", out[-4000:]
    assert any(c["valid"] is False for c in res["checks"].values()), res["checks"]
    undone = [int(n) for f in res["faults"] for n in re.findall(r"(\d+) unsynced writes", f["detail"])]
    assert sum(undone) > 100, res["faults"]

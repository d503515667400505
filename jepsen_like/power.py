"""Power loss for the ``power`` nemesis: undo, after a kill -9, every write a node had not yet fsynced.

Why: kill -9 loses nothing the kernel already has, so it cannot catch a store that acknowledges before its
data is durable. A power loss also drops the page cache. This module and the C shim beside it
(``power_shim.c``, preloaded into node processes with ``LD_PRELOAD``) model that, in the spirit of LazyFS
but without a FUSE file system:

* the shim keeps, for every regular file under the cluster's data directory, an undo log of the writes
  not yet durable: before each ``write``/``pwrite``/``writev``/``pwritev``/``ftruncate`` it appends the
  bytes the range held (and the file's size);
* an ``fsync``/``fdatasync`` of the file drops its undo log when it *starts* (a kill during the fsync then
  keeps every write: one of the outcomes a power loss during an fsync may have; dropping it after would undo
  writes the fsync made durable, which no power loss does); writes through ``O_SYNC``/``O_DSYNC``
  descriptors are durable at once, as LMDB's meta-page writes are;
* directory entries (create, rename, unlink) are durable at once: the model does not catch a missing
  directory fsync (LazyFS would).

:func:`rollback` is the power cut itself: after the nodes are killed, it applies each undo log backwards
(old bytes back, the old size back) so every file is as it was at its last fsync. Only the records' parser
(:func:`parse_undo`) and the backwards application on bytes (:func:`undo_bytes`) are logic; both are pure
and tested against a model in tests/test_power.py.

The shim is compiled on first use with the system C compiler (``cc``); :func:`shim_error` says why it cannot
be when it cannot, and the harness refuses the ``power`` nemesis with that reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["UndoLog", "PowerCut", "build_shim", "shim_error", "shim_env", "parse_undo", "undo_bytes", "rollback",
           "forget_under"]

SHIM_SOURCE = Path(__file__).with_name("power_shim.c")
_HEAD = struct.Struct("<QQI")


@dataclass
class UndoLog:
    """One file's undo log: its last recorded path and its records (kind, offset, old size, old bytes)."""

    path: str | None = None
    records: list[tuple[str, int, int, bytes]] = field(default_factory=list)
    torn: bool = False  # the last record was cut short (the kill came while it was appended): ignored


@dataclass
class PowerCut:
    """What a rollback did: files put back and bytes of unsynced writes undone."""

    files: int = 0
    writes: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.writes} unsynced writes ({self.bytes / 1024:.1f} KiB) undone in {self.files} files"
        return s + (f"; skipped: {', '.join(self.skipped)}" if self.skipped else "")


def parse_undo(data: bytes) -> UndoLog:
    """Pure: the records of an undo log (format in power_shim.c); a torn last record is dropped."""
    out = UndoLog()
    i = 0
    while i < len(data):
        kind = chr(data[i])
        if kind == "P":
            if i + 5 > len(data):
                out.torn = True
                break
            (n,) = struct.unpack_from("<I", data, i + 1)
            if i + 5 + n > len(data):
                out.torn = True
                break
            out.path = data[i + 5:i + 5 + n].decode("utf-8", "surrogateescape")
            i += 5 + n
        elif kind in ("W", "T"):
            if i + 1 + _HEAD.size > len(data):
                out.torn = True
                break
            off, size, n = _HEAD.unpack_from(data, i + 1)
            start = i + 1 + _HEAD.size
            if start + n > len(data):
                out.torn = True
                break
            out.records.append((kind, off, size, data[start:start + n]))
            i = start + n
        else:
            raise ValueError(f"undo log corrupt at byte {i}: record type {data[i]!r}")
    return out


def undo_bytes(content: bytes, records: list[tuple[str, int, int, bytes]]) -> bytes:
    """Pure: ``content`` with ``records`` undone, last first (what :func:`rollback` does to a file)."""
    buf = bytearray(content)
    for _kind, off, size, old in reversed(records):
        if len(buf) < off + len(old):
            buf.extend(b"\0" * (off + len(old) - len(buf)))
        buf[off:off + len(old)] = old
        del buf[size:]
        if len(buf) < size:
            buf.extend(b"\0" * (size - len(buf)))
    return bytes(buf)


def rollback(log_dir: str | os.PathLike, under: str | os.PathLike) -> PowerCut:
    """Undo the unsynced writes of every file under ``under`` (its processes must be dead), then drop their logs."""
    cut = PowerCut()
    base = os.path.realpath(under)
    for undo in sorted(Path(log_dir).glob("*.undo")):
        log = parse_undo(undo.read_bytes())
        if log.path is None or not _is_under(log.path, base):
            continue
        dev, ino = (int(x) for x in undo.stem.split("-"))
        try:
            st = os.stat(log.path)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != (dev, ino):
            cut.skipped.append(f"{log.path} (gone)")  # deleted or replaced: its entry's change was durable
            undo.unlink()
            continue
        if log.records:
            with open(log.path, "r+b") as f:
                for _kind, off, size, old in reversed(log.records):
                    if old:
                        f.seek(off)
                        f.write(old)
                    f.truncate(size)
                    cut.bytes += len(old)
                f.flush()
                os.fsync(f.fileno())
            cut.files += 1
            cut.writes += len(log.records)
        undo.unlink()
    return cut


def forget_under(log_dir: str | os.PathLike, under: str | os.PathLike) -> int:
    """Drop the undo logs of files under ``under`` (the harness deleted them); returns how many."""
    base = os.path.realpath(under)
    n = 0
    for undo in Path(log_dir).glob("*.undo"):
        log = parse_undo(undo.read_bytes())
        if log.path is not None and _is_under(log.path, base):
            undo.unlink()
            n += 1
    return n


def _is_under(path: str, base: str) -> bool:
    return path == base or path.startswith(base + os.sep)


def shim_error() -> str | None:
    """Why the shim cannot be built here (no C compiler), or None."""
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build the power-loss shim: apt-get install gcc"
    return None


def build_shim(cache_dir: str | os.PathLike) -> Path:
    """Compile the shim into ``cache_dir`` once per source version; returns the shared object's path."""
    src = SHIM_SOURCE.read_bytes()
    out = Path(cache_dir) / f"raftkv-power-{hashlib.sha256(src).hexdigest()[:12]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SHIM_SOURCE), "-ldl",
                              "-lpthread"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building the power-loss shim failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    return out


def shim_env(shim: str | os.PathLike, root: str | os.PathLike, log_dir: str | os.PathLike) -> dict[str, str]:
    """Environment entries that load the shim into a node process, tracking files under ``root``."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    Path(root).mkdir(parents=True, exist_ok=True)
    preload = " ".join(x for x in (str(shim), os.environ.get("LD_PRELOAD", "")) if x)
    return {"LD_PRELOAD": preload, "RAFTKV_POWER_ROOT": str(root), "RAFTKV_POWER_LOG": str(log_dir)}

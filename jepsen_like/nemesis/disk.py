"""Disk faults: ``slow-disk`` (injected latency on every durable commit) and ``disk`` (a full file system),
with the pure helpers the ``disk`` fault and its tests use: the tmpfs guard, filling and freeing, and
reading a node's storage-engine failure from its log.

``slow-disk``: ``RAFTKV.FAULT DISK.SLOW_MS`` makes every durable commit of a
random node's storage engine (:mod:`raftkv.engine`) take ``SLOW_DISK_MS`` (20 to
400 ms) longer, as an fsync that slow would; the window's end sets it back to 0.
The node's engine commit counters (``RAFTKV.STATUS`` ``engine``), read at both
ends of the window, go into the fault's detail: the mean commit time during the
window shows the fault was in effect.

``disk``: a full disk.  Runs with this nemesis put each node's data directory
on a tmpfs of ``--disk-mib`` MiB (mounted by the runner inside the run's private
mount namespace, :func:`jepsen_like.netns.mount_tmpfs`).  The fault fills one
node's file system (a random node or a shard leader; a quarter of the time every
node's) with a filler file until ``ENOSPC``, so the next storage-engine commit
that needs a new page fails: "No space left on device", or "Input/output error"
when a page write was cut short (LMDB reports a short write as ``EIO``).  By design a failed
durable commit stops the node's Raft driver (raftkv/driver.py: a failed fsync
cannot be retried safely, and the frames that would acknowledge it are never
sent); the node's RESP server stays up.  At the window's end the filler is
removed, and every filled node whose driver stopped (or whose process died) is
restarted from its data directory; the fault's detail says which nodes stopped
with that error in their log.  The nemesis refuses to fill a directory that is
not a small tmpfs mount point.
"""

from __future__ import annotations

import errno
import json
import os
import re

from .base import Fault, NemesisBase, _read_from, _size

SLOW_DISK_MS = (20, 400)
"""Range of the latency a ``slow-disk`` fault adds to each durable commit (milliseconds)."""
FILLER = "jepsen-disk-filler"
"""Name of the file the ``disk`` nemesis fills a node's data directory with."""
FILL_LIMIT_BYTES = 1 << 30
"""The ``disk`` nemesis refuses to fill a file system larger than this (it must be the run's small tmpfs)."""


class DiskFaults(NemesisBase):
    """``slow-disk`` and ``disk``: inject, undo (with a note of what the window did), heal."""

    _engine_before: dict[int, tuple[int, float] | None]
    _log_at: dict[int, dict[str, int]]

    def _start_slow_disk(self) -> Fault:
        node, why = self._target()
        ms = round(self.rng.uniform(*SLOW_DISK_MS))
        f = Fault("slow-disk", f"disk of {node} ({why}) slowed: +{ms} ms per durable commit", [node], self.clock())
        self._set_slow_disk(node, ms)  # then read the counters, so the window's commits are all slowed
        self._engine_before[id(f)] = self._engine_counters(node)
        return f

    def _end_slow_disk(self, f: Fault) -> None:
        after = self._engine_counters(f.nodes[0])  # before the undo, for the same reason
        for n in f.nodes:
            self._set_slow_disk(n, 0)
        f.detail += _commit_summary(self._engine_before.pop(id(f), None), after)

    def _start_disk(self) -> Fault:
        if self.rng.random() < 0.25:
            nodes, why = list(self.nodes), "every node"
        else:
            node, why = self._target()
            nodes, why = [node], f"{node} ({why})"
        f = Fault("disk", f"filled the disk of {why}", nodes, self.clock())
        self._log_at[id(f)] = {n: _size(self.cluster.log_file(n)) for n in nodes}
        filled = [fill_disk(self.cluster.map.node_data_dir(n)) for n in nodes]
        f.detail += f": {sum(filled) / 2**20:.1f} MiB of filler"
        return f

    def _heal_disks(self) -> list[str]:
        """The heal: every open slow disk back to normal speed, every disk still full freed."""
        done = []
        for f in self.faults:  # a slow disk still open: back to normal speed (a restart also is)
            if f.kind == "slow-disk" and f.nodes and f.end is None:
                try:
                    self._set_slow_disk(f.nodes[0], 0)
                    done.append(f"disk of {f.nodes[0]} back to normal speed")
                except Exception:  # noqa: BLE001 - a node that does not answer is restarted below, at 0
                    pass
        for f in self.faults:  # a disk still full: free it, restart the nodes it stopped
            if f.kind == "disk" and f.nodes and f.end is None:
                try:
                    self._free_disk(f)
                    done.append(f"disk of {', '.join(f.nodes)} freed")
                except Exception as e:  # noqa: BLE001
                    done.append(f"freeing the disk of {', '.join(f.nodes)} failed: {e}")
        return done

    def _set_slow_disk(self, node: str, ms: int) -> None:
        """Set ``node``'s injected commit latency; raises unless the node confirms."""
        reply = self._fault_call(node, "DISK.SLOW_MS", str(ms))
        if not isinstance(reply, int) or isinstance(reply, bool):
            raise RuntimeError(f"{node} refused RAFTKV.FAULT DISK.SLOW_MS {ms}: {reply}")

    def _free_disk(self, f: Fault) -> None:
        """Remove the filler of ``f``'s nodes, then restart each one whose Raft driver stopped (or that died)."""
        log_at = self._log_at.pop(id(f), {})
        for n in f.nodes:
            free_disk(self.cluster.map.node_data_dir(n))
        notes = []
        for n in f.nodes:
            failure = engine_failure(_read_from(self.cluster.log_file(n), log_at.get(n, 0)))
            if self._driver_alive(n):
                notes.append(f"{n} served on" + (f" (a commit failed: {failure})" if failure else ""))
                continue
            self.cluster.kill_node(n)
            self.cluster.start_node(n)
            why = f"its Raft driver stopped: {failure}" if failure else "it stopped, no engine error in its log"
            notes.append(f"{n} restarted ({why})")
        f.detail += "; freed: " + "; ".join(notes)

    def _driver_alive(self, node: str) -> bool:
        """Whether ``node`` runs and its Raft driver is alive (RAFTKV.STATUS)."""
        if self.cluster.pid(node) is None:
            return False
        try:
            return bool(json.loads(self.cluster.call(node, "RAFTKV.STATUS"))["raft"]["driver_alive"])
        except Exception:  # noqa: BLE001 - not answering counts as stopped: a restart is what it needs
            return False

    def _engine_counters(self, node: str) -> tuple[int, float] | None:
        """``(durable commits, seconds in them)`` of ``node``'s engine, None if it does not answer."""
        try:
            eng = json.loads(self.cluster.call(node, "RAFTKV.STATUS"))["engine"]
            return int(eng["commits"]), float(eng["commit_s"])
        except Exception:  # noqa: BLE001 - only the fault's detail loses its figure
            return None


def is_small_tmpfs(path: str) -> bool:
    """Whether ``path`` is a mount point of a tmpfs no larger than :data:`FILL_LIMIT_BYTES` (what the runner
    mounts for the ``disk`` nemesis): the only kind of file system the nemesis will fill."""
    try:
        st = os.statvfs(path)
        with open("/proc/self/mounts") as mounts:
            fstype = {fields[1]: fields[2] for fields in (line.split() for line in mounts) if len(fields) > 2}
    except OSError:
        return False
    return fstype.get(os.path.realpath(path)) == "tmpfs" and st.f_blocks * st.f_frsize <= FILL_LIMIT_BYTES


def fill_disk(path: str, chunk: int = 1 << 20) -> int:
    """Write a filler file in ``path`` until its file system is full (``ENOSPC``); returns the bytes written."""
    if not is_small_tmpfs(path):
        raise RuntimeError(f"refusing to fill {path}: not a tmpfs of at most {FILL_LIMIT_BYTES >> 20} MiB "
                           "(run the disk nemesis inside the harness's namespace, which mounts one)")
    written = 0
    block = b"\0" * chunk
    with open(os.path.join(path, FILLER), "ab", buffering=0) as out:
        while chunk >= 4096:
            try:
                written += out.write(block[:chunk])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 2  # down to single pages: leave nothing a commit could use
    return written


def free_disk(path: str) -> None:
    """Remove the filler from ``path`` (absent is fine)."""
    try:
        os.remove(os.path.join(path, FILLER))
    except FileNotFoundError:
        pass


_ENGINE_FAILURE = re.compile(r"EngineError: storage engine (?:commit failed in \S+: (?:mdb_txn_commit: )?(.+)|in \S+ is full.*)")


def engine_failure(log_text: str) -> str:
    """Pure: the last storage-engine commit error in a node's log text ("" if none), e.g. "No space left on
    device", or "Input/output error" (what LMDB reports for a short write on a full file system)."""
    found = _ENGINE_FAILURE.findall(log_text)
    if not found:
        return ""
    return found[-1].strip() or "map full"


def _commit_summary(before: tuple[int, float] | None, after: tuple[int, float] | None) -> str:
    """Pure: the fault detail's note on the engine commits made between two counter readings."""
    if before is None or after is None or after[0] < before[0]:
        return " (commit times unknown: the node did not answer, or restarted)"
    n = after[0] - before[0]
    if n == 0:
        return " (no durable commit in the window)"
    return f" (mean durable commit {(after[1] - before[1]) / n * 1000:.0f} ms over {n} commits)"

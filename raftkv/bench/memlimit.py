"""Run benchmark node processes under a memory limit: one Linux memory cgroup per node (root only).

``RSS`` counts the pages of a memory-mapped store (LMDB) that a process touched, clean page cache the kernel
takes back when memory runs short. Whether a node *needs* more than N MB is measured by giving it no more: each
node's process goes into a cgroup of its own whose limit covers its anonymous memory and the page cache charged
to it (cgroup v2 ``memory.max``, or v1 ``memory.limit_in_bytes``), and the benchmark reports how fast it loads,
restarts and serves there, and its RSS.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["MemoryLimit", "MemoryLimitError"]

_V2_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
_V1_ROOT = "/sys/fs/cgroup/memory"


class MemoryLimitError(RuntimeError):
    """No memory cgroup could be made here (not Linux, not root, or no memory controller)."""


class MemoryLimit:
    """A memory cgroup of ``mb`` MB per node name; ``place`` moves a node's process into its own."""

    def __init__(self, mb: int, prefix: str = "raftkv-bench") -> None:
        if mb <= 0:
            raise ValueError(f"a memory limit must be positive, got {mb} MB")
        self.limit = mb << 20
        self.prefix = f"{prefix}-{os.getpid()}"
        self.dirs: dict[str, Path] = {}
        self.root, self.v2 = self._root()

    @staticmethod
    def _root() -> tuple[Path, bool]:
        for root in _V2_ROOTS:
            controllers = Path(root, "cgroup.controllers")
            if controllers.exists() and "memory" in controllers.read_text().split():
                return Path(root), True
        if Path(_V1_ROOT, "memory.limit_in_bytes").exists():
            return Path(_V1_ROOT), False
        raise MemoryLimitError("no cgroup memory controller found (Linux with cgroups, as root, is needed)")

    def place(self, node: str, pid: int) -> None:
        """Put process ``pid`` (node ``node``; its threads go with it) into the node's cgroup, made on first use."""
        d = self.dirs.get(node)
        if d is None:
            d = self.root / f"{self.prefix}-{node}"
            try:
                if self.v2:  # children get memory.max only once their parent delegates the controller
                    with contextlib.suppress(OSError):
                        (self.root / "cgroup.subtree_control").write_text("+memory")
                d.mkdir(exist_ok=True)
                if self.v2:
                    (d / "memory.max").write_text(str(self.limit))
                else:
                    (d / "memory.limit_in_bytes").write_text(str(self.limit))
                # No swapping past the limit either (where the kernel accounts swap): the node gets no more.
                with contextlib.suppress(OSError):
                    (d / ("memory.swap.max" if self.v2 else "memory.memsw.limit_in_bytes")).write_text(
                        "0" if self.v2 else str(self.limit))
            except OSError as e:
                raise MemoryLimitError(f"cannot make memory cgroup {d}: {e}") from e
            self.dirs[node] = d
        try:
            (d / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            raise MemoryLimitError(f"cannot move process {pid} into {d}: {e}") from e

    def usage_mb(self, node: str) -> float | None:
        """Memory charged to the node's cgroup now (anonymous and page cache), MB."""
        d = self.dirs.get(node)
        if d is None:
            return None
        f = d / ("memory.current" if self.v2 else "memory.usage_in_bytes")
        with contextlib.suppress(OSError, ValueError):
            return int(f.read_text()) / (1 << 20)
        return None

    def close(self) -> None:
        """Remove the cgroups (once their processes are gone; one still in use is left)."""
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                d.rmdir()
        self.dirs = {}

"""Values a state-machine command returns besides plain data: a deterministic error, or a lock.

They live here, below ``raftkv.state``, ``raftkv.txn`` and ``raftkv.backup_state``,
so those modules can share them without importing each other in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CmdError:
    """A deterministic command failure; ``code`` is stable (e.g. ``WRONGTYPE``)."""

    code: str
    message: str


@dataclass(frozen=True)
class Locked:
    """The key is locked by prepared transaction ``txid`` whose home is ``home_shard``."""

    key: bytes
    txid: str
    home_shard: int
    since_ms: int

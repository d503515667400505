"""The errors the client libraries raise (``raftkv.Client``, ``raftkv.aio``, the transaction builder).

``code`` is the stable error code (see ``raftkv.protocol.ERROR_CODES``); people read the message.
The clients retry the codes that promise "not applied" themselves, among them ``MOVING`` (the key is
being copied to a new shard by ``raftkv shard add``) and ``WRONGSHARD`` (it belongs to another shard
now: the client fetches a newer map first); those reach the caller only when the request's time is up.
"""

from __future__ import annotations


class RaftKVError(Exception):
    """A request failed; ``code`` is the stable error code (see raftkv.protocol.ERROR_CODES)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class IndeterminateError(RaftKVError):
    """The write may or may not have been applied; read the key to find out."""


class UnavailableError(RaftKVError):
    """The request was not applied: no leader or no node reachable within the timeout."""


class LockTimeout(RaftKVError):
    """The lock was held by someone else for longer than the caller was willing to wait."""

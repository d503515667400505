"""raftkv.store: what ``raftkv.engine.Engine`` needs of the key-value store beneath it.

Two stores implement it: ``raftkv.lmdbstore`` (LMDB, a copy-on-write B+tree) and ``raftkv.rocksstore``
(RocksDB, a log-structured merge tree). Both commit a batch of operations atomically and, with ``sync`` on,
durably (a power loss keeps every commit that returned); both read committed data only. docs/engine.md says
how they differ and which a node uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

__all__ = ["PUT", "DEL", "DEL_RANGE", "StoreError", "StoreFull", "Store", "WriteBatch", "ReadView"]

#: Operation codes of a buffered commit: ``(PUT, key, value)``, ``(DEL, key, None)``, ``(DEL_RANGE, lo, hi)``.
PUT, DEL, DEL_RANGE = 0, 1, 2
T = TypeVar("T")


class StoreError(Exception):
    """The store could not be opened or written (the message says what and where)."""


class StoreFull(StoreError):
    """The store reached its configured size limit."""


class WriteBatch(Protocol):
    """The writes of one ``Engine.commit_now`` commit, applied in call order. Reads inside it
    (``delete_first``) see the committed data and this batch's own deletions."""

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def delete_range(self, lo: bytes, hi: bytes) -> None: ...

    def delete_first(self, lo: bytes, hi: bytes, limit: int) -> int: ...

    def delete_first_sized(self, lo: bytes, hi: bytes, limit: int) -> tuple[int, int]: ...

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> int: ...


class ReadView(Protocol):
    """A consistent read-only view of what was committed when it was taken; close it when done."""

    def get(self, key: bytes) -> bytes | None: ...

    def scan(self, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]: ...

    def keys(self, lo: bytes, hi: bytes) -> Iterator[bytes]: ...

    def scan_batches(self, lo: bytes, hi: bytes, size: int) -> Iterator[list[tuple[bytes, bytes]]]: ...

    def close(self) -> None: ...

    def __enter__(self) -> ReadView: ...

    def __exit__(self, *exc: object) -> None: ...


class Store(Protocol):
    """One store in one directory (see module doc)."""

    kind: str
    path: str

    def commit(self, ops: list[tuple[int, bytes, bytes | None]]) -> None: ...

    def commit_with(self, write: Callable[[WriteBatch], T]) -> T: ...

    def flush_meta(self) -> None: ...

    def get(self, key: bytes) -> bytes | None: ...

    def read_view(self) -> ReadView: ...

    def size_bytes(self) -> int: ...

    def usage(self) -> dict[str, int]: ...

    def close(self) -> None: ...

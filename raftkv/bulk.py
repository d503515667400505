"""Bulk loading: many keys written fast, as one-shard transactions in parallel.

Theory of operation
-------------------
A plain ``SET`` per key costs a whole state-machine command each (a RESP request, a session check, an
entry in a batch, an apply): about 4,000 keys/s on three nodes. A transaction whose keys all live on one
shard is ONE command of one Raft entry, applied at most once per transaction id (``RAFTKV.TXN ID``),
whatever its size. So a bulk load groups its keys by shard (``batches``, pure) into batches of at most
``keys_max`` keys and ``bytes_max`` bytes, and writes each batch as one such transaction to its shard's
leader, several batches in flight (``load``, the edge: threads over a ``raftkv.Client``).

Guarantees: each batch is atomic and applied once (a retry after an unknown outcome resends the same
transaction id); the load as a whole is not atomic. If ``load`` raises, every batch it reported done is
applied, and some others may be; loading the same items again is safe (it writes the same values again).
Within a batch a later item of a key replaces an earlier one; batches of one shard run in parallel, so
items of one key that fall into different batches land in no defined order (give each key once).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["BYTES_MAX", "FORMATS", "KEYS_MAX", "batches", "load", "parse_lines"]

KEYS_MAX = 500  # keys per transaction: large enough to amortise a command, small enough to keep entries short
BYTES_MAX = 1 << 20  # key and value bytes per transaction, under the node's 1.5 MiB request limit


FORMATS = ("tsv", "jsonl")


def parse_lines(lines: Iterable[bytes], fmt: str = "tsv") -> Iterator[tuple[bytes, bytes]]:
    """``(key, value)`` pairs from the lines of a load file; blank lines are skipped.

    ``tsv``: ``key<TAB>value`` (split at the first tab; the value may hold tabs; bytes as they are).
    ``jsonl``: ``{"key": "...", "value": "..."}`` per line (strings, written as UTF-8).
    Raises ``ValueError`` naming the line for a line that is neither.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    for n, line in enumerate(lines, 1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        if fmt == "tsv":
            key, tab, value = line.partition(b"\t")
            if not tab or not key:
                raise ValueError(f"line {n}: expected KEY<TAB>VALUE, got {line[:60]!r}")
            yield key, value
            continue
        try:
            doc = json.loads(line)
            key, value = doc["key"], doc["value"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f'line {n}: expected {{"key": ..., "value": ...}}, got {line[:60]!r}') from None
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise ValueError(f"line {n}: key and value must be strings (key not empty)")
        yield key.encode(), value.encode()


def batches(items: Iterable[tuple[bytes, bytes]], shard_of: Callable[[bytes], int], keys_max: int = KEYS_MAX,
            bytes_max: int = BYTES_MAX) -> Iterator[tuple[int, list[tuple[bytes, bytes]]]]:
    """Group ``items`` by shard into ``(shard, [(key, value), ...])`` batches, in input order per shard.

    A batch is emitted once it holds ``keys_max`` keys or would pass ``bytes_max`` bytes; the rest at the
    end. An item alone over ``bytes_max`` gets a batch of its own (the node judges its size). Within a
    batch a key appears once: a later item with the same key replaces the earlier one.
    """
    if keys_max < 1 or bytes_max < 1:
        raise ValueError("keys_max and bytes_max must be positive")
    open_: dict[int, dict[bytes, bytes]] = {}
    sizes: dict[int, int] = {}
    for key, value in items:
        shard = shard_of(key)
        batch = open_.setdefault(shard, {})
        old = batch.pop(key, None)  # a repeated key: the later value replaces it (and goes last)
        if old is not None:
            sizes[shard] -= len(key) + len(old)
        size = len(key) + len(value)
        if batch and (len(batch) >= keys_max or sizes[shard] + size > bytes_max):
            yield shard, list(batch.items())
            batch = open_[shard] = {}
            sizes[shard] = 0
        batch[key] = value
        sizes[shard] = sizes.get(shard, 0) + size
    for shard, batch in open_.items():
        if batch:
            yield shard, list(batch.items())


def load(client: Any, items: Iterable[tuple[bytes, bytes]], parallel: int = 12, keys_max: int = KEYS_MAX,
         bytes_max: int = BYTES_MAX, progress: Callable[[int], None] | None = None) -> int:
    """Write ``items`` through ``client`` (a ``raftkv.Client``); returns the number of keys written.

    ``parallel`` batches are in flight at once; ``progress(keys_written_so_far)`` is called after each
    batch. The first failing batch's exception is raised once the batches in flight have ended (module
    doc: what is then applied). Items with the same key in different batches land in no defined order.
    """
    if parallel < 1:
        raise ValueError("parallel must be at least 1")
    done = 0
    lock = threading.Lock()
    slots = threading.Semaphore(parallel)
    failure: list[BaseException] = []

    def write(batch: list[tuple[bytes, bytes]]) -> None:
        nonlocal done
        try:
            if not failure:
                t = client.txn()
                for key, value in batch:
                    t.then_put(key, value)
                t.commit(retries=10)
                with lock:
                    done += len(batch)
                    n = done
                if progress is not None:
                    progress(n)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
            failure.append(e)
        finally:
            slots.release()

    with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="raftkv-load") as pool:
        for _shard, batch in batches(items, client.shard_of, keys_max, bytes_max):
            slots.acquire()
            if failure:
                slots.release()
                break
            pool.submit(write, batch)
    if failure:
        raise failure[0]
    return done

"""The client side of the change feed: ``Client.watch`` (server side: ``raftkv.server.commands.watch``).

A ``Watch`` long-polls ``RAFTKV.WATCH`` and keeps one cursor per shard (a
revision per shard: the key's shard for a key watch, every shard for a
prefix).  A reply is only taken once it arrived whole, and its cursor only
moves past events that were handed out, so re-sending the cursor after a lost
connection or a leader change (the client's request path retries reads on
another node) neither skips nor repeats a change, as long as the shard still
retains it; otherwise ``CompactedError`` says from which revision it does.
Changes come in revision order per shard; a prefix watch interleaves shards in
no particular order (their revisions are not comparable).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from raftkv.changelog import decode_cursors, encode_cursor
from raftkv.errors import RaftKVError


@dataclass(frozen=True)
class WatchEvent:
    """One change of one key: its new value (None: deleted), the shard and the shard revision it took."""

    key: bytes
    value: bytes | None
    revision: int
    shard: int

    @property
    def deleted(self) -> bool:
        return self.value is None


class CompactedError(RaftKVError):
    """The shard no longer retains the changes after the cursor: ``oldest`` is the oldest revision
    a watch can start from there (read the current value, then watch from the revision read)."""

    def __init__(self, message: str) -> None:
        super().__init__("COMPACTED", message)
        found = re.match(r"oldest=(\d+)(?: shard=(\d+))?", message)
        self.oldest = int(found.group(1)) if found else 0
        self.shard = int(found.group(2)) if found and found.group(2) else None


Start = int | dict[int, int] | None


class Watch:
    """An endless iterator of ``WatchEvent`` (see module doc); ``cursors`` is where it stands
    (``{shard: revision}``: every watched change up to it has been handed out; None until the first
    reply of a watch started from now).

    ``call(args)`` sends one read request with the client's retries and raises ``RaftKVError``
    (None: an asyncio subclass sends them);
    ``shards`` are the shards watched (the key's, or all for a prefix).  ``start``: None (from now),
    a revision (every watched shard's) or ``{shard: revision}``.
    """

    def __init__(self, call: Callable[[list[bytes]], Any] | None, subject: bytes, prefix: bool, shards: list[int],
                 start: Start, block_s: float, count: int = 1000) -> None:
        self.call = call
        self.subject = subject
        self.prefix = prefix
        self.shards = shards
        self.block_ms = max(1, int(block_s * 1000))
        self.count = count
        if isinstance(start, dict):
            if sorted(start) != sorted(shards):
                raise ValueError(f"start_revision: want one revision for each of the shards {shards}")
            self.cursors: dict[int, int] | None = dict(start)
        else:
            self.cursors = None if start is None else dict.fromkeys(shards, start)

    def _from(self) -> bytes:
        return b"$" if self.cursors is None else encode_cursor(self.cursors, self.prefix)

    def request(self, block: bool) -> list[bytes]:
        """The ``RAFTKV.WATCH`` request from the current cursors."""
        args = [b"RAFTKV.WATCH", b"PREFIX" if self.prefix else b"KEY", self.subject, b"FROM", self._from(),
                b"COUNT", str(self.count).encode()]
        return args + [b"BLOCK", str(self.block_ms).encode()] if block else args

    def parse(self, reply: Any) -> tuple[list[WatchEvent], dict[int, int]]:
        """A ``RAFTKV.WATCH`` reply as the events and the cursors after them."""
        token, rows = reply
        events = [WatchEvent(key, value, int(rev), int(shard)) for shard, rev, _kind, key, value in rows]
        return events, decode_cursors(token) if self.prefix else {self.shards[0]: int(token)}

    @staticmethod
    def refusal(error: RaftKVError) -> RaftKVError:
        """The error to raise for an error reply (``CompactedError`` for COMPACTED)."""
        return CompactedError(error.message) if error.code == "COMPACTED" else error

    def fetch(self, block: bool = True) -> tuple[list[WatchEvent], dict[int, int]]:
        """One poll: the new events and the cursors after them (``cursors`` is not moved)."""
        assert self.call is not None, "no blocking transport: poll it from asyncio (raftkv.aio.AsyncWatch)"
        try:
            return self.parse(self.call(self.request(block)))
        except RaftKVError as e:
            raise self.refusal(e) from None

    def poll(self, block: bool = True) -> list[WatchEvent]:
        """The next batch of events (empty when the wait ran out quietly); moves ``cursors`` past it."""
        events, self.cursors = self.fetch(block)
        return events

    def handing_out(self, events: list[WatchEvent], after: dict[int, int]) -> Iterator[WatchEvent]:
        """``events`` one by one, the cursors moved past each before it is handed out (a consumer may
        stop at any event and resume after it), then to ``after``."""
        if self.cursors is None:
            # Started from now: a shard's cursor is just before its first event (nothing it
            # watches changed in between), or where the reply left it.
            self.cursors = dict(after)
            for e in reversed(events):
                self.cursors[e.shard] = e.revision - 1
        for e in events:
            self.cursors[e.shard] = e.revision
            yield e
        self.cursors = after

    def __iter__(self) -> Iterator[WatchEvent]:
        while True:
            yield from self.handing_out(*self.fetch())

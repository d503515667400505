"""A shard's change feed: a bounded ring of recent changes, in revision order.  Pure, no I/O.

Theory of operation
-------------------
Every change of a key (a write or a deletion, expiry deletions included) takes
the shard's next *revision* (``KVState.write`` bumps ``KVState.revision``), in
log order, so the same revision names the same change on every replica.  The
change log keeps the newest changes as ``(revision, key, value)`` events
(``value`` None: deleted) in a ring bounded by ``events_max`` events and
``bytes_max`` bytes of keys and values: the oldest are dropped first.

A watcher holds a *cursor*: the revision it has seen everything up to.  Asking
for the events after cursor ``c`` is answerable only while no event newer than
``c`` was dropped: the log keeps ``floor``, the revision of the newest event it
dropped (or the shard's revision when history is unknown: a snapshot taken
before the change log existed, a backup restore), and refuses a cursor below it
with ``COMPACTED`` rather than answer with a gap.  The oldest cursor accepted
is therefore ``floor``; the answer also carries the shard's revision, so a
watcher whose keys did not change still moves its cursor forward and does not
fall out of the window on a busy shard.

The ring is part of the replicated state and of snapshots: a follower or a
restarted node serves the same history as the leader did.  The limits are
constants of the state machine, not settings: every replica must drop the same
events at the same revision.

State-machine command (a read, ``KVState.read``):

=============================================  ======================================
command                                        result
=============================================  ======================================
``("changes", key, prefix, after, count)``     ``(events, cursor)``: the events of
                                               ``key`` (or, if ``prefix``, of every key
                                               starting with it) with revision
                                               ``> after``, oldest first, at most
                                               ``count``; ``cursor`` is what to pass as
                                               ``after`` next.  ``after`` None: from
                                               now (no events, the current revision).
                                               ``CmdError("COMPACTED", "oldest=N")``
                                               when ``after < floor``.
=============================================  ======================================
"""

from __future__ import annotations

import bisect
import collections
from typing import Any

from raftkv.results import CmdError

EVENTS_MAX = 10_000  # events kept per shard
EVENT_BYTES_MAX = 8 * 1024 * 1024  # key and value bytes kept per shard
COUNT_MAX = 10_000  # events in one answer
SCAN_MAX = EVENTS_MAX  # events examined by one read (a prefix that matches little scans the window)

Event = tuple[int, bytes, "bytes | None"]  # (revision, key, value or None for a deletion)


def _size(event: Event) -> int:
    return len(event[1]) + (0 if event[2] is None else len(event[2]))


class ChangeLog:
    """The newest changes of one shard, oldest first, bounded in count and bytes (see module doc)."""

    __slots__ = ("events", "floor", "bytes", "events_max", "bytes_max")

    def __init__(self, events: list[Event] | None = None, floor: int = 0, events_max: int = EVENTS_MAX,
                 bytes_max: int = EVENT_BYTES_MAX) -> None:
        assert events_max >= 1 and bytes_max >= 1
        self.events: collections.deque[Event] = collections.deque(events or ())
        self.floor = floor  # every event with revision > floor is in ``events``
        self.bytes = sum(_size(e) for e in self.events)
        self.events_max = events_max
        self.bytes_max = bytes_max
        assert all(a[0] < b[0] for a, b in zip(self.events, list(self.events)[1:], strict=False))
        assert not self.events or self.events[0][0] > floor

    def record(self, revision: int, key: bytes, value: bytes | None) -> None:
        """Append the change that took ``revision`` (newer than every event kept), then drop the
        oldest events until the limits hold again.  A single event over ``bytes_max`` is dropped at
        once: the floor moves past it, so a watcher learns it missed something instead of a gap."""
        assert not self.events or revision > self.events[-1][0], "revisions only grow"
        event = (revision, key, value)
        self.events.append(event)
        self.bytes += _size(event)
        while self.events and (len(self.events) > self.events_max or self.bytes > self.bytes_max):
            dropped = self.events.popleft()
            self.bytes -= _size(dropped)
            self.floor = dropped[0]

    def compact_to(self, revision: int) -> None:
        """Forget the history up to ``revision`` (state changed outside the log of changes, e.g. a
        backup loaded): watchers with an older cursor get ``COMPACTED``."""
        while self.events and self.events[0][0] <= revision:
            self.bytes -= _size(self.events.popleft())
        self.floor = max(self.floor, revision)

    def since(self, after: int, match: Any, count: int, revision: int) -> tuple[list[Event], int] | CmdError:
        """Events newer than ``after`` whose key satisfies ``match``, at most ``count`` of them, and the
        cursor to continue from (``revision`` is the shard's current one).  ``COMPACTED`` if events newer
        than ``after`` may have been dropped; ``ERR`` for a cursor ahead of the shard."""
        if after < self.floor:
            return CmdError("COMPACTED", f"oldest={self.floor}: changes after revision {after} are no longer "
                                         f"retained (the shard keeps its newest {self.events_max} changes)")
        if after > revision:
            return CmdError("ERR", f"revision {after} is ahead of the shard (at revision {revision})")
        events = self.events
        start = bisect.bisect_right(events, after, key=lambda e: e[0])
        out: list[Event] = []
        scanned = 0
        for i in range(start, len(events)):
            event = events[i]
            scanned += 1
            if match(event[1]):
                out.append(event)
                if len(out) >= count:
                    return out, event[0]
            if scanned >= SCAN_MAX:
                return out, event[0]
        return out, revision

    def dump(self) -> tuple[int, list[Event]]:
        """Picklable form for snapshots."""
        return self.floor, list(self.events)

    @classmethod
    def load(cls, blob: tuple[int, list[Event]] | None, revision: int) -> ChangeLog:
        """Inverse of ``dump``; ``None`` (a snapshot older than change logs): no history before ``revision``."""
        if blob is None:
            return cls(floor=revision)
        floor, events = blob
        return cls([tuple(e) for e in events], floor)  # type: ignore[misc]


def _changes(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, key, prefix, after, count = cmd
    if after is None:
        return [], s.revision
    match = (lambda k: k.startswith(key)) if prefix else (lambda k: k == key)
    return s.changes.since(after, match, min(count, COUNT_MAX), s.revision)


READ_HANDLERS = {"changes": _changes}


# -- cursors on the wire (RAFTKV.WATCH's FROM and its reply; raftkv.watchclient) --------------------

def encode_cursor(cursors: dict[int, int], prefix: bool) -> bytes:
    """A key watch's cursor is its one shard's revision; a prefix watch's lists every shard's."""
    if not prefix:
        (rev,) = cursors.values()
        return str(rev).encode()
    return ",".join(f"{s}={r}" for s, r in sorted(cursors.items())).encode()


def decode_cursors(raw: bytes) -> dict[int, int]:
    """``s=rev,s=rev,...`` as ``{shard: revision}``; raises ``ValueError`` on anything else."""
    return {int(s): int(r) for s, r in (part.split(b"=") for part in raw.split(b","))}

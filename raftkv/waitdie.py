"""Wait-die priorities for cross-shard transactions on a hot key: pure, no I/O, no clock.

Theory of operation
-------------------
Conflicts stay no-wait in the state machine: a PREPARE that meets another
transaction's lock votes NO.  What changes is what the participant shard's
leader proposes, at the edge, for transactions that carry a priority:

* A transaction's *priority* is the start of its first attempt (wall-clock
  milliseconds where the retry loop runs, plus a random tag that breaks ties),
  kept across every retry.  Smaller is older.  It travels inside the
  transaction id (``wd.<ms hex>.<tag>.<attempt>``), so no message, command or
  state changes shape: a node of an earlier version passes it along as an
  opaque id, and ids without it (old clients, ``RAFTKV.TXN ID x``) have no
  priority.
* Wait-die, without holding anything: where classic wait-die would make an
  older PREPARE wait for younger lock holders (``gate``: ``"queue"``), the edge
  gives the transaction a place in the queue of those keys instead and
  proposes it at once (it loses to the holder, or gets the key if that one
  let go first).  While an older transaction has a place in a key's queue, or
  has a PREPARE for it on its way into the log, a younger PREPARE for the key
  is refused (``"refuse"``: a final NO that locks nothing), so the younger
  cannot take the key ahead of it.  A PREPARE that meets an older holder, or
  that has no priority, is proposed as before (``"go"``: it dies with a NO
  vote if the key is locked).  Nothing is held back, so nothing waits while
  holding locks on other shards, and no cycle of waits can exist; the
  "waits-for" relation (``waits_for``: who is queued behind whom) still only
  goes from older to younger.
* A retry loop keeps the priority and does not charge a *die* (losing to an
  older transaction) or a *queued* loss (its vote says ``QUEUED``) against its
  conflict budget: the older one is making progress, or the loser holds its
  place; the loser becomes the oldest contender once the ones older than it
  have finished, and then gets the key as soon as the holders present when it
  queued let go.  The budget still counts every other conflict (no priority on
  either side, a first attempt, which does not queue: ``patient``).  Every
  loop stays bounded by its deadline.

Priorities need no agreement between machines: any total order a transaction
keeps across its retries will do.  A skewed clock only makes one machine's
transactions look older (unfair, never unsafe), and a client that forges an
old priority in its ``ID`` keeps a place for at most a few seconds.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

__all__ = ["QUEUED", "QUEUED_NOTE", "Priority", "attempt_of", "attempt_txid", "conflict_charged", "gate", "holder_of", "must_wait", "new_priority",
           "patient", "priority_of", "waits_for"]

Priority = tuple[int, str]  # (first attempt's start in ms, random tag): smaller is older

WAIT_AFTER_LOSSES = 1  # attempts a transaction loses before its PREPAREs may wait (see ``patient``)

_TXID = re.compile(r"^wd\.([0-9a-f]{1,16})\.([0-9a-f]{1,16})\.([0-9]{1,6})$")
# The TXNCONFLICT message names the holder this way (raftkv.server.coordinator._answer).
LOCKED_BY = "is locked by transaction "
# A NO vote's fourth field, and a note in its TXNCONFLICT message: the loser has a place in the key's queue.
QUEUED = "queued"
QUEUED_NOTE = "(queued for the key: not counted)"
_HOLDER = re.compile(re.escape(LOCKED_BY) + r"([^\s;]+)")


def new_priority(now_ms: int, tag: str | None = None) -> Priority:
    """The priority of a transaction whose first attempt starts at ``now_ms``."""
    return (max(0, int(now_ms)), tag if tag is not None else secrets.token_hex(8))


def attempt_txid(prio: Priority, attempt: int) -> str:
    """The id of attempt number ``attempt`` (0, 1, ...) of a transaction of priority ``prio``: unique per attempt,
    and carrying the priority (at most 44 characters)."""
    return f"wd.{prio[0]:x}.{prio[1]}.{attempt % 1_000_000}"


def priority_of(txid: str) -> Priority | None:
    """The priority ``txid`` carries, or None (ids of old clients, ids a client chose)."""
    m = _TXID.match(txid) if isinstance(txid, str) else None
    return None if m is None else (int(m.group(1), 16), m.group(2))


def attempt_of(txid: str) -> int | None:
    """The attempt number (0, 1, ...) a priority id carries, or None."""
    m = _TXID.match(txid) if isinstance(txid, str) else None
    return None if m is None else int(m.group(3))


def patient(txid: str) -> bool:
    """May ``txid`` take a place in a key's queue?  Only a transaction that already lost
    ``WAIT_AFTER_LOSSES`` attempts: a place keeps every younger transaction off the key (refused) until its
    owner comes back, even while the key is free, which costs throughput; a transaction that keeps
    losing is worth that, a first try is not (it is no-wait, as before)."""
    attempt = attempt_of(txid)
    return attempt is not None and attempt >= WAIT_AFTER_LOSSES


def must_wait(waiter: Priority | None, holder: Priority | None) -> bool:
    """Wait-die: would a PREPARE of priority ``waiter`` wait for (here: queue behind) a lock held by
    priority ``holder``?

    Only a transaction with a priority waits, and only for a younger holder, a holder without a priority
    (which itself never waits) or an earlier attempt of its own (equal priority: that attempt is aborted and
    only releasing).  An older holder makes it die."""
    if waiter is None:
        return False
    return holder is None or waiter <= holder


def gate(mine: Priority | None, locks: Sequence[Priority | None], claims: Sequence[Priority | None] = (),
         queued: Sequence[Priority] = (), may_wait: bool = True) -> str:
    """What the edge does with a PREPARE of priority ``mine``, given the priorities of the transactions that
    lock its keys (``locks``), that have a PREPARE for them on its way into the log from this edge
    (``claims``), and whose PREPAREs for them are held back at this edge (``queued``), none counting itself:

    * ``"refuse"``: an older transaction is about to lock one of its keys, or has a place in its queue;
      taking the key ahead of it would starve it, so this one dies without locking anything (the edge
      proposes the refusal recovery uses);
    * ``"queue"``: a PREPARE it may queue behind (``must_wait``) is on its way in (whether that one locks
      the key or dies decides what this one meets), or every lock is held by one it may queue behind: it
      takes a place in the keys' queue, and is proposed;
    * ``"go"``: propose now (it locks the keys, or meets an older lock and dies with a NO vote).

    ``may_wait`` False (a first attempt, ``patient``): never ``"queue"``, ``"go"`` instead (no-wait)."""
    if any(q is not None and (mine is None or q < mine) for q in list(claims) + list(queued)):
        return "refuse"
    if not may_wait:
        return "go"
    if any(must_wait(mine, c) for c in claims):
        return "queue"
    if not locks and not claims:
        return "go"
    return "queue" if all(must_wait(mine, h) for h in list(locks) + list(claims)) else "go"


def waits_for(mine: Priority | None, locks: Sequence[Priority | None], claims: Sequence[Priority | None] = (),
              queued: Sequence[Priority] = ()) -> list[Priority | None]:
    """The transactions a PREPARE that ``gate`` queues is queued behind: the edges it adds to the waits-for
    graph (edges of order only: nothing blocks on them)."""
    if gate(mine, locks, claims, queued) != "queue":
        return []
    return [h for h in list(locks) + list(claims) if must_wait(mine, h)]


def holder_of(message: str) -> str | None:
    """The holder's id named in a ``-TXNCONFLICT`` message, if any."""
    found = _HOLDER.findall(message or "")  # the last one: the key's repr comes first and could hold the phrase
    return found[-1] if found else None


def conflict_charged(mine_txid: str, holder_txid: str | None, message: str = "") -> bool:
    """Does a conflict abort of ``mine_txid`` by ``holder_txid`` (``message``: the ``-TXNCONFLICT`` text)
    count against the retry budget?

    Not when ``mine_txid`` has a priority and either the holder is strictly older (a *die*: the
    transaction keeps its priority and becomes the oldest contender eventually) or the edge queued it
    (``QUEUED_NOTE``: younger ones may not take the key ahead of it now).  Every other conflict counts."""
    mine = priority_of(mine_txid)
    if mine is None:
        return True
    if QUEUED_NOTE in (message or ""):
        return False
    holder = priority_of(holder_txid) if holder_txid is not None else None
    return not (holder is not None and holder < mine)

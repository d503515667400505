"""Locks with fencing tokens, as state-machine commands (Kleppmann's fencing argument). Pure.

A lock is an ordinary key holding its owner's id, with a deadline in log time
(``raftkv.expiry``), so a crashed holder's lock lapses by itself.  Acquiring
it returns a *fencing token*: the key's modification revision, which the shard's
revision counter makes strictly larger than every earlier acquisition's (a key
moved by ``raftkv shard add`` gets a revision of its new shard above every
revision its old shard had, so tokens only grow through a move too).  A holder passes the token to whatever it protects;
the protected resource refuses a token lower than the highest it has seen, so a
holder that paused past its deadline (GC, swap, partition) cannot clobber the
work of the next holder even though it still believes it holds the lock.

``Client.lock`` holds the key through a lease instead (``("lease_lock", ...)``
in ``raftkv.leases``): the same key, owner and token, but kept by a lease's
keep-alives and released by revoking the lease.  The commands below are the
older form, a deadline the holder refreshes by acquiring again.

========================================  ======================================
command                                   result
========================================  ======================================
``("lock", key, owner, ttl_ms)``          ``(1, token)``, or ``(0, holder)``;
                                          the holder re-acquiring keeps its
                                          token and extends the deadline
``("unlock", key, owner)``                1 if ``owner`` held it, else 0
========================================  ======================================
"""

from __future__ import annotations

from typing import Any

from raftkv.expiry import on_live_key


@on_live_key
def _lock(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    _, key, owner, ttl_ms = cmd
    if entry is not None and entry[0] != owner:
        return (0, entry[0])
    if entry is None:
        s.write(key, owner)
    s.expiries.set(key, now_ms + ttl_ms)
    return (1, s.data[key][1])


@on_live_key
def _unlock(s: Any, cmd: tuple, entry: Any, now_ms: int) -> Any:
    _, key, owner = cmd
    if entry is None or entry[0] != owner:
        return 0
    s.write(key, None)
    return 1


HANDLERS = {"lock": _lock, "unlock": _unlock}

"""The authoritative shard map: a versioned compare-and-set register in shard 0's Raft log.

Theory of operation
-------------------
The cluster file only bootstraps a cluster.  Every later change of the shard map
(``raftkv node add|remove|replace``, ``rebalance``, ``shard add``) is a
compare-and-set on the map's epoch, replicated through shard 0's log, in the
way CockroachDB keeps its range descriptors in its own ranges: shard 0 always
exists (``shard remove`` only takes the last shard, never the only one), and a
Raft group already gives the register its majority and its linearizable reads.

``("map_cas", expected, epoch, text)``
    ``text`` (the public cluster file, no ``[security]``) becomes the map of
    ``epoch`` if the register holds epoch ``expected`` and ``epoch > expected``.
    An empty register (a cluster bootstrapped from its file, or one created
    before the register existed) takes any change that raises the epoch: its
    first writer wins, and every later one must name that epoch.  A retry of an
    applied change (same epoch, same text) answers as the first did, so a lost
    reply is safe to resend.  Any other mismatch is refused with the register's
    epoch: two operators who read the same map cannot both change it.
``("map_get",)`` (read)
    ``(epoch, text)``, or None while the register is empty.

Everything here is pure: ``KVState`` applies it (``register`` is its
``map_register`` field, carried by snapshots and checkpoints).  The node side
is ``RAFTKV.MAPCAS`` / ``RAFTKV.MAPGET`` (``raftkv.server.commands.member``);
``raftkv.membership.Operator`` is the caller, and every node polls the register
so that a map no push reached is installed anyway.
"""

from __future__ import annotations

from typing import Any

from raftkv.results import CmdError

MAP_SHARD = 0  # the shard whose log holds the register


def mapchanged(epoch: int, expected: int) -> CmdError:
    """The register is at ``epoch``, not at the ``expected`` one the caller read: another change came first."""
    return CmdError("MAPCHANGED", f"{epoch} the cluster's shard map is at epoch {epoch}, not {expected}: another "
                                  "command changed the cluster; nothing was changed, run the command again (it "
                                  "reads the cluster's map first)")


def cas(register: tuple[int, str] | None, expected: int, epoch: int,
        text: str) -> tuple[tuple[int, str] | None, Any]:
    """``(register after, reply)`` of a compare-and-set (module doc); reply ``epoch`` or a ``CmdError``."""
    if register is not None and register == (epoch, text):
        return register, epoch  # a retry of the change that was applied
    if epoch <= expected:
        return register, CmdError("ERR", f"map_cas: the new epoch {epoch} must exceed {expected}")
    if register is not None and register[0] != expected:
        return register, mapchanged(register[0], expected)
    return (epoch, text), epoch


def _cas(s: Any, cmd: tuple, now_ms: int) -> Any:
    _, expected, epoch, text = cmd
    if not (isinstance(expected, int) and isinstance(epoch, int) and isinstance(text, str)):
        return CmdError("ERR", "map_cas: want (expected epoch, new epoch, text)")
    s.map_register, reply = cas(s.map_register, expected, epoch, text)
    return reply


def _get(s: Any, cmd: tuple, now_ms: int) -> Any:
    return s.map_register


HANDLERS = {"map_cas": _cas}
READ_HANDLERS = {"map_get": _get}

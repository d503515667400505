"""The one internal RPC between nodes: ``RAFTKV.RPC <message>``, and its codec.

Theory of operation
-------------------
A node that does not lead a shard hands the *state-machine command itself* to
the node that does (the way hashicorp/raft forwards a log entry), never the
client's RESP request: the leader runs exactly what the origin would have run,
session wrapper, transaction message and all.  There are three messages:

``("exec", shard, cmd, read, idempotent, hops, budget_s)``
    ``Router.execute`` on the leader; the reply is the command's result
    (a state-machine value, ``CmdError``) or an ``Error`` (``UNKNOWN``,
    ``TRYAGAIN``, ...), which the origin accounts for like its own attempts.
``("txn", txid, compares, then_ops, else_ops, hops)``
    coordinate a transaction on its home shard's leader; the reply is a
    ``TxnResult`` or an ``Error``.
``("leader", shard, request, hops)``
    run an operator command (transfer, backup dump, membership) on the
    shard's leader node; the reply is the command's reply value.

``hops`` counts hand-overs so forwarding can never loop (``router.HOPS_MAX``);
``budget_s`` is the origin's remaining time, so the leader answers before the
origin gives up.

Messages and replies are MessagePack: binary-safe without base64 and decoded
in C.  The few non-plain values that cross (errors, transaction results,
simple strings) travel as extension types; nothing else is accepted, so a
message can never make a node build an arbitrary object (no pickle here).
"""

from __future__ import annotations

from typing import Any

import msgpack

from raftkv.protocol import NIL_ARRAY, Error, Map, Simple
from raftkv.results import CmdError
from raftkv.txn import TxnResult

COMMAND = b"RAFTKV.RPC"
KINDS = ("exec", "txn", "leader")

_ERROR, _CMD_ERROR, _TXN_RESULT, _SIMPLE, _NIL_ARRAY, _MAP = range(1, 7)


class MalformedMessage(ValueError):
    """An RPC message or reply that does not decode to one of the known shapes."""


def _default(o: Any) -> msgpack.ExtType:
    if isinstance(o, Error):
        return msgpack.ExtType(_ERROR, _pack((o.code, o.message)))
    if isinstance(o, CmdError):
        return msgpack.ExtType(_CMD_ERROR, _pack((o.code, o.message)))
    if isinstance(o, TxnResult):
        return msgpack.ExtType(_TXN_RESULT, _pack((o.succeeded, o.results)))
    if isinstance(o, Simple):
        return msgpack.ExtType(_SIMPLE, _pack(o.text))
    if o is NIL_ARRAY:
        return msgpack.ExtType(_NIL_ARRAY, b"")
    if isinstance(o, Map):
        return msgpack.ExtType(_MAP, _pack(o.items))
    raise TypeError(f"cannot send {type(o).__name__} between nodes")


def _ext(code: int, data: bytes) -> Any:
    if code == _NIL_ARRAY:
        return NIL_ARRAY
    value = _unpack(data)
    if code == _ERROR:
        return Error(*value)
    if code == _CMD_ERROR:
        return CmdError(*value)
    if code == _TXN_RESULT:
        return TxnResult(bool(value[0]), tuple(value[1]))
    if code == _SIMPLE:
        return Simple(value)
    if code == _MAP:
        return Map(tuple(value))
    raise MalformedMessage(f"unknown extension type {code}")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    # Arrays come back as tuples: state-machine commands are tuples, and every
    # reply encoder treats tuples and lists alike.
    return msgpack.unpackb(data, ext_hook=_ext, raw=False, use_list=False, strict_map_key=False)


def encode(obj: Any) -> bytes:
    """One RPC message or reply as bytes."""
    return _pack(obj)


def decode(data: bytes) -> Any:
    """The value ``encode`` made; raises ``MalformedMessage`` on anything else."""
    try:
        return _unpack(data)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise MalformedMessage(f"undecodable RPC payload: {e}") from None


def decode_message(data: bytes) -> tuple:
    """A request message: a tuple whose first item is one of ``KINDS``."""
    msg = decode(data)
    if not isinstance(msg, tuple) or not msg or msg[0] not in KINDS:
        raise MalformedMessage("not an RPC message")
    return msg

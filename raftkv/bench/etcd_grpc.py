"""etcd's native gRPC API as the benchmark speaks it: a minimal protobuf wire codec for exactly the fields
used, and the channel's methods.

No generated code and no protobuf runtime: a request is a few length-delimited fields, and of each reply the
benchmark reads one or two fields, so the messages are encoded and decoded here by hand.  The field numbers
are those of etcd's ``api/etcdserverpb/rpc.proto`` and ``api/mvccpb/kv.proto``:

* ``PutRequest`` {1 key, 2 value};
* ``RangeRequest`` {1 key, 7 serializable} (linearizable unless ``serializable``);
* ``RangeResponse`` {1 header, 2 kvs: ``KeyValue`` {1 key, 5 value}};
* ``TxnRequest`` {1 compare: ``Compare`` {1 result, 2 target, 3 key, 7 value}, 2 success: ``RequestOp``
  {2 request_put}}; ``TxnResponse`` {1 header, 2 succeeded};
* ``StatusResponse`` (Maintenance) {1 header: ``ResponseHeader`` {2 member_id}, 4 leader}.

proto3 leaves out fields at their default (0, false, empty), and so does the encoder (``Compare.result``
``EQUAL`` is 0), except members of a ``oneof`` (``Compare.value``, ``RequestOp.request_put``).

``grpc`` (the optional ``bench`` extra) is imported only by ``Channel``: the codec has no dependency, and a
process that forks load workers never starts gRPC's threads before the fork.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

PUT = "/etcdserverpb.KV/Put"
RANGE = "/etcdserverpb.KV/Range"
TXN = "/etcdserverpb.KV/Txn"
STATUS = "/etcdserverpb.Maintenance/Status"

# Compare.CompareResult and Compare.CompareTarget
EQUAL = 0
VALUE = 3

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


# -- wire format ---------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    """``n`` (0 <= n < 2**64) as a base-128 varint."""
    if not 0 <= n < 1 << 64:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field_bytes(num: int, data: bytes, oneof: bool = False) -> bytes:
    """A length-delimited field (bytes, string or embedded message).  Empty means absent in proto3, except
    for a member of a ``oneof``, which is sent even empty (its presence says which member is set)."""
    return varint(num << 3 | _LEN) + varint(len(data)) + data if data or oneof else b""


def field_varint(num: int, n: int) -> bytes:
    """A varint field (integer, enum, bool); 0 means absent in proto3."""
    return varint(num << 3 | _VARINT) + varint(n) if n else b""


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def iter_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field of a message: varints as int, length-delimited fields as bytes,
    fixed-width fields as their raw bytes.  Raises ValueError on a malformed message."""
    i, end = 0, len(buf)
    while i < end:
        key, i = _read_varint(buf, i)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError("field number 0")
        if wt == _VARINT:
            val, i = _read_varint(buf, i)
            yield num, val
            continue
        if wt == _LEN:
            size, i = _read_varint(buf, i)
        elif wt in (_I64, _I32):
            size = 8 if wt == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if i + size > end:
            raise ValueError("truncated field")
        yield num, bytes(buf[i:i + size])
        i += size


# -- requests ------------------------------------------------------------------------------------
def put_request(key: bytes, value: bytes) -> bytes:
    return field_bytes(1, key) + field_bytes(2, value)


def range_request(key: bytes, serializable: bool = False) -> bytes:
    return field_bytes(1, key) + field_varint(7, int(serializable))


def compare_value(key: bytes, value: bytes) -> bytes:
    """``Compare``: the value of ``key`` equals ``value``."""
    return field_varint(1, EQUAL) + field_varint(2, VALUE) + field_bytes(3, key) + field_bytes(7, value, oneof=True)


def txn_request(compares: list[bytes], puts: list[tuple[bytes, bytes]]) -> bytes:
    """``TxnRequest``: if every compare holds, put each (key, value); no failure branch."""
    return (b"".join(field_bytes(1, c) for c in compares)
            + b"".join(field_bytes(2, field_bytes(2, put_request(k, v), oneof=True)) for k, v in puts))


# -- replies -------------------------------------------------------------------------------------
def range_kvs(buf: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of a ``RangeResponse``."""
    kvs = []
    for num, kv in iter_fields(buf):
        if num == 2 and isinstance(kv, bytes):
            fields = dict(iter_fields(kv))
            kvs.append((fields.get(1, b""), fields.get(5, b"")))
    return kvs  # type: ignore[return-value]


def txn_succeeded(buf: bytes) -> bool:
    """``TxnResponse.succeeded``: whether every compare held (and the success branch ran)."""
    return any(num == 2 and val == 1 for num, val in iter_fields(buf))


def status_ids(buf: bytes) -> tuple[int, int]:
    """(this member's ID, the leader's ID or 0) from a ``StatusResponse``."""
    member = leader = 0
    for num, val in iter_fields(buf):
        if num == 1 and isinstance(val, bytes):
            member = next((v for n, v in iter_fields(val) if n == 2), 0)  # type: ignore[misc]
        elif num == 4:
            leader = val  # type: ignore[assignment]
    return member, leader


class Channel:
    """One ``grpc.aio`` channel (one HTTP/2 connection) to one etcd member and its multi-callables.

    Requests are the bytes built above (no request serializer); replies are decoded by the functions above
    (``put`` returns the raw ``PutResponse``).  Create it inside a running event loop.
    """

    def __init__(self, addr: tuple[str, int]) -> None:
        import grpc.aio

        self.chan = grpc.aio.insecure_channel(f"{addr[0]}:{addr[1]}")
        uu = self.chan.unary_unary
        self.put: Any = uu(PUT)
        self.range: Any = uu(RANGE, response_deserializer=range_kvs)
        self.txn: Any = uu(TXN, response_deserializer=txn_succeeded)
        self.status: Any = uu(STATUS, response_deserializer=status_ids)

    async def close(self) -> None:
        await self.chan.close()

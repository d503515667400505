"""A dict that is cheap to snapshot again and again: the transaction table's retained history.

A shard keeps every finished transaction's record, tombstone and id for ten minutes of log time
(raftkv.txn, ``TOMBSTONE_TTL_MS``): at a few hundred transactions a second that is hundreds of
thousands of entries, and every checkpoint stored them all.  Copying and pickling them took 0.6 s
of the applying thread per checkpoint at 340,000 entries, so a sustained MSET load slowed down the
longer it ran (860 -> ~200 per second in two minutes, p99 from 0.1 to over 1 s).

``Retained`` is a plain ``dict`` for every reader, and also remembers its keys in insertion order
in segments of ``SEGMENT`` keys.  ``segments()`` pickles each segment once and keeps the bytes
until one of its keys is set again or deleted; a checkpoint then pickles only what changed since
the last one, and a restart gets the bytes back (``from_segments``) without pickling anything.

Values must not be changed in place behind its back: replace them (``d[k] = v``), or call
``touch(k)`` after changing one.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

SEGMENT = 2048  # keys per segment: a dirty segment costs a few ms to pickle again

_MISSING = object()


class _Segment:
    __slots__ = ("keys", "live", "blob")

    def __init__(self) -> None:
        self.keys: list = []  # in insertion order; deleted keys stay until the segment is pickled again
        self.live = 0  # how many of ``keys`` are still in the dict
        self.blob: bytes | None = None  # the pickled {key: value} of its live keys, None once stale


class Retained(dict):
    """``dict`` whose ``segments()`` re-pickles only the segments changed since the last call."""

    def __init__(self, items: Any = (), /) -> None:
        super().__init__()
        self._segs: list[_Segment] = []
        self._where: dict[Any, _Segment] = {}
        for k, v in dict(items).items():
            self[k] = v

    # -- writes: every one goes through these, so the segments stay right -----------------
    def __setitem__(self, key: Any, value: Any) -> None:
        seg = self._where.get(key)
        if seg is None:
            if not self._segs or len(self._segs[-1].keys) >= SEGMENT:
                self._segs.append(_Segment())
            seg = self._segs[-1]
            seg.keys.append(key)
            seg.live += 1
            self._where[key] = seg
        seg.blob = None
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._forget(key)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """As ``dict.pop``."""
        if key in self:
            value = super().pop(key)
            self._forget(key)
            return value
        if default is _MISSING:
            raise KeyError(key)
        return default

    def setdefault(self, key: Any, default: Any = None) -> Any:
        """As ``dict.setdefault``."""
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        """As ``dict.update``."""
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def popitem(self) -> tuple:
        """As ``dict.popitem``."""
        key, value = super().popitem()
        self._forget(key)
        return key, value

    def clear(self) -> None:
        """As ``dict.clear``."""
        super().clear()
        self._segs, self._where = [], {}

    def touch(self, key: Any) -> None:
        """``key``'s value was changed in place: pickle its segment again next time."""
        seg = self._where.get(key)
        if seg is not None:
            seg.blob = None

    def _forget(self, key: Any) -> None:
        seg = self._where.pop(key)
        seg.live -= 1
        seg.blob = None

    # -- snapshots -----------------------------------------------------------------------
    def segments(self) -> list[bytes]:
        """The whole dict as pickled segments (oldest first); only stale segments are pickled."""
        out = []
        kept = []
        for seg in self._segs:
            if seg.live == 0:
                continue  # every key deleted (expired): the segment goes
            if seg.blob is None:
                if seg.live < len(seg.keys):
                    seg.keys = [k for k in seg.keys if self._where.get(k) is seg]
                seg.blob = pickle.dumps({k: dict.__getitem__(self, k) for k in seg.keys},
                                        protocol=pickle.HIGHEST_PROTOCOL)
            kept.append(seg)
            out.append(seg.blob)
        self._segs = kept
        return out

    @classmethod
    def from_segments(cls, blobs: Iterable[bytes]) -> Retained:
        """Inverse of ``segments()``: the segments' bytes are kept, so nothing is pickled again."""
        r = cls()
        for blob in blobs:
            part = pickle.loads(blob)
            if not part:
                continue
            seg = _Segment()
            seg.keys, seg.live, seg.blob = list(part), len(part), blob
            before = len(r)
            dict.update(r, part)
            r._where.update(dict.fromkeys(part, seg))
            if len(r) != before + len(part):
                raise ValueError("a key in two segments")  # segments() never writes that
            r._segs.append(seg)
        r._loaded()
        return r

    def _loaded(self) -> None:
        """Called once ``from_segments`` has filled the dict (subclasses rebuild their indexes)."""

    # -- pickle / copy: as a plain dict of the same items, rebuilt into segments on load -----
    def __reduce__(self) -> tuple:
        return (type(self), (dict(self),))

    def copy(self) -> Retained:
        """A new dict of this type with the same items."""
        return type(self)(self)

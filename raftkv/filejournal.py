"""raftkv.filejournal: pysyncobj's file journal made crash-safe, and the durability primitives under it.

Used by a replica that has no storage engine (tests, tools and the stand-alone benchmarks; a node's groups
keep their log in the node's engine, ``raftkv.raftlog.EngineJournal``). What changes from stock pysyncobj
0.3.17 (docs/pysyncobj-patches.md §3 and §11):

* every flush is an msync plus fsync, and ``.meta`` (term, vote, commit index) is written to a temporary
  file, fsynced and renamed, never rewritten in place; the commit index reaches ``.meta`` only after a flush
  made the log it covers durable;
* the journal is rewritten (compaction, truncation) by writing a new file and renaming it over the old, so a
  crash leaves the old journal or the new one, never a journal cleared and half refilled;
* the full dump is fsynced before it is renamed into place (``DurableDumpSerializer``): stock renames an
  unsynced file, so a later fsync of the directory could make the name durable before the data;
* every fsync and rename goes through a ``Storage`` passed in, whose named crash points let tests stop a
  node between any two persistence steps (tests/test_crash_points.py).

``_dispatch_create_journal`` replaces ``pysyncobj.syncobj.createJournal`` at import: a ``SafeSyncObj`` under
construction hands it the journal factory it was given (thread-local, one shot); everything else gets the
stock journal.
"""

from __future__ import annotations

import gzip
import os
import struct
import threading
from typing import Any

import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj import syncobj as _so
from pysyncobj.atomic_replace import atomicReplace
from pysyncobj.journal import FileJournal, Journal, MemoryJournal, MetaStorer, ResizableFile
from pysyncobj.pickle import to_bytes
from pysyncobj.serializer import Serializer

__all__ = ["DEFAULT_STORAGE", "DurableDumpSerializer", "DurableFileJournal", "DurableMetaStorer", "Storage",
           "TrackedMemoryJournal", "replace_journal"]


class Storage:
    """The durability primitives raftfix uses, and named crash points between them.

    One object per node, passed in (``SafeSyncObj(storage=...)``); the default is the real thing. Tests substitute
    a subclass that records which bytes a completed fsync made durable (to model power loss) and whose
    ``point(name)`` kills the node at a chosen step (tests/test_crash_points.py). Points are named
    ``area.step``; each marks a state the files can be left in by a process crash.
    """

    def fsync(self, fd: int) -> None:
        """Make the file (or directory) open as ``fd`` durable."""
        os.fsync(fd)

    def msync(self, mapped: Any, fd: int) -> None:
        """Make the writes through the mapping ``mapped`` (a pysyncobj ``ResizableFile`` on ``fd``) durable."""
        mapped.flush()  # mmap.flush() == msync(MS_SYNC)

    def point(self, name: str) -> None:
        """A crash point: the files are in a state a process crash can leave them in. Does nothing here."""

    def fsync_path(self, path: str) -> None:
        """fsync an existing file or directory by name."""
        fd = os.open(path, os.O_RDONLY)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: str) -> None:
        """fsync the directory holding ``path`` so a create/rename in it survives power loss."""
        self.fsync_path(os.path.dirname(os.path.abspath(path)) or ".")

    def replace(self, tmp: str, path: str) -> None:
        """Atomically and durably put ``tmp`` (already fsynced) in place of ``path``."""
        os.replace(tmp, path)
        self.point("replace.renamed")  # renamed in the page cache, the directory entry not yet durable
        self.fsync_dir(path)


DEFAULT_STORAGE = Storage()


class DurableMetaStorer(MetaStorer):
    """``MetaStorer`` whose write is durable: fsync the temp file, rename, fsync the directory.

    Stock only ``f.flush()``es Python's buffer, so after power loss a node could forget its vote and vote twice
    in one term.
    """

    def __init__(self, path: str, storage: Storage = DEFAULT_STORAGE, deferred: bool = False) -> None:
        super().__init__(path)
        self._storage = storage
        self._deferred = deferred
        self.pending: dict[str, Any] | None = None  # deferred: the newest meta, written by the next sync()

    def storeMeta(self, meta: dict[str, Any]) -> None:  # noqa: N802 - pysyncobj's name
        if self._deferred:
            # Group commit (SafeSyncObj(deferFlush=True)): the driver sends nothing of this tick before the
            # journal's flush, which writes this first; one fsync per group per loop, however many term changes.
            self.pending = dict(meta)
            return
        self._write(meta)

    def sync(self) -> None:
        """Deferred mode: make the newest stored meta durable (nothing to do if none is pending)."""
        meta, self.pending = self.pending, None
        if meta is not None:
            self._write(meta)

    def _write(self, meta: dict[str, Any]) -> None:
        path = self.getPath()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_so.pickle.dumps(meta))
            f.flush()
            self._storage.fsync(f.fileno())
        self._storage.point("meta.written")
        self._storage.replace(tmp, path)


class DurableFileJournal(FileJournal):
    """pysyncobj's mmap ``FileJournal`` plus a dirty flag, a real ``flush()`` and crash-safe rewrites.

    ``flush()`` msyncs the mapping (MS_SYNC: data and the size needed to read it back on Linux) and, when the
    file size changed since the last flush (the mapping was resized/extended), also ``os.fsync``s the file.
    The directory is fsynced once, on the first flush, so the file's creation is durable.

    Two stock hazards closed here (docs/pysyncobj-patches.md §7):

    * ``deleteEntriesTo`` (log compaction) clears the file and re-adds the kept entries in place, so a crash in
      the middle leaves only some of them. Here the kept entries are written to a new file, fsynced, and
      renamed over the journal (then the directory is fsynced): a crash leaves the old or the new journal.
    * The commit index is kept in ``.meta``, which is written (and fsynced) whenever the term changes, possibly
      before the entries the commit index covers are flushed. After power loss the journal can then hold an
      older, never-committed entry at a "committed" index. Here ``setRaftCommitIndex`` only records the value;
      it reaches ``.meta`` once a flush has made the whole log it refers to durable.
    """

    def __init__(self, journalFile: str, storage: Storage = DEFAULT_STORAGE,  # noqa: N803
                 defer_meta: bool = False) -> None:
        super().__init__(journalFile)
        self._path = journalFile
        self._storage = storage
        self._needs_flush = False
        self._synced_size = -1  # forces one fsync + directory fsync on the first flush
        self._commit_pending: int | None = None  # set in memory, not yet covered by a flush
        # Term/vote must be durable before a vote is sent: swap in the fsyncing storer. With ``defer_meta`` it
        # is written by the next flush() instead, for a caller that sends nothing before that flush.
        self._meta = DurableMetaStorer(journalFile + ".meta", storage, deferred=defer_meta)
        self._FileJournal__metaStorer = self._meta

    @property
    def needs_flush(self) -> bool:
        """Entries, or deferred term/vote metadata, not yet durable."""
        return self._needs_flush or self._meta.pending is not None

    @needs_flush.setter
    def needs_flush(self, value: bool) -> None:
        self._needs_flush = value

    def add(self, command: bytes, idx: int, term: int) -> None:
        super().add(command, idx, term)
        self.needs_flush = True
        self._storage.point("journal.append")

    def clear(self) -> None:
        super().clear()
        self.needs_flush = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802,N803
        super().deleteEntriesFrom(entryFrom)
        self.needs_flush = True

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802,N803
        self.replace_entries(self[entryTo:])

    def replace_entries(self, entries: list[tuple[bytes, int, int]]) -> None:
        """Atomically make ``entries`` the whole journal (durable on return): new file, fsync, rename, fsync dir.

        Everything in the old journal that is not in ``entries`` is dropped, so callers pass a suffix of the
        log (compaction) or a snapshot's entries (install). Unflushed writes of the old journal are moot: the
        new file holds every entry we keep, and is flushed.
        """
        storage = self._storage
        tmp = self._path + ".rewrite"
        header = self._FileJournal__getDefaultHeader()
        body = bytearray()
        for command, idx, term in entries:
            record = struct.pack("<QQ", idx, term) + to_bytes(command)
            size = struct.pack("<I", len(record))
            body += size + record + size
        offset = len(header) + len(body)
        # LAST_RECORD_OFFSET is the header's last 4 bytes; stock writes FIRST_RECORD_OFFSET there.
        data = header[:-4] + struct.pack("<I", offset) + bytes(body)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            storage.fsync(f.fileno())
        storage.point("rewrite.written")
        old = self._FileJournal__journalFile
        storage.replace(tmp, self._path)
        old._destroy()  # the old inode: its mapping is no longer the journal
        self._FileJournal__journalFile = ResizableFile(self._path)
        self._FileJournal__journal = list(entries)
        self._FileJournal__currentOffset = offset
        self._synced_size = os.path.getsize(self._path)
        self.needs_flush = False
        self._promote_commit()

    def flush(self) -> None:
        """Make every write so far durable (one call covers any number of appended entries)."""
        storage = self._storage
        storage.point("flush.before")
        self._meta.sync()
        rfile = self._FileJournal__journalFile
        fd = rfile._ResizableFile__f.fileno()
        storage.msync(rfile, fd)
        size = os.fstat(fd).st_size
        if size != self._synced_size:
            storage.fsync(fd)  # belt and braces for the resize/extend paths (ftruncate / append + remap)
            if self._synced_size < 0:
                storage.fsync_dir(self._path)
            self._synced_size = size
        self.needs_flush = False
        self._promote_commit()
        storage.point("flush.after")

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802,N803
        self._commit_pending = raftCommitIndex
        if not self.needs_flush:
            self._promote_commit()  # the whole log is durable already (a leader flushes before committing)

    def _promote_commit(self) -> None:
        if self._commit_pending is not None:
            super().setRaftCommitIndex(self._commit_pending)  # saved with the next .meta write
            self._commit_pending = None

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        # A defence in depth for .meta files written by older builds: a commit index past the log would make
        # the follower refuse legitimate truncations.
        stored = super().getRaftCommitIndex()
        return min(stored, self[-1][1]) if len(self) else stored


class DurableDumpSerializer(Serializer):
    """pysyncobj's full-dump serializer (stock file format), with the dump fsynced before the rename.

    Stock writes ``dump.tmp`` and renames it over ``dump`` without an fsync; the dump is fsynced only at the
    next compaction step. A directory fsync in between (a ``.meta`` or journal replacement) makes the new name
    durable before its data, and a power loss then leaves an empty or partial dump where the old one was: the
    replica cannot restart (tests/test_crash_points.py's power-loss model found it, 1 run in 6). Only for the
    stock format (no ``serializer=`` of the application's own).
    """

    def __init__(self, storage: Storage, file_name: str, transmission_batch_size: int, try_use_fork: bool,
                 serialize_checker: Any = None) -> None:
        super().__init__(file_name, transmission_batch_size, try_use_fork, None, None, serialize_checker)
        self._storage = storage

    def serialize(self, data: Any, id: Any) -> None:  # noqa: A002 - pysyncobj's signature
        file_name = self._Serializer__fileName  # type: ignore[attr-defined]
        if self._Serializer__pid != 0 or file_name is None:  # type: ignore[attr-defined]
            Serializer.serialize(self, data, id)  # busy (stock returns) or in memory (nothing to sync)
            return
        self._Serializer__currentID = id
        use_fork = self._Serializer__useFork  # type: ignore[attr-defined]
        if use_fork:
            pid = os.fork()
            if pid != 0:
                self._Serializer__pid = pid
                return
        try:
            tmp = file_name + ".tmp"
            with open(tmp, "wb") as f:
                with gzip.GzipFile(fileobj=f, mode="wb") as g:
                    pysyncobj_pickle.dump(data, g)
                f.flush()
                self._storage.fsync(f.fileno())
            atomicReplace(tmp, file_name)
            if use_fork:
                os._exit(0)
            self._Serializer__pid = -1
        except Exception:  # as stock: the compaction is reported failed and tried again later
            if use_fork:
                os._exit(-1)
            self._Serializer__pid = -2

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802 - pysyncobj's name
        """Stock, except that the last chunk of a dump received from the leader is fsynced before the rename."""
        if data is None or not data[2] or self._Serializer__fileName is None:  # type: ignore[attr-defined]
            return Serializer.setTransmissionData(self, data)
        chunk, is_first, _ = data
        if is_first:  # a one-chunk dump: stock opens the file and writes it (and answers False: not the last)
            Serializer.setTransmissionData(self, (chunk, True, False))
            chunk = b""
        incoming = self._Serializer__incomingTransmissionFile  # type: ignore[attr-defined]
        if incoming is None:
            return False  # no transfer under way (or it failed): as stock
        try:
            incoming.write(chunk)
            incoming.flush()
            self._storage.fsync(incoming.fileno())
        except OSError:
            self._Serializer__incomingTransmissionFile = None
            return False
        return Serializer.setTransmissionData(self, (b"", False, True))  # stock closes and renames


def replace_journal(journal: Journal, entries: list[tuple[bytes, int, int]]) -> None:
    """Make ``entries`` the whole of ``journal``: atomically where the journal supports it."""
    replace = getattr(journal, "replace_entries", None)
    if replace is not None:
        replace(entries)
        return
    journal.clear()
    for entry in entries:
        journal.add(*entry)


class TrackedMemoryJournal(MemoryJournal):
    """In-memory journal with the same ``needs_flush``/``flush()`` interface (flush is a no-op)."""

    def __init__(self) -> None:
        super().__init__()
        self.needs_flush = False

    def flush(self) -> None:
        """Nothing to make durable; kept so ``SafeSyncObj`` treats every journal the same way."""
        self.needs_flush = False


# pysyncobj builds its journal with ``createJournal(conf.journalFile)`` inside ``SyncObj.__init__``. We replace
# the module-level name once, with a dispatcher that uses the factory a ``SafeSyncObj`` constructor registered
# on *this thread* and falls back to stock otherwise, so stock ``SyncObj`` instances are unaffected and
# concurrent constructions in other threads cannot pick up our factory.
_stock_create_journal = _so.createJournal
# The journal factory of the SafeSyncObj being constructed on this thread (one shot; see module doc).
pending_factory = threading.local()


def _dispatch_create_journal(journalFile: str | None = None) -> Journal:  # noqa: N803
    factory = getattr(pending_factory, "factory", None)
    if factory is None:
        return _stock_create_journal(journalFile)
    pending_factory.factory = None
    return factory(journalFile)


_so.createJournal = _dispatch_create_journal

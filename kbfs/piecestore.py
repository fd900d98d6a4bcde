"""The piece store: verified pieces of contents on disk, with LRU over whole contents.

`PieceStore(directory, capacity, min_free)` keeps per content key (a tree root, or
`s1-<sha1>-<size>`) one sparse data file (`kbfs.piecefile`) and a catalogue row with a bitmap
of the pieces it durably holds (`kbfs.catalog`). The disk layer of the next cache; no reader
uses it yet.

Trust rule. The caller verified every piece given to `put`; the store never claims a piece
it does not durably hold. `put` writes the bytes, then sets the bit in memory; bits reach
the catalogue in batches (about once a second, on `flush()`, `close()`) only after each data
file of the batch was fdatasynced: a kill -9 or a power cut may lose bits, never add one.
Other processes see a piece once committed; `read` answers only when every covering piece
is present (committed, or written by this process into the very file its bit is about).

Capacity. LRU over whole contents (an access counter, touches committed with the bits).
After each flush, and when a put finds the disk below the floor, the least recently used
contents go (rows committed, then files unlinked) until `capacity` holds and `min_free`
(at most 5% of the file system) is free. Skipped: pinned contents (a count kept in the
catalogue), contents this process is using, and those it holds (`hold`/`release`: an
in-memory count, for open files, gone with the process). A content another process is writing may be
evicted: that process's bits are dropped at its next commit. The store may exceed
`capacity` by one flush interval's writes (a put flushes first past `MAX_UNSYNCED`).

Threads: one lock guards the metadata and is never held during I/O; the catalogue has its
own around its connection; flushes are serialized (so `flush()` returns once everything put
before it is committed). Processes may share a folder (busy timeouts; bits are OR-ed in).

Page cache: `read_cached` answers only from an open handle of a complete content whose
bytes are all in memory (never a disk read, a file open or a catalogue query: the mount's
inline reads).

Not here: verification (stored tree nodes are opaque hints), fetching, fetch coordination.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kbfs import catalog, piecefile
from kbfs.catalog import Catalog
from kbfs.piecefile import discard_legacy

log = logging.getLogger(__name__)

PIECE_SIZE = 64 * 1024
MAX_UNSYNCED = 64 << 20      # bytes written since the last flush before a put flushes itself
MAX_OPEN = 256               # idle data files kept open
__all__ = ["PieceStore", "discard_legacy", "disk_space"]


def disk_space(path: str) -> tuple[int, int]:
    """(bytes free to us, bytes in all) of PATH's file system. A seam for tests."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


@dataclass(eq=False)
class _Handle:
    key: str
    size: int
    piece_size: int
    fd: int
    ino: int
    bits: bytearray
    pending: set[int] = field(default_factory=set)
    users: int = 0
    retired: bool = False
    complete: bool = False   # every piece present (bits are never cleared in a handle)


class PieceStore:
    """Pieces on disk under DIRECTORY; see the module docstring."""

    def __init__(self, directory: str, capacity: int, min_free: int = 1 << 30,
                 flush_interval: float = 1.0) -> None:
        self.directory = os.path.abspath(directory)
        piecefile.private_folder(self.directory)
        piecefile.private_folder(os.path.join(self.directory, "data"))
        self.capacity = capacity
        self.min_free = min(min_free, disk_space(self.directory)[1] // 20)
        self.catalog = Catalog(os.path.join(self.directory, "catalog.sqlite"))
        self._lock = threading.Lock()          # metadata only, never held during I/O
        self._flush_lock = threading.Lock()    # one flush at a time
        self._handles: OrderedDict[str, _Handle] = OrderedDict()
        self._touches: set[str] = set()
        self._held: dict[str, int] = {}        # hold(): kept from eviction by this process
        self._unsynced = 0
        self._stats: dict[str, int] = dict.fromkeys(
            ("puts", "pieces_written", "reads", "hits", "misses", "flushes", "bits_committed",
             "bits_dropped", "evicted_contents", "evicted_bytes", "refused"), 0)
        self._closed = False
        piecefile.sweep(self.directory, set(self.catalog.keys()), min_age=600.0)  # crash leftovers
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, args=(flush_interval,),
                                         name="kbfs-piece-flush", daemon=True)
        self._flusher.start()

    # ---- handles
    def _get(self, key: str, size: int | None = None, piece_size: int | None = None) -> _Handle | None:
        """KEY's open handle with a user reference taken, opening (or, with SIZE, creating)
        its data file. None if the content is unknown (or unusable) and SIZE is None."""
        piecefile.check_key(key)
        with self._lock:
            if self._closed:
                raise ValueError("piece store is closed")
            h = self._handles.get(key)
            if h is not None:
                if size is not None and (h.size, h.piece_size) != (size, piece_size):
                    raise ValueError(f"content {key}: size/piece size {size}/{piece_size} "
                                     f"differ from {h.size}/{h.piece_size}")
                h.users += 1
                self._handles.move_to_end(key)
                return h
        h = self._open(key, size, piece_size)
        if h is None:
            return None
        with self._lock:
            other = self._handles.get(key)
            if other is None:
                self._handles[key] = h
            else:  # another thread opened it meanwhile: use that one
                os.close(h.fd)
                h = other
            h.users += 1
            return h

    def _open(self, key: str, size: int | None, piece_size: int | None) -> _Handle | None:
        """KEY's data file and its bits. A row's bits count only for the inode it names, and a
        new file resets the row before it is published (see catalog). Without SIZE (a read)
        nothing is created or reset, and the row is read after the file is opened."""
        path = piecefile.data_path(self.directory, key)
        for _ in range(5):
            tmp = None
            fd = piecefile.open_existing(path)
            try:
                if fd is None:
                    if size is None:
                        return None
                    fd, tmp = piecefile.create_unpublished(self.directory, key, size)
                ino = piecefile.identity(fd)[1]
                if size is None or piece_size is None:
                    row = self.catalog.row(key)
                    if row is None or row.ino != ino or piecefile.file_size(fd) != row.size:
                        os.close(fd)
                        return None
                    return _Handle(key, row.size, row.piece_size, fd, ino, bytearray(row.bitmap))
                reset = tmp is not None or piecefile.file_size(fd) != size
                if reset and tmp is None:
                    os.ftruncate(fd, size)  # not the file its row describes: start over
                bits = self.catalog.register(key, size, piece_size, ino, reset=reset)
                if tmp is None or piecefile.publish(tmp, path):
                    return _Handle(key, size, piece_size, fd, ino, bytearray(bits))
                os.close(fd)  # another process published first: open theirs
            except BaseException:
                if fd is not None:
                    os.close(fd)
                if tmp is not None:
                    piecefile._unlink(tmp)
                raise
        raise OSError(errno.EAGAIN, f"content {key}: data file keeps changing")

    def _release(self, h: _Handle) -> None:
        with self._lock:
            h.users -= 1
            close = h.retired and h.users == 0
        if close:
            os.close(h.fd)

    def _retire(self, keys: Iterable[str]) -> None:
        """Forget the handles of KEYS (their files were removed or replaced)."""
        to_close = []
        with self._lock:
            for key in keys:
                h = self._handles.pop(key, None)
                if h is not None:
                    h.retired = True
                    h.pending.clear()
                    if h.users == 0:
                        to_close.append(h.fd)
        for fd in to_close:
            os.close(fd)

    # ---- the entry points
    def put(self, key: str, size: int, piece_size: int, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Store verified DATA: pieces INDEX, INDEX+1, ... of content KEY (SIZE bytes, pieces
        of PIECE_SIZE; DATA ends at a piece boundary or at the content's end). False when the
        disk has no room even after eviction (nothing stored)."""
        n = len(data)
        offset = index * piece_size
        if (size < 0 or piece_size <= 0 or index < 0 or n == 0 or offset + n > size
                or ((offset + n) % piece_size and offset + n != size)):
            raise ValueError(f"content {key}: {n} bytes at piece {index} do not fit "
                             f"{size} bytes in pieces of {piece_size}")
        last = (offset + n - 1) // piece_size
        if not self._room(n):
            with self._lock:
                self._stats["refused"] += 1
            return False
        h = self._get(key, size, piece_size)
        assert h is not None
        try:
            with self._lock:
                if not catalog.missing(h.bits, index, last):
                    return True
            piecefile.write_at(h.fd, offset, data)
            with self._lock:
                catalog.set_bits(h.bits, range(index, last + 1))
                if not h.retired:
                    h.pending.update(range(index, last + 1))
                self._touches.add(key)
                self._unsynced += n
                self._stats["puts"] += 1
                self._stats["pieces_written"] += last - index + 1
                flush_now = self._unsynced >= MAX_UNSYNCED
        finally:
            self._release(h)
        if flush_now:
            self.flush()
        return True

    def read(self, key: str, offset: int, length: int) -> bytes | None:
        """The bytes of [OFFSET, OFFSET+LENGTH) of KEY (cut at its end) if every piece covering
        them is present, else None."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        h = self._get(key)
        if h is None:
            with self._lock:
                self._stats["reads"] += 1
                self._stats["misses"] += 1
            return None
        try:
            end = min(offset + length, h.size)
            if end <= offset:
                return b""
            first, last = offset // h.piece_size, (end - 1) // h.piece_size
            with self._lock:
                gap = bool(catalog.missing(h.bits, first, last))
            if gap:  # another process may have committed them since
                self._refresh(h)
                with self._lock:
                    gap = bool(catalog.missing(h.bits, first, last))
            with self._lock:
                self._stats["reads"] += 1
                self._stats["misses" if gap else "hits"] += 1
                if not gap:
                    self._touches.add(key)
            data = None if gap else piecefile.read_at(h.fd, offset, end - offset)
            return data if data is not None and len(data) == end - offset else None
        finally:
            self._release(h)

    def read_cached(self, key: str, offset: int, length: int) -> bytearray | None:
        """[OFFSET, OFFSET+LENGTH) of KEY (cut at its end) without waiting on anything: only
        when KEY's data file is open here already, every piece of the content is present,
        and all the bytes are in the page cache (`piecefile.read_cached`); else None (the
        caller reads the waiting way). For the mount's inline reads on its event loop:
        no file is opened, no catalogue query, no disk read."""
        with self._lock:
            h = self._handles.get(key)
            if h is None or h.retired or not (h.complete or self._complete(h)):
                return None
            end = min(offset + length, h.size)
            h.users += 1
        try:
            data = piecefile.read_cached(h.fd, offset, max(0, end - offset))
        finally:
            self._release(h)
        if data is not None:
            with self._lock:
                self._stats["reads"] += 1
                self._stats["hits"] += 1
                self._touches.add(key)
        return data

    @staticmethod
    def _complete(h: _Handle) -> bool:
        """Whether every piece of H is present (C-speed: a count over the bitmap); remembered."""
        n = catalog.piece_count(h.size, h.piece_size)
        full, rem = divmod(n, 8)
        bits = h.bits
        if len(bits) < full + (1 if rem else 0) or bits.count(255, 0, full) != full:
            return False
        if rem and bits[full] & ((1 << rem) - 1) != (1 << rem) - 1:
            return False
        h.complete = True
        return True

    def _refresh(self, h: _Handle) -> None:
        row = self.catalog.row(h.key)
        with self._lock:
            if row is not None and row.ino == h.ino:
                catalog.merge(h.bits, row.bitmap)

    def present(self, key: str) -> bytes | None:
        """KEY's bitmap of readable pieces (the catalogue's, refreshed, plus this process's
        uncommitted ones), or None for an unknown content."""
        got = self._present(key)
        return None if got is None else got[0]

    def _present(self, key: str) -> tuple[bytes, int] | None:
        h = self._get(key)
        if h is None:
            return None
        try:
            self._refresh(h)
            with self._lock:
                return bytes(h.bits), catalog.piece_count(h.size, h.piece_size)
        finally:
            self._release(h)

    def ranges(self, key: str) -> list[tuple[int, int]]:
        """KEY's present pieces as inclusive (first, last) runs."""
        got = self._present(key)
        return [] if got is None else catalog.ranges(*got)

    def missing(self, key: str, first: int, last: int) -> list[int]:
        """Pieces in [FIRST, LAST] of KEY that are not present."""
        bits = self.present(key)
        return list(range(first, last + 1)) if bits is None else catalog.missing(bits, first, last)

    def pin(self, key: str) -> int:  # keep KEY from eviction (a count kept across restarts)
        return self.catalog.pin(piecefile.check_key(key), +1)

    def unpin(self, key: str) -> int:
        return self.catalog.pin(piecefile.check_key(key), -1)

    def hold(self, key: str) -> None:  # keep KEY from eviction while this process runs (open files)
        with self._lock:
            self._held[piecefile.check_key(key)] = self._held.get(key, 0) + 1

    def release(self, key: str) -> None:
        with self._lock:
            if self._held.get(key, 0) > 1:
                self._held[key] -= 1
            else:
                self._held.pop(key, None)

    def put_nodes(self, key: str, name: str, blob: bytes) -> None:  # opaque hints for the caller
        self.catalog.put_nodes(piecefile.check_key(key), name, blob)

    def get_nodes(self, key: str, name: str) -> bytes | None:
        return self.catalog.get_nodes(piecefile.check_key(key), name)

    # ---- durability
    def flush(self) -> None:
        """Make every piece put so far durable, then commit its bit (see the trust rule)."""
        with self._flush_lock:
            with self._lock:
                batch = [(h, h.pending) for h in self._handles.values() if h.pending]
                for h, _ in batch:
                    h.pending = set()
                    h.users += 1
                touches, self._touches = self._touches, set()
                self._unsynced = 0
            bits: dict[str, tuple[int, Iterable[int]]] = {}
            failed: set[str] = set()
            dropped: set[str] | None = None
            try:
                for h, indices in batch:
                    try:
                        piecefile.sync(h.fd)   # first the bytes, durable ...
                        bits[h.key] = (h.ino, indices)
                    except OSError as exc:     # ... or their bits are never committed
                        log.warning("piece store %s: fdatasync of %s failed: %s", self.directory, h.key, exc)
                        failed.add(h.key)
                dropped = self.catalog.commit(bits, touches) if bits or touches else set()  # ... then bits
            finally:
                with self._lock:
                    if dropped is None:  # the catalogue failed: the next flush tries again
                        for h, indices in batch:
                            if not h.retired and h.key not in failed:
                                h.pending |= indices
                        self._touches |= touches
                    lost = failed | (dropped or set())
                    self._stats["flushes"] += 1
                    if dropped is not None:
                        self._stats["bits_committed"] += sum(len(i) for h, i in batch if h.key not in lost)
                    self._stats["bits_dropped"] += sum(len(i) for h, i in batch if h.key in lost)
                for h, _ in batch:
                    self._release(h)
                self._retire(lost)
            with self._lock:  # close idle files past MAX_OPEN, least recently used first
                idle = [k for k, h in self._handles.items() if h.users == 0 and not h.pending]
            self._retire(idle[: max(0, len(self._handles) - MAX_OPEN)])
        self.evict_to(self.capacity)

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep flushing; the next round retries
                log.exception("piece store %s: background flush failed", self.directory)

    # ---- capacity
    def _room(self, n: int) -> bool:
        free, _ = disk_space(self.directory)
        if free - n >= self.min_free:
            return True
        self.evict_to(self.capacity, need_free=self.min_free + n - free)
        return disk_space(self.directory)[0] - n >= self.min_free

    def evict_to(self, target: int, need_free: int = 0) -> int:
        """Remove least recently used contents (unpinned, not in use here) until at most
        TARGET bytes are used and the disk is above the floor (plus NEED_FREE bytes more
        freed); bytes freed."""
        _, used = self.catalog.totals()
        free, _ = disk_space(self.directory)
        amount = max(used - target, need_free, self.min_free - free, 0)
        if amount <= 0:
            return 0
        with self._lock:
            busy = {k for k, h in self._handles.items() if h.users or h.pending} | set(self._held)
        gone = self.catalog.evict(amount, skip=busy)   # rows committed before any unlink
        self._retire(k for k, _ in gone)
        for key, _ in gone:
            piecefile.remove(self.directory, key)
        freed = sum(u for _, u in gone)
        if gone:
            log.info("piece store %s: evicted %d contents (%d bytes)", self.directory, len(gone), freed)
        with self._lock:
            self._stats["evicted_contents"] += len(gone)
            self._stats["evicted_bytes"] += freed
        return freed

    def statistics(self) -> dict[str, Any]:
        contents, used = self.catalog.totals()
        free, _ = disk_space(self.directory)
        with self._lock:
            return dict(self._stats, contents=contents, used=used, capacity=self.capacity,
                        min_free=self.min_free, free=free, open_files=len(self._handles),
                        pending_pieces=sum(len(h.pending) for h in self._handles.values()))

    def clear(self) -> None:
        """Remove every content (pins stay) and every stray file under data/."""
        self.flush()
        keys = self.catalog.clear()
        with self._lock:
            everything = list(self._handles)
        self._retire(everything)
        for key in keys:
            piecefile.remove(self.directory, key)
        piecefile.sweep(self.directory, set(self.catalog.keys()), min_age=0.0)

    def close(self) -> None:
        """Commit what is pending, close every file and the catalogue."""
        if self._closed:
            return
        self._stop.set()
        self._flusher.join()
        self.flush()
        with self._lock:
            self._closed = True
            handles = list(self._handles.values())
            self._handles.clear()
        for h in handles:
            h.retired = True
            if h.users == 0:
                os.close(h.fd)
        self.catalog.close()

    def __enter__(self) -> PieceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

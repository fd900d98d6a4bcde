"""A read-only, seekable binary file object over a verified cache, and the v2 read path.

`KbfsFile(cache, ref, name)` serves `read`, `readinto`, `seek` and `tell` with the
semantics of `io.RawIOBase` (wrap it in `io.BufferedReader`, as `kbfs.client.open`
does, for small reads); every byte it returns comes from the cache's `read`, so every
byte has been verified against the pointer. For a v1 pointer the cache is a
`cache.BlockCache` and sequential reads feed a `cache.ReadAhead`, which prefetches the
blocks that come next. The file is pinned in the cache (`open_file` / `close_file`)
while it is open.

Which path a pointer takes (`takes_pieces`): a pointer with a root and 64 KiB leaves
(a "v2" pointer, `kbfs prv create --block-size 65536`) is read through `PieceReads`:
a `kbfs.piececache.PieceCache` (made by the caller's factory on the first v2 read, so
v1-only users never load it), which has its own single flight and link-sized
read-ahead, so `KbfsFile` gives it no `ReadAhead`. When no source can prove the pieces
(`piecewire.NoProof`: an older share, a plain web server), that content falls back to
the block cache at the pointer's own block size (leaf list + 64 KiB blocks: slower,
equally verified), with one log line per content. Everything else (root-less pointers,
1 MiB trees) stays on the block cache, unchanged.

This module only reads through caches it is given: it never resolves sources,
never talks to the network and never imports `fetch`, `piececache` or `requests`
(layer L3).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from kbfs.cache import BlockCache, FileRef, ReadAhead
from kbfs.errors import SourceError

__all__ = ["KbfsFile", "PieceReads", "takes_pieces", "PIECE_SIZE"]

log = logging.getLogger(__name__)

PIECE_SIZE = 64 * 1024      # the leaf size of a v2 pointer (what shares prove)
MAX_FALLBACKS = 4096        # contents remembered as read by the leaf list (no proofs)


def takes_pieces(ref: FileRef) -> bool:
    """Whether REF is read through the piece cache: a root and 64 KiB leaves (v2)."""
    return ref.root is not None and ref.block_size == PIECE_SIZE


class PieceCacheLike(Protocol):
    """What `PieceReads` needs of `kbfs.piececache.PieceCache` (not imported here: L2)."""

    def read(self, ref: Any, offset: int, length: int) -> bytes: ...
    def open_file(self, ref: Any) -> None: ...
    def close_file(self, ref: Any) -> None: ...
    def cached_bytes(self, ref: Any) -> int: ...
    def statistics(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class PieceReads:
    """Verified reads of v2 content: the piece cache (made by MAKE on first use), and
    BLOCKS for content no source can prove pieces of (see the module docstring).

    Thread-safe; one per cache folder, shared by every reader of it."""

    def __init__(self, blocks: BlockCache, make: Callable[[], PieceCacheLike]) -> None:
        self.blocks = blocks
        self._make = make
        self._pieces: PieceCacheLike | None = None
        self._lock = threading.Lock()
        self._fallback: OrderedDict[str, None] = OrderedDict()
        self._fallback_reads = 0

    @property
    def pieces(self) -> PieceCacheLike:
        """The piece cache, made on first use."""
        with self._lock:
            if self._pieces is None:
                self._pieces = self._make()
            return self._pieces

    @staticmethod
    def takes(ref: FileRef) -> bool:
        """Whether REF belongs here (`takes_pieces`), for callers that cannot import this."""
        return takes_pieces(ref)

    def falls_back(self, ref: FileRef) -> bool:
        """Whether REF is read by the leaf list (its sources gave no proof)."""
        with self._lock:
            return ref.key in self._fallback

    def read(self, ref: FileRef, offset: int, length: int) -> bytes:
        """Verified bytes [OFFSET, OFFSET+LENGTH) of v2 REF (cut at its end)."""
        if not self.falls_back(ref):
            try:
                return self.pieces.read(ref, offset, length)
            except SourceError as exc:
                from kbfs.piecewire import NoProof  # L0; loaded only by v2 readers

                if not isinstance(exc, NoProof):
                    raise
                self._fall_back(ref, exc)
        with self._lock:
            self._fallback_reads += 1
        return bytes(self.blocks.read(ref, offset, length))

    def _fall_back(self, ref: FileRef, exc: BaseException) -> None:
        with self._lock:
            first = ref.key not in self._fallback
            self._fallback[ref.key] = None
            self._fallback.move_to_end(ref.key)
            while len(self._fallback) > MAX_FALLBACKS:
                self._fallback.popitem(last=False)
        if first:
            log.warning("sha1 %s: no source proves its %d KiB pieces (%s); reading it by "
                        "its leaf list at its own block size instead (slower, as verified)",
                        ref.sha1, ref.block_size >> 10, exc)

    def open_file(self, ref: FileRef) -> None:
        """Hold REF against eviction in both caches (the block cache's pin is a counter)."""
        self.pieces.open_file(ref)
        self.blocks.open_file(ref)

    def close_file(self, ref: FileRef) -> None:
        self.blocks.close_file(ref)
        self.pieces.close_file(ref)

    def cached_bytes(self, ref: FileRef) -> int:
        n = self.pieces.cached_bytes(ref)
        return max(n, self.blocks.cached_bytes(ref)) if self.falls_back(ref) else n

    def verified(self, ref: FileRef) -> str:
        """'tree': every piece is checked against the root before it is served."""
        return "tree"

    def statistics(self) -> dict[str, Any]:
        """The piece cache's counters (empty until it is made) and the fall-backs."""
        with self._lock:
            pieces = self._pieces
            extra = {"fallback_contents": len(self._fallback), "fallback_reads": self._fallback_reads}
        return {**(pieces.statistics() if pieces is not None else {}), **extra}

    def close(self) -> None:
        with self._lock:
            pieces, self._pieces = self._pieces, None
        if pieces is not None:
            pieces.close()


_Cache = BlockCache | PieceReads

# readall() of a big file is served in pieces of this size so that read-ahead can
# keep up and no single cache.read call has to hold the whole file twice.
_READALL_CHUNK = 16 << 20


class KbfsFile(io.RawIOBase):
    """A verified, read-only view of one file held by a `BlockCache` (or, for v2 content,
    `PieceReads`: READAHEAD is then ignored, the piece cache reads ahead itself)."""

    def __init__(self, cache: _Cache, ref: FileRef, name: str = "",
                 readahead: bool = True) -> None:
        super().__init__()
        self._cache = cache
        self._ref = ref
        self._pos = 0
        self._pinned = False
        # One file object is used by one reader at a time, but h5py and dask may hand it
        # between threads; the lock keeps position updates and reads paired.
        self._lock = threading.Lock()
        self.name = name or ref.sha1
        self.mode = "rb"
        cache.open_file(ref)
        self._pinned = True
        self._readahead: ReadAhead | None = (
            ReadAhead(cache, ref) if readahead and isinstance(cache, BlockCache) else None)
        # v2: a read ends at a piece boundary when it can (a short read, which
        # BufferedReader completes), so that a buffer's fill after a seek asks for one
        # piece, not the two it would straddle.
        self._piece = ref.block_size if isinstance(cache, PieceReads) else 0

    # ------------------------------------------------------------ properties

    @property
    def ref(self) -> FileRef:
        """The content this file reads."""
        return self._ref

    @property
    def size(self) -> int:
        """Length of the file in bytes."""
        return self._ref.size

    def __repr__(self) -> str:
        return f"<KbfsFile name={self.name!r} sha1={self._ref.sha1} size={self._ref.size}>"

    # ------------------------------------------------------------ io protocol

    def readable(self) -> bool:
        self._check_open()
        return True

    def seekable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return False

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        offset = int(offset)
        if whence == os.SEEK_SET:
            target = offset
        elif whence == os.SEEK_CUR:
            target = self._pos + offset
        elif whence == os.SEEK_END:
            target = self._ref.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if target < 0:
            raise OSError(22, f"negative seek position {target}")
        # As with regular files, seeking past the end is allowed; reads there return b"".
        self._pos = target
        return target

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._read_at_pos(len(view))
        n = len(data)
        view[:n] = data
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        return self._read_at_pos(size)

    def readall(self) -> bytes:
        self._check_open()
        parts = []
        while True:
            part = self._read_at_pos(_READALL_CHUNK)
            if not part:
                break
            parts.append(part)
        return b"".join(parts)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._pinned:
                self._pinned = False
                self._cache.close_file(self._ref)
        finally:
            super().close()

    # ------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def _read_at_pos(self, size: int) -> bytes:
        self._check_open()
        with self._lock:
            start = self._pos
            length = min(size, self._ref.size - start)
            if length <= 0:
                return b""
            if self._piece:
                cut = (start + length) // self._piece * self._piece
                if cut > start:
                    length = cut - start if start + length < self._ref.size else length
            if self._readahead is not None:
                # Told before the blocking read so the prefetch of what follows overlaps it.
                self._readahead.on_read(start, length)
            data = self._cache.read(self._ref, start, length)
            self._pos = start + len(data)
            return data

"""A read-only, seekable binary file object over the verified piece cache.

`KbfsFile(cache, ref, name)` serves `read`, `readinto`, `seek` and `tell` with the
semantics of `io.RawIOBase` (wrap it in `io.BufferedReader`, as `kbfs.client.open`
does, for small reads); every byte it returns comes from the cache's `read`
(`kbfs.piececache.PieceCache`, the one cache of every pointer kind), so every byte has
been verified against the pointer. The cache has its own single flight and link-sized
read-ahead. A read of at least a piece ends at a piece boundary when it can (a short
read, which BufferedReader completes), so that a buffer's fill after a seek asks for one
piece, not the two it would straddle (for v1's 1 MiB blocks too); a smaller read is
whole. The file is held in the cache (`open_file` / `close_file`) while it is open.

`takes_pieces(ref)`: whether REF is a v2 pointer (a root, 64 KiB leaves), for callers
that size buffers or choose a download path by it.

This module only reads through the cache it is given: it never resolves sources, never
talks to the network and never imports `fetch`, `piececache` or `requests` (layer L3).
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any, Protocol

from kbfs.fileref import FileRef

__all__ = ["KbfsFile", "takes_pieces", "PIECE_SIZE"]

PIECE_SIZE = 64 * 1024      # the leaf size of a v2 pointer (what shares prove)


def takes_pieces(ref: FileRef) -> bool:
    """Whether REF is a v2 pointer: a root and 64 KiB leaves (proved piece by piece)."""
    return ref.root is not None and ref.block_size == PIECE_SIZE


class CacheLike(Protocol):
    """What `KbfsFile` needs of `kbfs.piececache.PieceCache` (not imported here: L2)."""

    def read(self, ref: Any, offset: int, length: int) -> bytes: ...
    def open_file(self, ref: Any) -> None: ...
    def close_file(self, ref: Any) -> None: ...


# readall() of a big file is served in pieces of this size so that read-ahead can
# keep up and no single cache.read call has to hold the whole file twice.
_READALL_CHUNK = 16 << 20


class KbfsFile(io.RawIOBase):
    """A verified, read-only view of one file held by the piece cache."""

    def __init__(self, cache: CacheLike, ref: FileRef, name: str = "",
                 readahead: bool = True) -> None:  # READAHEAD: unused (the cache reads ahead)
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
        # Reads end at piece boundaries (module docstring), v1's 1 MiB blocks too: a buffer
        # of 1 MiB filled after a seek straddles two of them, and both were fetched for a
        # 4 KiB read.
        self._piece = ref.block_size

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
            if length >= self._piece:   # a buffer's fill; a smaller read needs both pieces anyway
                cut = (start + length) // self._piece * self._piece
                if cut > start:
                    length = cut - start if start + length < self._ref.size else length
            data = self._cache.read(self._ref, start, length)
            self._pos = start + len(data)
            return data

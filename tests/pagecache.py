"""Test helpers that look at the page cache: which pages of a file are in memory (mincore),
and dropping a file's pages. Linux only; nothing here changes a file's bytes."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path


def resident_pages(fd: int) -> int:
    """How many of FD's pages are in the page cache (mincore(2) on a mapping of it; a
    read with RWF_NOWAIT cannot tell: it may fail for other reasons than a missing page)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(b & 1 for b in vec.raw[:pages])
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)


def evict_from_page_cache(path: Path) -> bool:
    """Drop PATH's pages from the page cache; whether they are all gone (checked with
    mincore, which, unlike a read, brings nothing back in). The kernel may keep a page that
    is busy at that moment, so this asks again a few times."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(50):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if resident_pages(fd) == 0:
                return True
            time.sleep(0.02)
        return False
    finally:
        os.close(fd)


def resident_pages_of(path: str | Path) -> int:
    """`resident_pages` of the file at PATH."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return resident_pages(fd)
    finally:
        os.close(fd)

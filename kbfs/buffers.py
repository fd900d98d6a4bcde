"""Page-aligned buffers for downloads that write with O_DIRECT (layer L0, stdlib only).

`anonymous_memory(n)`: N bytes (at least 1) of private anonymous memory, page-aligned as
O_DIRECT writes need, and zero pages until written (MAP_PRIVATE: not mmap's default
MAP_SHARED, whose pages cost a shmem page fault each, measured at 4% of a download).
`DIRECT_ALIGN`: the alignment O_DIRECT offsets and lengths keep to. No huge pages: a
download reuses a few run buffers, and they measured its kernel time up by half.
"""

from __future__ import annotations

import mmap

DIRECT_ALIGN = 4096

__all__ = ["DIRECT_ALIGN", "anonymous_memory"]


def anonymous_memory(n: int) -> mmap.mmap:
    """See the module docstring."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    return mmap.mmap(-1, max(1, n), flags=flags) if flags else mmap.mmap(-1, max(1, n))

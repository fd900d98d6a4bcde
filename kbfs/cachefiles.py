"""Whole files out of the piece cache: `local_path` copies and copying present pieces out.

- `local_path(cache, ref)`: the path of a complete, verified copy of REF
  (`<store>/copies/<key>`, 0600 in the 0700 cache folder), made once by reading REF through
  the cache (every piece verified) into a temporary file, fsynced and renamed. Copies are
  the caller's to keep (kbfs.realize hands them out): not counted against capacity,
  removed by `kbfs cache clear`.
- `copy_present(cache, ref, fd, indices, lock)`: write the pieces of INDICES that the store
  holds into FD at their offsets (a download resuming from the cache); the indices still
  missing.

Not here: fetching (through `cache.read` only), verification (the cache's).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from kbfs import piecefile

COPY_BYTES = 16 << 20     # bytes read from the cache per step


def copies_dir(cache: Any) -> str:
    return os.path.join(cache.directory, "copies")


def local_path(cache: Any, ref: Any) -> str:
    """See the module docstring."""
    folder = copies_dir(cache)
    piecefile.private_folder(folder)
    path = os.path.join(folder, piecefile.check_key(ref.key))
    try:
        st = os.lstat(path)
        if os.path.isfile(path) and not os.path.islink(path) and st.st_size == ref.size:
            return path
    except FileNotFoundError:
        pass
    # os.urandom, not secrets: secrets loads hashlib (OpenSSL), which a cached read never needs
    tmp = os.path.join(folder, f".{ref.key}.{os.urandom(6).hex()}")
    cache.open_file(ref)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            pos = 0
            while pos < ref.size:
                data = cache.read(ref, pos, min(COPY_BYTES, ref.size - pos))
                if not data:
                    raise OSError(f"{ref.sha1}: the cache ended at {pos} of {ref.size} bytes")
                _pwrite_all(fd, memoryview(data), pos)
                pos += len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    finally:
        cache.close_file(ref)
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return path


def copy_present(cache: Any, ref: Any, fd: int, indices: Sequence[int],
                 lock: threading.Lock | None = None) -> list[int]:
    """See the module docstring. INDICES sorted; runs of present pieces are read at once."""
    bs = ref.block_size
    present: set[int] = set()
    for a, b in cache.store.ranges(ref.key):
        present.update(range(a, b + 1))
    missing = [i for i in indices if i not in present]
    have = [i for i in indices if i in present]
    run = max(1, COPY_BYTES // bs)
    k = 0
    while k < len(have):
        j = k + 1
        while j < len(have) and have[j] == have[j - 1] + 1 and j - k < run:
            j += 1
        lo, hi = have[k] * bs, min(have[j - 1] * bs + bs, ref.size)
        data = cache.store.read(ref.key, lo, hi - lo)   # present: verified when stored
        if data is None:                                # evicted meanwhile
            missing.extend(have[k:j])
        else:
            if lock is None:
                _pwrite_all(fd, memoryview(data), lo)
            else:
                with lock:
                    _pwrite_all(fd, memoryview(data), lo)
        k = j
    return sorted(missing)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n

"""What the piece cache counts as present, checked against the truth (for fault tests).

`check_cache(cache_dir, truths)` opens CACHE_DIR/pieces read-only (the catalogue with
mode=ro, the data files for reading: it may run beside a live daemon, or on a full disk)
and asserts that every piece whose bit is committed belongs to a content in TRUTHS (sha1
-> bytes) and holds exactly that piece's bytes; it returns how many pieces it checked.
The store's crash rule is what this tests: a kill may lose pieces, never add one.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from kbfs import catalog, tree


def check_cache(cache_dir: str | Path, truths: dict[str, bytes]) -> int:
    """Assert that every piece the piece store under CACHE_DIR counts as present (its
    committed bitmap, as any other process sees it) belongs to a known content in TRUTHS and
    holds exactly that piece's bytes (so it matches its leaf); return the count. A kill may
    lose pieces (absent: fine), never add one (a bit over wrong or missing bytes: fails).
    Read-only (the catalogue opened mode=ro, data files read): the disk may be full."""
    folder = Path(cache_dir) / "pieces"
    if not (folder / "catalog.sqlite").is_file():
        return 0
    # Contents are keyed by their root at the pointer's block size (v1 1 MiB, v2 64 KiB),
    # or s1-SHA1-SIZE without one: kbfs.fileref.FileRef.key.
    keyed = {k: (sha1, d) for sha1, d in truths.items()
             for k in (tree.tree_of_bytes(d, tree.BLOCK_SIZE)[1], tree.tree_of_bytes(d, 64 << 10)[1],
                       f"s1-{sha1}-{len(d)}")}
    db = sqlite3.connect(f"file:{folder / 'catalog.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT key, size, piece_size, ino, bitmap FROM contents").fetchall()
    finally:
        db.close()
    n = 0
    for key, size, bs, ino, bitmap in rows:
        present = catalog.ranges(bytes(bitmap), catalog.piece_count(size, bs))
        if not present:
            continue
        assert key in keyed, f"pieces of unknown content in the cache: {key} {present}"
        sha1, data = keyed[key]
        assert size == len(data), (key, size)
        try:
            fd = os.open(folder / "data" / key[:2] / key, os.O_RDONLY)
        except FileNotFoundError:
            continue   # removed (evicted, or the folder deleted): its bits describe no file
        try:
            if os.fstat(fd).st_ino != ino:
                continue   # bits name another inode: no reader counts them (kbfs.catalog)
            for a, b in present:
                for i in range(a, b + 1):
                    want = data[i * bs:(i + 1) * bs]
                    got = os.pread(fd, len(want), i * bs)
                    assert got == want, f"piece {i} of {sha1} is present with other bytes"
                    assert tree.leaf_hash(got) == tree.leaf_hash(want)
                    n += 1
        finally:
            os.close(fd)
    return n

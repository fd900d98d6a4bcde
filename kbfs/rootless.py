"""The first read of root-less content: the whole file must match its SHA-1 before any byte counts.

Pointers of the original tools carry a SHA-1 and a size, no block tree root: nothing
vouches for any leaf list a source offers. `prove(ref, source, store, leaf_lists, staging)`
fetches every block (the leaves the source offers only check the transfer: a source that
lies consistently about tree and bytes passes them, never the SHA-1), hashes the whole
content with SHA-1 and only on a match:

1. records the leaves it computed from the bytes (`LeafLists.record_proven`, durable), then
2. puts the pieces (blocks of the pointer's block size) into the piece store, whose own
   crash rule (bytes fdatasynced before their bit commits) applies from there.

Until the match the bytes sit in a staging file (`STAGING/<key>.<random>`, 0600) that the
store knows nothing of: a kill -9 or a mismatch leaves no piece counted. A mismatch raises
VerificationError naming the SHA-1. SINK(offset, bytes), when given, receives every byte in
order as it comes (a download writes them out: one fetch whatever the cache's size).

Not here: single flight (the caller's), reads after the match (checked against the
recorded leaves like any leaf-list content, `kbfs.verifiers`).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from kbfs import tree
from kbfs.errors import VerificationError

log = logging.getLogger(__name__)

RUN_BYTES = 16 << 20      # bytes per source call of the pass
STALE = 3600.0            # a staging file older than this is a crash's leftover

Sink = Callable[[int, memoryview], None]


def sweep(staging: str) -> None:
    """Remove staging files left by killed passes (older than STALE)."""
    try:
        names = os.listdir(staging)
    except OSError:
        return
    now = time.time()
    for name in names:
        path = os.path.join(staging, name)
        try:
            if now - os.lstat(path).st_mtime > STALE:
                os.unlink(path)
        except OSError:
            pass


def prove(ref: Any, source: Any, store: Any, leaf_lists: Any, staging: str,
          sink: Sink | None = None, fetched: Callable[[int], None] | None = None) -> list[bytes]:
    """Run the pass of the module docstring for root-less REF; its leaves (recorded)."""
    import hashlib  # root-less content only: not loaded at start-up

    log.info("%s has no block tree: reading the whole file once to check its SHA-1", ref.sha1)
    bs, size, blocks = ref.block_size, ref.size, tree.block_count(ref.size, ref.block_size)
    want = blocks * tree.LEAF_BYTES
    offered = source.fetch_tree(ref.sha1, size, block_size=bs)
    if len(offered) != want:
        raise VerificationError(f"tree of {ref.sha1} has {len(offered)} bytes, expected {want}")
    transport = tree.split_leaves(offered)
    run = max(1, RUN_BYTES // bs)
    hasher = hashlib.sha1()
    mine: list[bytes] = []
    path = os.path.join(staging, f"{ref.key}.{secrets.token_hex(6)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        for first in range(0, blocks, run):
            count = min(run, blocks - first)
            lo, hi = first * bs, min((first + count) * bs, size)
            data = source.fetch_blocks(ref.sha1, size, first, count, transport, bs)
            if len(data) != hi - lo:
                raise VerificationError(f"source returned {len(data)} bytes for blocks "
                                        f"{first}-{first + count - 1} of {ref.sha1}")
            view = memoryview(data)
            hasher.update(view)
            if fetched is not None:
                fetched(hi - lo)
            if sink is not None and hi > lo:
                sink(lo, view)
            for k in range(count):
                a, b = tree.block_span(k, len(view), bs)
                mine.append(tree.leaf_hash(view[a:b]))
            _pwrite_all(fd, view, lo)
        actual = hasher.hexdigest()
        if actual != ref.sha1:
            log.error("%s: the content served has SHA-1 %s; nothing of it is kept or served",
                      ref.sha1, actual)
            raise VerificationError(
                f"{ref.sha1}: the content the sources served has SHA-1 {actual}, not the "
                "pointer's (a source served self-consistent but wrong data)")
        leaf_lists.record_proven(ref, mine)      # durable before any piece counts
        for first in range(0, blocks, run):
            lo, hi = first * bs, min((first + run) * bs, size)
            if hi <= lo:
                continue
            try:
                if not store.put(ref.key, size, bs, first, os.pread(fd, hi - lo, lo)):
                    break   # no room: later reads fetch, checked against the recorded leaves
            except (OSError, ValueError) as exc:
                log.warning("cannot store %s after its SHA-1 matched: %s", ref.sha1, exc)
                break
        log.info("%s: SHA-1 matches; its pieces are checked against the leaves from now on", ref.sha1)
        return mine
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n

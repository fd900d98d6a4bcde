"""Whole-content passes: the first read of content that no piece-sized check can vouch for.

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

`prove_root(ref, ...)` is the same pass for a v2 pointer (a root, 64 KiB leaves) whose
sources prove no piece (an older share, a plain web server) and serve no leaf list at its
block size (shares serve 1 MiB leaves): the blocks come with the 1 MiB leaves the source
offers (a transport check only), the 64 KiB leaves are computed from the bytes, and only
when they hash up to the pointer's root (and the bytes to its SHA-1) are they kept, as the
content's leaf-list hint (`LeafLists.keep`, re-checked against the root on every load),
and the pieces put. Its caller bounds it (`kbfs.verifiers.WHOLE_LIMIT`): one small read
costs the whole file.

Not here: single flight (the caller's), reads after the match (checked against the
recorded leaves like any leaf-list content, `kbfs.verifiers`).
"""

from __future__ import annotations

import logging
import os
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
    log.info("%s has no block tree: reading the whole file once to check its SHA-1", ref.sha1)
    with _Staged(ref, source, staging, ref.block_size, sink, fetched) as staged:
        staged.check_sha1()
        leaf_lists.record_proven(ref, staged.leaves)      # durable before any piece counts
        staged.store_pieces(store)
        log.info("%s: SHA-1 matches; its pieces are checked against the leaves from now on", ref.sha1)
        return staged.leaves


def prove_root(ref: Any, source: Any, store: Any, leaf_lists: Any, staging: str,
               sink: Sink | None = None, fetched: Callable[[int], None] | None = None) -> list[bytes]:
    """The pass for REF with a root that no source proves (module docstring); its leaves
    (checked against the root, kept as the content's leaf-list hint)."""
    log.info("%s: reading the whole file once (%d bytes) to check it against its root %s",
             ref.sha1, ref.size, ref.root)
    with _Staged(ref, source, staging, max(ref.block_size, tree.BLOCK_SIZE), sink, fetched) as staged:
        try:
            tree.verify_leaves(staged.leaves, ref.size, ref.root, ref.block_size)
        except VerificationError as exc:
            log.error("%s: the content served does not hash to root %s; nothing of it is kept "
                      "or served", ref.sha1, ref.root)
            raise VerificationError(
                f"sha1 {ref.sha1}: the content the sources served, read whole, does not hash "
                f"to the pointer's root ({exc}; a source served self-consistent but wrong "
                "data)") from None
        staged.check_sha1()    # the root matched: a mismatch here is the pointer's own
        leaf_lists.keep(ref, staged.leaves)
        staged.store_pieces(store)
        return staged.leaves


class _Staged:
    """REF's whole content fetched into a staging file, its SHA-1 and its leaves at
    ref.block_size computed on the way; the file is removed on exit."""

    def __init__(self, ref: Any, source: Any, staging: str, transport_bs: int,
                 sink: Sink | None, fetched: Callable[[int], None] | None) -> None:
        import hashlib  # whole-content passes only: not loaded at start-up

        self.ref, self.source, self.transport_bs = ref, source, transport_bs
        self.sink, self.fetched = sink, fetched
        self.hasher = hashlib.sha1()
        self.leaves: list[bytes] = []
        # os.urandom, not secrets: secrets loads hashlib (OpenSSL), which a cached read never needs
        self.path = os.path.join(staging, f"{ref.key}.{os.urandom(6).hex()}")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> _Staged:
        try:
            self._fetch_all()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _fetch_all(self) -> None:
        ref, tbs, bs, size = self.ref, self.transport_bs, self.ref.block_size, self.ref.size
        blocks = tree.block_count(size, tbs)
        want = blocks * tree.LEAF_BYTES
        # The source's own leaves only check the transfer (root-less: nothing vouches for
        # them; a root: they are of another block size than the root's).
        offered = self.source.fetch_tree(ref.sha1, size, block_size=tbs)
        if len(offered) != want:
            raise VerificationError(f"tree of {ref.sha1} has {len(offered)} bytes, expected {want}")
        transport = tree.split_leaves(offered)
        run = max(1, RUN_BYTES // tbs)
        for first in range(0, blocks, run):
            count = min(run, blocks - first)
            lo, hi = first * tbs, min((first + count) * tbs, size)
            data = self.source.fetch_blocks(ref.sha1, size, first, count, transport, tbs)
            if len(data) != hi - lo:
                raise VerificationError(f"source returned {len(data)} bytes for blocks "
                                        f"{first}-{first + count - 1} of {ref.sha1}")
            view = memoryview(data)
            self.hasher.update(view)
            if self.fetched is not None:
                self.fetched(hi - lo)
            if self.sink is not None and hi > lo:
                self.sink(lo, view)
            for k in range(lo // bs, tree.block_count(hi, bs) if hi > lo else lo // bs + 1):
                a, b = tree.block_span(k, size, bs)
                self.leaves.append(tree.leaf_hash(view[a - lo:b - lo]))
            _pwrite_all(self.fd, view, lo)

    def check_sha1(self) -> None:
        actual = self.hasher.hexdigest()
        if actual != self.ref.sha1:
            log.error("%s: the content served has SHA-1 %s; nothing of it is kept or served",
                      self.ref.sha1, actual)
            raise VerificationError(
                f"{self.ref.sha1}: the content the sources served has SHA-1 {actual}, not the "
                "pointer's (a source served self-consistent but wrong data)")

    def store_pieces(self, store: Any) -> None:
        ref, size, bs = self.ref, self.ref.size, self.ref.block_size
        run = max(1, RUN_BYTES // bs)
        for first in range(0, tree.block_count(size, bs), run):
            lo, hi = first * bs, min((first + run) * bs, size)
            if hi <= lo:
                continue
            try:
                if not store.put(ref.key, size, bs, first, os.pread(self.fd, hi - lo, lo)):
                    break   # no room: later reads fetch, checked against the leaves
            except (OSError, ValueError) as exc:
                log.warning("cannot store %s after it matched: %s", ref.sha1, exc)
                break


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n

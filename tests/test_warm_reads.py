"""Warm reads that must not block (kbfs/piecestore.py `read_cached`,
kbfs/piececache.py `read_cached`; the mount's inline path in kbfs/fusefs.py `read`): the
inline path answers only for a content whose every piece is present and whose bytes are all
in the page cache (preadv2 RWF_NOWAIT). The page-cache probe in these tests is RWF_NOWAIT
itself (`piecefile.read_cached`): None means some byte was not in memory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fakepieces import Content, HonestSource, P

from kbfs import osio, piecefile
from kbfs.piececache import PieceCache
from tests.httpsource import HTTPSource, wait_until
from tests.mountutil import NEEDS_FUSE, mounted
from tests.test_mount import read_all, write_pointer

pytestmark = pytest.mark.skipif(not osio.nowait_reads(), reason="needs preadv2 RWF_NOWAIT (Linux)")


def make(tmp_path: Path, source: HonestSource, **kw: object) -> PieceCache:
    args: dict = dict(capacity=1 << 34, min_free=0, flush_interval=3600, min_ahead=256 * 1024)
    args.update(kw)
    return PieceCache(str(tmp_path / "cache"), source, **args)


def _evict_pages(cache: PieceCache, key: str) -> None:
    """Make the data file's bytes durable (clean pages), then drop them from the page cache."""
    cache.store.flush()
    fd = os.open(piecefile.data_path(cache.store.directory, key), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_inline_answers_only_a_complete_content_in_the_page_cache(tmp_path: Path) -> None:
    c = Content("inline", 40 * P + 999)
    with make(tmp_path, HonestSource({c.sha1: c})) as cache:
        ref = c.ref()
        assert cache.read_cached(ref, 0, 4096) is None          # never checked (not opened)
        cache.open_file(ref)
        assert cache.read_cached(ref, 0, 4096) is None          # no piece present
        assert cache.read(ref, 0, 20 * P) == c.data[: 20 * P]
        # Pieces 0..19 present and in memory, but the content is not complete: refused.
        assert cache.read_cached(ref, 0, 4096) is None
        assert cache.read(ref, 20 * P, c.size) == c.data[20 * P:]
        got = cache.read_cached(ref, 5 * P + 7, 70000)
        assert got is not None and bytes(got) == c.data[5 * P + 7 : 5 * P + 7 + 70000]
        assert bytes(cache.read_cached(ref, c.size - 5, 100) or b"?") == c.data[-5:]  # cut at the end
        assert cache.read_cached(ref, c.size + 10, 10) == bytearray()
        assert cache.read_cached(ref, -1, 10) is None and cache.read_cached(ref, 0, -1) is None
        # Out of the page cache: refused (the thread path reads it), then back in: answered.
        _evict_pages(cache, ref.key)
        assert cache.read_cached(ref, 3 * P, 4096) is None
        assert cache.read(ref, 3 * P, 4096) == c.data[3 * P : 3 * P + 4096]
        assert bytes(cache.read_cached(ref, 3 * P, 4096) or b"") == c.data[3 * P : 3 * P + 4096]
        assert cache.statistics()["inline_reads"] == 4   # the empty read past the end counts
        cache.close_file(ref)


def test_inline_never_reads_a_content_evicted_from_the_store(tmp_path: Path) -> None:
    c = Content("gone", 8 * P)
    with make(tmp_path, HonestSource({c.sha1: c})) as cache:
        ref = c.ref()
        cache.open_file(ref)
        assert cache.read(ref, 0, c.size) == c.data
        assert cache.read_cached(ref, 0, 10) is not None
        cache.close_file(ref)
        cache.clear()                                           # rows and files gone
        assert cache.read_cached(ref, 0, 10) is None


def test_a_store_whose_bits_lie_about_completeness_is_not_complete(tmp_path: Path) -> None:
    """The completeness count reads every bit: a missing last (partial-byte) piece or a
    short bitmap keeps the inline path off."""
    c = Content("edge", 9 * P + 1)                              # 10 pieces: a partial last byte
    with make(tmp_path, HonestSource({c.sha1: c})) as cache:
        ref = c.ref()
        cache.open_file(ref)
        assert cache.read(ref, 0, 9 * P) == c.data[: 9 * P]      # pieces 0..8, not 9
        assert cache.read_cached(ref, 0, 10) is None
        h = cache.store._handles[ref.key]
        saved = bytes(h.bits)
        h.bits[:] = bytes([255, 0])                             # pieces 8 and 9 missing
        assert not cache.store._complete(h)
        h.bits[:] = bytes([255])                                # a bitmap one byte short
        assert not cache.store._complete(h)
        h.bits[:] = saved
        assert cache.read(ref, 9 * P, 1) == c.data[-1:]
        assert cache.read_cached(ref, 0, 10) is not None
        cache.close_file(ref)


def test_a_mount_answers_warm_reads_inline_and_only_then(tmp_path: Path) -> None:
    """A real mount (real FUSE, a real HTTP source): a cached file's warm reads are answered
    inline (the status's inline_reads), the bytes right; with KBFS_INLINE_READS=0 none is,
    and a file only partly cached is never answered inline."""
    data = os.urandom(8 << 20)
    part = os.urandom(1 << 20) * 48        # 48 MiB, of which the first mount reads a little
    with HTTPSource() as source:
        write_pointer(source, tmp_path / "src", "f.bin", data)
        write_pointer(source, tmp_path / "src", "part.bin", part)
        with mounted(str(tmp_path / "src"), tmp_path, relays=[source.url]) as m:
            assert read_all(m.path("f.bin")) == data               # cold: fetched and stored
            with open(m.path("part.bin"), "rb") as f:
                assert f.read(4096) == part[:4096]
        fetches = source.counts()["sha1"]

        def inline_reads(env: dict[str, str], name: str, want: bytes) -> int:
            """Read WANT's bytes of NAME through a fresh mount; the daemon's inline reads."""
            with mounted(str(tmp_path / "src"), tmp_path, relays=[source.url], env_extra=env) as m:
                with open(m.path(name), "rb") as f:      # many FUSE reads, after the first
                    assert f.read(len(want)) == want
                time.sleep(2.5)        # the daemon rewrites its status every 2 s

                def cache() -> dict:
                    return json.loads(m.kbfs("status", "--json").stdout)[0]["cache"]

                assert wait_until(lambda: cache()["reads"] > 0, 5, interval=0.25)
                return int(cache()["inline_reads"])

        assert inline_reads({}, "f.bin", data) > 0
        assert source.counts()["sha1"] == fetches                  # all from the store
        assert inline_reads({"KBFS_INLINE_READS": "0"}, "f.bin", data) == 0
        assert inline_reads({}, "part.bin", part[: 4 << 20]) == 0   # pieces present, not all


for _mark in NEEDS_FUSE:   # a list of marks (tests/mountutil.py): FUSE present and usable
    test_a_mount_answers_warm_reads_inline_and_only_then = _mark(test_a_mount_answers_warm_reads_inline_and_only_then)

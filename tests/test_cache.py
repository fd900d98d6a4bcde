"""kbfs.cache over a real kbfs.fetch.Fetcher and real HTTP servers (tests/httpsource.py)."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kbfs import cache as cache_module
from kbfs import fetch, tree
from kbfs.cache import PREFETCH_RUN, REORDER, BlockCache, FileRef, ReadAhead
from kbfs.errors import NotFound, SourceUnavailable, VerificationError
from kbfs.fetch import Fetcher

try:
    from tests.httpsource import HTTPSource, free_port, wait_until
    from tests.pagecache import evict_from_page_cache, resident_pages_of
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from httpsource import HTTPSource, free_port, wait_until  # type: ignore[no-redef]
    from pagecache import evict_from_page_cache, resident_pages_of  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)

BS = 64 << 10
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def short_penalty(monkeypatch):
    monkeypatch.setattr(fetch, "PENALTY", 0.5)


@pytest.fixture
def src():
    with HTTPSource() as s:
        yield s


@pytest.fixture
def data() -> bytes:
    return os.urandom(10 * BS + 777)


def ref_of(info, root: bool = True) -> FileRef:
    return FileRef(info.sha1, info.size, info.root if root else None, info.block_size)


def block_files(directory: Path) -> list[Path]:
    return [p for p in (directory / "blocks").rglob("*")
            if p.is_file() and not p.name.startswith(".")]


@pytest.fixture
def make_cache(tmp_path):
    made: list[BlockCache] = []

    def make(source, capacity: int = 1 << 30, **kw) -> BlockCache:
        kw.setdefault("min_free", 0)
        c = BlockCache(str(tmp_path / "cache"), source, capacity, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_reads_are_byte_exact(src, data, make_cache):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        rng = random.Random(1)
        cases = [(0, 1), (BS - 1, 2), (BS - 3, 3 * BS + 5), (len(data) - 10, 100), (0, len(data)),
                 (len(data), 5), (len(data) + 100, 5), (10 * BS, 777), (5, 0)]
        cases += [(rng.randrange(len(data)), rng.randrange(3 * BS)) for _ in range(40)]
        for offset, length in cases:
            assert cache.read(ref, offset, length) == data[offset:offset + length], (offset, length)
        assert cache.cached_bytes(ref) == len(data)
        assert cache.verified(ref) == "tree"
        st = cache.statistics()
        assert st["bytes_fetched"] == len(data)  # each block fetched exactly once
        assert st["hits"] > 0 and st["misses"] == tree.block_count(len(data), BS)
        for p in block_files(cache_dir(cache)):
            i = int(p.name)
            assert tree.leaf_hash(p.read_bytes()) == info.leaves[i]


def cache_dir(cache: BlockCache) -> Path:
    return Path(cache.directory)


def test_empty_file(src, make_cache):
    info = src.add(b"", block_size=BS)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        assert cache.read(ref_of(info), 0, 100) == b""
        assert Path(cache.local_path(ref_of(info))).read_bytes() == b""
        legacy = ref_of(info, root=False)
        assert Path(cache.local_path(legacy)).read_bytes() == b""
        assert cache.verified(legacy) == "sha1"


def test_default_block_size(src, make_cache):
    data = os.urandom(2 * tree.BLOCK_SIZE + 99)
    info = src.add(data)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        ref = ref_of(info)
        assert cache.read(ref, tree.BLOCK_SIZE - 5, tree.BLOCK_SIZE + 50) == \
            data[tree.BLOCK_SIZE - 5:2 * tree.BLOCK_SIZE + 45]
        assert cache.read(ref, 0, len(data)) == data


def test_offline_after_caching_and_restart(src, data, make_cache, tmp_path):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url], deadline=2) as f:
        cache = make_cache(f)
        assert cache.read(ref, 0, len(data)) == data
        src.mode = "refuse"
        assert cache.read(ref, 123, 4 * BS) == data[123:123 + 4 * BS]
        cache.close()
        again = make_cache(f)  # a restart: everything comes from disk
        assert again.cached_bytes(ref) == len(data)
        assert again.read(ref, 0, len(data)) == data
        other = FileRef("1" * 40, 10, tree.tree_of_bytes(b"0123456789", BS)[1], BS)
        t0 = time.monotonic()
        # Refused connections give SourceUnavailable; a keep-alive connection opened before
        # the refusal may still carry the source's own answer, 404 (NotFound: nobody has it).
        with pytest.raises((SourceUnavailable, NotFound)):
            again.read(other, 0, 10)
        assert time.monotonic() - t0 < 3
        # The source comes back: reads work again by themselves.
        src.mode = "ok"
        src.add(b"0123456789", block_size=BS, sha1="1" * 40)
        time.sleep(fetch.PENALTY + 0.1)
        assert again.read(other, 2, 3) == b"234"


def test_wrong_tree_rejected(src, data, make_cache):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    src.mode = "wrong_tree"
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        with pytest.raises(VerificationError):
            cache.read(ref, 0, 10)
        assert not list((cache_dir(cache) / "trees").rglob("*"))
        assert src.counts().get("sha1", 0) == 0
        src.mode = "ok"  # tried again later, and now it is right
        assert cache.read(ref, 0, 10) == data[:10]


def test_all_sources_lying_nothing_stored(src, data, make_cache):
    info = src.add(data, block_size=BS)
    src.mode = "lie"
    with HTTPSource() as src2, Fetcher([src.url, src2.url]) as f:
        src2.add(data, block_size=BS)
        src2.mode = "lie"
        cache = make_cache(f)
        with pytest.raises(VerificationError):
            cache.read(ref_of(info), BS - 1, 3)
        assert cache.cached_bytes(ref_of(info)) == 0
        assert block_files(cache_dir(cache)) == []


def test_lying_source_skipped(src, data, make_cache):
    info = src.add(data, block_size=BS)
    src.mode = "lie"
    with HTTPSource() as src2, Fetcher([src.url, src2.url]) as f:
        src2.add(data, block_size=BS)
        cache = make_cache(f)
        assert cache.read(ref_of(info), 0, len(data)) == data
        assert f.last_source(info.sha1) == src2.sha1_url(info.sha1)


def test_rootless_content_is_read_whole_once_then_checked(src, data, make_cache):
    info = src.add(data, block_size=BS)
    ref = ref_of(info, root=False)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        assert cache.verified(ref) == "pending"
        # The first read of 3 blocks reads all of it and checks its SHA-1 before answering.
        assert cache.read(ref, 0, 3 * BS) == data[:3 * BS]
        assert cache.verified(ref) == "sha1"
        assert (cache_dir(cache) / "complete" / ref.key).exists()
        assert cache.cached_bytes(ref) == len(data)
        n = src.counts()["sha1"]
        assert cache.read(ref, 3 * BS, len(data)) == data[3 * BS:]
        assert src.counts()["sha1"] == n  # nothing fetched twice
        cache.close()
        again = make_cache(f)  # recorded leaves (fsynced) serve the next process
        assert again.verified(ref) == "sha1"
        assert again.read(ref, 0, len(data)) == data


def test_legacy_consistent_liar_dropped(src, data, make_cache):
    real_sha1 = hashlib.sha1(data).hexdigest()
    fake = os.urandom(len(data))
    info = src.add(fake, block_size=BS, sha1=real_sha1)  # tree and blocks agree, SHA-1 does not
    ref = FileRef(real_sha1, len(data), None, BS)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        with pytest.raises(VerificationError, match=real_sha1):
            cache.read(ref, 0, 10)  # not one byte of it
        assert cache.read_cached(ref, 0, 10) is None
        assert cache.verified(ref) == "pending"
        assert block_files(cache_dir(cache)) == []
        assert not [p for p in (cache_dir(cache) / "blocks").rglob("*") if p.is_file()]
        assert not list((cache_dir(cache) / "trees").rglob("*" + real_sha1 + "*"))
        assert cache.cached_bytes(ref) == 0
        assert cache.statistics()["errors"] >= 1
        with pytest.raises(VerificationError):
            cache.local_path(ref)
    assert info.sha1 == real_sha1


def test_concurrent_readers_share_one_fetch(src, make_cache):
    data = os.urandom(4 * tree.BLOCK_SIZE)
    info = src.add(data)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        cache.read(ref, 0, 1)  # the tree, so only block requests race below
        src.reset_counts()
        barrier = threading.Barrier(12)
        results: list[bytes] = []
        errors: list[BaseException] = []

        def reader(k: int) -> None:
            try:
                barrier.wait()
                off = tree.BLOCK_SIZE * 2 + k * 1000
                results.append(cache.read(ref, off, 5000))
                assert results[-1] == data[off:off + 5000]
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(results) == 12
        assert src.counts().get("sha1") == 1


def test_capacity_eviction_and_pins(src, make_cache):
    a = src.add(os.urandom(20 * BS), block_size=BS)
    b = src.add(os.urandom(5 * BS), block_size=BS)
    with Fetcher([src.url]) as f:
        cache = make_cache(f, capacity=10 * BS)
        rb = ref_of(b)
        cache.open_file(rb)
        assert cache.read(rb, 0, 5 * BS) == b.data
        assert cache.read(ref_of(a), 0, 20 * BS) == a.data
        st = cache.statistics()
        assert st["cached_bytes"] <= 10 * BS
        assert st["evictions"] > 0
        assert cache.cached_bytes(rb) == 5 * BS  # pinned: kept
        on_disk = sum(p.stat().st_size for p in block_files(cache_dir(cache)))
        assert on_disk == st["cached_bytes"]
        # Most recent blocks of A survive; the oldest went first.
        assert (cache_dir(cache) / "blocks" / a.root[:2] / a.root / "19").exists()
        assert not (cache_dir(cache) / "blocks" / a.root[:2] / a.root / "0").exists()
        cache.close_file(rb)
        # Unpinned now: filling the cache again evicts B down to the low-water mark.
        c = src.add(os.urandom(9 * BS), block_size=BS)
        cache.read(ref_of(c), 0, 9 * BS)
        assert cache.cached_bytes(rb) < 5 * BS
        assert cache.statistics()["cached_bytes"] <= 10 * BS


def test_clear_keeps_pinned(src, make_cache):
    a = src.add(os.urandom(3 * BS), block_size=BS)
    b = src.add(os.urandom(3 * BS), block_size=BS)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        cache.read(ref_of(a), 0, 3 * BS)
        cache.read(ref_of(b), 0, 3 * BS)
        cache.open_file(ref_of(b))
        cache.clear()
        assert cache.cached_bytes(ref_of(a)) == 0
        assert cache.cached_bytes(ref_of(b)) == 3 * BS
        assert {p.parent.name for p in block_files(cache_dir(cache))} == {b.root}


def test_store_failure_still_answers(src, data, make_cache):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        d = cache_dir(cache)
        # Tests run as root (chmod does not stop root): make 'blocks' a plain file instead.
        shutil.rmtree(d / "blocks")
        (d / "blocks").write_bytes(b"not a folder")
        assert cache.read(ref, 5, 3 * BS) == data[5:5 + 3 * BS]
        assert cache.statistics()["errors"] >= 1
        assert cache.cached_bytes(ref) == 0
        # The whole folder removed under us: folders are recreated and storing resumes.
        shutil.rmtree(d)
        assert cache.read(ref, 4 * BS, 2 * BS) == data[4 * BS:6 * BS]
        assert cache.cached_bytes(ref) == 2 * BS
        assert len(block_files(d)) == 2


def test_min_free_floor_serves_uncached(src, data, make_cache):
    info = src.add(data, block_size=BS)
    with Fetcher([src.url]) as f:
        cache = make_cache(f, min_free=1 << 60)
        assert cache.read(ref_of(info), 0, len(data)) == data
        assert cache.cached_bytes(ref_of(info)) == 0
        assert cache.statistics()["store_skipped"] > 0


def test_prefetch_and_read_ahead(src, make_cache):
    data = os.urandom(40 * BS)
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        ra = ReadAhead(cache, ref, max_window=8)
        step = BS // 2
        windows = []
        for off in range(0, 8 * step, step):
            assert cache.read(ref, off, step) == data[off:off + step]
            ra.on_read(off, step)
            windows.append(ra.window)
        assert windows == [0, 1, 2, 4, 8, 8, 8, 8]
        assert cache.wait_idle(10)
        # Blocks ahead of the reader are present; nothing was fetched twice.
        assert cache.cached_bytes(ref) >= 12 * BS
        assert cache.statistics()["bytes_fetched"] == cache.cached_bytes(ref)
        ra.on_read(30 * BS, 100)  # a jump resets the window
        assert ra.window == 0
        ra.on_read(35 * BS + 7, 100)
        assert ra.window == 0
        n = src.counts()["sha1"]
        cache.prefetch(ref, 20, 4)
        cache.prefetch(ref, 20, 4)  # already in flight or present: no second request
        assert cache.wait_idle(10)
        assert cache.read(ref, 20 * BS, 4 * BS) == data[20 * BS:24 * BS]
        assert src.counts()["sha1"] - n == 1


def test_prefetch_never_raises(make_cache):
    with Fetcher([f"http://127.0.0.1:{free_port()}"], deadline=1) as f:
        cache = make_cache(f)
        ref = FileRef("2" * 40, 5 * BS, "3" * 64, BS)
        cache.prefetch(ref, 0, 5)
        assert cache.wait_idle(10)
        assert cache.statistics()["errors"] >= 1


def test_local_path(src, data, make_cache):
    info = src.add(data, block_size=BS)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        p = cache.local_path(ref_of(info))
        assert Path(p).read_bytes() == data
        legacy = ref_of(info, root=False)
        assert Path(cache.local_path(legacy)).read_bytes() == data
        assert cache.verified(legacy) == "sha1"


def test_local_candidate_with_relay_down(tmp_path, data, make_cache):
    orig = tmp_path / "orig.dat"
    orig.write_bytes(data)
    leaves, root = tree.tree_of_bytes(data, BS)
    ref = FileRef(hashlib.sha1(data).hexdigest(), len(data), root, BS)
    with Fetcher([f"http://127.0.0.1:{free_port()}"], deadline=3) as f:
        f.add_local_candidate(ref.sha1, str(orig))
        cache = make_cache(f)
        assert cache.read(ref, 100, 5 * BS) == data[100:100 + 5 * BS]
        assert f.last_source(ref.sha1) == str(orig)


CRASH_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from kbfs.cache import BlockCache, FileRef
    from kbfs.fetch import Fetcher
    url, sha1, size, root, bs, directory = sys.argv[1:7]
    ref = FileRef(sha1, int(size), root, int(bs))
    f = Fetcher([url])
    cache = BlockCache(directory, f, 1 << 40, min_free=0, workers=4)
    print("ready", flush=True)
    while True:
        cache.read(ref, 0, ref.size)
        cache.prefetch(ref, 0, ref.blocks)
        cache.clear()
""")


def test_kill_9_leaves_no_bad_block(src, tmp_path):
    bs = 256 << 10
    data = os.urandom(24 * bs)
    info = src.add(data, block_size=bs)
    directory = tmp_path / "crash"
    script = tmp_path / "child.py"
    script.write_text(CRASH_CHILD.format(root=str(ROOT)))
    rng = random.Random()
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), src.url, info.sha1, str(info.size), info.root,
             str(bs), str(directory)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        present = block_files(directory)
        for p in present:
            assert tree.leaf_hash(p.read_bytes()) == info.leaves[int(p.name)], p
    # A fresh cache over the leftovers counts only real blocks and reads right.
    with Fetcher([src.url]) as f:
        cache = BlockCache(str(directory), f, 1 << 40, min_free=0)
        try:
            assert cache.statistics()["cached_bytes"] == sum(
                p.stat().st_size for p in block_files(directory))
            assert cache.read(ref_of(info), 0, info.size) == data
        finally:
            cache.close()


def test_two_caches_share_a_folder(src, data, make_cache):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        one = make_cache(f)
        two = make_cache(f)
        assert one.read(ref, 0, len(data)) == data
        n = src.counts()["sha1"]
        assert two.read(ref, 0, len(data)) == data  # found on disk, not fetched
        assert src.counts()["sha1"] == n
        two.clear()
        assert one.read(ref, 0, len(data)) == data  # vanished files: simply fetched again
        assert wait_until(lambda: one.cached_bytes(ref) == len(data))


# ---------------------------------------------------------------- no fsync: verify on read


def _xattrs_work(directory: Path) -> bool:
    probe = directory / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.kbfs.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def _block_path(cache: BlockCache, sha1: str, index: int) -> Path:
    return cache_dir(cache) / "blocks" / sha1[:2] / sha1 / str(index)  # (a root: the key)


def test_block_of_an_earlier_boot_is_verified_and_refetched_when_bad(src, data, make_cache):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        assert cache.read(ref, 0, len(data)) == data
        cache.close()
        # As after a power cut: the file is there at full size, its bytes are not, and it
        # carries no mark of the current boot.
        bad = _block_path(cache, info.root, 3)
        raw = bytearray(bad.read_bytes())
        raw[100] ^= 0xFF
        bad.write_bytes(bytes(raw))
        for p in block_files(cache_dir(cache)):
            try:
                os.removexattr(p, "user.kbfs.mark")
            except OSError:
                pass
        n = src.counts()["sha1"]
        again = make_cache(f)
        assert again.read(ref, 0, len(data)) == data
        assert again.read(ref, 3 * BS + 5, 10) == data[3 * BS + 5:3 * BS + 15]
        assert src.counts()["sha1"] == n + 1  # only the bad block went over the network
        assert again.statistics()["errors"] >= 1
        assert again.wait_idle(10)
        assert tree.leaf_hash(bad.read_bytes()) == info.leaves[3]


def test_bad_block_copied_by_write_to_is_refetched(src, data, make_cache, tmp_path):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        cache.read(ref, 0, len(data))
        cache.close()
        bad = _block_path(cache, info.root, 1)
        bad.write_bytes(b"\0" * BS)  # right size, wrong bytes...
        try:
            os.removexattr(bad, "user.kbfs.mark")  # ...and no mark of this boot
        except OSError:
            pass
        again = make_cache(f)
        out = tmp_path / "out.bin"
        fd = os.open(out, os.O_RDWR | os.O_CREAT)
        try:
            assert again.write_to(ref, fd, 0, ref.blocks) == len(data)
        finally:
            os.close(fd)
        assert out.read_bytes() == data
        assert again.statistics()["errors"] >= 1


def test_blocks_written_this_boot_are_not_hashed_again(src, data, make_cache, monkeypatch):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        if not _xattrs_work(cache_dir(cache)):
            pytest.skip("no user xattrs on this file system")
        cache.read(ref, 0, len(data))
        cache.close()
        calls = []
        real = tree.block_matches

        def counting(block, leaf):
            calls.append(len(block))
            return real(block, leaf)

        monkeypatch.setattr(tree, "block_matches", counting)
        again = make_cache(f)
        assert again.read(ref, 0, len(data)) == data
        assert calls == []
        # Unmarked (an earlier boot): hashed once in this process, then trusted.
        for p in block_files(cache_dir(cache)):
            os.removexattr(p, "user.kbfs.mark")
        third = make_cache(f)
        assert third.read(ref, 0, len(data)) == data
        assert third.read(ref, 0, len(data)) == data
        assert len(calls) == ref.blocks


def test_read_cached_only_serves_present_verified_blocks(src, data, make_cache):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        assert cache.read_cached(ref, 10, 4096) is None  # missing: never fetched by it
        assert src.counts().get("sha1", 0) == 0
        cache.read(ref, 0, 3 * BS)
        assert cache.read_cached(ref, 10, 4096) == data[10:4106]
        assert cache.read_cached(ref, BS - 5, 10) == data[BS - 5:BS + 5]  # two blocks
        assert cache.read_cached(ref, 2 * BS + 1, 2 * BS) is None  # block 3 is missing
        assert cache.read_cached(ref, len(data), 10) is None
        for off in range(0, 3 * BS, 4096):
            assert cache.read_cached(ref, off, 4096) == data[off:off + 4096]


def test_write_to_mixes_cached_and_fetched_blocks(src, data, make_cache, tmp_path):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f, background_stores=True)
        cache.read(ref, 2 * BS, 3 * BS)
        out = tmp_path / "out.bin"
        fd = os.open(out, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(fd, len(data))
            assert cache.write_to(ref, fd, 6, 100) == len(data) - 6 * BS  # clipped at the end
            assert cache.write_to(ref, fd, 0, 6) == 6 * BS
        finally:
            os.close(fd)
        assert out.read_bytes() == data
        assert cache.wait_idle(10)
        assert cache.cached_bytes(ref) == len(data)
        assert cache.statistics()["bytes_fetched"] == len(data)  # each block once


def test_write_to_without_storing(src, data, make_cache, tmp_path):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        out = tmp_path / "out.bin"
        fd = os.open(out, os.O_RDWR | os.O_CREAT)
        try:
            assert cache.write_to(ref, fd, 0, ref.blocks, store=False) == len(data)
        finally:
            os.close(fd)
        assert out.read_bytes() == data
        assert cache.wait_idle(10)
        assert cache.cached_bytes(ref) == 0 and block_files(cache_dir(cache)) == []


def test_background_stores_serve_at_once_and_store_behind(src, data, make_cache):
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f, background_stores=True)
        assert cache.read(ref, 0, len(data)) == data
        # Read again at once, stores maybe still queued: served from memory or disk,
        # never fetched twice.
        assert cache.read(ref, 0, len(data)) == data
        assert cache.wait_idle(10)
        assert cache.statistics()["bytes_fetched"] == len(data)
        assert cache.cached_bytes(ref) == len(data)
        for p in block_files(cache_dir(cache)):
            assert tree.leaf_hash(p.read_bytes()) == info.leaves[int(p.name)]
        assert not [p for p in (cache_dir(cache) / "blocks").rglob(".*")]  # no temporaries


def test_read_ahead_keeps_a_stream_whose_reads_arrive_out_of_order(src, make_cache):
    """FUSE serves the kernel's read-ahead on several threads, so a stream's reads reach
    the daemon out of order (5-6 blocks seen in a cold 1 GiB stream). Within the window
    that is still the stream: the window is kept; a read beyond it is a jump."""
    data = os.urandom(40 * BS)
    ref = ref_of(src.add(data, block_size=BS))
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        ra = ReadAhead(cache, ref, max_window=8)
        for i in range(5):
            ra.on_read(i * BS, BS)
        assert ra.window == 8
        ra.on_read(11 * BS, BS)  # arrived before 5-10, more than REORDER ahead
        assert REORDER < 11 - 4 <= 8
        for i in range(5, 11):  # the late ones
            ra.on_read(i * BS, BS)
        ra.on_read(12 * BS, BS)
        assert ra.window == 8
        assert cache.statistics()["stream_jumps"] == 0
        ra.on_read(30 * BS, BS)  # beyond the window: a jump
        assert ra.window == 0
        assert cache.statistics()["stream_jumps"] == 1
        ra.on_read(30 * BS + (REORDER + 2) * BS, BS)  # a new stream allows only REORDER
        assert ra.window == 0
        assert cache.wait_idle(10)


def test_read_ahead_tops_up_in_batches(src, make_cache):
    data = os.urandom(64 * BS)
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        ra = ReadAhead(cache, ref, max_window=32)
        for off in range(0, 40 * BS, BS // 2):
            ra.on_read(off, BS // 2)
            assert cache.read(ref, off, BS // 2) == data[off:off + BS // 2]
        assert cache.wait_idle(10)
        assert cache.statistics()["bytes_fetched"] == cache.cached_bytes(ref)
        # Range requests carry several blocks each, not one per block read.
        assert src.counts()["sha1"] <= 40 // 2


def test_free_space_floor_fits_small_file_systems(tmp_path, src, data):
    """A 1 GiB floor on a 64 MiB file system would forbid caching anything at all."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        info = src.add(data, block_size=BS)
        with Fetcher([src.url]) as f:
            cache = BlockCache(str(mnt / "cache"), f, capacity=32 << 20)
            try:
                assert cache.min_free <= (64 << 20) // 20
                assert cache.read(ref_of(info), 0, len(data)) == data
                cache.wait_idle(10)
                assert cache.cached_bytes(ref_of(info)) == len(data)
            finally:
                cache.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_block_deleted_by_another_process_is_fetched_again(src, data, make_cache, monkeypatch):
    """A cached descriptor must not keep serving (and holding the space of) a deleted file
    for longer than FD_RECHECK_SECONDS; until then its old inode serves the right bytes."""
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        assert cache.read(ref, 0, BS) == data[:BS]
        cache.wait_idle(10)
        assert cache.read(ref, 0, 100) == data[:100]  # served through the cached descriptor
        block = cache_dir(cache) / "blocks" / info.root[:2] / info.root / "0"
        assert block.exists()
        before = src.counts().get("sha1", 0)
        block.unlink()  # as another mount's eviction or `kbfs cache clear` would
        monkeypatch.setattr(cache_module, "FD_RECHECK_SECONDS", 3600.0)
        assert cache.read(ref, 0, BS) == data[:BS]  # within the window: the old inode
        assert src.counts().get("sha1", 0) == before and not block.exists()
        monkeypatch.setattr(cache_module, "FD_RECHECK_SECONDS", 0.0)  # the window is over
        assert cache.read(ref, 0, BS) == data[:BS]
        cache.wait_idle(10)
        assert src.counts().get("sha1", 0) > before  # fetched again, not read from the old inode
        assert block.exists()  # and stored again


def block_path(cache: BlockCache, ref: FileRef, index: int) -> Path:
    return cache_dir(cache) / "blocks" / ref.key[:2] / ref.key / str(index)


def resident(cache: BlockCache, ref: FileRef, index: int) -> int:
    """Pages of block INDEX's file in the page cache."""
    return resident_pages_of(block_path(cache, ref, index))


def readable_now(path: Path) -> bool:
    """Whether all of PATH can be read without waiting for the disk (RWF_NOWAIT). Not a
    check that pages are gone: a NOWAIT read that misses starts the kernel's read-ahead."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return os.preadv(fd, [bytearray(size)], 0, os.RWF_NOWAIT) == size
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_read_cached_nowait_serves_only_page_cached_blocks(src, data, make_cache):
    """NOWAIT (the event loop's large reads) never waits for the disk: a block file out of
    the page cache is left to a worker thread, until read-ahead brings it back in."""
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        assert cache.read(ref, 0, 4 * BS) == data[:4 * BS]  # stored through the page cache
        assert cache.read_cached(ref, 0, BS, nowait=True) == data[:BS]
        if not evict_from_page_cache(block_path(cache, ref, 1)):
            pytest.skip("this file system ignores POSIX_FADV_DONTNEED")
        assert cache.read_cached(ref, BS, BS, nowait=True) is None
        assert cache.read_cached(ref, BS, BS) == data[BS:2 * BS]  # blocking: still served
        # Sequential read-ahead over present blocks asks the kernel to read them in.
        assert evict_from_page_cache(block_path(cache, ref, 2))
        cache.prefetch(ref, 1, 2)
        assert cache.wait_idle(10)
        assert wait_until(lambda: readable_now(block_path(cache, ref, 2)), 10)
        assert cache.read_cached(ref, BS, 2 * BS, nowait=True) == data[BS:3 * BS]
        # Into a caller's buffer (the FUSE daemon reuses one), across a block boundary.
        into = memoryview(bytearray(3 * BS))
        got = cache.read_cached(ref, BS + 100, BS + 5, nowait=True, into=into)
        assert got == data[BS + 100:2 * BS + 105]
        assert src.counts()["sha1"] == 1  # nothing was fetched again


def test_read_through_brings_blocks_in_by_reading_them(src, make_cache, monkeypatch, caplog):
    """A downloader's read-ahead (`advise(read_through=True)`) reads block files that are
    out of memory through the read path, not with a WILLNEED hint (which fills the page
    cache with 4 KiB pages: see BlockCache._advise). With the hint made to fail, the
    blocks come in all the same; the plain hint then brings nothing (the test can fail)."""
    n = 6
    data = os.urandom(n * BS)
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        assert cache.read(ref, 0, len(data)) == data
        os.sync()
        pages = BS // mmap.PAGESIZE

        def no_hints(fd: int, offset: int, length: int, advice: int) -> None:
            raise OSError(95, "no hints here")

        for i in range(1, n):
            if not evict_from_page_cache(block_path(cache, ref, i)):
                pytest.skip("this file system ignores POSIX_FADV_DONTNEED")
        monkeypatch.setattr(os, "posix_fadvise", no_hints)  # kbfs.cache's os is this os
        cache.advise(ref, [0, 1, 2], read_through=True)
        cache.advise(ref, [3, 4, 5])
        assert cache.wait_idle(10)
        assert [resident(cache, ref, i) for i in range(n)] == [pages] * 3 + [0] * 3
        cache.advise(ref, [0, 1, 2], read_through=True)  # all in memory: nothing to read
        assert cache.wait_idle(10)
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
        assert cache.read(ref, 0, len(data)) == data


def test_drop_behind_releases_block_pages_a_stream_has_passed(src, make_cache):
    """The mount's reader keeps the bytes in the FUSE file's page cache: behind a sequential
    stream the block files' own pages go (one copy in memory, not two); blocks the stream
    jumped over, and those it has just read, stay."""
    n = 64
    data = os.urandom(n * BS)
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        assert cache.read(ref, 0, len(data)) == data  # stored through the page cache
        os.sync()  # clean pages: the kernel drops only those
        fetches = src.counts()["sha1"]

        def stream(ra: ReadAhead, first: int, last: int) -> None:
            for off in range(first * BS, last * BS, BS // 2):
                ra.on_read(off, BS // 2)
                assert cache.read(ref, off, BS // 2) == data[off:off + BS // 2]
            assert cache.wait_idle(10)

        pages = BS // mmap.PAGESIZE
        stream(ReadAhead(cache, ref, max_window=8), 0, n)  # without: everything stays
        assert all(resident(cache, ref, i) == pages for i in range(n))

        ra = ReadAhead(cache, ref, max_window=8, drop_behind=True)
        stream(ra, 0, 16)
        stream(ra, 32, n)  # a jump over blocks 16-31
        # Released in batches of PREFETCH_RUN, once more than REORDER blocks behind.
        lag = REORDER + 1 + PREFETCH_RUN
        released = [*range(0, 16 - lag), *range(32, n - lag)]
        assert wait_until(lambda: all(resident(cache, ref, i) == 0 for i in released), 10), \
            [(i, resident(cache, ref, i)) for i in released if resident(cache, ref, i)]
        kept = [*range(16, 32), *range(n - REORDER - 1, n)]
        assert all(resident(cache, ref, i) == pages for i in kept)
        # Released blocks still read right (from the disk, through a worker's pread).
        assert cache.read(ref, 0, 2 * BS) == data[:2 * BS]
        assert src.counts()["sha1"] == fetches  # nothing was fetched again


def test_read_ahead_blocks_in_memory_are_served_without_a_fetch(src, make_cache):
    data = os.urandom(24 * BS)
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f, background_stores=True)
        cache.prefetch(ref, 0, 8)
        assert cache.wait_idle(10)
        # Held in memory for their reader (and written to disk past the page cache).
        for off in range(0, 8 * BS, BS // 2):
            assert cache.read_cached(ref, off, BS // 2, nowait=True) == data[off:off + BS // 2]
        assert cache.read_buffer(ref, 3 * BS, BS) == data[3 * BS:4 * BS]


def test_read_ahead_blocks_written_direct_are_exact(src, make_cache, tmp_path):
    """Read-ahead stores write straight from the fetched run's memory (O_DIRECT where the
    file system has it); a fresh cache reads back exactly the source's bytes."""
    data = os.urandom(20 * BS + 100)  # the short last block is written buffered
    info = src.add(data, block_size=BS)
    ref = ref_of(info)
    with Fetcher([src.url]) as f:
        cache = make_cache(f, background_stores=True)
        cache.prefetch(ref, 0, ref.blocks)
        assert cache.wait_idle(10)
        assert cache.cached_bytes(ref) == len(data)
        for i in range(ref.blocks):
            assert block_path(cache, ref, i).read_bytes() == data[i * BS:(i + 1) * BS]
    with Fetcher([f"http://127.0.0.1:{free_port()}"], deadline=1) as offline:
        again = make_cache(offline)
        assert again.read(ref, 0, len(data)) == data


def test_reopened_cache_accounts_every_block(src, make_cache):
    """Opening a cache folder stats two block files per content, not every block: the
    bytes it accounts are still exact (short last blocks, partly cached contents), and a
    block file of the wrong size is caught when it is read, then fetched again."""
    a = os.urandom(9 * BS + 123)
    b = os.urandom(3 * BS)
    ia, ib = src.add(a, block_size=BS), src.add(b, block_size=BS)
    ra, rb = ref_of(ia), ref_of(ib)
    with Fetcher([src.url]) as f:
        cache = make_cache(f)
        cache.read(ra, 2 * BS, 8 * BS)  # blocks 2-9: the short last block among them
        cache.read(rb, 0, BS)
        assert cache.wait_idle(10)
        cache.close()
        again = make_cache(f)
        assert again.cached_bytes(ra) == 7 * BS + 123
        assert again.cached_bytes(rb) == BS
        assert again.statistics()["cached_bytes"] == 8 * BS + 123
        again.close()
        # A middle block cut short behind the cache's back (it is never written so).
        with open(block_path(again, ra, 5), "r+b") as fh:
            fh.truncate(BS - 1)
        third = make_cache(f)
        assert third.cached_bytes(ra) == 7 * BS + 123  # not stat'ed when opening
        n = src.counts()["sha1"]
        assert third.read(ra, 5 * BS, BS) == a[5 * BS:6 * BS]
        assert src.counts()["sha1"] == n + 1  # caught on reading, fetched again
        assert third.wait_idle(10)
        assert third.cached_bytes(ra) == 7 * BS + 123
        assert block_path(third, ra, 5).stat().st_size == BS

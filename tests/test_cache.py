"""The one cache (kbfs.piececache over kbfs.piecestore) for every pointer kind, over a real
kbfs.fetch.Fetcher and real HTTP servers (tests/httpsource.py), and real `kbfs cat`
processes killed with SIGKILL for the crash rule.

What it pins: content identity is `FileRef.key` (the root, or s1-SHA1-SIZE); a pointer
sharing a SHA-1 with another never shares its pieces; v1 pointers read in pieces of their
own block size by their leaf list; root-less content gives no byte before the whole file
matched its SHA-1, and nothing of it counts as present before that; capacity is LRU over
contents with open files held and a free-space floor; the cache folder is 0700, its files
0600, a symlink for it is refused; a kill -9 during reads never leaves a piece present
that does not verify.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kbfs import piecestore
from kbfs.errors import CacheError, VerificationError
from kbfs.fetch import Fetcher
from kbfs.fileref import FileRef
from kbfs.piececache import PieceCache

try:
    from tests import hostile_pointers as hp
    from tests.httpsource import HTTPSource
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import hostile_pointers as hp  # type: ignore[no-redef]
    from httpsource import HTTPSource  # type: ignore[no-redef]

MiB = 1 << 20
P = 64 << 10
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def src() -> Any:
    with HTTPSource() as s:
        yield s


@pytest.fixture
def fetcher(src: HTTPSource) -> Any:
    with Fetcher([src.url], deadline=5) as f:
        yield f


def make(tmp_path: Path, source: Any, capacity: int = 1 << 30, **kw: Any) -> PieceCache:
    return PieceCache(str(tmp_path / "cache" / "pieces"), source, capacity,
                      **{"min_free": 0, "flush_interval": 0.2, **kw})


def test_content_identity_is_the_root_or_sha1_and_size() -> None:
    sha1, root = "ab" * 20, "cd" * 32
    assert FileRef(sha1, 10, root, MiB).key == root
    assert FileRef(sha1, 10, None).key == f"s1-{sha1}-10"
    assert FileRef(sha1.upper(), 10, None).key == f"s1-{sha1}-10"
    assert FileRef(sha1, 10, None, P).key == f"s1-{sha1}-10-{P}"
    for bad in [("zz" * 20, 1, None), (sha1, -1, None), (sha1, 1, "x" * 64), (sha1, 1, "../" * 22),
                (sha1 + "0", 1, None), (sha1, 1, None, 0)]:
        with pytest.raises(ValueError):
            FileRef(*bad)  # type: ignore[arg-type]


def test_v1_content_reads_in_its_own_blocks_by_its_leaf_list(tmp_path: Path, src: HTTPSource,
                                                              fetcher: Fetcher) -> None:
    data = random.Random(1).randbytes(5 * MiB + 7)
    info = src.add(data)          # 1 MiB leaves
    ref = FileRef(info.sha1, info.size, info.root, MiB)
    with make(tmp_path, fetcher) as cache:
        assert cache.read(ref, 2 * MiB + 5, 100) == data[2 * MiB + 5:2 * MiB + 105]
        st = cache.statistics()
        assert st["leaf_lists_fetched"] == 1 and st["proof_fetches"] == 0
        assert cache.store.ranges(ref.key) == [(2, 2)]        # one piece: one 1 MiB block
        assert cache.read(ref, 0, len(data)) == data
        assert src.counts().get("tree", 0) == 1               # the leaf list once
    with make(tmp_path, fetcher) as again:                    # a new process: the hint
        assert again.read(ref, 0, len(data)) == data
        assert again.statistics()["leaf_lists_fetched"] == 0 and src.counts().get("tree", 0) == 1


def test_a_lying_v1_source_gives_an_error_and_stores_nothing(tmp_path: Path, src: HTTPSource,
                                                            fetcher: Fetcher) -> None:
    data = random.Random(2).randbytes(3 * MiB)
    info = src.add(data)
    ref = FileRef(info.sha1, info.size, info.root, MiB)
    with make(tmp_path, fetcher) as cache:
        src.mode = "wrong_tree"
        with pytest.raises(VerificationError):
            cache.read(ref, 0, 10)
        src.mode = "lie"
        with pytest.raises(VerificationError):
            cache.read(ref, 0, 10)
        assert cache.store.ranges(ref.key) == []
        src.mode = "ok"
        assert cache.read(ref, 0, len(data)) == data


def test_a_pointer_sharing_a_sha1_never_shares_pieces(tmp_path: Path, src: HTTPSource,
                                                      fetcher: Fetcher) -> None:
    """Y served under X's SHA-1 with Y's own root: its pieces are kept under Y's root and
    the real pointer of X still reads X (from the honest source), at any block size."""
    x, y = os.urandom(2 * MiB + 5), os.urandom(2 * MiB + 5)
    with make(tmp_path, fetcher) as cache:
        iy = src.add(y, sha1=hashlib.sha1(x).hexdigest())
        fake = FileRef(iy.sha1, iy.size, iy.root, MiB)
        assert cache.read(fake, 0, len(y)) == y
        ix = src.add(x)
        real = FileRef(ix.sha1, ix.size, ix.root, MiB)
        assert real.sha1 == fake.sha1 and real.key != fake.key
        assert cache.read(real, 0, len(x)) == x
        rootless = FileRef(ix.sha1, ix.size, None)
        assert cache.read(rootless, 0, len(x)) == x          # its own key again
        assert len({real.key, fake.key, rootless.key}) == 3


def test_rootless_nothing_counts_before_the_whole_sha1_matched(tmp_path: Path, src: HTTPSource,
                                                               fetcher: Fetcher) -> None:
    real = os.urandom(3 * MiB + 11)
    sha1 = hashlib.sha1(real).hexdigest()
    ref = FileRef(sha1, len(real), None)
    with make(tmp_path, fetcher) as cache:
        src.add(os.urandom(len(real)), sha1=sha1)          # a consistent liar
        with pytest.raises(VerificationError, match=sha1):
            cache.read(ref, 0, 10)
        assert cache.store.ranges(ref.key) == [] and cache.verified(ref) == "pending"
        assert os.listdir(tmp_path / "cache" / "pieces" / "staging") == []
        src.add(real)
        seen: list[tuple[int, list[Any]]] = []

        def sink(offset: int, data: memoryview) -> None:   # during the pass: nothing present
            cache.store.flush()
            seen.append((offset, cache.store.ranges(ref.key)))

        assert cache.check_whole(ref, sink) is True
        assert seen and all(r == [] for _, r in seen)
        assert cache.verified(ref) == "sha1" and cache.check_whole(ref) is False
        assert cache.read(ref, 0, len(real)) == real
        cache.store.flush()
        assert cache.store.ranges(ref.key) == [(0, 3)]
    with make(tmp_path, fetcher, capacity=1 << 30) as again:   # recorded: no second pass
        again.store.evict_to(0)                          # pieces (and record) gone ...
        n = src.counts().get("sha1", 0)
        assert again.read(ref, MiB, 10) == real[MiB:MiB + 10]   # ... proven again, whole
        assert again.statistics()["whole_passes"] == 1 and src.counts()["sha1"] > n


def test_rootless_pieces_fetched_later_are_checked_against_the_recorded_leaves(
        tmp_path: Path, src: HTTPSource, fetcher: Fetcher) -> None:
    real = os.urandom(4 * MiB)
    ref = FileRef(hashlib.sha1(real).hexdigest(), len(real), None)
    src.add(real)
    with make(tmp_path, fetcher, capacity=2 * MiB) as cache:   # no room for all of it
        assert cache.read(ref, 0, 10) == real[:10]
        assert cache.verified(ref) == "sha1"
        src.mode = "lie"
        missing = [i for i in range(4) if cache.store.missing(ref.key, i, i)]
        if missing:
            with pytest.raises(VerificationError):
                cache.read(ref, missing[0] * MiB, 10)
        src.mode = "ok"
        assert cache.read(ref, 0, len(real)) == real


def test_capacity_is_lru_over_contents_and_open_files_are_held(tmp_path: Path, src: HTTPSource,
                                                                fetcher: Fetcher) -> None:
    blobs = [os.urandom(2 * MiB) for _ in range(3)]
    refs = []
    for b in blobs:
        info = src.add(b, block_size=P)
        refs.append(FileRef(info.sha1, info.size, info.root, P))
    with make(tmp_path, fetcher, capacity=5 * MiB) as cache:
        a, b, c = refs
        cache.open_file(b)
        assert cache.read(b, 0, 2 * MiB) == blobs[1]
        assert cache.read(a, 0, 2 * MiB) == blobs[0]
        cache.store.flush()
        assert cache.read(c, 0, 2 * MiB) == blobs[2]
        cache.store.flush()
        assert cache.cached_bytes(a) == 0                 # least recently used: gone
        assert cache.cached_bytes(b) == 2 * MiB           # older, but open: held
        assert cache.cached_bytes(c) == 2 * MiB
        cache.close_file(b)
        assert cache.read(a, 0, 2 * MiB) == blobs[0]
        cache.store.flush()
        assert cache.cached_bytes(b) == 0                 # released: evictable again
        assert cache.store.statistics()["used"] <= 5 * MiB


def test_below_the_free_space_floor_reads_are_served_uncached(tmp_path: Path, src: HTTPSource,
                                                               fetcher: Fetcher,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(MiB)
    info = src.add(data)
    ref = FileRef(info.sha1, info.size, info.root, MiB)
    with make(tmp_path, fetcher, min_free=1 << 20) as cache:
        monkeypatch.setattr(piecestore, "disk_space", lambda path: (1 << 19, 1 << 40))
        assert cache.read(ref, 0, MiB) == data
        assert cache.cached_bytes(ref) == 0 and cache.store.statistics()["refused"] >= 1


def test_the_cache_folder_is_private(tmp_path: Path, src: HTTPSource, fetcher: Fetcher) -> None:
    (tmp_path / "cache").mkdir(mode=0o755)
    (tmp_path / "cache").chmod(0o755)
    data = os.urandom(MiB + 5)
    info = src.add(data)
    with make(tmp_path, fetcher) as cache:
        assert cache.read(FileRef(info.sha1, info.size, info.root, MiB), 0, len(data)) == data
    for p in [tmp_path / "cache", *(tmp_path / "cache").rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert mode & 0o077 == 0, (p, oct(mode))
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(CacheError):
        PieceCache(str(tmp_path / "link" / "pieces"), fetcher, 1 << 20)


# ---- crash safety: kill -9 during reads by a real reader, then every piece claimed verifies

_KINDS = {"v2": P, "v1": MiB, "rootless": None}


@pytest.mark.parametrize("kind", list(_KINDS))
def test_kill_9_during_reads_never_leaves_a_bad_piece(tmp_path: Path, kind: str) -> None:
    data = random.Random(kind).randbytes(20 * MiB + 333)   # more than one 16 MiB demand run
    bs = _KINDS[kind]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), KBFS_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO))
    with HTTPSource() as src:
        info = src.add(data, block_size=bs or MiB)
        src.proofs = "ok"
        if bs is None:
            ptr = hp.write(tmp_path / "x.prv", hp.rootless_of(info.sha1, len(data)))
        else:
            from kbfs import prv
            ptr = hp.write(tmp_path / "x.prv", prv.Pointer(
                info.sha1, info.size, "", "", prv.PRV_VERSION, prv.TreeRef(info.root, bs)))
        ref = FileRef(info.sha1, info.size, None if bs is None else info.root, bs or MiB)
        src.mode, src.trickle_rate = "trickle", 8 * MiB
        rng = random.Random(99)
        ever: list[tuple[int, int]] = []
        for k in range(3):
            proc = subprocess.Popen([sys.executable, "-m", "kbfs", "cat", ptr, "--relay", src.url,
                                     "--no-local"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(2.5, 4.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            store = piecestore.PieceStore(str(tmp_path / "cache" / "pieces"), 1 << 40, 0)
            try:
                claimed = store.ranges(ref.key)
                for a, b in claimed:   # every piece the store claims holds the true bytes
                    lo, hi = a * ref.block_size, min((b + 1) * ref.block_size, len(data))
                    assert store.read(ref.key, lo, hi - lo) == data[lo:hi], (k, a, b)
                ever.extend(claimed)
            finally:
                store.close()
        src.mode = "ok"
        if bs is not None:
            assert ever, "no kill came after a commit: the test proved nothing"
        got = subprocess.run([sys.executable, "-m", "kbfs", "cat", ptr, "--relay", src.url,
                              "--no-local"], env=env, capture_output=True, timeout=120)
        assert got.returncode == 0 and got.stdout == data, got.stderr.decode()[-500:]

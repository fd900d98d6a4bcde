"""Attacks on the reader's cache and downloads (issue 14, items 1, 2, 5, 11, 15), each
with real processes where the attack needs them.

- a pointer with a real file's SHA-1, another size and its own root, served by a fake
  source, must not poison what the real pointer reads afterwards on the same cache;
- a leaf list kept in the cache and changed on disk must not make a wrong byte count (the
  block cache's keyed marks went with its block files: the piece store's crash rule, bits
  committed only after the bytes are durable, replaces them);
- a cache folder of the block cache's layout is discarded with one log line;
- root-less content from a source lying consistently (tree and blocks agree, SHA-1 does
  not) gives no byte at all, and the honest source works afterwards;
- a local copy is used only once it matched everything the pointer says;
- a symlink planted as a download's part file is not written through;
- another local user reads nothing of the cache (0700 folders, 0600 files).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import hostile_pointers as hp
import pytest
from httpsource import HTTPSource
from netutil import start_relay, start_share

from kbfs import client, prv, tree
from kbfs.errors import CacheError, KbfsError, VerificationError
from kbfs.fetch import Fetcher
from kbfs.fileref import FileRef
from kbfs.piececache import PieceCache

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BS = 64 << 10


def kb(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run `kbfs ARGS` as a user with an empty config (bytes out: stdout is data)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "kbfs", *args], env=env, capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode().strip()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def block_files_of(cache_dir: Path) -> list[Path]:
    """Every data file of the piece store under CACHE_DIR/pieces/data (a content that got
    pieces) and every staging file (a root-less pass under way)."""
    root = cache_dir / "pieces"
    return sorted(p for sub in ("data", "staging") for p in (root / sub).rglob("*") if p.is_file())


def BlockCache(directory: str, source: object, capacity: int) -> PieceCache:  # noqa: N802
    """The one cache over DIRECTORY (its store in DIRECTORY/pieces, as kbfs.client makes it)."""
    return PieceCache(os.path.join(directory, "pieces"), source, capacity, min_free=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- item 1: same SHA-1


def test_pointer_with_a_real_sha1_and_its_own_root_cannot_poison_the_real_one(
        tmp_path: Path) -> None:
    """Attack: the fake pointer (X's SHA-1, Y's size and root) is read once from a fake
    source; then the real pointer of X is downloaded and realized on the same cache.
    Before the fix the download exited 0 with Y's first block in place of X's."""
    data_dir = tmp_path / "share"
    data_dir.mkdir()
    x = os.urandom(3 * MiB + 5)
    (data_dir / "x.bin").write_bytes(x)
    real = prv.create_pointer(data_dir / "x.bin")
    real = prv.Pointer(real.sha1, real.size, real.fcs, "", real.prv_version, real.tree)
    real_ptr = hp.write(tmp_path / "x.bin.prv", real)
    y = os.urandom(2 * MiB + 77)
    fake = hp.same_sha1_other_content(real, y)
    fake_ptr = hp.write(tmp_path / "fake.prv", fake)
    cache = tmp_path / "cache"
    with HTTPSource() as evil:  # the fake share's --listen server: serves Y as X's SHA-1
        evil.add(y, sha1=real.sha1)
        got = kb(tmp_path, "cat", fake_ptr, "--relay", evil.url, "--cache-dir", str(cache))
        assert got.returncode == 0, got.stderr.decode()
        assert got.stdout == y  # what the fake pointer commits to: nothing wrong with that
    with start_relay(tmp_path) as relay, start_share(data_dir, relay.url, tmp_path):
        out = tmp_path / "out.bin"
        got = kb(tmp_path, "download", real_ptr, "--relay", relay.url, "--cache-dir", str(cache),
                 "-o", str(out))
        assert got.returncode == 0, got.stderr.decode()
        assert out.read_bytes() == x
        got = kb(tmp_path, "cat", real_ptr, "--relay", relay.url, "--cache-dir", str(cache),
                 "--length", str(MiB + 3))
        assert got.stdout == x[:MiB + 3]
        path = client.realize(real_ptr, relays=[relay.url], cache_dir=str(cache), local=False)
        assert Path(path).read_bytes() == x
        assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_real_root_with_another_size_fails_and_spares_the_real_blocks(tmp_path: Path) -> None:
    data = os.urandom(6 * BS + 100)
    with HTTPSource() as src, Fetcher([src.url], deadline=3) as f:
        info = src.add(data, block_size=BS)
        cache = BlockCache(str(tmp_path / "c"), f, 1 << 30)
        real = FileRef(info.sha1, info.size, info.root, BS)
        assert cache.read(real, 0, len(data)) == data
        odd = FileRef(info.sha1, 5 * BS + 10, info.root, BS)  # the same root, another size
        with pytest.raises(VerificationError):
            cache.read(odd, 5 * BS, 10)
        cache.close()
        again = BlockCache(str(tmp_path / "c"), f, 1 << 30)  # a new process: nothing in memory
        with pytest.raises(KbfsError):  # no tree of this size to be had (or it fails the root)
            again.read(odd, 5 * BS, 10)
        n = src.counts().get("sha1", 0)
        assert again.read(real, 0, len(data)) == data
        assert src.counts().get("sha1", 0) == n  # the real blocks were all kept
        again.close()


def test_a_stored_leaf_list_changed_on_disk_is_refetched_never_trusted(tmp_path: Path) -> None:
    """Attack: the leaf list a v1 read kept in the cache (a store node hint) is replaced by
    the leaves of other bytes served by a source that agrees with them. A new process must
    check the hint against the pointer's root, fetch the real list and serve X's bytes."""
    x, y = os.urandom(3 * MiB + 5), os.urandom(3 * MiB + 5)
    with HTTPSource() as src, Fetcher([src.url], deadline=3) as f:
        info = src.add(x)
        ref = FileRef(info.sha1, info.size, info.root, MiB)
        cache = BlockCache(str(tmp_path / "c"), f, 1 << 30)
        assert cache.read(ref, 0, 10) == x[:10]
        assert cache.store.get_nodes(ref.key, "leaves") is not None
        forged = b"".join(tree.leaf_hash(y[i:i + MiB]) for i in range(0, len(y), MiB))
        cache.store.put_nodes(ref.key, "leaves", forged)
        cache.close()
        src.add(y, sha1=info.sha1)     # the source now serves Y under X's SHA-1 ...
        src.add(x)                     # ... and X again (the last added wins the tree)
        again = BlockCache(str(tmp_path / "c"), f, 1 << 30)
        assert again.read(ref, MiB, 2 * MiB + 5) == x[MiB:]
        assert again.store.get_nodes(ref.key, "leaves") != forged   # replaced by the real one
        again.close()


def test_a_cache_of_the_old_layout_is_discarded(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    data = os.urandom(2 * BS)
    sha1 = hashlib.sha1(data).hexdigest()
    d = tmp_path / "c"
    (d / "blocks" / sha1[:2] / sha1).mkdir(parents=True)
    (d / "blocks" / sha1[:2] / sha1 / "0").write_bytes(b"\0" * BS)  # wrong, but "ours"
    (d / "trees" / sha1[:2]).mkdir(parents=True)
    (d / "trees" / sha1[:2] / sha1).write_bytes(b"\0" * 64)
    (d / "complete").mkdir()
    (d / "complete" / sha1).write_bytes(b"")
    with HTTPSource() as src, Fetcher([src.url], deadline=3) as f:
        info = src.add(data, block_size=BS)
        (d / "layout").write_bytes(b"kbfs-cache 2")
        (d / "mark.key").write_bytes(os.urandom(32))
        with caplog.at_level(logging.INFO):
            cache = BlockCache(str(d), f, 1 << 30)
        lines = [r for r in caplog.records if "old block cache" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING, caplog.text
        assert sorted(os.listdir(d)) == ["pieces"]
        assert not (d / "blocks" / sha1[:2] / sha1).exists()
        assert not (d / "complete" / sha1).exists()
        assert cache.read(FileRef(sha1, len(data), None, BS), 0, 10) == data[:10]
        assert cache.read(FileRef(sha1, len(data), info.root, BS), 0, 2 * BS) == data
        cache.close()


# ---------------------------------------------------------------- item 2: root-less


def test_rootless_content_from_a_consistent_liar_gives_no_byte(tmp_path: Path) -> None:
    """Attack: a source serves other bytes under the pointer's SHA-1 with a tree that
    matches them. Before the fix `kbfs cat --length 10` printed the liar's first 10
    bytes and exited 0 (the SHA-1 was checked later, in the background)."""
    real = os.urandom(3 * MiB + 11)
    sha1 = hashlib.sha1(real).hexdigest()
    ptr = hp.write(tmp_path / "old.prv", hp.rootless_of(sha1, len(real)))
    cache = tmp_path / "cache"
    with HTTPSource() as src:
        src.add(os.urandom(len(real)), sha1=sha1)
        got = kb(tmp_path, "cat", ptr, "--length", "10", "--relay", src.url,
                 "--cache-dir", str(cache))
        assert got.stdout == b""
        line = one_line(got)
        assert sha1 in line and "SHA-1" in line, line
        assert block_files_of(cache) == []
        src.add(real)  # now honest
        got = kb(tmp_path, "cat", ptr, "--length", "10", "--relay", src.url,
                 "--cache-dir", str(cache))
        assert got.returncode == 0, got.stderr.decode()
        assert got.stdout == real[:10]
        out = tmp_path / "out"
        got = kb(tmp_path, "download", ptr, "--relay", src.url, "--cache-dir", str(cache),
                 "-o", str(out))
        assert got.returncode == 0, got.stderr.decode()
        assert out.read_bytes() == real


def test_rootless_download_from_a_consistent_liar_leaves_nothing(tmp_path: Path) -> None:
    real = os.urandom(2 * MiB + 3)
    sha1 = hashlib.sha1(real).hexdigest()
    ptr = hp.write(tmp_path / "old.prv", hp.rootless_of(sha1, len(real)))
    with HTTPSource() as src:
        src.add(os.urandom(len(real)), sha1=sha1)
        out = tmp_path / "out"
        got = kb(tmp_path, "download", ptr, "--relay", src.url, "--cache-dir",
                 str(tmp_path / "cache"), "-o", str(out))
        assert sha1 in one_line(got)
        assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]


# ---------------------------------------------------------------- item 5: local copies


def test_local_copy_must_match_the_root_at_the_pointers_block_size(tmp_path: Path) -> None:
    """Attack: a pointer with a real file's SHA-1 and size but a root of other bytes (at a
    block size other than the default) names that file as its original. Before the fix
    the local copy was used on SHA-1 + size alone and `kbfs cat` printed it."""
    x = os.urandom(200_000)
    orig = tmp_path / "orig.bin"
    orig.write_bytes(x)
    _, other_root = tree.tree_of_bytes(os.urandom(len(x)), BS)
    p = prv.Pointer(hashlib.sha1(x).hexdigest(), len(x), "", str(orig), prv.PRV_VERSION,
                    prv.TreeRef(other_root, BS))
    ptr = hp.write(tmp_path / "p.prv", p)
    got = kb(tmp_path, "cat", ptr, "--cache-dir", str(tmp_path / "cache"))
    assert got.stdout == b""
    one_line(got)
    # The honest pointer at that block size does use it.
    _, root = tree.tree_of_bytes(x, BS)
    ok = hp.write(tmp_path / "ok.prv", prv.Pointer(p.sha1, p.size, "", str(orig),
                                                    prv.PRV_VERSION, prv.TreeRef(root, BS)))
    got = kb(tmp_path, "cat", ok, "--cache-dir", str(tmp_path / "cache"))
    assert got.returncode == 0 and got.stdout == x


def test_rootless_pointer_naming_another_file_of_that_size_is_not_used(tmp_path: Path) -> None:
    x = os.urandom(300_000)
    other = tmp_path / "private.bin"
    other.write_bytes(os.urandom(len(x)))
    other.chmod(0o600)
    ptr = hp.write(tmp_path / "p.prv", hp.rootless_of(hashlib.sha1(x).hexdigest(), len(x),
                                                     str(other)))
    got = kb(tmp_path, "cat", ptr, "--cache-dir", str(tmp_path / "cache"))
    assert got.stdout == b""
    one_line(got)
    r = client.resolve(ptr, cache_dir=str(tmp_path / "cache"), relays=[])
    assert client.get_client(cache_dir=str(tmp_path / "cache"), relays=[]).local_copies(r) == []


def test_rootless_local_candidate_of_other_content_gives_no_byte(tmp_path: Path) -> None:
    """The mount's way to a local file (`Fetcher.add_local_candidate`): before the fix the
    cache took the tree of the file itself and served its bytes for the pointer."""
    x = os.urandom(5 * BS + 9)
    other = tmp_path / "private.bin"
    other.write_bytes(os.urandom(len(x)))
    other.chmod(0o600)
    sha1 = hashlib.sha1(x).hexdigest()
    with Fetcher([], deadline=2) as f:
        f.add_local_candidate(sha1, str(other))
        cache = BlockCache(str(tmp_path / "c"), f, 1 << 30)
        with pytest.raises(VerificationError, match=sha1):
            cache.read(FileRef(sha1, len(x), None, BS), 0, 10)
        assert block_files_of(tmp_path / "c") == []
        cache.close()


# ---------------------------------------------------------------- item 11: part files


def test_symlink_planted_as_the_part_file_is_not_written_through(tmp_path: Path) -> None:
    """Attack: another user plants `.x.kbfs-part -> victim` in a shared folder. Before the
    fix the download opened it with O_CREAT (following the link) and overwrote victim."""
    data = os.urandom(MiB + 17)
    with HTTPSource() as src:
        info = src.add(data)
        p = prv.Pointer(info.sha1, info.size, "", "", prv.PRV_VERSION, prv.TreeRef(info.root))
        ptr = hp.write(tmp_path / "x.prv", p)
        shared = tmp_path / "common-folder"
        shared.mkdir()
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious\n")
        (shared / ".x.kbfs-part").symlink_to(victim)
        got = kb(tmp_path, "download", ptr, "--relay", src.url, "--cache-dir",
                 str(tmp_path / "cache"), "-o", str(shared / "x"))
        assert "symbolic link" in one_line(got)
        assert victim.read_bytes() == b"precious\n"
        assert not (shared / "x").exists()
        # A part file of another user's is not resumed from either.
        (shared / ".x.kbfs-part").unlink()
        planted = shared / ".x.kbfs-part"
        planted.write_bytes(data[:1000])
        os.chown(planted, 65534, 65534)
        got = kb(tmp_path, "download", ptr, "--relay", src.url, "--cache-dir",
                 str(tmp_path / "cache"), "-o", str(shared / "x"))
        assert "another user" in one_line(got)
        planted.unlink()
        got = kb(tmp_path, "download", ptr, "--relay", src.url, "--cache-dir",
                 str(tmp_path / "cache"), "-o", str(shared / "x"))
        assert got.returncode == 0, got.stderr.decode()
        assert (shared / "x").read_bytes() == data


# ---------------------------------------------------------------- item 15: other users


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user may enter (pytest's tmp_path is 0700: it would hide the cache
    from other users whatever the cache's own modes)."""
    d = Path(tempfile.mkdtemp(prefix="kbfs-sec-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_another_local_user_reads_nothing_of_the_cache(tmp_path: Path, open_dir: Path) -> None:
    """Attack: user nobody reads a cached block of private data. Before the fix the cache
    folder was 0755 and its files 0644: `cat BLOCKFILE` printed the data."""
    data = os.urandom(MiB + 5)
    cache = open_dir / "cache"
    with HTTPSource() as src:
        info = src.add(data)
        p = prv.Pointer(info.sha1, info.size, "", "", prv.PRV_VERSION, prv.TreeRef(info.root))
        ptr = hp.write(tmp_path / "x.prv", p)
        got = kb(tmp_path, "cat", ptr, "--relay", src.url, "--cache-dir", str(cache))
        assert got.returncode == 0 and got.stdout == data
        path = client.realize(ptr, relays=[src.url], cache_dir=str(cache), local=False)
    blocks = block_files_of(cache)
    assert blocks
    for f in [*blocks, Path(path)]:
        peek = _as_nobody("cat", str(f))
        assert peek.returncode != 0 and "Permission denied" in peek.stderr, peek
        assert f.stat().st_mode & 0o777 == 0o600, f
    for folder in [cache, *[p for p in cache.rglob("*") if p.is_dir()]]:
        assert folder.stat().st_mode & 0o077 == 0, folder
    for f in [p for p in cache.rglob("*") if p.is_file()]:
        assert f.stat().st_mode & 0o077 == 0, f


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder of another user")
def test_existing_wide_cache_is_narrowed_and_another_users_is_refused(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    ours.chmod(0o755)
    with Fetcher([], deadline=1) as f:
        BlockCache(str(ours), f, 1 << 20).close()
        assert ours.stat().st_mode & 0o777 == 0o700
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        with pytest.raises(CacheError, match="another user"):
            BlockCache(str(theirs), f, 1 << 20)
    ptr = hp.write(tmp_path / "x.prv", hp.rootless_of("a" * 40, 10))
    got = kb(tmp_path, "cat", ptr, "--cache-dir", str(theirs))
    assert "another user" in one_line(got)


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                    reason="needs /dev/fuse and fusermount3")
def test_mount_serves_no_byte_of_rootless_content_from_a_consistent_liar(tmp_path: Path) -> None:
    """The mount reads through the same cache: before the fix its first read of a
    root-less file handed out the liar's bytes."""
    from mountutil import mounted

    real = os.urandom(2 * MiB + 9)
    sha1 = hashlib.sha1(real).hexdigest()
    pointers = tmp_path / "pointers"
    pointers.mkdir()
    hp.write(pointers / "old.bin.prv", hp.rootless_of(sha1, len(real)))
    with HTTPSource() as src:
        src.add(os.urandom(len(real)), sha1=sha1)
        with mounted(str(pointers), tmp_path, relays=[src.url]) as m:
            with pytest.raises(OSError) as err, open(m.path("old.bin"), "rb") as f:
                f.read(10)
            assert err.value.errno == 5  # EIO
            src.add(real)
            with open(m.path("old.bin"), "rb") as f:
                assert f.read() == real

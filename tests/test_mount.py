"""Real FUSE mounts of a local folder of pointers: listing, reads, xattrs, refusals, faults.

Content is served by `tests.httpsource.HTTPSource` (a real HTTP server standing in for a
relay); pointers carry no usable original_path, so every byte comes through the fetcher,
the verified cache and the mount. Every mount is unmounted and its daemon killed in
teardown (tests/mountutil.py), even when a test fails.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbfs import prv, tree
from tests.cachecheck import check_cache
from tests.httpsource import HTTPSource, wait_until
from tests.mountutil import NEEDS_FUSE, Mount, alive, force_unmount, mounted, run_kbfs, start_mount

pytestmark = NEEDS_FUSE

MiB = 1 << 20



def wait_xattr(path: str, name: str, want: bytes, timeout: float = 20) -> bool:
    """Whether xattr NAME of PATH reaches WANT within TIMEOUT: blocks are stored behind
    the reads that fetched them, so "cached" catches up a moment after a read returns."""
    end = time.monotonic() + timeout
    while os.getxattr(path, name) != want:
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True

def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_pointer(
    src: HTTPSource,
    folder: Path,
    name: str,
    data: bytes,
    *,
    legacy: bool = False,
    originals: Path | None = None,
) -> prv.Pointer:
    """Serve DATA from SRC and write FOLDER/NAME.prv for it (no local original to cheat with)."""
    store = originals or folder.parent / "originals"
    store.mkdir(parents=True, exist_ok=True)
    original = store / hashlib.sha1(data).hexdigest()
    original.write_bytes(data)
    src.add(path=str(original))
    # v1 (1 MiB): HTTPSource serves the 1 MiB leaf list and no proofs (a 64 KiB pointer
    # from it is read whole first: tests/test_download.py, v2 pointers, no proofs).
    pointer = dataclasses.replace(prv.create_pointer(original, block_size=tree.BLOCK_SIZE),
                                  original_path="")
    if legacy:
        pointer = dataclasses.replace(pointer, tree=None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.prv").write_text(pointer.to_json())
    return pointer


def read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------- a shared mount


@dataclasses.dataclass
class World:
    base: Path
    source: HTTPSource
    folder: Path
    mount: Mount
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("world")
    folder = base / "pointers"
    files = {
        "big.bin": _data(9 * MiB + 12345, 1),
        "small.txt": b"hello kbfs\n",
        "empty.dat": b"",
        "deep/inner/x.bin": _data(3 * MiB, 2),
    }
    with HTTPSource() as source:
        for rel, data in files.items():
            parent, _, name = rel.rpartition("/")
            write_pointer(source, folder / parent if parent else folder, name, data)
        # A folder pointer with two files and a sub-folder.
        pd = prv.PrvDir()
        for rel, seed in (("a.bin", 3), ("sub/b.bin", 4)):
            data = _data(MiB + seed, seed)
            files[f"tree/{rel}"] = data
            original = base / "originals" / f"pd-{seed}"
            original.parent.mkdir(exist_ok=True)
            original.write_bytes(data)
            source.add(path=str(original))
            p = dataclasses.replace(prv.create_pointer(original), original_path="")
            if "/" in rel:
                pd.dirs.setdefault("sub", prv.PrvDir()).files["b.bin"] = p
            else:
                pd.files["a.bin"] = p
        (folder / "tree.prvdir").write_text(pd.to_json())
        # Pass-through files and folders, a name collision and a malformed pointer.
        (folder / "notes.md").write_text("plain notes\n")
        (folder / ".hidden").write_text("hidden\n")
        (folder / "plaindir").mkdir()
        (folder / "plaindir" / "p.txt").write_text("pp\n")
        (folder / "clash.bin").write_text("the real file\n")
        write_pointer(source, folder, "clash.bin", _data(2 * MiB, 5))
        (folder / "broken.prv").write_text('{"original_checksum": "nope"}')
        with mounted(str(folder), base, relays=[source.url], extra=["--timeout", "5"]) as mount:
            yield World(base, source, folder, mount, files)


def test_listing_and_stat(world: World) -> None:
    world.source.reset_counts()
    mnt = world.mount.mountpoint
    top = sorted(os.listdir(mnt))
    assert top == sorted(
        [
            ".hidden",
            "big.bin",
            "broken.prv",
            "clash.bin",
            "clash.bin.prv",
            "deep",
            "empty.dat",
            "notes.md",
            "plaindir",
            "small.txt",
            "tree",
        ]
    )
    st = os.stat(os.path.join(mnt, "big.bin"))
    assert st.st_size == len(world.files["big.bin"])
    assert st.st_mtime_ns == os.stat(world.folder / "big.bin.prv").st_mtime_ns
    assert not st.st_mode & 0o222
    assert os.stat(os.path.join(mnt, "empty.dat")).st_size == 0
    assert sorted(os.listdir(os.path.join(mnt, "tree"))) == ["a.bin", "sub"]
    assert os.listdir(os.path.join(mnt, "tree", "sub")) == ["b.bin"]
    assert os.path.getsize(os.path.join(mnt, "tree", "sub", "b.bin")) == len(
        world.files["tree/sub/b.bin"]
    )
    assert os.path.getsize(os.path.join(mnt, "deep", "inner", "x.bin")) == 3 * MiB
    # The real file wins; its pointer stays visible as itself.
    assert read_all(os.path.join(mnt, "clash.bin")) == b"the real file\n"
    assert json.loads(read_all(os.path.join(mnt, "clash.bin.prv")))["original_size"] == 2 * MiB
    # Malformed pointer: shown as the plain file, and logged once.
    assert read_all(os.path.join(mnt, "broken.prv")) == b'{"original_checksum": "nope"}'
    assert world.mount.log_text().count("broken.prv") == 1
    assert read_all(os.path.join(mnt, "notes.md")) == b"plain notes\n"
    assert read_all(os.path.join(mnt, ".hidden")) == b"hidden\n"
    assert read_all(os.path.join(mnt, "plaindir", "p.txt")) == b"pp\n"
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(mnt, "nope"))
    # Listing and stat never touched the network.
    assert sum(world.source.counts().values()) == 0


def test_new_pointer_appears(world: World) -> None:
    data = _data(100_000, 7)
    write_pointer(world.source, world.folder, "later.bin", data)
    deadline = time.monotonic() + 5
    while "later.bin" not in os.listdir(world.mount.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert read_all(world.mount.path("later.bin")) == data


def test_byte_exact_reads_with_tools(world: World, tmp_path: Path) -> None:
    big = world.mount.path("big.bin")
    want = md5(world.files["big.bin"])
    assert (
        subprocess.run(["md5sum", big], capture_output=True, text=True, check=True).stdout.split()[
            0
        ]
        == want
    )
    assert (
        hashlib.md5(
            subprocess.run(["cat", big], capture_output=True, check=True).stdout
        ).hexdigest()
        == want
    )
    subprocess.run(["cp", big, str(tmp_path / "copy")], check=True)
    assert md5((tmp_path / "copy").read_bytes()) == want
    dd = subprocess.run(
        ["dd", f"if={big}", "bs=4096", "skip=1000", "count=3", "status=none"],
        capture_output=True,
        check=True,
    ).stdout
    assert dd == world.files["big.bin"][1000 * 4096 : 1003 * 4096]
    for rel in ("small.txt", "empty.dat", "deep/inner/x.bin", "tree/a.bin", "tree/sub/b.bin"):
        assert read_all(world.mount.path(*rel.split("/"))) == world.files[rel], rel


def test_unaligned_and_past_end_reads(world: World) -> None:
    data = world.files["deep/inner/x.bin"]
    with open(world.mount.path("deep", "inner", "x.bin"), "rb", buffering=0) as f:
        for off, n in (
            (MiB - 3, 10),
            (0, 1),
            (len(data) - 5, 100),
            (len(data), 10),
            (len(data) + 9, 4),
        ):
            assert os.pread(f.fileno(), n, off) == data[off : off + n], (off, n)


# numpy and h5py hold the GIL while the kernel waits on the mount, and the HTTP source of
# these tests runs in this process: they read in a child process, as a real program would.
def run_python(code: str, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


MEMMAP_CODE = """
import sys, numpy as np
arr = np.memmap(sys.argv[1], dtype=np.uint8, mode="r")
want = np.fromfile(sys.argv[2], dtype=np.uint8)
assert arr.shape == want.shape
idx = np.random.default_rng(0).integers(0, len(want), 2000)
assert (arr[idx] == want[idx]).all()
assert (arr[-4096:] == want[-4096:]).all()
assert (arr == want).all()
print("ok")
"""


def test_numpy_memmap(world: World, tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    data = _data(5 * MiB + 3, 12)
    write_pointer(world.source, world.folder / "np", "m.bin", data)
    (tmp_path / "want").write_bytes(data)
    assert (
        run_python(MEMMAP_CODE, world.mount.path("np", "m.bin"), str(tmp_path / "want")) == "ok\n"
    )


H5_CODE = """
import sys, h5py, numpy as np
matrix = np.random.default_rng(1).standard_normal((600, 1000))
with h5py.File(sys.argv[1], "r") as f:
    assert np.array_equal(f["m"][123:140, 400:777], matrix[123:140, 400:777])
    assert np.array_equal(f["m"][-1], matrix[-1])
    assert np.array_equal(f["m"][:, 5], matrix[:, 5])
    assert f["v"][99_999] == 99_999
print("ok")
"""


def test_h5py_random_access(world: World, tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    np = pytest.importorskip("numpy")
    original = tmp_path / "data.h5"
    matrix = np.random.default_rng(1).standard_normal((600, 1000))
    with h5py.File(original, "w") as f:
        f.create_dataset("m", data=matrix, chunks=(50, 100))
        f.create_dataset("v", data=np.arange(100_000))
    write_pointer(world.source, world.folder, "data.h5", original.read_bytes())
    assert run_python(H5_CODE, world.mount.path("data.h5")) == "ok\n"


def test_many_threads_one_file(world: World) -> None:
    data = world.files["big.bin"]
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        with open(world.mount.path("big.bin"), "rb", buffering=0) as f:
            for _ in range(40):
                off, n = rng.randrange(len(data)), rng.choice((1, 4096, 65536, 300_000))
                got = os.pread(f.fileno(), n, off)
                if got != data[off : off + n]:
                    errors.append(f"{seed}: {off}+{n}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_many_files_open(world: World) -> None:
    names = []
    for i in range(40):
        data = _data(10_000 + i, 100 + i)
        write_pointer(world.source, world.folder / "many", f"f{i}", data)
        names.append((f"f{i}", data))
    handles = [open(world.mount.path("many", n), "rb") for n, _ in names]  # noqa: SIM115
    try:
        for f, (_, data) in zip(reversed(handles), reversed(names), strict=True):
            assert f.read() == data
    finally:
        for f in handles:
            f.close()


def test_writes_refused(world: World) -> None:
    mnt = world.mount.mountpoint
    refused = (errno.EROFS, errno.EACCES, errno.EPERM)
    for action in (
        lambda: open(os.path.join(mnt, "big.bin"), "r+b"),
        lambda: open(os.path.join(mnt, "new.txt"), "w"),
        lambda: open(os.path.join(mnt, "notes.md"), "a"),
        lambda: os.mkdir(os.path.join(mnt, "d")),
        lambda: os.unlink(os.path.join(mnt, "small.txt")),
        lambda: os.rename(os.path.join(mnt, "small.txt"), os.path.join(mnt, "s2")),
        lambda: os.truncate(os.path.join(mnt, "big.bin"), 0),
        lambda: os.chmod(os.path.join(mnt, "big.bin"), 0o777),
        lambda: os.setxattr(os.path.join(mnt, "big.bin"), "user.x", b"1"),
        lambda: os.symlink("x", os.path.join(mnt, "link")),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno in refused
    assert (world.folder / "small.txt.prv").exists()


def test_xattrs(world: World) -> None:
    path = world.mount.path("deep", "inner", "x.bin")
    sha1 = hashlib.sha1(world.files["deep/inner/x.bin"]).hexdigest()
    names = set(os.listxattr(path))
    assert {
        "user.kbfs.sha1",
        "user.kbfs.size",
        "user.kbfs.cached",
        "user.kbfs.verified",
        "user.kbfs.source",
    } <= names
    assert os.getxattr(path, "user.kbfs.sha1").decode() == sha1
    assert os.getxattr(path, "user.kbfs.size") == str(3 * MiB).encode()
    read_all(path)
    assert wait_xattr(path, "user.kbfs.cached", str(3 * MiB).encode())
    assert os.getxattr(path, "user.kbfs.verified") == b"tree"
    assert world.source.url in os.getxattr(path, "user.kbfs.source").decode()
    assert json.loads(os.getxattr(path, "user.kbfs.pointer"))["original_checksum"] == sha1
    with pytest.raises(OSError) as info:
        os.getxattr(path, "user.kbfs.nothing")
    assert info.value.errno == errno.ENODATA
    assert os.listxattr(world.mount.path("notes.md")) == []


def test_legacy_pointer_checked_by_sha1(world: World) -> None:
    data = _data(2 * MiB + 77, 9)
    write_pointer(world.source, world.folder / "legacy", "old.bin", data, legacy=True)
    path = world.mount.path("legacy", "old.bin")
    assert os.getxattr(path, "user.kbfs.verified") == b"pending"
    assert read_all(path) == data
    deadline = time.monotonic() + 10
    while os.getxattr(path, "user.kbfs.verified") != b"sha1" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.getxattr(path, "user.kbfs.verified") == b"sha1"


def test_status_reports_counters(world: World) -> None:
    read_all(world.mount.path("small.txt"))
    time.sleep(2.5)  # the daemon rewrites its status every 2 s
    res = world.mount.kbfs("status", world.mount.mountpoint)
    assert res.returncode == 0, res.stderr
    assert "running" in res.stdout and "hit rate" in res.stdout and world.source.url in res.stdout
    raw = json.loads(world.mount.kbfs("status", "--json").stdout)
    assert raw[0]["fs"]["bytes_served"] > 0 and raw[0]["pid"] == world.mount.pid


# ---------------------------------------------------------------- faults


def test_lying_source_gives_eio(tmp_path: Path) -> None:
    with HTTPSource() as source:
        data = _data(3 * MiB, 11)
        write_pointer(source, tmp_path / "src", "x.bin", data)
        source.mode = "lie"
        with mounted(
            str(tmp_path / "src"), tmp_path, relays=[source.url], extra=["--timeout", "3"]
        ) as m:
            with open(m.path("x.bin"), "rb", buffering=0) as f, pytest.raises(OSError) as info:
                f.read(4096)
            assert info.value.errno == errno.EIO
            assert "x.bin" in m.log_text()
            # Wrong bytes never reached the cache.
            assert os.getxattr(m.path("x.bin"), "user.kbfs.cached") == b"0"
            source.mode = "ok"
            assert read_all(m.path("x.bin")) == data


def _dir_bytes(path: Path) -> int:
    """Bytes the files under PATH hold on disk (the piece store's data files are sparse)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def test_cache_cap_respected(tmp_path: Path) -> None:
    with HTTPSource() as source:
        files = {f"f{i}": _data(6 * MiB, 20 + i) for i in range(4)}
        for name, data in files.items():
            write_pointer(source, tmp_path / "src", name, data)
        with mounted(
            str(tmp_path / "src"), tmp_path, relays=[source.url], extra=["--cache-size", "8M"]
        ) as m:
            for name, data in files.items():
                assert md5(read_all(m.path(name))) == md5(data)
            # The piece store may exceed its capacity by one flush interval's writes (it
            # evicts after each flush, about once a second): wait for that one.
            data_dir = Path(m.cache_dir) / "pieces" / "data"
            wait_until(lambda: 0 < _dir_bytes(data_dir) <= 8 * MiB, 5, interval=0.2)
            held = _dir_bytes(data_dir)
            assert 0 < held <= 8 * MiB, held
            assert _check_cache_blocks(Path(m.cache_dir), files["f3"]) > 0


def _check_cache_blocks(cache_dir: Path, data: bytes) -> int:
    """Every piece of DATA the piece cache counts as present holds exactly the right bytes
    (and no other content has any); returns how many (tests/cachecheck.py)."""
    return check_cache(cache_dir, {hashlib.sha1(data).hexdigest(): data})


def test_kill_9_during_reads_then_remount(tmp_path: Path) -> None:
    data = _data(40 * MiB, 30)
    with HTTPSource() as source:
        write_pointer(source, tmp_path / "src", "big.bin", data)
        # Slow enough per connection that the read is still under way when the kill lands,
        # however many range requests the read-ahead keeps in flight.
        source.trickle_rate = 1 * MiB
        source.mode = "trickle"
        m = start_mount(str(tmp_path / "src"), tmp_path, relays=[source.url])
        try:
            outcome: list[object] = []
            first_bytes = threading.Event()

            def reader() -> None:
                got = bytearray()
                try:
                    with open(m.path("big.bin"), "rb", buffering=0) as f:
                        while chunk := f.read(MiB):
                            got += chunk
                            first_bytes.set()
                    outcome.append(bytes(got))
                except OSError as exc:
                    outcome.append(exc)

            t = threading.Thread(target=reader, daemon=True)
            t.start()
            assert first_bytes.wait(30), "no bytes arrived through the mount"
            os.kill(m.pid, signal.SIGKILL)
            t.join(30)
            assert outcome and isinstance(outcome[0], OSError)
            while alive(m.pid):
                time.sleep(0.05)
        finally:
            force_unmount(m.mountpoint, m.pid)
        assert _check_cache_blocks(Path(m.cache_dir), data) >= 0
        source.mode = "ok"
        with mounted(str(tmp_path / "src"), tmp_path, relays=[source.url]) as m2:
            assert md5(read_all(m2.path("big.bin"))) == md5(data)
        assert _check_cache_blocks(Path(m.cache_dir), data) == 40


def test_offline_reads(tmp_path: Path) -> None:
    cached, uncached = _data(3 * MiB, 40), _data(2 * MiB, 41)
    with HTTPSource() as source:
        write_pointer(source, tmp_path / "src", "cached.bin", cached)
        write_pointer(source, tmp_path / "src", "uncached.bin", uncached)
        with mounted(str(tmp_path / "src"), tmp_path, relays=[source.url]) as m:
            assert read_all(m.path("cached.bin")) == cached
        source.stop()
        # A fresh mount (empty page cache) over the same disk cache, every source down.
        with mounted(
            str(tmp_path / "src"), tmp_path, relays=[source.url], extra=["--timeout", "3"]
        ) as m:
            assert read_all(m.path("cached.bin")) == cached
            t0 = time.monotonic()
            with pytest.raises(OSError) as info:
                read_all(m.path("uncached.bin"))
            assert info.value.errno == errno.EIO
            assert time.monotonic() - t0 < 15
            source.start()  # the source comes back: the mount recovers by itself
            deadline = time.monotonic() + 20
            while True:
                try:
                    assert read_all(m.path("uncached.bin")) == uncached
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)


# ---------------------------------------------------------------- command line


def test_bad_input_one_line(tmp_path: Path) -> None:
    from tests.mountutil import isolated_env

    env = isolated_env(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        (["mount", str(tmp_path / "src"), str(tmp_path / "missing")], "no such folder"),
        (["mount", str(tmp_path / "src"), str(tmp_path / "afile")], "not a folder"),
        (["mount", str(tmp_path / "nosrc"), str(tmp_path / "src")], "no such folder"),
        (["mount", "kbfs://127.0.0.1:1/NOT-AN-ID", str(tmp_path / "src")], "share id"),
        (["umount", str(tmp_path / "src")], "not a kbfs mount"),
        (["status", str(tmp_path / "src")], "not a kbfs mount"),
    ]
    for args, words in cases:
        res = run_kbfs(args, env=env)
        assert res.returncode != 0, args
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kbfs: error:") and words in lines[0], (
            args,
            res.stderr,
        )


def test_already_mounted_and_umount(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a")
    with mounted(str(tmp_path / "src"), tmp_path) as m:
        res = run_kbfs(["mount", str(tmp_path / "src"), m.mountpoint], env=m.env)
        assert res.returncode == 1 and "already mounted" in res.stderr
        res = m.kbfs("umount", m.mountpoint)
        assert res.returncode == 0, res.stderr
        assert not os.path.ismount(m.mountpoint)
        deadline = time.monotonic() + 10
        while alive(m.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(m.pid)
        assert "no kbfs mounts" in m.kbfs("status").stdout


def test_sigterm_unmounts_cleanly(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with mounted(str(tmp_path / "src"), tmp_path) as m:
        os.kill(m.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (alive(m.pid) or os.path.ismount(m.mountpoint)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(m.pid) and not os.path.ismount(m.mountpoint)
        assert "unmounted" in m.log_text()


def test_cache_commands(tmp_path: Path) -> None:
    from tests.mountutil import isolated_env

    env = isolated_env(tmp_path)
    cache = str(tmp_path / "cache")
    data = _data(3 * MiB + 5, 50)
    with HTTPSource() as source:
        write_pointer(source, tmp_path / "src", "p.bin", data)
        prv_file = str(tmp_path / "src" / "p.bin.prv")
        res = run_kbfs(
            ["cache", "prefetch", prv_file, "--cache-dir", cache, "--relay", source.url], env=env
        )
        assert res.returncode == 0, res.stderr
        assert _check_cache_blocks(Path(cache), data) == 4
        stats = json.loads(
            run_kbfs(["cache", "stats", "--json", "--cache-dir", cache], env=env).stdout
        )
        assert stats["used"] == len(data)      # bytes of the pieces present
        with mounted(str(tmp_path / "src"), tmp_path, relays=[source.url]) as m:
            res = m.kbfs("cache", "clear", "--cache-dir", cache)
            assert res.returncode == 1 and "unmount it first" in res.stderr
            # Prefetch through the mount: the daemon fills its own cache.
            res = m.kbfs("cache", "prefetch", m.path("p.bin"))
            assert res.returncode == 0, res.stderr
            assert wait_xattr(m.path("p.bin"), "user.kbfs.cached", str(len(data)).encode())
        res = run_kbfs(["cache", "clear", "--cache-dir", cache], env=env)
        assert res.returncode == 0, res.stderr
        assert _check_cache_blocks(Path(cache), data) == 0
        res = run_kbfs(["cache", "prefetch", str(tmp_path / "src"), "--cache-dir", cache], env=env)
        assert res.returncode == 1 and "neither a file in a kbfs mount" in res.stderr


def test_no_local_fetches_through_relays_only(tmp_path: Path) -> None:
    """A pointer whose original is on this machine is read from it, unless --no-local."""
    data = _data(2 * MiB + 5, 31)
    original = tmp_path / "data" / "orig.bin"
    original.parent.mkdir()
    original.write_bytes(data)
    src = tmp_path / "src"
    src.mkdir()
    (src / "orig.bin.prv").write_text(prv.create_pointer(str(original)).to_json())
    with HTTPSource() as source:
        source.mode = "refuse"  # the relay is down: only the original can answer
        with mounted(str(src), tmp_path, name="local", cache_dir=str(tmp_path / "c1"),
                     relays=[source.url], extra=["--timeout", "3"]) as m:
            assert read_all(m.path("orig.bin")) == data
        with mounted(str(src), tmp_path, name="remote", cache_dir=str(tmp_path / "c2"),
                     relays=[source.url], extra=["--timeout", "3", "--no-local"]) as m:
            with open(m.path("orig.bin"), "rb", buffering=0) as f, pytest.raises(OSError) as info:
                f.read(4096)
            assert info.value.errno == errno.EIO


def _closed_port_url() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def test_unreachable_relay_warned_and_errors_in_status(tmp_path: Path) -> None:
    """`kbfs mount` with a relay that is down says so at mount time (one line), and
    `kbfs status` (and --json) shows it, the last read error with its cause, and a
    malformed .prv of the folder (path and reason), not only `errors N`."""
    src = tmp_path / "ptrs"
    src.mkdir()
    data = os.urandom(5000)
    digest = prv.FileDigest(hashlib.sha1(data).hexdigest(), len(data), "", [], tree.tree_of_bytes(data)[1])
    (src / "x.bin.prv").write_text(digest.pointer("").to_json())
    (src / "bad.prv").write_text('{"original_checksum": "nothex", "original_size": 1}')
    down = _closed_port_url()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    from tests.mountutil import isolated_env

    env = isolated_env(tmp_path)
    res = run_kbfs(["mount", str(src), str(mnt), "--cache-dir", str(tmp_path / "cache"),
                    "--relay", down, "--timeout", "1"], env=env, timeout=90)
    import re as _re

    m = _re.search(r"pid (\d+); log (.+?)\)", res.stdout)
    assert res.returncode == 0 and m, res.stdout + res.stderr
    mount = Mount(str(mnt), int(m.group(1)), m.group(2), str(tmp_path / "cache"), env)
    try:
        warn = [line for line in res.stderr.splitlines() if "unreachable" in line]
        assert len(warn) == 1 and down in warn[0] and "reads" in warn[0], res.stderr
        assert sorted(os.listdir(mount.mountpoint)) == ["bad.prv", "x.bin"]
        with pytest.raises(OSError) as exc:
            with open(mount.path("x.bin"), "rb") as f:
                f.read()
        assert exc.value.errno == errno.EIO

        def status() -> str:
            r = mount.kbfs("status", mount.mountpoint)
            assert r.returncode == 0, r.stderr
            return r.stdout

        assert wait_until(lambda: "last error" in status(), timeout=10), status()
        text = status()
        assert f"relay {down}: unreachable at mount time" in text
        assert "x.bin.prv" in text and "unreachable" in text.split("last error")[1], text
        assert "pointer problem" in text and "bad.prv" in text and "original_checksum" in text
        raw = json.loads(mount.kbfs("status", "--json", mount.mountpoint).stdout)[0]
        assert raw["unreachable_at_mount"] == {down: "connection refused"}
        assert any("bad.prv" in path for path in raw["problems"])
        assert raw["last_errors"] and raw["last_errors"][-1]["error"]
    finally:
        force_unmount(mount.mountpoint, mount.pid)

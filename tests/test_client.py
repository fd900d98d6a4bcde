"""kbfs.open / realize / locate / resolve and the file object's io semantics.

Content is served by real HTTP servers on 127.0.0.1: `tests/httpsource.py` (a threaded
server that can misbehave on purpose) and, for the kbfs:// form, real relay and share
processes (tests/netutil.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from httpsource import HTTPSource

import kbfs
from kbfs import client, prv
from kbfs.errors import BadRequest, ConfigError, KbfsError, NotFound
from kbfs.fileref import FileRef
from kbfs.reader import KbfsFile

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user config file or environment leaks into a test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("KBFS_RELAY", "KBFS_CACHE_DIR", "KBFS_CACHE_SIZE", "KBFS_SEARCH_DIRS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def src() -> Any:
    with HTTPSource() as s:
        yield s


def make_pointer(tmp_path: Path, data: bytes, name: str = "data.bin",
                 original_path: str | None = None, tree: bool = True) -> tuple[str, prv.Pointer]:
    """Write DATA to tmp_path/orig/NAME and a pointer to it (original_path overridable)."""
    orig = tmp_path / "orig" / name
    orig.parent.mkdir(parents=True, exist_ok=True)
    orig.write_bytes(data)
    # v1 (1 MiB blocks): the HTTPSource sources here serve the 1 MiB leaf list, no proofs.
    p = prv.create_pointer(orig, block_size=1 << 20)
    p = prv.Pointer(p.sha1, p.size, p.fcs,
                    str(orig) if original_path is None else original_path,
                    p.prv_version, p.tree if tree else None)
    path = tmp_path / "pointers" / (name + ".prv")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(p.to_json())
    return str(path), p


def settings(src: HTTPSource | None, tmp_path: Path) -> dict[str, Any]:
    return {"relays": [src.url] if src else None, "cache_dir": str(tmp_path / "cache")}


# ---------------------------------------------------------------- the file object


@pytest.fixture
def raw_file(src: HTTPSource, tmp_path: Path, make_file: Any) -> Any:
    data = make_file(tmp_path / "f.bin", 3 * MiB + 777, seed=3)
    info = src.add(data)
    c = client.get_client([src.url], str(tmp_path / "cache"))
    ref = FileRef(info.sha1, info.size, info.root)
    c._router.route(info.sha1, [src.url])  # what resolve() does for a source
    f = KbfsFile(c.cache, ref, "f.bin")
    yield f, data, c.cache
    f.close()


def test_seek_tell_semantics(raw_file: Any) -> None:
    f, data, _ = raw_file
    assert f.readable() and f.seekable() and not f.writable()
    assert f.tell() == 0
    assert f.seek(10) == 10 and f.tell() == 10
    assert f.read(5) == data[10:15] and f.tell() == 15
    assert f.seek(-5, io.SEEK_CUR) == 10
    assert f.read(3) == data[10:13]
    assert f.seek(0, io.SEEK_END) == len(data)
    assert f.read(10) == b""
    assert f.seek(-100, io.SEEK_END) == len(data) - 100
    assert f.read() == data[-100:]
    # Past the end is allowed, as for regular files; reads there give b"".
    assert f.seek(len(data) + 1000) == len(data) + 1000
    assert f.read(10) == b"" and f.read() == b""
    with pytest.raises(OSError):
        f.seek(-1)
    with pytest.raises(OSError):
        f.seek(-len(data) - 1, io.SEEK_END)
    assert f.tell() == len(data) + 1000  # a failed seek leaves the position alone
    with pytest.raises(ValueError):
        f.seek(0, 7)


def test_read_readinto_readall(raw_file: Any) -> None:
    f, data, _ = raw_file
    f.seek(MiB - 3)  # across a block boundary
    buf = bytearray(10)
    assert f.readinto(buf) == 10 and bytes(buf) == data[MiB - 3:MiB + 7]
    mv = memoryview(bytearray(8))
    f.seek(len(data) - 4)
    assert f.readinto(mv) == 4 and bytes(mv[:4]) == data[-4:]
    assert f.readinto(bytearray(5)) == 0
    f.seek(0)
    assert f.read(0) == b""
    assert f.read(-1) == data
    f.seek(123)
    assert f.read(None) == data[123:]
    f.seek(7)
    assert f.readall() == data[7:]
    arr = np.frombuffer(bytearray(16), dtype=np.uint8)
    f.seek(100)
    assert f.readinto(arr) == 16 and arr.tobytes() == data[100:116]


def test_close_unpins_and_forbids_io(raw_file: Any) -> None:
    f, _, cache = raw_file
    assert cache.store._held.get(f.ref.key) == 1   # held against eviction while open
    f.close()
    f.close()  # idempotent
    assert cache.store._held.get(f.ref.key) is None
    assert f.closed
    for op in (f.read, f.tell, lambda: f.seek(0), lambda: f.readinto(bytearray(1))):
        with pytest.raises(ValueError):
            op()


def test_sequential_read_feeds_readahead(src: HTTPSource, tmp_path: Path, make_file: Any) -> None:
    """A sequential kbfs.open reader (small reads; the BufferedReader asks the cache for whole
    blocks, exactly adjacent) gets read-ahead: blocks it never read arrive in the cache.
    A few small reads inside one block are no stream (h5py's metadata reads look like that;
    kbfs.readahead2.Streams): they fetch their own block only."""
    data = make_file(tmp_path / "x", 12 * MiB + 5, seed=4)
    ptr, _ = make_pointer(tmp_path, data, original_path="/nonexistent/data.bin")
    src.add(data)
    s = settings(src, tmp_path)
    with kbfs.open(ptr, **s) as f:
        c = client.get_client(**s)
        ref = client.resolve(ptr, **s).ref
        for _ in range(4):
            assert f.read(1000)
        assert c.cache.wait_idle(10) and c.cache.cached_bytes(ref) == MiB   # block 0 only
        f.seek(0)
        got = b"".join(f.read(64 << 10) for _ in range(64))   # the first 4 MiB, in order
        assert got == data[:4 * MiB]
        assert c.cache.wait_idle(10)
        assert c.cache.statistics()["readahead_pieces"] > 0
        assert c.cache.cached_bytes(ref) > 5 * MiB   # blocks past what was read came ahead


# ---------------------------------------------------------------- sources


def test_open_prv_through_relay(src: HTTPSource, tmp_path: Path, make_file: Any) -> None:
    data = make_file(tmp_path / "x", 2 * MiB + 5, seed=1)
    ptr, p = make_pointer(tmp_path, data, original_path="/nonexistent/data.bin")
    src.add(data)
    with kbfs.open(ptr, **settings(src, tmp_path)) as f:
        assert isinstance(f, io.BufferedIOBase)
        assert f.read(4) == data[:4]
        f.seek(MiB + 1)
        assert f.read(MiB) == data[MiB + 1:2 * MiB + 1]
        f.seek(0)
        assert hashlib.sha1(f.read()).hexdigest() == p.sha1
    r = client.resolve(ptr, **settings(src, tmp_path))
    assert r.name == "data.bin" and r.ref.root == p.tree.root and r.pointer == p  # type: ignore[union-attr]


def test_open_sha1_uri_legacy_rules(src: HTTPSource, tmp_path: Path, make_file: Any) -> None:
    data = make_file(tmp_path / "x", MiB + 17, seed=2)
    info = src.add(data)
    s = settings(src, tmp_path)
    r = client.resolve(f"sha1://{info.sha1}/results.mda", **s)
    assert r.ref == FileRef(info.sha1, len(data), None) and r.name == "results.mda"
    assert client.resolve(f"sha1://{info.sha1.upper()}", **s).name == info.sha1
    with kbfs.open(f"sha1://{info.sha1}/results.mda", **s) as f:
        assert f.read() == data
    path = kbfs.realize(f"sha1://{info.sha1}", **s)
    assert Path(path).read_bytes() == data
    c = client.get_client(**s)
    assert c.cache.verified(r.ref) == "sha1"
    # With every relay down the remembered size still opens the cached content.
    src.mode = "refuse"
    with kbfs.open(f"sha1://{info.sha1}", **s) as f:
        assert f.read() == data


def test_sha1_uri_errors(src: HTTPSource, tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="40 hex digits"):
        client.resolve("sha1://nothex", **settings(src, tmp_path))
    with pytest.raises(BadRequest, match="40 hex digits"):  # `$` took a final line break
        client.resolve("sha1://" + "ab" * 20 + "\n", **settings(src, tmp_path))
    with pytest.raises(NotFound, match="no relay knows"):
        client.resolve("sha1://" + "ab" * 20, **settings(src, tmp_path))
    with pytest.raises(ConfigError, match="none is configured"):
        client.resolve("sha1://" + "cd" * 20, **settings(None, tmp_path))


def test_bad_sources_are_one_clear_error(tmp_path: Path) -> None:
    s = settings(None, tmp_path)
    with pytest.raises(NotFound, match="no such pointer"):
        client.resolve(str(tmp_path / "missing.prv"), **s)
    (tmp_path / "junk.prv").write_text("{not json")
    with pytest.raises(KbfsError, match="not valid JSON"):
        client.resolve(str(tmp_path / "junk.prv"), **s)
    with pytest.raises(BadRequest, match="unknown kind of source"):
        client.resolve("ftp://example.org/x", **s)
    with pytest.raises(BadRequest):
        client.resolve("kbfs://nohostport", **s)
    with pytest.raises(BadRequest):
        client.resolve("kbfs://127.0.0.1:1/NOT-A-SHARE-ID/x", **s)


def test_local_first_with_relay_down(src: HTTPSource, tmp_path: Path, make_file: Any,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_file(tmp_path / "x", MiB + 99, seed=4)
    ptr, p = make_pointer(tmp_path, data)
    src.mode = "refuse"  # nothing on the network: only the original can serve
    s = settings(src, tmp_path)
    hashed: list[str] = []
    real_digest = prv.digest_file
    monkeypatch.setattr(prv, "digest_file", lambda path, *a: hashed.append(str(path)) or real_digest(path, *a))
    with kbfs.open(ptr, **s) as f:
        assert f.read() == data
    assert kbfs.realize(ptr, **s) == p.original_path
    with kbfs.open(ptr, **s) as f:
        f.seek(-10, io.SEEK_END)
        assert f.read() == data[-10:]
    assert hashed == [p.original_path]  # checked once, then remembered by stat
    state = json.loads((tmp_path / "cache" / client.STATE_FILE).read_text())
    assert list(state["files"]) == [os.path.realpath(p.original_path)]
    loc = client.locate(ptr, **s)
    assert loc.local == [p.original_path] and loc.cached_bytes == 0

    # Same size, other bytes, new mtime: checked again, refused, and the relay is down.
    Path(p.original_path).write_bytes(bytes(len(data)))
    with pytest.raises(KbfsError):
        with kbfs.open(ptr, **s) as f:
            f.read(10)
    assert len(hashed) == 2


def test_search_dirs_are_a_local_source(src: HTTPSource, tmp_path: Path, make_file: Any) -> None:
    data = make_file(tmp_path / "x", 5000, seed=5)
    ptr, _ = make_pointer(tmp_path, data, name="rec.mda", original_path="/gone/rec.mda")
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / "rec.mda").write_bytes(data)
    src.mode = "refuse"
    s = {**settings(src, tmp_path), "search_dirs": [str(shelf)]}
    assert kbfs.realize(ptr, **s) == str(shelf / "rec.mda")
    with kbfs.open(ptr, **s) as f:
        assert f.read() == data


def test_local_false_reads_through_the_cache(src: HTTPSource, tmp_path: Path,
                                            make_file: Any) -> None:
    data = make_file(tmp_path / "x", 2 * MiB, seed=6)
    ptr, p = make_pointer(tmp_path, data)
    src.add(data)
    s = settings(src, tmp_path)
    with kbfs.open(ptr, local=False, **s) as f:
        assert f.read() == data
    assert src.counts().get("sha1", 0) >= 1
    path = kbfs.realize(ptr, local=False, **s)
    assert path != p.original_path and Path(path).read_bytes() == data


def test_shared_singletons(src: HTTPSource, tmp_path: Path) -> None:
    s = settings(src, tmp_path)
    a = client.get_client(**s)
    b = client.get_client(**s)
    other = client.get_client([src.url, "http://127.0.0.1:9"], s["cache_dir"])
    assert a is b and a is not other
    assert a.cache is other.cache  # one cache per folder, whatever the relays


# ---------------------------------------------------------------- numpy and h5py


def test_h5py_and_numpy_on_kbfs_open(src: HTTPSource, tmp_path: Path) -> None:
    h5 = tmp_path / "orig" / "rec.h5"
    h5.parent.mkdir(parents=True)
    rng = np.random.default_rng(7)
    traces = rng.standard_normal((64, 40_000)).astype(np.float32)  # ~10 MiB
    with h5py.File(h5, "w") as f:
        f.create_dataset("traces", data=traces, chunks=(8, 4096))
        f["traces"].attrs["rate"] = 30000.0
        f.create_dataset("labels", data=np.arange(1000, dtype=np.int64))
    data = h5.read_bytes()
    ptr, _ = make_pointer(tmp_path, data, name="rec.h5", original_path="/elsewhere/rec.h5")
    src.add(data)
    with kbfs.open(ptr, **settings(src, tmp_path)) as fobj, h5py.File(fobj, "r") as f:
        assert f["traces"].attrs["rate"] == 30000.0
        np.testing.assert_array_equal(f["traces"][3:5, 1000:9000], traces[3:5, 1000:9000])
        np.testing.assert_array_equal(f["labels"][:], np.arange(1000))
    with kbfs.open(ptr, **settings(src, tmp_path)) as fobj:
        fobj.seek(0)
        head = np.frombuffer(fobj.read(8), dtype=np.uint8)
        assert head.tobytes() == b"\x89HDF\r\n\x1a\n"


def test_realize_of_a_legacy_pointer_checks_sha1(src: HTTPSource, tmp_path: Path,
                                                 make_file: Any) -> None:
    data = make_file(tmp_path / "x", MiB + 1, seed=8)
    ptr, p = make_pointer(tmp_path, data, original_path="", tree=False)
    src.add(data)
    path = kbfs.realize(ptr, **settings(src, tmp_path))
    assert Path(path).read_bytes() == data
    shutil.rmtree(tmp_path / "orig")
    assert client.get_client(**settings(src, tmp_path)).cache.verified(FileRef(p.sha1, p.size, None)) == "sha1"


# ---------------------------------------------------------------- downloads of cached content


def test_preallocate_keeps_what_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "part"
    path.write_bytes(b"x" * 5000)
    fd = os.open(path, os.O_RDWR)
    try:
        if not client._preallocate(fd, 3 * MiB):
            pytest.skip("no fallocate on the file system of tmp_path")
        st = os.fstat(fd)
        assert st.st_size == 3 * MiB and st.st_blocks * 512 >= 3 * MiB  # the blocks are there
        assert client._preallocate(fd, MiB)  # never shrinks
        assert os.fstat(fd).st_size == 3 * MiB
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 5000 + bytes(3 * MiB - 5000)


def test_preallocate_refused_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "part"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)  # fallocate needs a writable descriptor: EBADF
    try:
        assert client._preallocate(fd, MiB) is False
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc"


@pytest.mark.parametrize("cached_blocks", [range(0, 5), range(1, 5)])
def test_download_preallocates_only_what_the_cache_holds_whole(
        src: HTTPSource, tmp_path: Path, make_file: Any, monkeypatch: pytest.MonkeyPatch,
        cached_blocks: range) -> None:
    """A download whose every block is cached is cp's work: its part file gets its disk
    blocks first. With blocks to fetch (O_DIRECT writes) it does not; both are exact."""
    data = make_file(tmp_path / "x", 4 * MiB + 3, seed=9)
    ptr, p = make_pointer(tmp_path, data, original_path="/nonexistent/data.bin")
    src.add(data)
    s = settings(src, tmp_path)
    with kbfs.open(ptr, local=False, **s) as f:  # fills the cache with the blocks wanted
        for k in cached_blocks:
            f.seek(k * MiB)
            f.read(1)
    c = client.get_client(**s)
    c.cache.wait_idle(10)
    ref = client.resolve(ptr, **s).ref
    whole = len(cached_blocks) == ref.blocks
    assert (c.cache.cached_bytes(ref) == ref.size) is whole
    calls: list[int] = []
    real = client._preallocate

    def spy(fd: int, size: int) -> bool:
        calls.append(size)
        return real(fd, size)

    monkeypatch.setattr(client, "_preallocate", spy)
    src.reset_counts()
    out = tmp_path / "out.bin"
    result = client.download(ptr, str(out), local=False, **s)
    assert out.read_bytes() == data and os.path.getsize(out) == len(data)
    assert calls == ([len(data)] if whole else [])
    assert result.fetched == (0 if whole else MiB)
    assert not (tmp_path / ".out.bin.kbfs-part").exists()

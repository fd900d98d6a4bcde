"""The piece store's three modules: piecefile (data files), catalog (bitmaps in SQLite),
piecestore (put/read, capacity, pins, free floor, threads, two processes on one folder)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kbfs import catalog, osio, piecefile, piecestore
from kbfs.catalog import Catalog
from kbfs.piecestore import PieceStore, discard_legacy

REPO = Path(__file__).resolve().parent.parent
P = 64 * 1024
K1 = "a1" + "0" * 62
K2 = "b2" + "0" * 62
K3 = "s1-" + "c" * 40 + "-1000"


def piece(key: str, index: int, length: int = P) -> bytes:
    """The bytes the tests store as piece INDEX of KEY (derivable, so any reader can check)."""
    return hashlib.shake_128(f"{key}:{index}".encode()).digest(length)


def content(key: str, size: int) -> bytes:
    return b"".join(piece(key, i, min(P, size - i * P)) for i in range((size + P - 1) // P))


@pytest.fixture
def store(tmp_path: Path):
    s = PieceStore(str(tmp_path / "c"), capacity=1 << 30, min_free=0, flush_interval=3600)
    yield s
    s.close()


# ---- piecefile

def test_keys_are_checked() -> None:
    for good in (K1, K3, "s1-" + "f" * 40 + "-18446744073709551615"):
        assert piecefile.check_key(good) == good
    for bad in ("", "ab", "A" * 64, "../" + "a" * 10, "-" + "a" * 10, "a" * 101, "a/b" * 5, ".hidden", 7):
        with pytest.raises(ValueError):
            piecefile.check_key(bad)  # type: ignore[arg-type]
    assert piecefile.data_path("/d", K1) == f"/d/data/a1/{K1}"


def test_create_publish_open(tmp_path: Path) -> None:
    d = str(tmp_path)
    piecefile.private_folder(d)
    fd, tmp = piecefile.create_unpublished(d, K1, 5 * P)
    assert os.path.basename(tmp).startswith(".")
    st = os.fstat(fd)
    assert st.st_size == 5 * P and st.st_blocks == 0 and st.st_mode & 0o777 == 0o600  # sparse
    assert oct(os.stat(os.path.dirname(tmp)).st_mode & 0o777) == "0o700"
    path = piecefile.data_path(d, K1)
    assert piecefile.publish(tmp, path) and not os.path.exists(tmp)
    piecefile.write_at(fd, 2 * P, piece(K1, 2))
    piecefile.sync(fd)
    assert piecefile.read_at(fd, 2 * P, P) == piece(K1, 2)
    assert piecefile.read_at(fd, 5 * P - 10, 100) == b"\0" * 10  # short only at the end
    fd2, tmp2 = piecefile.create_unpublished(d, K1, 5 * P)
    assert not piecefile.publish(tmp2, path) and not os.path.exists(tmp2)  # never replaces
    fd3 = piecefile.open_existing(path)
    assert fd3 is not None and piecefile.identity(fd3) == piecefile.identity(fd)
    for f in (fd, fd2, fd3):
        os.close(f)
    assert piecefile.remove(d, K1) and not piecefile.remove(d, K1)
    assert piecefile.open_existing(path) is None


def test_symlinks_and_foreign_files_refused(tmp_path: Path) -> None:
    d = str(tmp_path)
    os.makedirs(os.path.join(d, "data", "a1"))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x")
    os.symlink(target, piecefile.data_path(d, K1))
    with pytest.raises(PermissionError):
        piecefile.open_existing(piecefile.data_path(d, K1))
    os.symlink(tmp_path, os.path.join(d, "link"))
    with pytest.raises(PermissionError):
        piecefile.private_folder(os.path.join(d, "link"))
    os.chmod(os.path.join(d, "data"), 0o755)
    piecefile.private_folder(os.path.join(d, "data"))
    assert os.stat(os.path.join(d, "data")).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("linux", [True, False])
def test_seam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linux: bool) -> None:
    if linux and not sys.platform.startswith("linux"):
        pytest.skip("Linux calls")
    monkeypatch.setattr(osio, "_linux", linux)  # the seam (kbfs.osio) both ways
    d = str(tmp_path)
    fd, tmp = piecefile.create_unpublished(d, K1, 4 * P)
    data = content(K1, 4 * P)
    piecefile.write_at(fd, 0, data)
    piecefile.sync(fd)
    dst = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    assert piecefile.copy_range(fd, dst, P, 2 * P, 0) == 2 * P
    assert piecefile.copy_range(fd, dst, 3 * P, 5 * P, 2 * P) == P  # cut at the end
    assert os.pread(dst, 4 * P, 0) == data[P:]
    piecefile.advise(fd, 0, P, dontneed=True)
    piecefile.advise(fd, 0, P, dontneed=False)
    blocks = os.fstat(fd).st_blocks
    punched = piecefile.punch(fd, P, P)
    assert punched == linux or not punched  # a file system may refuse: then nothing changes
    if punched:
        assert os.fstat(fd).st_blocks < blocks and os.pread(fd, P, P) == b"\0" * P
    else:
        assert os.pread(fd, P, P) == data[P:2 * P]
    assert os.fstat(fd).st_size == 4 * P
    os.close(fd)
    os.close(dst)


def test_portable_environment_turns_the_seam_off() -> None:
    code = "import kbfs.piecefile as p; print(p.LINUX_CALLS)"
    env = dict(os.environ, KBFS_PORTABLE="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- catalog

def test_bitmaps() -> None:
    bm = catalog.empty_bitmap(20)
    assert len(bm) == 3
    catalog.set_bits(bm, [0, 1, 2, 9, 19])
    assert catalog.has(bm, 9) and not catalog.has(bm, 8) and not catalog.has(bm, 400)
    assert catalog.ranges(bm, 20) == [(0, 2), (9, 9), (19, 19)]
    assert catalog.missing(bm, 1, 4) == [3, 4]
    assert catalog.popcount(bm) == 5
    other = catalog.empty_bitmap(20)
    catalog.set_bits(other, [3, 4])
    catalog.merge(bm, other)
    assert catalog.ranges(bm, 20) == [(0, 4), (9, 9), (19, 19)]
    assert catalog.piece_count(0, P) == 0 and catalog.piece_count(P + 1, P) == 2
    full = catalog.empty_bitmap(2)
    catalog.set_bits(full, [0, 1])
    assert catalog.used_bytes(full, P + 1, P) == P + 1


def test_catalog_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "cat.sqlite")
    cat = Catalog(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert cat.register(K1, 3 * P, P, ino=11, reset=False) == b"\0"
    assert cat.commit({K1: (11, [0, 2])}) == set()
    assert cat.register(K1, 3 * P, P, ino=11, reset=False) == bytes([0b101])
    with pytest.raises(ValueError):
        cat.register(K1, 4 * P, P, ino=11, reset=False)  # a key binds its size
    # Bits for another file than the row names are dropped, not added.
    assert cat.commit({K1: (12, [1])}) == {K1}
    assert cat.commit({K2: (11, [1])}) == {K2}
    row = cat.row(K1)
    assert row is not None and row.bitmap == bytes([0b101]) and row.used == 2 * P
    # A new data file (reset, or another inode) starts empty.
    assert cat.register(K1, 3 * P, P, ino=12, reset=False) == b"\0"
    cat.commit({K1: (12, [1])})
    assert cat.register(K1, 3 * P, P, ino=12, reset=True) == b"\0"
    cat.put_nodes(K1, "top", b"\1" * 64)
    assert cat.get_nodes(K1, "top") == b"\1" * 64 and cat.get_nodes(K1, "x") is None
    # A second connection (as another process would have) sees the same.
    other = Catalog(path)
    other.commit({K1: (12, [2])})
    assert cat.row(K1).bitmap == bytes([0b100])  # type: ignore[union-attr]
    other.close()
    cat.close()


def test_catalog_evicts_lru_skipping_pins(tmp_path: Path) -> None:
    cat = Catalog(str(tmp_path / "cat.sqlite"))
    for n, key in enumerate((K1, K2, K3)):
        cat.register(key, P, P, ino=n, reset=False)
        cat.commit({key: (n, [0])})
    cat.commit({}, touches=[K1])  # K1 newest now: order K2, K3, K1
    assert cat.pin(K2, +1) == 1
    assert cat.evict(1) == [(K3, P)]
    assert cat.evict(10 * P, skip=[K1]) == []
    assert cat.pin(K2, -1) == 0 and cat.pin(K2, -1) == 0
    assert [k for k, _ in cat.evict(10 * P)] == [K2, K1]
    assert cat.totals() == (0, 0)
    cat.close()


def test_catalog_of_another_schema_is_dropped(tmp_path: Path) -> None:
    import sqlite3
    path = str(tmp_path / "cat.sqlite")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE contents (x)")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    cat = Catalog(path)
    assert cat.totals() == (0, 0)
    cat.close()


# ---- piecestore

def test_put_read(store: PieceStore) -> None:
    size = 5 * P + 100
    data = content(K1, size)
    assert store.read(K1, 0, 10) is None and store.present(K1) is None
    assert store.missing(K1, 0, 2) == [0, 1, 2]
    assert store.put(K1, size, P, 1, data[P:3 * P])   # two pieces at once
    assert store.put(K1, size, P, 5, data[5 * P:])    # the short last piece
    assert store.read(K1, P + 5, 2 * P - 10) == data[P + 5:3 * P - 5]
    assert store.read(K1, 0, 10) is None               # piece 0 is missing
    assert store.read(K1, 2 * P, 2 * P) is None        # piece 3 is missing
    assert store.read(K1, 5 * P, 1 << 20) == data[5 * P:]  # cut at the end
    assert store.read(K1, size + 5, 10) == b""
    assert store.ranges(K1) == [(1, 2), (5, 5)] and store.missing(K1, 0, 5) == [0, 3, 4]
    for bad in [(K1, size, P, 0, b"x"), (K1, size, P, 5, data[5 * P:] + b"x"), (K1, size, P, -1, b"x" * P),
                (K1, size, P, 0, b"")]:
        with pytest.raises(ValueError):
            store.put(*bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.put(K1, size + 1, P, 0, data[:P])        # another size for one key
    with pytest.raises(ValueError):
        store.put("../x" + "a" * 60, size, P, 0, data[:P])
    stats = store.statistics()
    assert stats["pieces_written"] == 3 and stats["pending_pieces"] == 3 and stats["contents"] == 1


def test_bits_reach_other_stores_only_after_flush(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    a = PieceStore(d, 1 << 30, 0, flush_interval=3600)
    b = PieceStore(d, 1 << 30, 0, flush_interval=3600)
    a.put(K1, 4 * P, P, 0, piece(K1, 0))
    assert b.read(K1, 0, P) is None          # written, not yet durable: not claimed
    a.flush()
    assert b.read(K1, 0, P) == piece(K1, 0)
    b.put(K1, 4 * P, P, 3, piece(K1, 3))
    b.flush()
    assert a.read(K1, 3 * P, P) == piece(K1, 3) and a.ranges(K1) == [(0, 0), (3, 3)]
    a.close()
    b.close()
    c = PieceStore(d, 1 << 30, 0)
    assert c.ranges(K1) == [(0, 0), (3, 3)]
    c.close()


def test_replaced_or_deleted_file_claims_nothing(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    with PieceStore(d, 1 << 30, 0) as s:
        s.put(K1, 2 * P, P, 0, piece(K1, 0))
    path = piecefile.data_path(d, K1)
    os.unlink(path)
    with PieceStore(d, 1 << 30, 0) as s:
        assert s.read(K1, 0, P) is None
    with open(path, "wb") as f:            # another file (another inode) in its place
        f.write(piece(K1, 0) + b"\0" * P)
    with PieceStore(d, 1 << 30, 0) as s:
        assert s.read(K1, 0, P) is None
        s.put(K1, 2 * P, P, 1, piece(K1, 1))   # re-registers: the old bits are gone
        s.flush()
        assert s.ranges(K1) == [(1, 1)]


def test_evicted_by_another_store_then_bits_dropped(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    a = PieceStore(d, 1 << 30, 0, flush_interval=3600)
    b = PieceStore(d, 1 << 30, 0, flush_interval=3600)
    a.put(K1, 4 * P, P, 0, piece(K1, 0))
    a.flush()
    assert b.evict_to(0) == P and not os.path.exists(piecefile.data_path(d, K1))
    a.put(K1, 4 * P, P, 1, piece(K1, 1))     # into the unlinked file a still holds
    assert a.read(K1, 0, P) == piece(K1, 0)  # its old bytes, still right
    a.flush()                                # the row is gone: these bits are dropped
    assert b.read(K1, P, P) is None and a.statistics()["bits_dropped"] == 1
    a.put(K1, 4 * P, P, 2, piece(K1, 2))     # a new file, a new row
    a.flush()
    assert b.ranges(K1) == [(2, 2)] and b.read(K1, 2 * P, P) == piece(K1, 2)
    a.close()
    b.close()


def test_lru_capacity_and_pins(tmp_path: Path) -> None:
    s = PieceStore(str(tmp_path / "c"), capacity=5 * P, min_free=0, flush_interval=3600)
    for key in (K1, K2, K3):
        for i in range(2):
            s.put(key, 2 * P, P, i, piece(key, i))
        s.flush()                     # 4, then 6 pieces: K1, the oldest, goes
    assert s.present(K1) is None and s.ranges(K2) == [(0, 1)] and s.ranges(K3) == [(0, 1)]
    assert s.read(K2, 0, 1) is not None       # K2 newest now
    s.pin(K3)
    key4 = "d4" + "0" * 62
    s.put(key4, 2 * P, P, 0, piece(key4, 0, P) + piece(key4, 1, P))
    s.flush()                                  # K3 would be next but is pinned: K2 goes
    assert s.present(K2) is None and s.ranges(K3) == [(0, 1)]
    assert s.statistics()["used"] == 4 * P and s.statistics()["evicted_contents"] == 2
    s.unpin(K3)
    assert s.evict_to(0) == 4 * P and s.statistics()["contents"] == 0
    s.close()


def test_free_space_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = {"free": 100 * P, "total": 1000 * P}
    monkeypatch.setattr(piecestore, "disk_space", lambda path: (disk["free"], disk["total"]))
    s = PieceStore(str(tmp_path / "c"), capacity=1 << 40, min_free=1 << 40, flush_interval=3600)
    assert s.min_free == 50 * P                  # at most 5% of the file system
    for key in (K1, K2):
        assert s.put(key, P, P, 0, piece(key, 0))
        s.flush()
    disk["free"] = 50 * P                         # below the floor once a piece lands
    s.pin(K2)

    real_remove = piecefile.remove

    def remove(directory: str, key: str) -> bool:
        disk["free"] += P
        return real_remove(directory, key)

    monkeypatch.setattr(piecefile, "remove", remove)
    assert s.put(K3, P, P, 0, piece(K3, 0))       # K1 is evicted to make room
    assert s.present(K1) is None and s.present(K2) is not None
    disk["free"] = 10 * P
    assert not s.put("e5" + "0" * 62, P, P, 0, b"x" * P)  # only pinned/busy left: refused
    assert s.statistics()["refused"] == 1
    s.close()


def test_clear_and_sweep(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    s = PieceStore(d, 1 << 30, 0, flush_interval=3600)
    s.put(K1, P, P, 0, piece(K1, 0))
    s.put(K2, P, P, 0, piece(K2, 0))
    s.pin(K1)
    stray = os.path.join(d, "data", "a1", ".stray")
    Path(stray).write_bytes(b"x")
    s.clear()
    assert s.statistics()["contents"] == 0 and s.read(K1, 0, 1) is None
    assert not os.path.exists(stray) and not os.path.exists(piecefile.data_path(d, K1))
    assert s.catalog.pins() == {K1: 1}
    s.put(K1, P, P, 0, piece(K1, 0))
    s.close()
    # A data file without a row (a crash between an eviction's commit and its unlink).
    orphan = piecefile.data_path(d, K2)
    os.makedirs(os.path.dirname(orphan), exist_ok=True)
    Path(orphan).write_bytes(b"x")
    os.utime(orphan, (1, 1))
    with PieceStore(d, 1 << 30, 0) as s:
        assert not os.path.exists(orphan) and s.read(K1, 0, P) == piece(K1, 0)


def test_nodes_are_kept_and_evicted(store: PieceStore) -> None:
    store.put(K1, P, P, 0, piece(K1, 0))
    store.put_nodes(K1, "groups", b"\2" * 96)
    store.flush()
    assert store.get_nodes(K1, "groups") == b"\2" * 96
    store.evict_to(0)
    assert store.get_nodes(K1, "groups") is None


def test_discard_legacy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "cache"
    assert discard_legacy(str(d)) == []
    for sub in ("blocks/ab/" + "ab" * 32, "trees/ab", "complete", "files"):
        (d / sub).mkdir(parents=True)
    (d / "blocks" / "ab" / ("ab" * 32) / "0").write_bytes(b"x")
    (d / "layout").write_bytes(b"kbfs-cache 2")
    (d / "mark.key").write_bytes(b"k" * 32)
    (tmp_path / "keep").mkdir()
    os.symlink(tmp_path / "keep", d / "files2")
    (d / "files").rmdir()
    os.symlink(tmp_path / "keep", d / "files")   # a symlink is removed, not followed
    (tmp_path / "keep" / "precious").write_bytes(b"p")
    with caplog.at_level("WARNING"):
        removed = discard_legacy(str(d))
    assert removed == ["blocks", "trees", "complete", "files", "layout", "mark.key"]
    assert len(caplog.records) == 1 and "removed the old block cache" in caplog.text
    assert sorted(os.listdir(d)) == ["files2"] and (tmp_path / "keep" / "precious").exists()
    with PieceStore(str(d), 1 << 30, 0) as s:
        assert s.put(K1, P, P, 0, piece(K1, 0))


def test_two_threads_one_content(store: PieceStore) -> None:
    n = 64
    size = n * P
    errors: list[BaseException] = []

    def work(parity: int) -> None:
        try:
            for i in range(parity, n, 2):
                assert store.put(K1, size, P, i, piece(K1, i))
                got = store.read(K1, i * P, P)
                assert got == piece(K1, i)
                other = store.read(K1, (i ^ 1) * P, P)
                assert other is None or other == piece(K1, i ^ 1)
                if i % 16 == parity:
                    store.flush()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store.flush()
    assert store.ranges(K1) == [(0, n - 1)] and store.read(K1, 0, size) == content(K1, size)


WRITER = r"""
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from kbfs.piecestore import PieceStore
directory, key, parity, n = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
P = 64 * 1024
s = PieceStore(directory, 1 << 30, 0, flush_interval=0.01)
seen = 0
for i in range(parity, n, 2):
    s.put(key, n * P, P, i, hashlib.shake_128(f"{key}:{i}".encode()).digest(P))
    for j in range(n):
        got = s.read(key, j * P, P)
        if got is not None:
            assert got == hashlib.shake_128(f"{key}:{j}".encode()).digest(P), j
            seen += j % 2 != parity
s.close()
print(seen)
"""


def test_two_processes_one_content(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    PieceStore(d, 1 << 30, 0).close()
    n = 96
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), d, K1, str(p), str(n)],
                              stdout=subprocess.PIPE, text=True) for p in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert all(int(o) >= 0 for o in outs)
    with PieceStore(d, 1 << 30, 0) as s:   # no bit lost, none wrong
        assert s.ranges(K1) == [(0, n - 1)] and s.read(K1, 0, n * P) == content(K1, n * P)

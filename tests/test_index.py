"""The share-side index: incremental rescans, skipping rules, queries, threads."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kbfs import prv, tree
from kbfs.errors import KbfsError, NotFound
from kbfs.index import ShareIndex

MakeFile = Callable[..., bytes]


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    return root


@pytest.fixture
def index(tmp_path: Path, share: Path) -> Iterator[ShareIndex]:
    ix = ShareIndex(str(share), str(tmp_path / "state"))
    yield ix
    ix.close()


def _populate(share: Path, make_file: MakeFile) -> dict[str, bytes]:
    return {
        "a.bin": make_file(share / "a.bin", 1000, seed=1),
        "b.bin": make_file(share / "b.bin", tree.BLOCK_SIZE + 7, seed=2),
        "empty": make_file(share / "empty", 0),
        "sub/c.bin": make_file(share / "sub" / "c.bin", 300, seed=3),
        "sub/deep/d.bin": make_file(share / "sub" / "deep" / "d.bin", 5, seed=4),
    }


def test_first_scan_hashes_everything_second_nothing(
    index: ShareIndex, share: Path, make_file: MakeFile
) -> None:
    files = _populate(share, make_file)
    total = sum(len(v) for v in files.values())
    seen: list[int] = []
    totals_announced: list[int] = []
    s = index.scan(progress=seen.append, on_total=totals_announced.append)
    assert (s.added, s.updated, s.removed, s.unchanged, s.skipped) == (5, 0, 0, 0, 0)
    assert s.hashed_bytes == total
    assert sum(seen) == total
    assert totals_announced == [total]
    assert index.totals() == (5, total)

    for rel, data in files.items():
        f = index.lookup_path(rel)
        assert f is not None, rel
        leaves, root = tree.tree_of_bytes(data)
        assert f.sha1 == hashlib.sha1(data).hexdigest()
        assert f.fcs == "head1000-" + hashlib.sha1(data[:1000]).hexdigest()
        assert f.root == root
        assert f.size == len(data)
        assert index.leaves(f.sha1) == b"".join(leaves)
        assert index.is_current(f)

    totals_announced.clear()
    s2 = index.scan(on_total=totals_announced.append)
    assert (s2.added, s2.updated, s2.removed, s2.unchanged) == (0, 0, 0, 5)
    assert s2.hashed_bytes == 0
    assert totals_announced == [0]


def test_index_survives_reopening(tmp_path: Path, share: Path, make_file: MakeFile) -> None:
    _populate(share, make_file)
    with ShareIndex(str(share), str(tmp_path / "state")) as ix:
        ix.scan()
    assert (tmp_path / "state" / "index.sqlite").is_file()
    with ShareIndex(str(share), str(tmp_path / "state")) as ix:
        s = ix.scan()
        assert s.hashed_bytes == 0 and s.unchanged == 5


def test_touch_rehashes_only_that_file(index: ShareIndex, share: Path, make_file: MakeFile) -> None:
    _populate(share, make_file)
    index.scan()
    st = os.stat(share / "sub" / "c.bin")
    os.utime(share / "sub" / "c.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    s = index.scan()
    assert (s.added, s.updated, s.removed, s.unchanged) == (0, 1, 0, 4)
    assert s.hashed_bytes == 300
    f = index.lookup_path("sub/c.bin")
    assert f is not None and f.mtime_ns == st.st_mtime_ns + 1_000_000_000


def test_same_size_same_mtime_rewrite_is_detected(
    index: ShareIndex, share: Path, make_file: MakeFile
) -> None:
    path = share / "a.bin"
    make_file(path, 1000, seed=1)
    index.scan()
    old = index.lookup_path("a.bin")
    assert old is not None
    st = os.stat(path)
    time.sleep(0.05)  # let the ctime clock move on even where it ticks coarsely
    new_data = make_file(path, 1000, seed=99)  # in place: same inode
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert not index.is_current(old)
    s = index.scan()
    assert s.updated == 1
    f = index.lookup_path("a.bin")
    assert f is not None and f.sha1 == hashlib.sha1(new_data).hexdigest()


def test_replaced_file_is_detected_by_inode(
    index: ShareIndex, share: Path, make_file: MakeFile
) -> None:
    path = share / "a.bin"
    make_file(path, 1000, seed=1)
    index.scan()
    st = os.stat(path)
    new_data = make_file(share / "tmp-new", 1000, seed=5)
    os.utime(share / "tmp-new", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(share / "tmp-new", path)
    assert os.stat(path).st_ino != st.st_ino
    s = index.scan()
    assert (s.updated, s.added, s.removed) == (1, 0, 0)
    f = index.lookup_path("a.bin")
    assert f is not None and f.sha1 == hashlib.sha1(new_data).hexdigest()


def test_deleted_files_drop_out(index: ShareIndex, share: Path, make_file: MakeFile) -> None:
    files = _populate(share, make_file)
    index.scan()
    sha_a = hashlib.sha1(files["a.bin"]).hexdigest()
    os.remove(share / "a.bin")
    os.remove(share / "sub" / "deep" / "d.bin")
    os.rmdir(share / "sub" / "deep")
    s = index.scan()
    assert (s.removed, s.unchanged, s.hashed_bytes) == (2, 3, 0)
    assert index.lookup_path("a.bin") is None
    assert index.lookup_sha1(sha_a) is None
    with pytest.raises(NotFound):
        index.leaves(sha_a)
    assert index.list_dir("sub") == ([], [index.lookup_path("sub/c.bin")])
    assert index.totals()[0] == 3


def test_skipping_rules(tmp_path: Path, share: Path, make_file: MakeFile) -> None:
    outside = tmp_path / "outside"
    make_file(outside / "secret.bin", 10, seed=7)
    make_file(share / "inner" / "real.bin", 20, seed=8)
    make_file(share / ".zattrs", 10, seed=9)  # a dotfile is data (zarr)
    make_file(share / ".git" / "objects" / "x", 10)  # version control is not
    make_file(share / "sub" / ".cache" / "y", 10, seed=10)
    make_file(share / "inner" / ".real.bin.swp", 10)  # nor an editor's temporary
    make_file(share / "inner" / ".real.bin.kbfs-part", 10)  # nor a download's part file
    os.symlink(outside / "secret.bin", share / "escape.bin")
    os.symlink(outside, share / "escape-dir")
    os.symlink("../../outside/secret.bin", share / "inner" / "relative-escape.bin")
    os.symlink(share / "inner" / "real.bin", share / "link-to-real.bin")
    os.symlink("inner", share / "link-dir")
    os.symlink(".", share / "inner" / "loop")  # would recurse forever if followed blindly
    os.symlink(share / "missing", share / "dangling")
    os.mkfifo(share / "fifo")
    state = share / "state"  # the state folder inside the shared folder is not shared
    ix = ShareIndex(str(share), str(state))
    try:
        s = ix.scan()
        paths = sorted(
            f.path for d in ("", "inner", "link-dir", "sub/.cache") for f in ix.list_dir(d)[1]
        )
        assert paths == [".zattrs", "inner/real.bin", "link-dir/real.bin", "link-to-real.bin",
                         "sub/.cache/y"]
        assert (s.added, s.skipped) == (5, 0)
        assert ix.totals() == (5, 80)
        dirs, _ = ix.list_dir("")
        assert dirs == ["inner", "link-dir", "sub"]
        linked = ix.lookup_path("link-to-real.bin")
        assert linked is not None and ix.is_current(linked)
        assert ix.lookup_path("escape.bin") is None
    finally:
        ix.close()


def test_queries(index: ShareIndex, share: Path, make_file: MakeFile) -> None:
    files = _populate(share, make_file)
    make_file(share / "sub.txt", 3, seed=10)  # sorts between 'sub' and 'sub/...' neighbours
    make_file(share / "sub-x" / "e.bin", 4, seed=11)
    make_file(share / "copy.bin", 1000, seed=1)  # same content as a.bin
    index.scan()

    dirs, top = index.list_dir("")
    assert dirs == ["sub", "sub-x"]
    assert [f.path for f in top] == ["a.bin", "b.bin", "copy.bin", "empty", "sub.txt"]
    dirs, sub = index.list_dir("sub")
    assert dirs == ["deep"] and [f.path for f in sub] == ["sub/c.bin"]
    assert index.list_dir("/sub/") == index.list_dir("sub")
    assert index.list_dir("sub/deep")[1][0].path == "sub/deep/d.bin"
    assert index.list_dir("nothing-here") == ([], [])

    sha_a = hashlib.sha1(files["a.bin"]).hexdigest()
    first = index.lookup_sha1(sha_a)
    assert first is not None and first.path == "a.bin"
    assert index.lookup_sha1(sha_a.upper()) == first
    assert index.lookup_sha1("0" * 40) is None
    # The first copy changed on disk (not yet rescanned): the other copy is offered.
    make_file(share / "a.bin", 1000, seed=12)
    again = index.lookup_sha1(sha_a)
    assert again is not None and again.path == "copy.bin"

    assert index.lookup_path("sub/c.bin") == index.lookup_path("/sub/c.bin")
    assert index.lookup_path("sub") is None
    assert index.totals() == (8, sum(len(v) for v in files.values()) + 3 + 4 + 1000)

    f = index.lookup_path("b.bin")
    assert f is not None
    p = f.pointer(str(share))
    assert p.original_path == str(share / "b.bin")
    # The pointer a share hands out names its 64 KiB tree (issue 15); root stays the 1 MiB one.
    data_b = (share / "b.bin").read_bytes()
    assert p.tree == prv.TreeRef(tree.tree_of_bytes(data_b, 65536)[1], 65536)
    assert f.root64 == p.tree.root and f.root == tree.tree_of_bytes(data_b)[1]
    assert prv.file_matches(share / "b.bin", p) == (True, "")
    assert len(index.leaves(f.sha1)) == 2 * tree.LEAF_BYTES


def test_file_changing_while_hashed_is_not_recorded(
    index: ShareIndex, share: Path, make_file: MakeFile
) -> None:
    path = share / "moving.bin"
    make_file(path, 5000, seed=1)
    bumps = 0

    def touch_during_hash(_n: int) -> None:
        nonlocal bumps
        bumps += 1
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))

    s = index.scan(progress=touch_during_hash)
    assert bumps == 3  # every attempt saw the file move
    assert (s.added, s.skipped) == (0, 1)
    assert index.lookup_path("moving.bin") is None

    # Moving once, then still: the second attempt is recorded with the final stat.
    calls = 0

    def touch_once(_n: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            touch_during_hash(_n)

    s = index.scan(progress=touch_once)
    assert (s.added, s.skipped) == (1, 0)
    f = index.lookup_path("moving.bin")
    assert f is not None and index.is_current(f)


def test_readers_in_threads_during_a_scan(
    tmp_path: Path, share: Path, make_file: MakeFile
) -> None:
    n_files = 24
    for i in range(n_files):
        make_file(share / f"f{i:02}.bin", 256 * 1024 + i, seed=i)
    ix = ShareIndex(str(share), str(tmp_path / "state"), commit_seconds=0)
    errors: list[BaseException] = []
    counts_during_scan: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                n, _ = ix.totals()
                _, files = ix.list_dir("")
                assert len(files) >= n  # rows only ever appear during a first scan
                for f in files:
                    assert ix.lookup_sha1(f.sha1) is not None
                    assert len(ix.leaves(f.sha1)) == tree.LEAF_BYTES
        except BaseException as exc:
            errors.append(exc)

    def during_hash(_n: int) -> None:
        # A fresh thread (with its own connection) sees what the scan committed so far.
        out: list[int] = []
        t = threading.Thread(target=lambda: out.append(ix.totals()[0]))
        t.start()
        t.join()
        counts_during_scan.append(out[0])

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        s = ix.scan(progress=during_hash)
    finally:
        stop.set()
        for t in threads:
            t.join()
    ix.close()
    assert not errors, errors
    assert s.added == n_files
    # The scan commits as it goes: the k-th file's hashing sees the k-1 before it.
    assert counts_during_scan == list(range(n_files))


def test_close_then_use_fails(tmp_path: Path, share: Path) -> None:
    ix = ShareIndex(str(share), str(tmp_path / "state"))
    ix.close()
    with pytest.raises(Exception, match="closed"):
        ix.totals()


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        ShareIndex(str(tmp_path / "nope"), str(tmp_path / "state"))


def test_corrupt_index_file_is_a_clear_error(tmp_path: Path, share: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "index.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(KbfsError, match="index.sqlite: cannot use the index"):
        ShareIndex(str(share), str(state))


def test_close_during_a_scan_stops_it(tmp_path: Path, share: Path, make_file: MakeFile) -> None:
    for i in range(5):
        make_file(share / f"f{i}", 10, seed=i)
    ix = ShareIndex(str(share), str(tmp_path / "state"), commit_seconds=0)

    def close_after_two(_n: int) -> None:
        if ix.totals()[0] == 2:
            ix.close()

    with pytest.raises(KbfsError, match="closed"):
        ix.scan(progress=close_after_two)
    with ShareIndex(str(share), str(tmp_path / "state")) as again:
        assert again.totals()[0] == 2  # what was committed stays
        assert again.scan().added == 3


def test_symlinks_to_excluded_paths_and_hard_links_are_not_indexed(
    tmp_path: Path, share: Path, make_file: MakeFile, caplog: pytest.LogCaptureFixture
) -> None:
    """`public.txt -> .ssh/id_rsa` would publish an excluded file under a shared name, and
    a hard link may be another name of a file outside the folder: neither is indexed (one
    log line each, not one per scan). The caller's exclusions hold the same way, also
    through a symlinked folder (`alias -> data` must not give away `data/secret`). Hard
    links are shared when asked for."""
    make_file(share / ".ssh" / "id_rsa", 10, seed=11)
    make_file(share / ".git" / "config", 10, seed=12)
    make_file(share / "ok.bin", 10, seed=13)
    make_file(share / "data" / "secret" / "notes", 10, seed=15)
    make_file(share / "data" / "fine.bin", 10, seed=16)
    make_file(tmp_path / "outside" / "passwd", 10, seed=14)
    os.symlink(".ssh/id_rsa", share / "public.txt")
    os.symlink(share / ".git" / "config", share / "env.txt")
    os.symlink(".ssh", share / "keys")  # a folder link into an excluded folder
    os.symlink("data/secret/notes", share / "notes.txt")  # into the caller's exclusion
    os.symlink("data", share / "alias")  # alias/secret/notes is data/secret/notes
    os.link(tmp_path / "outside" / "passwd", share / "hard.txt")
    ix = ShareIndex(str(share), str(tmp_path / "state"), exclude=["data/secret"])
    try:
        with caplog.at_level("WARNING", "kbfs.index"):
            ix.scan()
            ix.scan()
        assert [f.path for f in ix.list_dir("")[1]] == ["ok.bin"]
        assert ix.list_dir("")[0] == ["alias", "data"]
        assert [f.path for f in ix.list_dir("alias")[1]] == ["alias/fine.bin"]
        assert ix.list_dir("alias")[0] == [] and ix.list_dir("data")[0] == []
        lines = [r.getMessage() for r in caplog.records if "not sharing" in r.getMessage()]
        assert len(lines) == 6, lines
        assert any("hard.txt" in m and "hard links" in m for m in lines), lines
        assert any("public.txt" in m and "excluded" in m for m in lines), lines
        assert any("alias/secret" in m and "excluded" in m for m in lines), lines
    finally:
        ix.close()
    # A file that gains a second name after it was indexed is dropped at the next scan
    # (and is not current meanwhile: the link changed its ctime).
    ix = ShareIndex(str(share), str(tmp_path / "state"))
    try:
        f = ix.lookup_path("ok.bin")
        assert f is not None and ix.is_current(f)
        os.link(share / "ok.bin", tmp_path / "ok-elsewhere")
        assert not ix.is_current(f)
        ix.scan()
        assert ix.lookup_path("ok.bin") is None
    finally:
        ix.close()
    with ShareIndex(str(share), str(tmp_path / "state2"), hard_links=True,
                    exclude=["data/secret"]) as ix2:
        ix2.scan()
        assert sorted(f.path for f in ix2.list_dir("")[1]) == ["hard.txt", "ok.bin"]


def test_share_does_not_serve_excluded_symlink_targets_or_hard_links(tmp_path: Path) -> None:
    """A real `kbfs share` on a real relay: neither the excluded file behind a shared
    symlink nor the hard link to a file outside the folder can be read, by path or by
    sha1; an ordinary file can."""
    import netutil  # tests/ is on sys.path; only this test needs processes
    import requests

    data = tmp_path / "data"
    (data / ".ssh").mkdir(parents=True)
    (data / ".ssh" / "key").write_bytes(b"HIDDEN-KEY-5d1e\n")
    (tmp_path / "outside.txt").write_bytes(b"OUTSIDE-FILE-8a2c\n")
    (data / "ok.txt").write_bytes(b"fine\n")
    os.symlink(".ssh/key", data / "public.txt")
    os.link(tmp_path / "outside.txt", data / "hard.txt")
    sha = {n: hashlib.sha1(b).hexdigest()
           for n, b in (("key", b"HIDDEN-KEY-5d1e\n"), ("out", b"OUTSIDE-FILE-8a2c\n"))}
    with netutil.start_relay(tmp_path / "logs") as relay, \
            netutil.start_share(data, relay.url, tmp_path / "logs") as sh:
        base = f"{relay.url}/s/{sh.id}"
        assert requests.get(f"{base}/file/ok.txt", timeout=10).content == b"fine\n"
        for url in (f"{base}/file/public.txt", f"{base}/file/hard.txt",
                    f"{relay.url}/sha1/{sha['key']}", f"{relay.url}/sha1/{sha['out']}"):
            r = requests.get(url, timeout=10)
            assert r.status_code == 404, (url, r.status_code, r.content[:100])
        names = [f["name"] for f in requests.get(f"{base}/list/", timeout=10).json()["files"]]
        assert names == ["ok.txt"]
        assert "not sharing" in sh.proc.stderr()


# -- the 64 KiB tree (issue 15): group nodes and root kept beside the leaves -------------

_OLD_SCHEMA = """
CREATE TABLE files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha1 TEXT NOT NULL, fcs TEXT NOT NULL,
    root TEXT NOT NULL, leaves BLOB NOT NULL
);
CREATE INDEX files_sha1 ON files (sha1);
"""


def _group_nodes(data: bytes) -> bytes:
    from kbfs import proof

    leaves, _ = tree.tree_of_bytes(data, proof.PIECE_SIZE)
    return b"".join(proof.nodes_of(leaves, proof.GROUP_LEVEL))


@pytest.mark.parametrize("size", [0, 1, 65536, tree.BLOCK_SIZE + 1, 5 * tree.BLOCK_SIZE - 3])
def test_scan_keeps_the_64k_group_nodes_and_root(
    index: ShareIndex, share: Path, make_file: MakeFile, size: int
) -> None:
    data = make_file(share / "f.bin", size, seed=size)
    index.scan()
    f = index.lookup_path("f.bin")
    assert f is not None
    got = index.pieces(f.sha1)
    assert got is not None
    groups, root64 = got
    assert groups == _group_nodes(data)  # exactly proof.py's level-4 nodes: 32 bytes per MiB
    assert len(groups) == 32 * max(1, -(-size // tree.BLOCK_SIZE))
    assert root64 == tree.tree_of_bytes(data, 65536)[1]
    assert index.leaves(f.sha1) == b"".join(tree.tree_of_bytes(data)[0])  # the 1 MiB tree as before


def test_index_written_by_older_code_is_rehashed_once(
    tmp_path: Path, share: Path, make_file: MakeFile, caplog: pytest.LogCaptureFixture
) -> None:
    """An index.sqlite from before the 64 KiB tree: the table gets the columns (one log
    line), nothing is served as pieces until the scan has rehashed every old row, and the
    scan after that hashes nothing."""
    import sqlite3

    data = make_file(share / "a.bin", 3 * tree.BLOCK_SIZE + 5, seed=9)
    state = tmp_path / "state"
    state.mkdir()
    st = os.stat(share / "a.bin")
    d = prv.digest_file(share / "a.bin", block_size=tree.BLOCK_SIZE, keep_leaves=True)
    assert d.leaves is not None
    conn = sqlite3.connect(state / "index.sqlite")
    conn.executescript(_OLD_SCHEMA)
    conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 ("a.bin", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, d.sha1, d.fcs,
                  d.root, b"".join(d.leaves)))
    conn.commit()
    conn.close()
    with caplog.at_level("WARNING", logger="kbfs.index"):
        ix = ShareIndex(str(share), str(state))
    try:
        lines = [r.getMessage() for r in caplog.records if "older kbfs" in r.getMessage()]
        assert len(lines) == 1 and "1 files are hashed again" in lines[0]
        old = ix.lookup_sha1(d.sha1)
        assert old is not None  # still served as before, by 1 MiB blocks
        assert ix.pieces(d.sha1) is None  # never proofs from data that is not there
        # ... so its pointer is the 1 MiB one, until the rescan gives it the 64 KiB tree.
        assert old.root64 == "" and old.pointer(str(share)).tree == prv.TreeRef(d.root, 1 << 20)
        s = ix.scan()
        assert (s.updated, s.unchanged, s.hashed_bytes) == (1, 0, len(data))
        got = ix.pieces(d.sha1)
        assert got is not None and got[0] == _group_nodes(data)
        new = ix.lookup_sha1(d.sha1)
        assert new is not None and new.pointer(str(share)).tree == prv.TreeRef(got[1], 65536)
        assert ix.scan().hashed_bytes == 0
    finally:
        ix.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="kbfs.index"):
        ShareIndex(str(share), str(state)).close()
    assert not [r for r in caplog.records if "older kbfs" in r.getMessage()]

"""v2 pointers (a root, 64 KiB leaves) through every reader, against real processes.

A real `kbfs relay` and `kbfs share` (tests/netutil.py) serve a file; pointers to it made
with `prv.create_pointer(block_size=65536)` (v2) and the default 1 MiB (v1), whose original
path is gone, are read through the mount (tests/mountutil.py), `kbfs download`, `kbfs cat`
and `kbfs.open`. v2 reads go through the piece cache (one piece-sized, proven request for a
cold 4 KiB read); v1 reads go through the same cache at their 1 MiB block size, by their
leaf list. tests/httpsource.py plays the sources the share cannot: one that lies in its
proofs (an error, never wrong bytes), one with no proofs at all (the leaf-list path at
64 KiB still reads right).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kbfs import client, prv
from kbfs.errors import VerificationError
from kbfs.piecestore import PieceStore

try:
    from tests import mountutil, netutil
    from tests.httpsource import HTTPSource
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import mountutil  # type: ignore[no-redef]
    import netutil  # type: ignore[no-redef]
    from httpsource import HTTPSource  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(300)

PIECE = 65536
MiB = 1 << 20
SIZE = 3 * MiB + 12345


def _pointer_file(folder: Path, src: Path, name: str, block_size: int | None) -> prv.Pointer:
    """A pointer to SRC saved as FOLDER/NAME.prv, its original path gone (network only)."""
    p = prv.create_pointer(src, block_size=block_size) if block_size else prv.create_pointer(src)
    p = prv.Pointer(p.sha1, p.size, p.fcs, "/nonexistent/" + name, p.prv_version, p.tree)
    (folder / f"{name}.prv").write_text(p.to_json())
    return p


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A relay and a share of one file, and v2 + v1 pointers to it in a folder."""
    base = tmp_path_factory.mktemp("v2net")
    data_dir, ptrs = base / "data", base / "ptrs"
    data_dir.mkdir()
    ptrs.mkdir()
    content = random.Random(15).randbytes(SIZE)
    (data_dir / "f.bin").write_bytes(content)
    p64 = _pointer_file(ptrs, data_dir / "f.bin", "f64.bin", PIECE)
    p1m = _pointer_file(ptrs, data_dir / "f.bin", "f1m.bin", MiB)
    assert p64.tree is not None and p64.tree.block_size == PIECE
    assert p1m.tree is not None and p1m.tree.block_size == MiB
    with netutil.start_relay(base) as relay, netutil.start_share(data_dir, relay.url, base):
        yield {"relay": relay.url, "content": content, "ptrs": ptrs, "p64": p64, "p1m": p1m,
               "base": base}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A user with an empty config and a private cache (for this process and children)."""
    for k in list(os.environ):
        if k.startswith("KBFS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    e = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    e["KBFS_CACHE_DIR"] = str(tmp_path / "cache")
    return e


def _kbfs(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kbfs", *args], env=env, capture_output=True,
                          timeout=timeout)


def _client(relay: str, tmp_path: Path) -> client.Client:
    return client.get_client([relay], str(tmp_path / "cache"))


def _wire_bytes(c: client.Client) -> int:
    return sum(s.get("bytes", 0) for f in c._router.statistics().values()
               for s in f["sources"].values())


# -- kbfs.open, cat, download (real relay + share) ------------------------------------------


def test_open_v2_reads_one_piece_cold_and_seeks(net: Any, tmp_path: Path, env: Any) -> None:
    """kbfs.open of a v2 pointer: a cold 4 KiB read after a seek moves one 64 KiB piece and
    its proof (not a 1 MiB block, not the leaf list), through the piece cache in
    CACHE_DIR/pieces; then seeks and a read to the end give the true bytes."""
    content = net["content"]
    c = _client(net["relay"], tmp_path)
    ptr = str(net["ptrs"] / "f64.bin.prv")
    with client.open(ptr, local=False, relays=[net["relay"]], cache_dir=str(tmp_path / "cache")) as f:
        f.seek(MiB + 5 * PIECE + 100)
        assert f.read(4096) == content[MiB + 5 * PIECE + 100:MiB + 5 * PIECE + 4196]
        st = c.pieces.statistics()
        assert st["fetches"] == 1 and st["bytes_fetched"] == PIECE, (st, c._router.statistics())
        assert PIECE <= _wire_bytes(c) <= PIECE + 2048   # one piece + its proof's nodes
        for off in (0, SIZE - 10, 2 * MiB + 7, 333):
            f.seek(off)
            assert f.read(5000) == content[off:off + 5000]
        f.seek(0)
        assert f.read() == content
    assert c.cache.statistics()["leaf_fetches"] == 0        # no leaf list was needed
    assert (tmp_path / "cache" / "pieces" / "catalog.sqlite").exists()
    assert c.pieces.statistics()["fallback_contents"] == 0


def test_v1_pointer_of_the_same_file_reads_by_its_1mib_blocks(net: Any, tmp_path: Path, env: Any) -> None:
    """The 1 MiB pointer of the same file reads through the same piece cache, in pieces of
    its own block size (1 MiB), by its leaf list (fetched once, checked against the root,
    kept as a store hint), never asking for proofs."""
    c = _client(net["relay"], tmp_path)
    p1m = net["p1m"]
    with c.open(str(net["ptrs"] / "f1m.bin.prv"), local=False) as f:
        f.seek(MiB + 100)
        assert f.read(4096) == net["content"][MiB + 100:MiB + 4196]
        st = c.cache.statistics()
        assert st["bytes_fetched"] == MiB and st["proof_fetches"] == 0, st
        assert st["leaf_lists_fetched"] == 1
        f.seek(0)
        assert f.read() == net["content"]
    assert c.cache.store.ranges(p1m.tree.root) == [(0, 3)]
    assert c.cache.store.get_nodes(p1m.tree.root, "leaves") is not None


def test_cat_offset_length_v2(net: Any, tmp_path: Path, env: dict[str, str]) -> None:
    content = net["content"]
    ptr = str(net["ptrs"] / "f64.bin.prv")
    for off, n in [(0, 10), (PIECE - 3, 7), (MiB + 12345, 300000), (SIZE - 5, 100)]:
        res = _kbfs(env, "cat", ptr, "--offset", str(off), "--length", str(n), "--relay", net["relay"],
                    "--no-local")
        assert res.returncode == 0, res.stderr.decode()
        assert res.stdout == content[off:off + n]
    data_files = lambda: [q for q in (tmp_path / "cache" / "pieces" / "data").rglob("*") if q.is_file()]  # noqa: E731
    assert data_files()
    res = _kbfs(env, "cache", "clear")
    assert res.returncode == 0, res.stderr.decode()
    assert not data_files()     # kbfs cache clear empties the piece cache too


def test_download_v2_file_and_resumed_from_the_piece_cache(net: Any, tmp_path: Path,
                                                           env: dict[str, str]) -> None:
    """`kbfs download` of a v2 pointer writes the true bytes; a download after part of the
    content was read (the pieces a failed run left) fetches only the rest."""
    content = net["content"]
    ptr = str(net["ptrs"] / "f64.bin.prv")
    out = tmp_path / "out.bin"
    res = _kbfs(env, "download", ptr, "--relay", net["relay"], "--no-local", "-o", str(out))
    assert res.returncode == 0, res.stderr.decode()
    assert out.read_bytes() == content
    # resumed: another cache, half of the file read first, then the download
    c = client.get_client([net["relay"]], str(tmp_path / "cache2"))
    with c.open(ptr, local=False) as f:
        assert f.read(SIZE // 2) == content[:SIZE // 2]
    c.cache.store.flush()
    before = _wire_bytes(c)
    result = c.download(ptr, str(tmp_path / "out2.bin"), local=False)
    assert (tmp_path / "out2.bin").read_bytes() == content
    assert result.cached_before >= SIZE // 2 - PIECE
    assert _wire_bytes(c) - before <= SIZE - result.cached_before + 64 * 1024
    assert not list(tmp_path.glob("out2.bin.part-*"))


# -- the mount (real relay + share) --------------------------------------------------------


def _status(m: Any, ready: Any, timeout: float = 15.0) -> dict[str, Any]:
    """The mount's status once READY(status) holds (the file is rewritten every 2 s)."""
    end = time.monotonic() + timeout
    while True:
        res = m.kbfs("status", m.mountpoint, "--json")
        st = json.loads(res.stdout)[0] if res.returncode == 0 and res.stdout.strip() else {}
        if (st and ready(st)) or time.monotonic() > end:
            return st
        time.sleep(0.5)


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse and fusermount3")
def test_mount_v2_random_and_sequential(net: Any, tmp_path: Path) -> None:
    """Through the mount: a cold 4 KiB read of a v2 file moves one piece and its proof;
    random 4 KiB reads and a full sequential read give the true bytes; the xattr says
    'tree'; kbfs status shows the pieces; the v1 file beside it reads by the block cache."""
    content = net["content"]
    with mountutil.mounted(str(net["ptrs"]), tmp_path, relays=[net["relay"]]) as m:
        path = m.path("f64.bin")
        assert os.path.getsize(path) == SIZE
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead
            off = MiB + 7 * PIECE + 4096
            assert os.pread(fd, 4096, off) == content[off:off + 4096]
            st = _status(m, lambda st: (st.get("pieces") or {}).get("fetches"))
            pieces = st["pieces"]
            assert pieces["fetches"] == 1 and pieces["bytes_fetched"] == PIECE, pieces
            wire = sum(s.get("bytes", 0) for s in st["fetch"]["sources"].values())
            assert PIECE <= wire <= PIECE + 2048, st["fetch"]
            assert st["cache"].get("leaf_fetches", 0) == 0
            rng = random.Random(4)
            for _ in range(40):
                o = rng.randrange(0, SIZE - 4096) & ~4095
                assert os.pread(fd, 4096, o) == content[o:o + 4096], o
        finally:
            os.close(fd)
        with open(path, "rb") as f:
            assert hashlib.sha1(f.read()).hexdigest() == net["p64"].sha1
        assert os.getxattr(path, "user.kbfs.verified") == b"tree"
        assert int(os.getxattr(path, "user.kbfs.cached")) == SIZE
        with open(m.path("f1m.bin"), "rb") as f:
            assert f.read() == content
        st = _status(m, lambda st: (st.get("cache") or {}).get("bytes_fetched", 0) >= 2 * SIZE)
        assert st["cache"]["bytes_fetched"] <= 2 * SIZE    # each file once: v2 and v1 pieces
        assert st["cache"]["leaf_lists_fetched"] == 1      # v1: by its leaf list
        text = m.kbfs("status", m.mountpoint).stdout
        assert "pieces: served" in text, text


# -- sources the share cannot play (tests/httpsource.py) -----------------------------------


def _v2_at(src: HTTPSource, tmp_path: Path, data: bytes) -> str:
    f = tmp_path / "orig.bin"
    f.write_bytes(data)
    _pointer_file(tmp_path, f, "x", PIECE)
    f.unlink()
    src.add(data, block_size=PIECE)
    return str(tmp_path / "x.prv")


@pytest.mark.parametrize("lie", ["wrong", "other", "bs", "flip"])
def test_lying_source_gives_an_error_never_wrong_bytes(tmp_path: Path, env: Any, lie: str) -> None:
    data = random.Random(7).randbytes(2 * MiB + 99)
    with HTTPSource() as src:
        ptr = _v2_at(src, tmp_path, data)
        if lie == "flip":
            src.proofs, src.mode = "ok", "lie"    # an honest proof over flipped bytes
        else:
            src.proofs = lie
        c = _client(src.url, tmp_path)
        with c.open(ptr, local=False) as f, pytest.raises(VerificationError):
            f.seek(PIECE * 3)
            f.read(4096)
        res = _kbfs(env, "cat", ptr, "--relay", src.url, "--no-local")
        assert res.returncode != 0 and res.stdout == b""
        assert b"Traceback" not in res.stderr
        res = _kbfs(env, "download", ptr, "--relay", src.url, "--no-local", "-o", str(tmp_path / "o"))
        # A download asks for the whole file in one run, whose proof is empty (the root is
        # computed from the bytes alone): a lie in proof nodes then has nothing to bend, and
        # the true bytes arrive. Whatever the lie, never a wrong byte: fail, or the original.
        if res.returncode == 0:
            assert lie != "flip" and (tmp_path / "o").read_bytes() == data
        else:
            assert not (tmp_path / "o").exists() and b"Traceback" not in res.stderr


def test_no_proof_falls_back_to_the_leaf_list(tmp_path: Path, env: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A source with no proofs (before issue 15): v2 content is read by its leaf list at
    64 KiB blocks, correctly, with one log line for the content."""
    data = random.Random(8).randbytes(MiB + 3 * PIECE + 5)
    with HTTPSource() as src:
        ptr = _v2_at(src, tmp_path, data)
        src.proofs = "none"
        c = _client(src.url, tmp_path)
        with caplog.at_level("WARNING", logger="kbfs.verifiers"):
            with c.open(ptr, local=False) as f:
                f.seek(PIECE + 10)
                assert f.read(4096) == data[PIECE + 10:PIECE + 4106]
                f.seek(0)
                assert f.read() == data
        assert sum("no source proves" in r.getMessage() for r in caplog.records) == 1
        assert c.pieces.statistics()["fallback_contents"] == 1
        assert c.cache.statistics()["bytes_fetched"] >= len(data)
        res = c.download(ptr, str(tmp_path / "o.bin"), local=False)
        assert (tmp_path / "o.bin").read_bytes() == data and res.size == len(data)


def test_interrupted_v2_download_resumes(tmp_path: Path, env: dict[str, str]) -> None:
    """A v2 download killed midway (kill -9) leaves its verified pieces in the piece cache;
    the same download again fetches only what is missing and writes the true bytes."""
    data = random.Random(9).randbytes(6 * MiB)
    with HTTPSource() as src:
        ptr = _v2_at(src, tmp_path, data)
        src.proofs = "ok"
        src.mode, src.trickle_rate = "trickle", MiB
        out = tmp_path / "out.bin"
        root = prv.load_pointer(ptr).tree.root  # type: ignore[union-attr]
        proc = subprocess.Popen([sys.executable, "-m", "kbfs", "download", ptr, "--relay", src.url,
                                 "--no-local", "-o", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # killed once some pieces are committed (another process may read the catalogue)
            end = time.monotonic() + 60
            while time.monotonic() < end and proc.poll() is None:
                if (tmp_path / "cache" / "pieces" / "catalog.sqlite").exists():
                    with PieceStore(str(tmp_path / "cache" / "pieces"), 1 << 40, 0) as store:
                        if store.ranges(root):
                            break
                time.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert not out.exists()
        src.mode = "ok"
        c = _client(src.url, tmp_path)
        result = c.download(ptr, str(out), local=False)
        assert out.read_bytes() == data
        assert result.cached_before > 0
        assert result.fetched <= len(data) - result.cached_before + 64 * PIECE

"""`kbfs download`, `kbfs cat` and `kbfs locate` as a user runs them: real processes.

Content comes from `tests/httpsource.py` (a real threaded HTTP server that can lie,
trickle or refuse on purpose) and from real relay and share processes
(`tests/netutil.py`). Fault tests kill the download process by its pid.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from httpsource import HTTPSource, wait_until

from kbfs import leaflists, prv
from kbfs import tree as kbfs_tree
from kbfs.piecestore import PieceStore

MiB = 1 << 20


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user with an empty config and a private cache."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    e["KBFS_CACHE_DIR"] = str(tmp_path / "cache")
    return e


@pytest.fixture
def src() -> Any:
    with HTTPSource() as s:
        yield s


def kbfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kbfs", *args]


def run(env: dict[str, str], *args: str, cwd: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(kbfs_cmd(*args), env=env, cwd=cwd, capture_output=True, timeout=timeout)


def pointer(tmp_path: Path, data: bytes, name: str = "data.bin", tree: bool = True,
            original_path: str = "/nonexistent/data.bin",
            block_size: int = MiB) -> tuple[str, prv.Pointer]:
    """A pointer to DATA whose original is gone (so the network must serve it). v1 (1 MiB
    blocks) unless BLOCK_SIZE says otherwise: HTTPSource serves the 1 MiB leaf list and
    no proofs, and most tests here are about 1 MiB blocks and part files."""
    f = tmp_path / "hash-me"
    f.write_bytes(data)
    p = prv.create_pointer(f, block_size=block_size)
    f.unlink()
    p = prv.Pointer(p.sha1, p.size, p.fcs, original_path, p.prv_version, p.tree if tree else None)
    path = tmp_path / (name + ".prv")
    path.write_text(p.to_json())
    return str(path), p


def content_key(p: prv.Pointer) -> str:
    """The cache's name of a pointer's content (its root, else s1-SHA1-SIZE)."""
    return p.tree.root if p.tree is not None else f"s1-{p.sha1}-{p.size}"


def cached_pieces(cache: Path, p: prv.Pointer) -> list[int]:
    """The pieces (blocks) of P's content the cache holds: its piece store's bitmap, as
    another process sees it (committed pieces only)."""
    if not (cache / "pieces").is_dir():
        return []
    with PieceStore(str(cache / "pieces"), 1 << 40, 0) as store:
        return [i for a, b in store.ranges(content_key(p)) for i in range(a, b + 1)]


def cached_nodes(cache: Path, p: prv.Pointer, name: str) -> bytes | None:
    """The nodes record NAME (kbfs.leaflists.NODES_*) the cache keeps for P's content."""
    if not (cache / "pieces").is_dir():
        return None
    with PieceStore(str(cache / "pieces"), 1 << 40, 0) as store:
        return store.get_nodes(content_key(p), name)


def part_of(out: Path) -> Path:
    """Where a download to OUT keeps its bytes until they are complete and verified."""
    return out.parent / f".{out.name}.kbfs-part"


def good_blocks(path: Path, data: bytes) -> list[int]:
    """Blocks of PATH that already hold the right bytes of DATA."""
    try:
        have = path.read_bytes()
    except FileNotFoundError:
        return []
    return [k for k in range(-(-len(data) // MiB))
            if have[k * MiB:min(len(data), (k + 1) * MiB)] == data[k * MiB:(k + 1) * MiB]]


def fetched_ranges(src: HTTPSource) -> list[tuple[int, int]]:
    """[a, b) of every range request SRC answered since its counts were reset."""
    out = []
    for _path, rng in src.ranges():
        assert rng is not None
        a, b = (int(x) for x in rng.split("=")[1].split("-"))
        out.append((a, b + 1))
    return out


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("kbfs: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- download


def test_download_prv_default_name_and_stats(src: HTTPSource, tmp_path: Path, env: dict[str, str],
                                             make_file: Any) -> None:
    data = make_file(tmp_path / "x", 33 * MiB + 3, seed=11)  # 34 blocks: runs of 9
    ptr, p = pointer(tmp_path, data, "rec.mda")
    src.add(data)
    work = tmp_path / "work"
    work.mkdir()
    proc = run(env, "-v", "download", ptr, "--relay", src.url, cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()
    out = work / "rec.mda"
    assert proc.stdout.decode().strip() == str(out)
    assert out.read_bytes() == data
    assert sorted(os.listdir(work)) == ["rec.mda"]  # no part file left behind
    assert "fetched" in proc.stderr.decode()
    # Several range requests were in flight, not one stream.
    assert src.counts()["sha1"] >= 3
    # A download keeps no second copy of what it fetched in the cache.
    assert cached_pieces(tmp_path / "cache", p) == []
    # Already cached (here by `kbfs cat`): a download fetches nothing.
    assert run(env, "cat", ptr, "--relay", src.url).stdout == data
    assert cached_pieces(tmp_path / "cache", p) == list(range(34))
    src.reset_counts()
    proc = run(env, "download", ptr, "--relay", src.url, "-o", str(tmp_path / "again.bin"))
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "again.bin").read_bytes() == data
    assert src.counts().get("sha1", 0) == 0


def test_download_sha1_uri_into_folder(src: HTTPSource, tmp_path: Path, env: dict[str, str],
                                      make_file: Any) -> None:
    data = make_file(tmp_path / "x", 3 * MiB + 1, seed=12)
    info = src.add(data)
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    proc = run(env, "download", f"sha1://{info.sha1}/firings.mda", "-r", src.url, "-o", str(outdir))
    assert proc.returncode == 0, proc.stderr.decode()
    assert (outdir / "firings.mda").read_bytes() == data
    # The SHA-1 matched: its leaves are recorded (what later reads are checked against).
    p = prv.Pointer(info.sha1, info.size, "", "", "0.1", None)
    assert cached_nodes(tmp_path / "cache", p, leaflists.NODES_PROVEN) == info.leaves_blob


def test_resume_after_kill(src: HTTPSource, tmp_path: Path, env: dict[str, str],
                           make_file: Any) -> None:
    data = make_file(tmp_path / "x", 24 * MiB, seed=13)
    ptr, p = pointer(tmp_path, data)
    src.add(data)
    src.mode = "trickle"
    # Per connection per second. The download asks for runs of 6 blocks, two at a time:
    # blocks 0-11 land after about 1.5 s, blocks 12-23 would take 3 s.
    src.trickle_rate = 4 * MiB
    out = tmp_path / "out.bin"
    part = part_of(out)
    proc = subprocess.Popen(kbfs_cmd("download", ptr, "-r", src.url, "-o", str(out), "-j", "2"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: len(good_blocks(part, data)) >= 4, timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    kept = good_blocks(part, data)
    assert 4 <= len(kept) < 24
    # The part file of the killed run is left (it could not clean up), never at OUT.
    assert not out.exists()
    src.mode = "ok"
    src.reset_counts()
    proc2 = run(env, "-v", "download", ptr, "-r", src.url, "-o", str(out))
    assert proc2.returncode == 0, proc2.stderr.decode()
    assert hashlib.sha1(out.read_bytes()).hexdigest() == p.sha1
    assert not part.exists()
    # Only the missing blocks went over the network.
    fetched = 0
    for a, b in fetched_ranges(src):
        assert not any(k * MiB < b and a < (k + 1) * MiB for k in kept)
        fetched += b - a
    assert fetched == len(data) - len(kept) * MiB


def test_resume_checks_every_block_of_the_part_file(src: HTTPSource, tmp_path: Path,
                                                    env: dict[str, str], make_file: Any) -> None:
    """A part file left by a failed run: right blocks are kept, wrong ones and holes
    are fetched again, and a failure keeps the part file for the next run."""
    data = make_file(tmp_path / "x", 10 * MiB + 5, seed=22)
    ptr, p = pointer(tmp_path, data)
    src.add(data)
    out = tmp_path / "out.bin"
    part = part_of(out)
    with open(part, "wb") as f:
        f.truncate(12 * MiB)  # longer than the content: cut to its size
        for k in (0, 1, 4, 5, 10):  # right bytes (10 is the short last block)
            f.seek(k * MiB)
            f.write(data[k * MiB:(k + 1) * MiB])
        f.seek(2 * MiB)  # wrong bytes in block 2, half of block 3; 6-9 are holes
        f.write(b"\1" * (MiB + MiB // 2))
    src.mode = "error500"
    line = one_line_error(run(env, "download", ptr, "-r", src.url, "-o", str(out)))
    assert "500" in line or "no source" in line
    assert part.name in line and "resumes from it" in line  # the one line says where
    assert not out.exists()
    assert good_blocks(part, data) == [0, 1, 4, 5, 10]  # kept for the next run, untouched
    src.mode = "ok"
    src.reset_counts()
    proc = run(env, "-v", "download", ptr, "-r", src.url, "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == data
    assert not part.exists()
    assert "kept from an interrupted run" in proc.stderr.decode()
    wanted = {2, 3, 6, 7, 8, 9}
    got = set()
    for a, b in fetched_ranges(src):
        got.update(range(a // MiB, -(-b // MiB)))
    assert got == wanted
    assert sum(b - a for a, b in fetched_ranges(src)) == len(wanted) * MiB


def test_download_copies_cached_blocks_and_fetches_the_rest(
        src: HTTPSource, tmp_path: Path, env: dict[str, str], make_file: Any) -> None:
    data = make_file(tmp_path / "x", 8 * MiB, seed=23)
    ptr, p = pointer(tmp_path, data)
    src.add(data)
    cache = tmp_path / "cache"
    proc = run(env, "cat", ptr, "-r", src.url, "--offset", str(2 * MiB), "--length", str(3 * MiB))
    assert proc.stdout == data[2 * MiB:5 * MiB]
    assert cached_pieces(cache, p) == [2, 3, 4]
    src.reset_counts()
    out = tmp_path / "out.bin"
    proc = run(env, "download", ptr, "-r", src.url, "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == data
    got = set()
    for a, b in fetched_ranges(src):
        got.update(range(a // MiB, -(-b // MiB)))
    assert got == {0, 1, 5, 6, 7}
    assert cached_pieces(cache, p) == [2, 3, 4]  # nothing stored by the download


def test_two_downloads_to_one_file(src: HTTPSource, tmp_path: Path, env: dict[str, str],
                                   make_file: Any) -> None:
    data = make_file(tmp_path / "x", 2 * MiB, seed=24)
    ptr, p = pointer(tmp_path, data)
    src.add(data)
    out = tmp_path / "out.bin"
    with open(part_of(out), "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a running download holds it
        assert "under way" in one_line_error(run(env, "download", ptr, "-r", src.url,
                                                 "-o", str(out)))
        assert not out.exists() and part_of(out).exists()
    proc = run(env, "download", ptr, "-r", src.url, "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == data


def test_lying_source_fails_cleanly(src: HTTPSource, tmp_path: Path, env: dict[str, str],
                                    make_file: Any) -> None:
    data = make_file(tmp_path / "x", 3 * MiB, seed=14)
    ptr, p = pointer(tmp_path, data)
    src.add(data)
    src.mode = "lie"
    out = tmp_path / "out.bin"
    proc = run(env, "download", ptr, "-r", src.url, "-o", str(out))
    line = one_line_error(proc)
    assert "verification" in line or "does not match" in line or "lied" in line or "fail" in line
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out.bin")]
    assert not part_of(out).exists()  # nothing verified: nothing worth keeping
    assert cached_pieces(tmp_path / "cache", p) == []


# ---------------------------------------------------------------- v2 pointers, no proofs
# HTTPSource proves no piece and serves the 1 MiB leaf list only: for a 64 KiB pointer it is
# what an older share, or a web server with a /tree/ beside the bytes, looks like.


def test_v2_pointer_from_a_source_that_proves_nothing(src: HTTPSource, tmp_path: Path,
                                                      env: dict[str, str], make_file: Any) -> None:
    """Read whole once, checked against the root by hashing, then served from the cache."""
    data = make_file(tmp_path / "x", 5 * MiB + 77, seed=26)
    ptr, p = pointer(tmp_path, data, block_size=64 << 10)
    src.add(data)
    cache = tmp_path / "cache"
    proc = run(env, "cat", ptr, "-r", src.url, "--offset", str(3 * MiB + 5), "--length", "100")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == data[3 * MiB + 5:3 * MiB + 105]
    assert "Traceback" not in proc.stderr.decode()
    # The whole file once (the 64 KiB request is the proof attempt, closed unread).
    assert sum(b - a for a, b in fetched_ranges(src) if b - a != 64 << 10) == len(data)
    assert cached_pieces(cache, p) == list(range(81))     # 80 whole pieces and a short one
    leaves, root = kbfs_tree.tree_of_bytes(data, 64 << 10)
    assert root == p.tree.root                            # type: ignore[union-attr]
    assert cached_nodes(cache, p, leaflists.NODES_LEAVES) == b"".join(leaves)
    src.reset_counts()
    out = tmp_path / "out.bin"
    proc = run(env, "download", ptr, "-r", src.url, "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == data
    assert src.counts().get("sha1", 0) == 0


def test_v2_pointer_read_whole_refuses_wrong_content(src: HTTPSource, tmp_path: Path,
                                                     env: dict[str, str], make_file: Any) -> None:
    """Self-consistent wrong bytes (their own 1 MiB leaves agree) under the pointer's SHA-1:
    the whole pass finds they do not hash to the root; one line, nothing kept."""
    data = make_file(tmp_path / "x", 3 * MiB + 9, seed=27)
    ptr, p = pointer(tmp_path, data, block_size=64 << 10)
    src.add(data[:-1] + bytes([data[-1] ^ 1]), sha1=p.sha1)
    out = tmp_path / "out.bin"
    line = one_line_error(run(env, "download", ptr, "-r", src.url, "-o", str(out)))
    assert "does not hash to the pointer's root" in line
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out.bin")]
    cache = tmp_path / "cache"
    assert cached_pieces(cache, p) == []
    assert cached_nodes(cache, p, leaflists.NODES_LEAVES) is None
    assert not os.listdir(cache / "pieces" / "staging")    # the staged bytes are gone
    # The pointer's root matches the bytes, its SHA-1 does not: the pointer contradicts itself.
    fake = "ab" * 20
    src.add(data, sha1=fake)
    p2 = prv.Pointer(fake, p.size, p.fcs, "/nonexistent/data.bin", p.prv_version, p.tree)
    (tmp_path / "self-contradicting.prv").write_text(p2.to_json())
    line = one_line_error(run(env, "cat", str(tmp_path / "self-contradicting.prv"), "-r", src.url))
    assert "SHA-1" in line and cached_pieces(cache, p2) == []


def test_v2_pointer_read_whole_is_bounded(src: HTTPSource, tmp_path: Path, make_file: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Above verifiers.WHOLE_LIMIT a proof-less v2 read is one line, not a whole-file read."""
    import kbfs
    from kbfs import verifiers
    from kbfs.errors import SourceError

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("KBFS_RELAY", "KBFS_CACHE_DIR", "KBFS_CACHE_SIZE", "KBFS_SEARCH_DIRS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(verifiers, "WHOLE_LIMIT", 2 * MiB)
    data = make_file(tmp_path / "x", 2 * MiB + 1, seed=28)
    ptr, p = pointer(tmp_path, data, block_size=64 << 10)
    src.add(data)
    with kbfs.open(ptr, relays=[src.url], cache_dir=str(tmp_path / "cache"), local=False) as f:
        with pytest.raises(SourceError, match="more than the limit of 2097152") as err:
            f.read(10)
    assert "\n" not in str(err.value)
    assert sum(b - a for a, b in fetched_ranges(src)) <= 64 << 10   # the one proof request
    assert cached_pieces(tmp_path / "cache", p) == []


def test_self_consistent_wrong_content_fails_on_sha1(src: HTTPSource, tmp_path: Path,
                                                     env: dict[str, str], make_file: Any) -> None:
    """A legacy pointer (no tree): the source serves other bytes with a matching tree."""
    data = make_file(tmp_path / "x", 2 * MiB + 5, seed=15)
    ptr, p = pointer(tmp_path, data, tree=False)
    src.add(b"\0" * len(data), sha1=p.sha1)
    out = tmp_path / "out.bin"
    proc = run(env, "download", ptr, "-r", src.url, "-o", str(out))
    assert "SHA-1" in one_line_error(proc)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out.bin")]
    cache = tmp_path / "cache"
    assert cached_pieces(cache, p) == []
    assert cached_nodes(cache, p, leaflists.NODES_PROVEN) is None     # never "matched"
    assert cached_nodes(cache, p, leaflists.NODES_LEAVES) is None


def test_failover_to_the_next_source(tmp_path: Path, env: dict[str, str], make_file: Any) -> None:
    data = make_file(tmp_path / "x", 4 * MiB, seed=16)
    ptr, p = pointer(tmp_path, data)
    with HTTPSource() as bad, HTTPSource() as good:
        bad.add(data)
        good.add(data)
        bad.mode = "lie"
        proc = run(env, "download", ptr, "-r", bad.url, "-r", good.url, "-o", str(tmp_path / "o"))
        assert proc.returncode == 0, proc.stderr.decode()
        assert (tmp_path / "o").read_bytes() == data
        assert bad.counts().get("sha1", 0) >= 1 and good.counts()["sha1"] >= 1


def test_download_local_original_with_relay_down(tmp_path: Path, env: dict[str, str],
                                                 make_file: Any) -> None:
    data = make_file(tmp_path / "orig.bin", 2 * MiB + 9, seed=17)
    p = prv.create_pointer(tmp_path / "orig.bin")
    (tmp_path / "orig.bin.prv").write_text(p.to_json())
    proc = run(env, "download", str(tmp_path / "orig.bin.prv"), "-r", "http://127.0.0.1:9",
               "-o", str(tmp_path / "copy.bin"))
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "copy.bin").read_bytes() == data


def test_bad_input_is_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    one_line_error(run(env, "download", str(tmp_path / "missing.prv")))
    one_line_error(run(env, "cat", "sha1://zz"))
    one_line_error(run(env, "locate", "gopher://x"))
    one_line_error(run(env, "download", "sha1://" + "a" * 40))  # no relay configured
    (tmp_path / "bad.prv").write_text('{"original_checksum": 5}')
    assert "original_checksum" in one_line_error(run(env, "cat", str(tmp_path / "bad.prv")))
    data_ptr, _ = pointer(tmp_path, b"x" * 100)
    assert "no relay configured" in one_line_error(run(env, "download", data_ptr))


def test_download_with_no_source_reachable(tmp_path: Path, env: dict[str, str],
                                           make_file: Any) -> None:
    data = make_file(tmp_path / "x", MiB, seed=18)
    ptr, _ = pointer(tmp_path, data)
    proc = run(env, "download", ptr, "-r", "http://127.0.0.1:9", "-o", str(tmp_path / "o"))
    one_line_error(proc)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o")]


def test_download_into_a_missing_folder_names_the_folder(src: HTTPSource, tmp_path: Path,
                                                         env: dict[str, str],
                                                         make_file: Any) -> None:
    """One line naming the folder that is not there, before any fetching."""
    data = make_file(tmp_path / "x", MiB, seed=31)
    ptr, _ = pointer(tmp_path, data)
    src.add(data)
    missing = tmp_path / "no" / "such"
    proc = run(env, "download", ptr, "-r", src.url, "--no-local", "-o", str(missing / "o.bin"))
    assert f"{missing}: no such folder" in one_line_error(proc)
    assert src.counts().get("sha1", 0) == 0
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- cat and locate


def test_cat_offset_length_byte_exact(src: HTTPSource, tmp_path: Path, env: dict[str, str],
                                      make_file: Any) -> None:
    data = make_file(tmp_path / "x", 3 * MiB + 11, seed=19)
    ptr, _ = pointer(tmp_path, data)
    src.add(data)
    for offset, length in ((0, 10), (MiB - 5, 10), (2 * MiB + 3, MiB + 8), (len(data), 5)):
        proc = run(env, "cat", ptr, "-r", src.url, "--offset", str(offset), "--length", str(length))
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == data[offset:offset + length]
    proc = run(env, "cat", ptr, "-r", src.url, "--offset", str(len(data) - 7))
    assert proc.stdout == data[-7:]
    proc = run(env, "cat", ptr, "-r", src.url)
    assert proc.stdout == data
    one_line_error(run(env, "cat", ptr, "-r", src.url, "--offset", str(len(data) + 1)))
    assert run(env, "cat", ptr, "--offset", "-1").returncode == 2  # click's usage error


def test_cat_into_a_closed_pipe(src: HTTPSource, tmp_path: Path, env: dict[str, str],
                                make_file: Any) -> None:
    data = make_file(tmp_path / "x", 6 * MiB, seed=20)
    ptr, _ = pointer(tmp_path, data)
    src.add(data)
    cmd = " ".join(kbfs_cmd("cat", ptr, "-r", src.url)) + " | head -c 100"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env, capture_output=True,
                          timeout=60)
    assert proc.stdout == data[:100]
    assert b"Traceback" not in proc.stderr and b"Exception" not in proc.stderr, proc.stderr


def test_locate(src: HTTPSource, tmp_path: Path, env: dict[str, str], make_file: Any) -> None:
    data = make_file(tmp_path / "orig.bin", 2 * MiB, seed=21)
    p = prv.create_pointer(tmp_path / "orig.bin")
    ptr = tmp_path / "orig.bin.prv"
    ptr.write_text(p.to_json())
    src.add(data)
    proc = run(env, "locate", str(ptr), "-r", src.url)
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode()
    assert f"local:   {tmp_path / 'orig.bin'}" in text
    assert f"url:     {src.url}/sha1/{p.sha1}" in text
    assert "cache:   0 B of 2.0 MiB (0%)" in text
    assert run(env, "cat", str(ptr), "--no-local", "-r", src.url).stdout == data
    text = run(env, "locate", str(ptr), "-r", src.url).stdout.decode()
    assert "cache:   2.0 MiB of 2.0 MiB (100%), verified: tree" in text


# ---------------------------------------------------------------- start-up


@pytest.mark.parametrize("gc_paused", [False, True])
def test_gc_is_off_for_start_up_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     make_file: Any, gc_paused: bool) -> None:
    """`kbfs.cli.main` keeps the cyclic GC off while modules load and turns it back on
    before the command runs (a relay runs for days); after a usage error too. GC_PAUSED:
    as `python -m kbfs` calls it, the GC already off."""
    import gc

    from kbfs import cli, client

    data = make_file(tmp_path / "orig.bin", MiB + 1, seed=25)
    ptr = tmp_path / "orig.bin.prv"
    ptr.write_text(prv.create_pointer(tmp_path / "orig.bin").to_json())
    monkeypatch.setenv("KBFS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    seen: dict[str, bool] = {}
    get_command, download = cli.KbfsGroup.get_command, client.Client.download

    def spy_get_command(self: Any, ctx: Any, name: str) -> Any:
        seen.setdefault("start-up", gc.isenabled())
        return get_command(self, ctx, name)

    def spy_download(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen["command"] = gc.isenabled()
        return download(self, *args, **kwargs)

    monkeypatch.setattr(cli.KbfsGroup, "get_command", spy_get_command)
    monkeypatch.setattr(client.Client, "download", spy_download)
    try:
        for argv, code in ((["download", str(ptr), "-o", str(tmp_path / "out.bin")], 0),
                           (["download", "--bogus-option"], 2)):
            monkeypatch.setattr(sys, "argv", ["kbfs", *argv])
            if gc_paused:
                gc.disable()
            with pytest.raises(SystemExit) as exc:
                cli.main(gc_paused=gc_paused)
            assert exc.value.code == code
            assert gc.isenabled()
        assert seen == {"start-up": False, "command": True}
        assert (tmp_path / "out.bin").read_bytes() == data
    finally:
        gc.enable()
        gc.unfreeze()  # main froze this test process's objects: let them be collected again


def test_cached_download_loads_no_hashlib_nor_http_stack(src: HTTPSource, tmp_path: Path,
                                                         env: dict[str, str], make_file: Any) -> None:
    """A download of cached content imports only what it uses: not hashlib (OpenSSL, ~2 ms
    of start-up; blocks are verified by BLAKE3) nor the HTTP stack (the Fetcher is made
    only when a block is missing) nor urllib.parse (~1.4 ms with ipaddress: no URL is
    built). Seen in `-X importtime`, which lists every import."""
    data = make_file(tmp_path / "x", MiB + 5, seed=26)
    ptr, p = pointer(tmp_path, data, "cached.bin")
    src.add(data)
    assert run(env, "cat", ptr, "--relay", src.url, "--no-local").stdout == data
    out = tmp_path / "out.bin"
    proc = subprocess.run([sys.executable, "-X", "importtime", *kbfs_cmd(
        "download", ptr, "--relay", src.url, "--no-local", "-o", str(out))[1:]],
        env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == data
    lines = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("import time:")]
    imported = {ln.rsplit("|", 1)[1].strip() for ln in lines}
    assert "kbfs.client" in imported and "kbfs.piececache" in imported  # the listing is complete
    for name in ("hashlib", "_hashlib", "kbfs.fetch", "requests", "http.client", "trio",
                 "urllib.parse", "ipaddress"):
        assert name not in imported, name

"""Faults the mount must survive, each with real processes and a real FUSE mount.

The promise under test: a program reading through kbfs gets the original bytes or EIO,
within a bound, never wrong bytes and never a hang; and the piece cache never counts a
piece whose bytes fail its leaf. Faults: `kill -9` of the mount daemon mid-read (repeated, then
a remount over the same cache and the dead mountpoint), the relay and the share killed and
restarted in the middle of a cold 64 MiB sequential read, sources that lie (other bytes,
a short body, a wrong tree, 200 without range, a stall, 1 KB/s trickle) ahead of a good
one, a full disk under the cache, the cache folder deleted while mounted, two mounts on
one cache, and a shared file changed after indexing with its size and mtime put back.

Every reader compares each piece with the truth as it reads (`read_checked`) and runs in
a thread joined with a bound (`run_bounded`): still running after the bound is a hang.
Relays and shares are stopped by pid (tests/netutil.py), mounts always unmounted
(tests/mountutil.py). The long variants are marked `soak` (`make soak`).
See docs/reliability.md for the table of outcomes and figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from kbfs import prv, tree
from tests.cachecheck import check_cache
from tests.httpsource import HTTPSource
from tests.mountutil import NEEDS_FUSE, Mount, alive, force_unmount, is_mounted, isolated_env, mounted, run_kbfs
from tests.netutil import ShareProc, start_relay, start_share, wait_share_ready

pytestmark = NEEDS_FUSE

MiB = 1 << 20


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def serve_pointer(sources: list[HTTPSource], folder: Path, name: str, data: bytes,
                  originals: Path) -> prv.Pointer:
    """Serve DATA from every source in SOURCES and write FOLDER/NAME.prv (no original_path)."""
    originals.mkdir(parents=True, exist_ok=True)
    original = originals / hashlib.sha1(data).hexdigest()
    original.write_bytes(data)
    for src in sources:
        src.add(path=str(original))
    # v1 (1 MiB): the faulty sources here (tests/httpsource.py) serve leaf lists, no proofs.
    pointer = dataclasses.replace(prv.create_pointer(original, block_size=tree.BLOCK_SIZE),
                                  original_path="")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.prv").write_text(pointer.to_json())
    return pointer


def test_check_cache_catches_a_wrong_or_foreign_piece(tmp_path: Path) -> None:
    """The checker above is what every fault test relies on: it must see a piece counted
    present over wrong bytes, and a content nobody served."""
    from kbfs.piecestore import PieceStore

    data = data_of(3 * MiB + 5, 7)
    root = tree.tree_of_bytes(data, tree.BLOCK_SIZE)[1]
    with PieceStore(str(tmp_path / "pieces"), 1 << 40, 0) as store:
        store.put(root, len(data), MiB, 0, data[:2 * MiB])
    truths = {_sha1(data): data}
    assert check_cache(tmp_path, truths) == 2
    with open(tmp_path / "pieces" / "data" / root[:2] / root, "r+b") as f:
        f.seek(MiB + 7)
        f.write(b"\xff" if data[MiB + 7] != 0xFF else b"\0")
    with pytest.raises(AssertionError, match="piece 1 of .* other bytes"):
        check_cache(tmp_path, truths)
    with pytest.raises(AssertionError, match="unknown content"):
        check_cache(tmp_path, {_sha1(b"x"): b"x"})


@dataclasses.dataclass
class Outcome:
    """What one reader saw: 'ok', or the errno it ended with, and how many checked bytes."""

    name: str
    ok: bool = False
    errno: int | None = None
    good_bytes: int = 0
    wrong: str | None = None  # set when a byte differed from the truth: always a failure
    short_reads: int = 0
    seconds: float = 0.0


def _first_diff(piece: bytes, truth: bytes, off: int) -> str:
    want = truth[off:off + len(piece)]
    for i, (x, y) in enumerate(zip(piece, want, strict=False)):
        if x != y:
            return f"first at {off + i} (block {(off + i) >> 20}), {len(piece)} bytes read"
    return f"length {len(piece)} vs {len(want)}"


def read_checked(path: str, truth: bytes, out: Outcome, *, mode: str = "seq",
                 chunk: int = 1 << 20, count: int = 64, seed: int = 0,
                 stop: threading.Event | None = None) -> Outcome:
    """Read PATH sequentially (mode 'seq') or at COUNT random offsets ('random'), comparing
    every piece with TRUTH. An OSError ends the read (recorded); wrong bytes are recorded."""
    t0 = time.monotonic()
    rng = random.Random(seed)
    try:
        with open(path, "rb", buffering=0) as f:
            if mode == "seq":
                pos = 0
                while True:
                    if stop is not None and stop.is_set():
                        break
                    piece = f.read(chunk)
                    if not piece:
                        break
                    if piece != truth[pos:pos + len(piece)]:
                        out.wrong = f"bytes {pos}-{pos + len(piece)} differ: " \
                            + _first_diff(piece, truth, pos)
                        return out
                    pos += len(piece)
                    out.good_bytes = pos
                if pos != len(truth) and not (stop is not None and stop.is_set()):
                    out.wrong = f"file ended at {pos}, expected {len(truth)}"
                    return out
            else:
                for _ in range(count):
                    if stop is not None and stop.is_set():
                        break
                    off = rng.randrange(max(1, len(truth)))
                    n = rng.choice((4096, 65536, 300_000, chunk))
                    piece = os.pread(f.fileno(), n, off)
                    if piece != truth[off:off + len(piece)]:
                        out.wrong = f"pread({n}, {off}) differs: {_first_diff(piece, truth, off)}"
                        return out
                    if len(piece) < min(n, len(truth) - off):
                        out.short_reads += 1  # allowed (a read may be short); bytes were true
                    out.good_bytes += len(piece)
        out.ok = True
    except OSError as exc:
        out.errno = exc.errno
    finally:
        out.seconds = time.monotonic() - t0
    return out


def run_bounded(jobs: dict[str, Callable[[Outcome], object]], bound: float
                ) -> dict[str, Outcome]:
    """Run each job in its own thread with a fresh Outcome; assert none is still running
    after BOUND seconds (a hang) and none saw wrong bytes."""
    outcomes = {name: Outcome(name) for name in jobs}
    threads = [threading.Thread(target=fn, args=(outcomes[name],), daemon=True, name=name)
               for name, fn in jobs.items()]
    for t in threads:
        t.start()
    end = time.monotonic() + bound
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"readers still running after {bound:.0f} s (a hang): {hung}"
    wrong = {n: o.wrong for n, o in outcomes.items() if o.wrong}
    assert not wrong, f"WRONG BYTES: {wrong}"
    return outcomes


def ok_or_eio(o: Outcome, also: tuple[int, ...] = ()) -> None:
    """A finished reader got every byte right, or a clean EIO (or one of ALSO)."""
    assert o.wrong is None, o
    assert o.ok or o.errno in (errno.EIO, *also), o


def drop_page_cache(path: str) -> None:
    """Ask the kernel to drop its cached pages of PATH so the next read reaches the daemon."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def daemon_figures(pid: int) -> dict[str, int]:
    """RSS (bytes), open descriptors and threads of PID, from /proc."""
    rss = threads = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = block_fds = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        fds += 1
        block_fds += "/pieces/data/" in target  # the piece store's open data files (bounded: MAX_OPEN)
    return {"rss": rss, "fds": fds, "block_fds": block_fds, "other_fds": fds - block_fds,
            "threads": threads}


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# ---------------------------------------------------------------- kill -9 of the daemon


def _mount_over(source: str, mnt: Path, cache: str, extra: list[str]) -> Mount:
    """`kbfs mount` at MNT, which may be the dead mount a killed daemon left ("transport
    endpoint is not connected"): kbfs itself must clear it (mountutil.start_mount would
    trip over it first)."""
    with contextlib.suppress(FileExistsError):
        mnt.mkdir(parents=True)
    env = isolated_env(mnt.parent)
    res = run_kbfs(["mount", source, str(mnt), "--cache-dir", cache, "--relay", *extra],
                   env=env, timeout=90)
    found = re.search(r"pid (\d+); log (.+?)\)", res.stdout)
    assert res.returncode == 0 and found, f"remount failed: {res.stdout}{res.stderr}"
    return Mount(str(mnt), int(found.group(1)), found.group(2), cache, env)


def _kill_rounds(tmp_path: Path, rounds: int) -> None:
    big, small = data_of(48 * MiB + 123, 61), data_of(9 * MiB, 62)
    truths = {_sha1(big): big, _sha1(small): small}
    rng = random.Random(rounds)
    with HTTPSource() as source:
        folder = tmp_path / "src"
        serve_pointer([source], folder, "big.bin", big, tmp_path / "orig")
        serve_pointer([source], folder, "small.bin", small, tmp_path / "orig")
        # Slow enough that each kill lands with transfers (and block writes) in flight.
        source.trickle_rate = 2 * MiB
        source.mode = "trickle"
        cache = str(tmp_path / "cache")
        pid = 0
        seen: list[Outcome] = []
        try:
            for r in range(rounds):
                # Half the blocks go (as another process's eviction would) so every round
                # has transfers in flight when the kill lands.
                blocks = sorted(Path(cache).glob("blocks/*/*/[0-9]*"))
                for f in rng.sample(blocks, len(blocks) // 2):
                    f.unlink()
                # Remount over the same cache and over the dead mountpoint the kill left.
                m = _mount_over(str(folder), tmp_path / "mnt", cache, [source.url, "--timeout", "10"])
                pid = m.pid
                stop = threading.Event()
                jobs: dict[str, Callable[[Outcome], object]] = {
                    "seq-big": lambda o, m=m: read_checked(m.path("big.bin"), big, o),
                    "seq-small": lambda o, m=m: read_checked(m.path("small.bin"), small, o),
                    "rnd-big": lambda o, m=m, r=r: read_checked(
                        m.path("big.bin"), big, o, mode="random", count=40, seed=r),
                    "rnd-small": lambda o, m=m, r=r: read_checked(
                        m.path("small.bin"), small, o, mode="random", count=40, seed=r + 99),
                }
                box: dict[str, dict[str, Outcome]] = {}
                runner = threading.Thread(
                    target=lambda jobs=jobs, box=box: box.update(res=run_bounded(jobs, 60)),
                    daemon=True)
                runner.start()
                time.sleep(rng.uniform(0.1, 1.5))
                os.kill(pid, signal.SIGKILL)
                runner.join(70)
                stop.set()
                assert not runner.is_alive(), "readers hung after the daemon was killed"
                assert "res" in box, "a reader saw wrong bytes or hung (see the assertion above)"
                seen.extend(box["res"].values())
                for o in box["res"].values():
                    # A dead daemon: ENOTCONN (or EIO); before the kill: true bytes.
                    ok_or_eio(o, also=(errno.ENOTCONN, errno.ECONNABORTED))
                end = time.monotonic() + 10
                while alive(pid) and time.monotonic() < end:
                    time.sleep(0.02)
                assert not alive(pid)
                check_cache(cache, truths)
            source.mode = "ok"
            m = _mount_over(str(folder), tmp_path / "mnt", cache, [source.url])
            pid = m.pid
            res = run_bounded({
                "big": lambda o: read_checked(m.path("big.bin"), big, o),
                "small": lambda o: read_checked(m.path("small.bin"), small, o),
            }, 120)
            assert all(o.ok for o in res.values()), res
            # Blocks are stored behind the reads: a clean unmount writes what is queued.
            assert m.kbfs("umount", m.path()).returncode == 0
            end = time.monotonic() + 30
            while alive(pid) and time.monotonic() < end:
                time.sleep(0.02)
            assert not alive(pid), "the daemon did not exit after umount"
            outcomes = [o for o in seen if not o.ok]
            print(f"\nkill -9 x{rounds}: {len(seen) - len(outcomes)} readers finished true before "
                  f"the kill, {len(outcomes)} ended with "
                  f"{sorted({errno.errorcode.get(o.errno or 0, '?') for o in outcomes})}; "
                  f"checked bytes before the kills: {sum(o.good_bytes for o in seen) >> 20} MiB")
            n = check_cache(cache, truths)
            assert n == tree.block_count(len(big)) + tree.block_count(len(small)), n
        finally:
            force_unmount(str(tmp_path / "mnt"), pid or None)


def test_kill_9_daemon_during_reads_remount(tmp_path: Path) -> None:
    _kill_rounds(tmp_path, 5)


@pytest.mark.soak
def test_kill_9_daemon_soak(tmp_path: Path) -> None:
    _kill_rounds(tmp_path, 30)


# ---------------------------------------------------------------- relay / share restarts


@dataclasses.dataclass
class Net:
    base: Path
    data: Path
    relay: object
    relay_port: int
    share: ShareProc

    def source(self) -> str:
        return f"kbfs://127.0.0.1:{self.relay_port}/{self.share.id}"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "big.bin").write_bytes(data_of(128 * MiB, 71))
    relay = start_relay(tmp_path)
    port = int(relay.url.rsplit(":", 1)[1])
    share = start_share(data, relay.url, tmp_path)
    box = Net(tmp_path, data, relay, port, share)
    try:
        yield box
    finally:
        box.share.stop()
        box.relay.stop()  # type: ignore[attr-defined]


def _wait_bytes(o: Outcome, n: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while o.good_bytes < n and o.seconds == 0 and time.monotonic() < end:
        time.sleep(0.01)


@pytest.mark.parametrize("victim", ["relay", "share"])
def test_restart_mid_cold_read(net: Net, victim: str) -> None:
    """Kill -9 the relay (or the share) after 8 MiB of a cold 128 MiB read, restart it on
    the same port (the share with the same key and state), and see the read end with true
    bytes or EIO within the bound; then the whole file reads true again."""
    truth = (net.data / "big.bin").read_bytes()
    with mounted(net.source(), net.base, extra=["--timeout", "20"]) as m:
        o = Outcome("seq")
        t = threading.Thread(target=read_checked, args=(m.path("big.bin"), truth, o),
                             daemon=True)
        t0 = time.monotonic()
        t.start()
        _wait_bytes(o, 8 * MiB)
        assert o.good_bytes >= 8 * MiB and not o.ok, o
        if victim == "relay":
            net.relay.kill()  # type: ignore[attr-defined]
            time.sleep(0.5)
            net.relay = start_relay(net.base, port=net.relay_port)
            wait_share_ready(net.relay.url, net.share.id)  # type: ignore[attr-defined]
        else:
            state = net.share.state_dir
            net.share.kill()
            time.sleep(0.5)
            net.share = start_share(net.data, net.relay.url, net.base,  # type: ignore[attr-defined]
                                    state_dir=state)
        restarted = time.monotonic() - t0
        t.join(120)
        assert not t.is_alive(), f"read hung {time.monotonic() - t0:.0f} s after the {victim} restart"
        ok_or_eio(o)
        print(f"\n{victim} restart at {restarted:.1f} s: reader {'ok' if o.ok else 'EIO'} after "
              f"{o.good_bytes >> 20} MiB in {o.seconds:.1f} s")
        # After the restart everything reads true (from the cache and the restarted path).
        again = run_bounded({"again": lambda x: read_checked(m.path("big.bin"), truth, x)}, 120)
        assert again["again"].ok, again
        check_cache(m.cache_dir, {_sha1(truth): truth})


# ---------------------------------------------------------------- lying sources

LIES = ["lie", "short", "wrong_tree", "no_range", "stall", "trickle", "error500", "refuse"]


@pytest.mark.parametrize("mode", LIES)
def test_bad_source_first_good_second(tmp_path: Path, mode: str) -> None:
    """Two --relay values, the misbehaving one first: detected, the good one is used, and
    the file reads true within the bound (a stall or a 1 KB/s trickle costs seconds)."""
    data = data_of(6 * MiB + 5, 80)
    with HTTPSource() as bad, HTTPSource() as good:
        folder = tmp_path / "src"
        serve_pointer([bad, good], folder, "x.bin", data, tmp_path / "orig")
        bad.trickle_rate = 1024
        bad.mode = mode
        with mounted(str(folder), tmp_path, relays=[bad.url, good.url],
                     extra=["--timeout", "10"]) as m:
            res = run_bounded({
                "seq": lambda o: read_checked(m.path("x.bin"), data, o),
                "rnd": lambda o: read_checked(m.path("x.bin"), data, o, mode="random", count=30),
            }, 90)
            assert all(o.ok for o in res.values()), (mode, res)
            counts = bad.counts()
            if mode != "refuse":
                asked = counts.get("tree", 0) + counts.get("sha1", 0)
                assert asked > 0, f"the bad source was never asked: {counts}"
                assert bad.url in m.log_text(), "the bad source's failure was not logged"
            check_cache(m.cache_dir, {_sha1(data): data})
            print(f"\n{mode}: seq {res['seq'].seconds:.1f} s, random {res['rnd'].seconds:.1f} s, "
                  f"bad source counts {counts}")


def test_only_source_lies_eio_within_bound(tmp_path: Path) -> None:
    """With one source and it lying, the answer is EIO, quickly, and nothing is cached."""
    data = data_of(3 * MiB, 81)
    with HTTPSource() as bad:
        folder = tmp_path / "src"
        serve_pointer([bad], folder, "x.bin", data, tmp_path / "orig")
        bad.mode = "lie"
        with mounted(str(folder), tmp_path, relays=[bad.url], extra=["--timeout", "5"]) as m:
            res = run_bounded({"seq": lambda o: read_checked(m.path("x.bin"), data, o)}, 30)
            assert res["seq"].errno == errno.EIO and res["seq"].good_bytes == 0, res
            assert check_cache(m.cache_dir, {_sha1(data): data}) == 0


# ---------------------------------------------------------------- the cache's disk


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield path
    finally:
        for args in (["umount", str(path)], ["umount", "-l", str(path)]):
            if not is_mounted(str(path)):
                break
            subprocess.run(args, capture_output=True, timeout=30)


def _fill(folder: Path) -> int:
    """Fill the file system of FOLDER until ENOSPC; return the bytes written."""
    n = 0
    with open(folder / "filler", "wb", buffering=0) as f:
        chunk = b"\0" * (64 << 10)
        while True:
            try:
                n += f.write(chunk) or 0
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    for small in (4096, 512, 1):
        with open(folder / "filler", "ab", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                n += f.write(b"\0" * small) or 0
    return n


def test_full_disk_under_the_cache(tmp_path: Path) -> None:
    a, b = data_of(12 * MiB + 1, 90), data_of(6 * MiB, 91)
    truths = {_sha1(a): a, _sha1(b): b}
    with HTTPSource() as source, _tmpfs(tmp_path / "cache", "8m") as cache:
        folder = tmp_path / "src"
        serve_pointer([source], folder, "a.bin", a, tmp_path / "orig")
        serve_pointer([source], folder, "b.bin", b, tmp_path / "orig")
        with mounted(str(folder), tmp_path, cache_dir=str(cache), relays=[source.url],
                     extra=["--timeout", "10"]) as m:
            res = run_bounded({"a": lambda o: read_checked(m.path("a.bin"), a, o)}, 60)
            assert res["a"].ok, res
            filled = _fill(cache)
            assert shutil.disk_usage(cache).free < 64 << 10
            drop_page_cache(m.path("a.bin"))
            res = run_bounded({
                "b-seq": lambda o: read_checked(m.path("b.bin"), b, o),
                "a-rnd": lambda o: read_checked(m.path("a.bin"), a, o, mode="random", count=30),
                "a-seq": lambda o: read_checked(m.path("a.bin"), a, o),
            }, 90)
            for o in res.values():
                ok_or_eio(o)
            assert res["b-seq"].ok and res["a-seq"].ok, res  # verified bytes, stored or not
            assert alive(m.pid) and os.listdir(m.mountpoint)
            check_cache(cache, truths)
            print(f"\nfull disk: filled {filled >> 10} KiB; reads ok: "
                  f"{sorted(n for n, o in res.items() if o.ok)}")


def _rmtree_racing(path: str) -> None:
    """Delete PATH although the daemon keeps writing into it (files come and go)."""
    for _ in range(50):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
    raise AssertionError(f"{path} could not be deleted")


def test_cache_folder_deleted_while_mounted(tmp_path: Path) -> None:
    a, b = data_of(10 * MiB, 92), data_of(5 * MiB + 3, 93)
    truths = {_sha1(a): a, _sha1(b): b}
    with HTTPSource() as source:
        folder = tmp_path / "src"
        serve_pointer([source], folder, "a.bin", a, tmp_path / "orig")
        serve_pointer([source], folder, "b.bin", b, tmp_path / "orig")
        with mounted(str(folder), tmp_path, relays=[source.url], extra=["--timeout", "10"]) as m:
            with open(m.path("a.bin"), "rb") as f:
                assert f.read(3 * MiB) == a[:3 * MiB]
                _rmtree_racing(m.cache_dir)
                drop_page_cache(m.path("a.bin"))
                f.seek(0)
                assert f.read() == a  # the rest fetched again, the start too (cache gone)
            res = run_bounded({
                "b": lambda o: read_checked(m.path("b.bin"), b, o),
                "a-rnd": lambda o: read_checked(m.path("a.bin"), a, o, mode="random", count=30),
            }, 60)
            assert all(o.ok for o in res.values()), res
            assert alive(m.pid)
            check_cache(m.cache_dir, truths)
        # A remount over the recreated (or still missing) folder works and reads true.
        with mounted(str(folder), tmp_path, relays=[source.url]) as m2:
            res = run_bounded({"a": lambda o: read_checked(m2.path("a.bin"), a, o)}, 60)
            assert res["a"].ok, res
        check_cache(m.cache_dir, truths)


def test_two_mounts_share_one_cache(tmp_path: Path) -> None:
    files = {f"f{i}.bin": data_of((4 + 3 * i) * MiB + i, 100 + i) for i in range(3)}
    truths = {_sha1(d): d for d in files.values()}
    with HTTPSource() as source:
        folder = tmp_path / "src"
        for name, d in files.items():
            serve_pointer([source], folder, name, d, tmp_path / "orig")
        cache = str(tmp_path / "shared-cache")
        with mounted(str(folder), tmp_path, name="m1", cache_dir=cache, relays=[source.url]) as m1, \
                mounted(str(folder), tmp_path, name="m2", cache_dir=cache,
                        relays=[source.url]) as m2:
            jobs: dict[str, Callable[[Outcome], object]] = {}
            for k, (mnt, (name, d)) in enumerate(
                    (mnt, item) for mnt in (m1, m2) for item in files.items()):
                jobs[f"seq-{k}"] = lambda o, p=mnt.path(name), d=d: read_checked(p, d, o)
                jobs[f"rnd-{k}"] = lambda o, p=mnt.path(name), d=d, k=k: read_checked(
                    p, d, o, mode="random", count=40, seed=k)
            res = run_bounded(jobs, 120)
            assert all(o.ok for o in res.values()), res
            # Each mount now reads what the other stored (page cache dropped first).
            for name in files:
                for mnt in (m1, m2):
                    drop_page_cache(mnt.path(name))
            res = run_bounded({f"{mnt.mountpoint}-{name}":
                               (lambda o, p=mnt.path(name), d=d: read_checked(p, d, o))
                               for mnt in (m1, m2) for name, d in files.items()}, 60)
            assert all(o.ok for o in res.values()), res
            assert alive(m1.pid) and alive(m2.pid)
        n = check_cache(cache, truths)
        assert n == sum(tree.block_count(len(d)) for d in files.values())


# ---------------------------------------------------------------- a shared file changed


def test_file_changed_after_indexing_same_size_and_mtime(tmp_path: Path) -> None:
    """The share must not serve the changed file under its old SHA-1 (relay and direct),
    and readers of the old pointer (a .prv mount and a kbfs:// mount) never get new bytes."""
    data = tmp_path / "data"
    data.mkdir()
    old = data_of(8 * MiB, 110)
    (data / "f.bin").write_bytes(old)
    old_sha1 = _sha1(old)
    with start_relay(tmp_path) as relay, \
            start_share(data, relay.url, tmp_path, "--rescan-interval", "600",
                        listen=True) as sh:
        pointer = dataclasses.replace(prv.create_pointer(data / "f.bin", block_size=tree.BLOCK_SIZE),
                                      original_path="")  # v1, as the other mounts here
        folder = tmp_path / "ptrs"
        folder.mkdir()
        (folder / "f.bin.prv").write_text(pointer.to_json())
        src = f"kbfs://{relay.url.removeprefix('http://')}/{sh.id}"
        with mounted(str(folder), tmp_path, name="m-prv", cache_dir=str(tmp_path / "c1"),
                     relays=[relay.url], extra=["--timeout", "8"]) as mp, \
                mounted(src, tmp_path, name="m-net", cache_dir=str(tmp_path / "c2"),
                        extra=["--timeout", "8"]) as mn:
            for mnt in (mp, mn):  # only the first block is fetched before the change
                with open(mnt.path("f.bin"), "rb", buffering=0) as f:
                    assert f.read(4096) == old[:4096]
            new = bytearray(old)
            for off in (5 * MiB + 7, 7 * MiB + 1):
                new[off] ^= 0xFF
            st = os.stat(data / "f.bin")
            with open(data / "f.bin", "r+b") as f:
                for off in (5 * MiB + 7, 7 * MiB + 1):
                    f.seek(off)
                    f.write(bytes([new[off]]))
            os.utime(data / "f.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
            assert os.stat(data / "f.bin").st_size == st.st_size
            assert os.stat(data / "f.bin").st_mtime_ns == st.st_mtime_ns
            # HTTP: the old sha1 is never answered with the new bytes, by relay or share.
            for base in (relay.url, sh.direct_url):
                for hdr in ({}, {"Range": f"bytes={5 * MiB}-{6 * MiB - 1}"}):
                    r = requests.get(f"{base}/sha1/{old_sha1}", headers=hdr, timeout=20)
                    new_part = bytes(new) if not hdr else bytes(new)[5 * MiB:6 * MiB]
                    assert r.status_code not in (200, 206) or r.content != new_part, \
                        (base, hdr, r.status_code)
            res = run_bounded({
                "prv-seq": lambda o: read_checked(mp.path("f.bin"), old, o),
                "net-seq": lambda o: read_checked(mn.path("f.bin"), old, o),
                "prv-rnd": lambda o: read_checked(mp.path("f.bin"), old, o, mode="random",
                                                  count=30),
            }, 60)
            for o in res.values():
                ok_or_eio(o)  # the old bytes (only if cached before the change) or EIO
            assert not res["prv-seq"].ok and not res["net-seq"].ok, res
            check_cache(mp.cache_dir, {old_sha1: old})
            check_cache(mn.cache_dir, {old_sha1: old})
        # The refusal started a rescan: the new content is served under its own sha1.
        new_sha1 = _sha1(bytes(new))
        end = time.monotonic() + 20
        while time.monotonic() < end:
            r = requests.get(f"{relay.url}/sha1/{new_sha1}", timeout=20)
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200 and r.content == bytes(new)

"""Benchmark: reading one large file through `kbfs mount` vs `rclone mount` (http backend).

kbfs: a real `kbfs relay` and `kbfs share` (processes on 127.0.0.1), a pointer folder whose
pointer has no usable original_path, and `kbfs mount` (its own daemon), twice: of the
share's own pointers ("kbfs v1", 1 MiB blocks) and of v2 pointers of the same file ("kbfs
v2": the tree `kbfs prv create --block-size 65536` writes, 64 KiB pieces read through the
piece cache). rclone: nginx (our own config, foreground, stopped by pid) serving the same
file, and `rclone mount :http: --vfs-cache-mode full`. All read the same bytes, side by
side in one run. Measured per system:

- cold sequential MB/s (empty disk cache, page cache dropped),
- warm sequential MB/s (disk cache full, page cache dropped),
- random 4 KiB reads, median latency, cold (fresh cache) and warm (blocks cached, page
  cache dropped),
- the daemon's peak RSS (VmHWM) after streaming the file.
- "hot": serial and 8-thread 4 KiB reads and a sequential pass with the mount's own pages
  dropped (fadvise DONTNEED on the mounted file) and the cache's files still in the page
  cache: what the mount's inline reads are for.

Side `kbfs2hop`: the v2 pointers with KBFS_INLINE_READS=0 (every read takes the thread hop),
beside `kbfs2` in the same run: the inline path's A/B.

Floors for the warm random reads, measured in the same run: the same 4 KiB reads straight
from the data file on disk (page cache dropped), and through `bench/minifuse.py`, a pyfuse3 +
trio file system that does nothing but pread that file, on its trio thread ("inline") and
in a worker thread (`--thread`, one `trio.to_thread` hop per read, as kbfs's mount does):
what a FUSE read costs in pyfuse3 and trio by themselves, and what the hop adds (the most
an inline fast path for warm reads could save).

With `--rss-size 10G` (the default; 0 skips it) a separate pass streams a sparse file of
that size through a fresh v2 mount (`--cache-size` 4G, so the cache cannot hold it) and
reports the daemon's peak RSS and the MB/s; only kbfs v2 (the goal is the daemon's own
RSS; rclone would copy the file into its disk cache).

Dropping the page cache needs root (`/proc/sys/vm/drop_caches`); when it is not permitted
the table says so and "warm" includes the page cache. Prints a markdown table with ratios.
Usage: bench_mount.py [--size 1G] [--dir DIR] [--random N] [--rss-size 10G] [--sides rclone,kbfs,kbfs2,kbfs2hop]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from mountutil import force_unmount, stop_pid  # noqa: E402

from kbfs.config import parse_size  # noqa: E402

CHUNK = 1 << 20


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drop_page_cache() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Proc:
    """A child process whose output lines are collected in the background."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> None:
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
        )
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no {pattern!r} from {self.popen.args!r}: {''.join(self.lines)[-2000:]}")

    def stop(self) -> None:
        stop_pid(self.popen.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


# ---------------------------------------------------------------- measurements


def sequential(path: str) -> tuple[float, str]:
    """MB/s of reading PATH start to end in 1 MiB reads, and its SHA-1 (hashed afterwards)."""
    t0 = time.perf_counter()
    n = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            chunk = os.read(fd, 4 * CHUNK)
            if not chunk:
                break
            n += len(chunk)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    return n / seconds / 1e6, ""


def drop_file_pages(path: str) -> None:
    """Drop PATH's own page cache (fadvise DONTNEED; for a file in a FUSE mount, the mount's
    pages only): the next reads reach the daemon while its store's pages stay cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha1_of(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(8 * CHUNK):
            h.update(chunk)
    return h.hexdigest()


def random_reads(path: str, offsets: list[int]) -> float:
    """Median seconds of one 4 KiB pread at each offset (kernel read-ahead disabled)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        times = []
        for off in offsets:
            t0 = time.perf_counter()
            data = os.pread(fd, 4096, off)
            times.append(time.perf_counter() - t0)
            assert len(data) == 4096
    finally:
        os.close(fd)
    return statistics.median(times)


def parallel_random_reads(path: str, offsets: list[int], threads: int = 8) -> float:
    """Reads per second of THREADS threads each doing 4 KiB preads at its share of OFFSETS
    (one open file each, kernel read-ahead off): what concurrent readers get, where one
    request that blocks the daemon's event loop would hold up the others."""
    def work(part: list[int]) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for off in part:
                assert len(os.pread(fd, 4096, off)) == 4096
        finally:
            os.close(fd)

    parts = [offsets[i::threads] for i in range(threads)]
    t0 = time.perf_counter()
    workers = [threading.Thread(target=work, args=(p,)) for p in parts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(offsets) / (time.perf_counter() - t0)


# ---------------------------------------------------------------- the two systems


def v2_trees(data: Path) -> dict[str, dict[str, Any]]:
    """The `kbfs_tree` of a 64 KiB-leaf (v2) pointer of every file in DATA, by name."""
    sys.path.insert(0, str(REPO))
    from kbfs import prv

    out = {}
    for path in sorted(data.iterdir()):
        ptr = prv.create_pointer(path, block_size=65536)
        out[path.name] = {"sha1": ptr.sha1, "kbfs_tree": ptr.to_dict()["kbfs_tree"]}
    return out


class KbfsSide:
    name = "kbfs"

    def __init__(self, base: Path, data: Path, env: dict[str, str], name: str = "kbfs",
                 trees: dict[str, dict[str, Any]] | None = None, of: KbfsSide | None = None,
                 cache_size: str = "20G") -> None:
        """NAME's mount of the share's pointers, or with TREES of v2 pointers of the same
        files; OF: another side whose relay and share this one reads through."""
        self.base, self.data, self.env, self.name, self.cache_size = base, data, env, name, cache_size
        self.mnt = str(base / f"{name}-mnt")
        self.cache = str(base / f"{name}-cache")
        self.pointers = base / f"pointers-{name}"
        self.pid = 0
        self.owner = of is None
        if of is not None:
            self.relay, self.share, self.relay_url, self.share_id = of.relay, of.share, of.relay_url, of.share_id
            self._pointers(of.listing, trees)
            return
        self.relay = Proc(
            [sys.executable, "-m", "kbfs", "relay", "--host", "127.0.0.1", "--port", "0"],
            env=env,
            cwd=str(REPO),
        )
        self.relay_url = self.relay.wait_for(r"listening on (http://\S+)").group(1)
        self.share = Proc(
            [sys.executable, "-m", "kbfs", "share", str(data), "--relay", self.relay_url],
            env=env,
            cwd=str(REPO),
        )
        self.share_id = self.share.wait_for(r"share id ([a-z2-7]+)").group(1)
        log("kbfs share indexing the file (hashing it once)...")
        self.share.wait_for(r"share connected to", timeout=1200)
        end = time.monotonic() + 1200
        while True:
            listing = requests.get(f"{self.relay_url}/s/{self.share_id}/list/", timeout=30).json()
            if len(listing.get("files") or []) >= len(list(data.iterdir())) or time.monotonic() > end:
                break
            time.sleep(0.5)
        if not listing.get("files"):
            raise RuntimeError(f"the share lists no files: {listing}")
        self.listing = listing
        self._pointers(listing, trees)

    def _pointers(self, listing: dict[str, Any], trees: dict[str, dict[str, Any]] | None) -> None:
        self.pointers.mkdir(exist_ok=True)
        for item in listing["files"]:
            pointer = dict(item["prv"], original_path="")  # a reader elsewhere: no local copy
            if trees is not None:
                v2 = trees[item["name"]]
                if v2["sha1"] != pointer["original_checksum"]:
                    raise RuntimeError(f"{item['name']}: the share lists another SHA-1 than the data's")
                pointer["kbfs_tree"] = v2["kbfs_tree"]
            (self.pointers / f"{item['name']}.prv").write_text(json.dumps(pointer, indent=4))
        os.makedirs(self.mnt, exist_ok=True)

    def mount(self, fresh: bool) -> None:
        if fresh:
            shutil.rmtree(self.cache, ignore_errors=True)
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "kbfs",
                "mount",
                str(self.pointers),
                self.mnt,
                "--relay",
                self.relay_url,
                "--cache-dir",
                self.cache,
                "--cache-size",
                self.cache_size,
            ],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=str(REPO),
            timeout=120,
        )
        m = re.search(r"pid (\d+)", res.stdout)
        if res.returncode or not m:
            raise RuntimeError(f"kbfs mount failed: {res.stdout}{res.stderr}")
        self.pid = int(m.group(1))

    def unmount(self) -> None:
        force_unmount(self.mnt, self.pid)

    def close(self) -> None:
        self.unmount()
        if self.owner:
            self.share.stop()
            self.relay.stop()


class RcloneSide:
    name = "rclone"

    def __init__(self, base: Path, data: Path) -> None:
        self.base, self.data = base, data
        self.mnt = str(base / "rclone-mnt")
        self.cache = str(base / "rclone-cache")
        self.port = free_port()
        conf = base / "nginx.conf"
        (base / "nginx").mkdir(exist_ok=True)
        conf.write_text(f"""
daemon off;
worker_processes 2;
pid {base}/nginx/nginx.pid;
error_log {base}/nginx/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {base}/nginx/body;
    proxy_temp_path {base}/nginx/proxy;
    fastcgi_temp_path {base}/nginx/fastcgi;
    uwsgi_temp_path {base}/nginx/uwsgi;
    scgi_temp_path {base}/nginx/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {data};
        autoindex on;
    }}
}}
""")
        self.nginx = Proc(["nginx", "-c", str(conf), "-p", str(base / "nginx")])
        end = time.monotonic() + 10
        while True:
            try:
                requests.get(f"http://127.0.0.1:{self.port}/", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > end:
                    raise RuntimeError("nginx did not start: " + "".join(self.nginx.lines)) from None
                time.sleep(0.1)
        os.makedirs(self.mnt, exist_ok=True)
        self.proc: Proc | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.popen.pid

    def mount(self, fresh: bool) -> None:
        if fresh:
            shutil.rmtree(self.cache, ignore_errors=True)
        self.proc = Proc(
            [
                "rclone",
                "mount",
                ":http:",
                self.mnt,
                "--http-url",
                f"http://127.0.0.1:{self.port}/",
                "--vfs-cache-mode",
                "full",
                "--cache-dir",
                self.cache,
                "--read-only",
                "--vfs-cache-max-size",
                "20G",
            ]
        )
        end = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if time.monotonic() > end or self.proc.popen.poll() is not None:
                raise RuntimeError("rclone mount failed: " + "".join(self.proc.lines)[-2000:])
            time.sleep(0.1)

    def unmount(self) -> None:
        force_unmount(self.mnt, None)
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def close(self) -> None:
        self.unmount()
        self.nginx.stop()


def direct_pieces(relay_url: str, sha1: str, size: int, offsets: list[int]) -> float:
    """Median seconds of one 64 KiB piece with its proof asked of the relay directly (one
    kept-alive connection of this process, no mount, no verification): what the relay and
    the share cost per cold v2 read, to tell from what the mount adds."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(relay_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
    times = []
    try:
        for off in offsets:
            first = off // 65536 * 65536
            t0 = time.perf_counter()
            conn.request("GET", f"/sha1/{sha1}", headers={
                "Range": f"bytes={first}-{min(first + 65536, size) - 1}", "Kbfs-Want-Proof": "bs=65536"})
            resp = conn.getresponse()
            resp.read()
            times.append(time.perf_counter() - t0)
            if resp.status != 206 or not resp.getheader("Kbfs-Proof"):
                raise RuntimeError(f"piece at {first}: {resp.status}, no proof")
    finally:
        conn.close()
    return statistics.median(times)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process PID has used so far (0.0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def side_cpu(side: KbfsSide | RcloneSide) -> dict[str, float]:
    """CPU seconds so far of SIDE's daemon, and for kbfs of its relay and share (what a
    pass's throughput costs, and on a shared 2-core machine what may bound it)."""
    out = {"daemon": proc_cpu(side.pid)}
    if isinstance(side, KbfsSide):
        out.update(relay=proc_cpu(side.relay.popen.pid), share=proc_cpu(side.share.popen.pid))
    else:
        out.update(nginx=sum(proc_cpu(int(p)) for p in os.listdir("/proc") if p.isdigit()
                             and _is_nginx_of(int(p), side.nginx.popen.pid)))
    return out


def _is_nginx_of(pid: int, master: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return pid == master or int(fields[1]) == master


def measure(
    side: KbfsSide | RcloneSide, fname: str, want_sha1: str, offsets: list[int], can_drop: bool
) -> dict[str, float]:
    path = os.path.join(side.mnt, fname)
    out: dict[str, float] = {}
    side.mount(fresh=True)
    try:
        drop_page_cache()
        log(f"{side.name}: cold sequential")
        cpu0 = side_cpu(side)
        out["cold_seq"], _ = sequential(path)
        out.update({f"cold_seq_cpu_{k}": round(v - cpu0[k], 2) for k, v in side_cpu(side).items()})
        out["rss_mb"] = peak_rss_mb(side.pid)
        if side.name == "rclone":
            time.sleep(2)  # let rclone finish writing its cache file
        drop_page_cache()
        log(f"{side.name}: warm sequential")
        out["warm_seq"], _ = sequential(path)
        got = sha1_of(path)
        if got != want_sha1:
            raise RuntimeError(f"{side.name} returned wrong bytes: sha1 {got}")
        # "Hot": the cache's own file in the page cache, the mount's pages dropped (the case
        # the inline read path is for: the daemon answers from memory).
        for key, fn in (("hot_rand", lambda: random_reads(path, offsets)),
                        ("hot_rand_par_per_s", lambda: parallel_random_reads(path, offsets)),
                        ("hot_seq", lambda: sequential(path)[0])):
            drop_file_pages(path)
            log(f"{side.name}: {key}")
            out[key] = fn()
    finally:
        side.unmount()
    side.mount(fresh=True)
    try:
        drop_page_cache()
        log(f"{side.name}: random 4 KiB cold")
        out["rand_cold"] = random_reads(path, offsets)
        if side.name == "rclone":
            time.sleep(2)
        drop_page_cache()
        log(f"{side.name}: random 4 KiB warm")
        out["rand_warm"] = random_reads(path, offsets)
        drop_page_cache()
        log(f"{side.name}: random 4 KiB warm, 8 threads")
        out["rand_warm_par_per_s"] = parallel_random_reads(path, offsets)
        out["rss_mb"] = max(out["rss_mb"], peak_rss_mb(side.pid))
    finally:
        side.unmount()
    return out


def floors(base: Path, data_file: Path, offsets: list[int]) -> dict[str, float]:
    """Median 4 KiB random-read latency from the disk itself and through minifuse.py, inline
    and with one thread hop per read (--thread)."""
    out: dict[str, float] = {}
    drop_page_cache()
    log("floor: random 4 KiB from the disk")
    out["disk"] = random_reads(str(data_file), offsets)
    mnt = base / "minifuse-mnt"
    mnt.mkdir(exist_ok=True)
    for key, extra in (("pyfuse3", []), ("pyfuse3_thread", ["--thread"]),
                       ("pyfuse3_2", []), ("pyfuse3_thread_2", ["--thread"])):
        proc = Proc([sys.executable, str(REPO / "bench" / "minifuse.py"), *extra, str(data_file), str(mnt)])
        try:
            proc.wait_for(r"^ready", timeout=30)
            drop_page_cache()
            log(f"floor: random 4 KiB through a pyfuse3 file system that only preads {extra}")
            out[key] = random_reads(str(mnt / data_file.name), offsets)
        finally:
            proc.stop()
            force_unmount(str(mnt), None)
    return out


def rss_pass(kb: KbfsSide, fname: str) -> dict[str, float]:
    """Stream FNAME (the sparse file) once through a fresh mount of KB: MB/s, peak RSS."""
    kb.mount(fresh=True)
    try:
        drop_page_cache()
        log(f"{kb.name}: streaming {fname} for the RSS goal")
        mbps, _ = sequential(os.path.join(kb.mnt, fname))
        return {"seq": mbps, "rss_mb": peak_rss_mb(kb.pid)}
    finally:
        kb.unmount()
        shutil.rmtree(kb.cache, ignore_errors=True)


@contextlib.contextmanager
def workdir(parent: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kbfs-bench-mount-", dir=parent))
    path.chmod(0o755)  # nginx's workers run as an unprivileged user and must read the data
    try:
        yield path
    finally:
        for mnt in ("kbfs-mnt", "rclone-mnt", "minifuse-mnt"):
            force_unmount(str(path / mnt), None)
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G", help="file size (default 1G)")
    ap.add_argument("--dir", default=None, help="work folder parent (default: the temp dir)")
    ap.add_argument("--random", type=int, default=200, help="random reads per pass")
    ap.add_argument("--rss-size", default="10G", help="sparse file streamed through kbfs v2 for the RSS goal (0: skip)")
    ap.add_argument("--plot", action="store_true", help="redraw docs/bench-mount.png (kbfs v1 vs rclone)")
    ap.add_argument("--sides", default="rclone,kbfs,kbfs2,kbfs2hop",
                    help="which of rclone,kbfs,kbfs2,kbfs2hop (v2 with KBFS_INLINE_READS=0), in this order")
    args = ap.parse_args()
    size = parse_size(args.size)
    rss_size = parse_size(args.rss_size) if args.rss_size not in ("0", "") else 0
    sides = [x for x in args.sides.split(",") if x]
    for tool in ("rclone", "nginx", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench_mount: {tool} is not installed", file=sys.stderr)
            return 2
    can_drop = drop_page_cache()
    with workdir(args.dir) as base:
        env = dict(
            os.environ,
            XDG_STATE_HOME=str(base / "state"),
            XDG_CONFIG_HOME=str(base / "config"),
            KBFS_RUNTIME_DIR=str(base / "run"),
        )
        for key in ("KBFS_RELAY", "KBFS_CACHE_DIR", "KBFS_CACHE_SIZE"):
            env.pop(key, None)
        data = base / "data"
        data.mkdir()
        fname = "big.bin"
        log(f"writing a {size / (1 << 30):.2f} GiB file")
        h = hashlib.sha1()
        with open(data / fname, "wb") as f:
            left = size
            rng = random.Random(1)
            block = rng.randbytes(16 * CHUNK)
            i = 0
            while left:
                # Distinct blocks (a counter in each MiB) without paying for 1 GiB of randomness.
                piece = bytearray(block[: min(left, len(block))])
                for j in range(0, len(piece), CHUNK):
                    piece[j : j + 8] = (i * 16 + j // CHUNK).to_bytes(8, "little")
                f.write(piece)
                h.update(piece)
                left -= len(piece)
                i += 1
        want = h.hexdigest()
        if rss_size:
            with open(data / "sparse.bin", "wb") as f:   # no disk blocks: zeros on read
                f.truncate(rss_size)
        log("hashing the data into v2 trees (64 KiB leaves)")
        trees = v2_trees(data)
        rng = random.Random(2)
        offsets = [rng.randrange(0, size - 4096) for _ in range(args.random)]
        results: dict[str, dict[str, float]] = {}
        rss: dict[str, float] = {}
        kb = KbfsSide(base, data, env)
        kb2 = KbfsSide(base, data, env, name="kbfs2", trees=trees, of=kb)
        kb2hop = KbfsSide(base, data, dict(env, KBFS_INLINE_READS="0"), name="kbfs2hop", trees=trees, of=kb)
        try:
            for name in sides:
                if name == "rclone":
                    rc = RcloneSide(base, data)
                    try:
                        results["rclone"] = measure(rc, fname, want, offsets, can_drop)
                    finally:
                        rc.close()
                else:
                    side = {"kbfs": kb, "kbfs2": kb2, "kbfs2hop": kb2hop}[name]
                    results[name] = measure(side, fname, want, offsets, can_drop)
                    shutil.rmtree(side.cache, ignore_errors=True)
            if "kbfs2" in results:   # the relay + share alone, other offsets (cold there too)
                others = [(o + size // 2) % (size - 4096) for o in offsets[:50]]
                results["kbfs2"]["direct_piece"] = direct_pieces(kb.relay_url, want, size, others)
            if rss_size:
                big = KbfsSide(base, data, env, name="kbfs2rss", trees=trees, of=kb, cache_size="4G")
                rss = rss_pass(big, "sparse.bin")
        finally:
            kb2hop.close()
            kb2.close()
            kb.close()
        floor = floors(base, data / fname, offsets)
    print()
    print(
        f"File: {size / (1 << 30):.2f} GiB, {args.random} random 4 KiB reads per pass; "
        f"page cache dropped between passes: {'yes' if can_drop else 'NO (not permitted)'}; "
        f"load average {os.getloadavg()[0]:.1f} at the end."
    )
    r = results.get("rclone")
    for name in ("kbfs", "kbfs2"):
        if name in results and r:
            print()
            print(f"kbfs {'v1 (1 MiB blocks)' if name == 'kbfs' else 'v2 (64 KiB pieces)'} against rclone:")
            print()
            print(report_table(results[name], r))
    if "kbfs2" in results and "kbfs2hop" in results:
        print()
        print(inline_table(results["kbfs2"], results["kbfs2hop"]))
    if rss:
        print()
        print(f"kbfs v2 streaming a {rss_size / (1 << 30):.0f} GiB sparse file (cache 4G): "
              f"{rss['seq']:.0f} MB/s, daemon peak RSS {rss['rss_mb']:.0f} MB "
              f"(goal <= 300 MB: {_met(rss['rss_mb'] <= 300)})")
    print()
    hop = [floor["pyfuse3_thread"] - floor["pyfuse3"], floor["pyfuse3_thread_2"] - floor["pyfuse3_2"]]
    print(
        f"Floors for the warm random reads (same offsets, page cache dropped): straight from "
        f"the disk {floor['disk'] * 1e6:.0f} us; through a pyfuse3 file system that only "
        f"preads (bench/minifuse.py), inline {floor['pyfuse3'] * 1e6:.0f} / {floor['pyfuse3_2'] * 1e6:.0f} us, "
        f"with a thread hop per read {floor['pyfuse3_thread'] * 1e6:.0f} / {floor['pyfuse3_thread_2'] * 1e6:.0f} us "
        f"(the hop: {hop[0] * 1e6:.0f} / {hop[1] * 1e6:.0f} us); "
        + "; ".join(f"{n} warm {results[n]['rand_warm'] * 1e6:.0f} us" for n in ("kbfs", "kbfs2") if n in results)
        + "."
    )
    if "kbfs2" in results and "direct_piece" in results["kbfs2"]:
        k2 = results["kbfs2"]
        print(f"- kbfs v2 cold random read {k2['rand_cold'] * 1e3:.2f} ms through the mount; one piece with "
              f"its proof asked of the relay directly {k2['direct_piece'] * 1e3:.2f} ms (relay + share; "
              f"the rest is the mount: FUSE, thread hop, verification, store)")
    for name, res in results.items():
        cpu = {k.removeprefix("cold_seq_cpu_"): v for k, v in res.items() if k.startswith("cold_seq_cpu_")}
        print(f"- {name}: CPU seconds during the cold sequential pass {cpu} "
              f"({size / res['cold_seq'] / 1e6:.1f} s of wall time)")
    print()
    print("raw:", json.dumps({"results": results, "rss": rss, "floors": floor}))
    if args.plot and "kbfs" in results and r:
        try:
            plot(results["kbfs"], r, REPO / "docs" / "bench-mount.png")
            print(f"\nplot: {REPO / 'docs' / 'bench-mount.png'}")
        except Exception as exc:  # noqa: BLE001 - the figures above are the result
            print(f"\nno plot: {exc}", file=sys.stderr)
    return 0


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report_table(k: dict[str, float], r: dict[str, float]) -> str:
    """The markdown table: figures, ratios and each goal met or not."""
    rows = [
        "| measure | kbfs | rclone | kbfs vs rclone | goal | result |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    cold = k["cold_seq"] / r["cold_seq"]
    rows.append(
        f"| cold sequential | {k['cold_seq']:.0f} MB/s | {r['cold_seq']:.0f} MB/s | "
        f"{cold:.2f}x | >= 1.5x | {_met(cold >= 1.5)} |"
    )
    warm = k["warm_seq"] / r["warm_seq"]
    rows.append(
        f"| warm sequential | {k['warm_seq']:.0f} MB/s | {r['warm_seq']:.0f} MB/s | "
        f"{warm:.2f}x | >= 2x | {_met(warm >= 2)} |"
    )
    rc = k["rand_cold"] / r["rand_cold"]
    rows.append(
        f"| random 4 KiB cold, median | {k['rand_cold'] * 1e3:.2f} ms | "
        f"{r['rand_cold'] * 1e3:.2f} ms | {rc:.2f}x rclone's time | <= 0.5x | {_met(rc <= 0.5)} |"
    )
    rows.append(
        f"| random 4 KiB warm, median | {k['rand_warm'] * 1e6:.0f} us | "
        f"{r['rand_warm'] * 1e6:.0f} us | {k['rand_warm'] / r['rand_warm']:.2f}x rclone's time | "
        f"<= 100 us | {_met(k['rand_warm'] <= 100e-6)} |"
    )
    if "rand_warm_par_per_s" in k and "rand_warm_par_per_s" in r:
        rows.append(
            f"| random 4 KiB warm, 8 threads | {k['rand_warm_par_per_s']:.0f} reads/s | "
            f"{r['rand_warm_par_per_s']:.0f} reads/s | {k['rand_warm_par_per_s'] / r['rand_warm_par_per_s']:.2f}x | | |"
        )
    rows.append(
        f"| daemon peak RSS (VmHWM) | {k['rss_mb']:.0f} MB | {r['rss_mb']:.0f} MB | "
        f"{k['rss_mb'] / r['rss_mb']:.2f}x | <= 300 MB | {_met(k['rss_mb'] <= 300)} |"
    )
    return "\n".join(rows)


def inline_table(on: dict[str, float], off: dict[str, float]) -> str:
    """The inline read path's A/B: kbfs v2 with it (the default) and without (KBFS_INLINE_READS=0)."""
    rows = ["| measure | inline (default) | thread hop only | inline / hop |", "| --- | ---: | ---: | ---: |"]
    for key, label, unit, scale in (
        ("hot_rand", "4 KiB serial, store's file in page cache, median", "us", 1e6),
        ("hot_rand_par_per_s", "4 KiB, 8 threads, store's file in page cache", "reads/s", 1),
        ("hot_seq", "sequential, store's file in page cache", "MB/s", 1),
        ("warm_seq", "warm sequential (page cache dropped)", "MB/s", 1),
        ("rand_warm", "4 KiB serial warm (page cache dropped), median", "us", 1e6),
        ("rand_warm_par_per_s", "4 KiB warm, 8 threads (page cache dropped)", "reads/s", 1),
    ):
        if key in on and key in off:
            rows.append(f"| {label} | {on[key] * scale:.0f} {unit} | {off[key] * scale:.0f} {unit} | "
                        f"{on[key] / off[key]:.2f}x |")
    return "\n".join(rows)


def plot(k: dict[str, float], r: dict[str, float], path: Path) -> None:
    """Bar charts of kbfs against rclone: throughput, latency, memory (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [
        ("sequential read (MB/s, higher is better)", ["cold", "warm"],
         [k["cold_seq"], k["warm_seq"]], [r["cold_seq"], r["warm_seq"]]),
        ("random 4 KiB read, median (ms, lower is better)", ["cold", "warm"],
         [k["rand_cold"] * 1e3, k["rand_warm"] * 1e3], [r["rand_cold"] * 1e3, r["rand_warm"] * 1e3]),
        ("daemon peak RSS (MB)", ["VmHWM"], [k["rss_mb"]], [r["rss_mb"]]),
    ]
    width = 0.38
    for ax, (title, labels, kv, rv) in zip(axes, panels, strict=True):
        xs = list(range(len(labels)))
        bars_k = ax.bar([x - width / 2 for x in xs], kv, width, label="kbfs", color="#1f77b4")
        bars_r = ax.bar([x + width / 2 for x in xs], rv, width, label="rclone", color="#ff7f0e")
        for bars in (bars_k, bars_r):
            for b in bars:
                h = b.get_height()
                ax.annotate(f"{h:.3g}", (b.get_x() + b.get_width() / 2, h), ha="center",
                            va="bottom", fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.set_title(title, fontsize=9)
        if "random" in title:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("kbfs mount vs rclone mount (http backend, --vfs-cache-mode full), 1 file")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

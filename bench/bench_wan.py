"""Benchmark: kbfs against rclone and curl over an emulated wide-area path, side by side in one run.

The path (bench/wanpath.py, bench/linkemu.py, every emulator a process of its own):

    kbfs:       reader -[A]- kbfs relay -[B]- kbfs share        (real processes on 127.0.0.1)
    reference:  reader -[A]- -[B]- nginx                         (nginx where the share is)

A = 40 ms RTT, 100 Mbit/s; B = 20 ms RTT, 200 Mbit/s (`--links 100m`); or both at 1 Gbit/s
(`--links 1g`); `--links both` runs the two one after the other. Path RTT = 60 ms: latencies are
given in units of it. The contenders read the same bytes over the same two links:

- the kbfs mount: `kbfs mount` of a folder of pointers (as a collaborator has them: no local
  copy, `--no-local`), through the relay at link A, twice: of the share's own (v1) pointers,
  1 MiB blocks, and of v2 pointers of the same files (the tree `kbfs prv create --block-size
  65536` writes: 64 KiB pieces, each verified by a proof that comes with it);
- the kbfs mount of the v2 pointers once more with read-around off (`KBFS_READ_AROUND=0`,
  kbfs/readahead2.py `ReadAround`): the A/B of that policy, in the random, first-byte and
  h5py phases, printed as a table of its own (on / off);
- rclone mount: `rclone mount :http: --vfs-cache-mode full` of nginx through the links;
- `kbfs download` of the v1 and of the v2 pointer, and `curl -o` of the same file from nginx.

Beside the figures, what they are made of (measured, outside the timed reads): the relay's
count of relayed requests (/sha1/, /tree/; read at its own address after each random read and
around each phase), the v2 mount's piece-cache counters (its status file: a read that fell
back to the leaf list shows there), and one request of each kind (/api/find, a piece with its
proof, a 1 MiB range) timed over link A on a connection of this process.

Measured (cold = a fresh mount with an empty cache folder each round, so neither the daemon's
cache nor the kernel's page cache of the mount has the bytes; within a round every read is of
bytes not read before; the servers' own page cache is warm for both):

- random 4 KiB reads through each mount: one pread each at offsets in distinct 32 MiB regions of
  a 1 GiB file (POSIX_FADV_RANDOM), p50 and p90; the first read of the file is left out (it is
  a first byte, below);
- first byte of a file never read: open + 4 KiB pread at 0 of files never touched, on a mount
  whose connections are already open (a file was read before); and the same on a fresh mount,
  connection set-up included (no goal);
- h5py: open a 64 MiB HDF5 file of 40 chunked datasets and read a 64-element slice of each;
- sequential: one pass over a 256 MiB file in 1 MiB reads, as a fraction of the narrow link;
- `kbfs download` vs `curl` of that file (SHA-1 of every copy checked).

Prints a markdown table of figures, ratios and the issue's goals ("met"/"NOT met"); exits 0
whatever the figures. Each phase is bounded (SIGALRM interrupts a read that hangs); every process
is stopped by pid and every mount unmounted in `finally`.

    python bench/bench_wan.py [--links 100m|1g|both] [--dir DIR] [--random 24] [--h5-rounds 3] [--smoke]
    (or BENCH_WAN_LINKS=1g)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from linkemu import WAN_A, WAN_A_GBIT, WAN_B, WAN_B_GBIT  # noqa: E402
from mountutil import force_unmount, isolated_env, start_mount, stop_pid  # noqa: E402
from wanpath import KbfsWan, kbfs_wan, nginx_wan  # noqa: E402

MIB = 1 << 20
PIECE = 64 * 1024  # the leaf size of a v2 pointer
RTT = 0.060  # path round trip: A (40 ms) + B (20 ms)
SEQ_SIZE = 256 * MIB
RAND_SIZE = 1024 * MIB
RAND_REGION = 32 * MIB
FIRST_FILES = 6  # t0 opens the connections, t1.. are measured
FIRST_SIZE = 4 * MIB
H5_DATASETS = 40
H5_SIZE = 64 * MIB
H5_SLICE = 64
LINKS = {"100m": (WAN_A, WAN_B), "1g": (WAN_A_GBIT, WAN_B_GBIT)}


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: float, what: str) -> Iterator[None]:
    """Raise PhaseTimeout in this (main) thread after SECONDS: a FUSE read blocked in the kernel
    returns EINTR to the signal, and the handler's exception ends it."""

    def fire(_sig: int, _frame: object) -> None:
        raise PhaseTimeout(f"{what}: over {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# data


def write_random(path: Path, size: int, seed: int) -> str:
    """SIZE bytes, every MiB distinct (a counter in it), cheap to make; returns the SHA-1."""
    rng = random.Random(seed)
    base = bytearray(rng.randbytes(16 * MIB))
    h = hashlib.sha1()
    with open(path, "wb") as f:
        for i in range(0, size, MIB):
            j = (i // MIB) % 16
            chunk = base[j * MIB : (j + 1) * MIB]
            chunk[:16] = seed.to_bytes(8, "little") + (i // MIB).to_bytes(8, "little")
            chunk = chunk[: size - i]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def write_h5(path: Path) -> None:
    """H5_DATASETS float32 datasets, 64 KiB chunks, a few attributes each: about H5_SIZE."""
    import h5py
    import numpy as np

    n = H5_SIZE // H5_DATASETS // 4
    rng = np.random.default_rng(7)
    with h5py.File(path, "w") as f:
        f.attrs["description"] = "bench_wan: 40 datasets"
        for k in range(H5_DATASETS):
            ds = f.create_dataset(f"group{k % 4}/ds{k:02d}", data=rng.random(n, dtype=np.float32),
                                  chunks=(16384,))
            ds.attrs["units"] = "mV"
            ds.attrs["index"] = k


def make_data(data: Path) -> dict[str, str]:
    data.mkdir(parents=True)
    sums = {"seq.bin": write_random(data / "seq.bin", SEQ_SIZE, 1),
            "rand.bin": write_random(data / "rand.bin", RAND_SIZE, 2)}
    for k in range(FIRST_FILES):
        sums[f"t{k}.bin"] = write_random(data / f"t{k}.bin", FIRST_SIZE, 10 + k)
    write_h5(data / "data.h5")
    return sums


def v2_trees(data: Path) -> dict[str, dict[str, Any]]:
    """The `kbfs_tree` of a 64 KiB-leaf ("v2") pointer of every file in DATA, by name (what
    `kbfs prv create --block-size 65536` writes), and its SHA-1."""
    from kbfs import prv

    out = {}
    for path in sorted(data.iterdir()):
        ptr = prv.create_pointer(path, block_size=PIECE)
        out[path.name] = {"sha1": ptr.sha1, "kbfs_tree": ptr.to_dict()["kbfs_tree"]}
    return out


def write_pointers(kb: KbfsWan, folder: Path, trees: dict[str, dict[str, Any]] | None = None) -> None:
    """The share's listing as pointers with no local copy (a reader elsewhere); with TREES,
    the same pointers with the v2 tree (64 KiB leaves) in place of the share's 1 MiB one."""
    folder.mkdir(exist_ok=True)
    with urllib.request.urlopen(f"{kb.relay_url}/s/{kb.share_id}/list/", timeout=30) as r:
        listing = json.load(r)
    for item in listing["files"]:
        pointer = dict(item["prv"], original_path="")
        if trees is not None:
            v2 = trees[item["name"]]
            if v2["sha1"] != pointer["original_checksum"]:
                raise RuntimeError(f"{item['name']}: the share lists another SHA-1 than the data's")
            pointer["kbfs_tree"] = v2["kbfs_tree"]
        (folder / f"{item['name']}.prv").write_text(json.dumps(pointer, indent=4))


def relay_requests(kb: KbfsWan) -> int:
    """The relay's count of relayed requests (/sha1/ ranges, /tree/), read at its own address
    (no link), between measured reads: /api/find is not in it."""
    with urllib.request.urlopen(f"{kb.relay_url}/api/health", timeout=10) as r:
        return int(json.load(r)["requests"])


# ---------------------------------------------------------------------------------------------
# the two mounts


class Mounts:
    """Fresh mounts of each contender ("kbfs": v1 pointers, "kbfs2": v2 pointers, "rclone"),
    always unmounted and stopped afterwards."""

    def __init__(self, work: Path, pointers: dict[str, Path], reader_url: str, nginx_url: str) -> None:
        self.work, self.pointers, self.reader_url, self.nginx_url = work, pointers, reader_url, nginx_url
        self.n = 0
        self.status_file: Path | None = None
        self.pid = 0  # the live kbfs mount's daemon

    def status(self, since: float) -> dict[str, Any]:
        """The live kbfs mount's status file once written after SINCE (time.time()); it is
        rewritten every 2 s (mount.STATUS_INTERVAL). {} for rclone or when none comes."""
        end = time.monotonic() + 6
        while self.status_file is not None and time.monotonic() < end:
            with contextlib.suppress(OSError, ValueError):
                st = json.loads(self.status_file.read_text())
                if st.get("updated", 0) > since:
                    return dict(st)
            time.sleep(0.2)
        return {}

    @contextlib.contextmanager
    def fresh(self, kind: str) -> Iterator[str]:
        self.n += 1
        base = self.work / f"{kind}-{self.n}"
        base.mkdir()
        if kind in self.pointers:
            m = start_mount(str(self.pointers[kind]), base, relays=[self.reader_url], extra=["--no-local"],
                            env_extra=MOUNT_ENV.get(kind))
            key = hashlib.sha1(os.path.abspath(m.mountpoint).encode()).hexdigest()[:16]
            self.status_file = base / "run" / "mounts" / f"{key}.json"  # isolated_env's runtime dir
            self.pid = m.pid
            try:
                yield m.mountpoint
            finally:
                self.status_file = None
                force_unmount(m.mountpoint, m.pid)
                shutil.rmtree(base, ignore_errors=True)
            return
        mnt = base / "mnt"
        mnt.mkdir()
        env = dict(isolated_env(base), RCLONE_CONFIG=str(base / "rclone.conf"))
        proc = subprocess.Popen(
            ["rclone", "mount", ":http:", str(mnt), "--http-url", self.nginx_url,
             "--vfs-cache-mode", "full", "--cache-dir", str(base / "cache"), "--read-only",
             "--vfs-cache-max-size", "20G", "--dir-cache-time", "1h"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(base / "rclone.log", "w"),  # noqa: SIM115
            env=env)
        try:
            end = time.monotonic() + 30
            while not os.path.ismount(mnt):
                if time.monotonic() > end or proc.poll() is not None:
                    raise RuntimeError("rclone mount failed: " + (base / "rclone.log").read_text()[-2000:])
                time.sleep(0.05)
            yield str(mnt)
        finally:
            force_unmount(str(mnt), None)
            stop_pid(proc.pid)
            proc.wait()
            shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# measurements (each on a mount point)


def pread_time(path: str, offset: int, length: int = 4096, random_access: bool = True) -> float:
    """Seconds of open + one pread (+ close) at OFFSET."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        if random_access:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        got = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(got) != length:
        raise RuntimeError(f"short read of {path} at {offset}: {len(got)} bytes")
    return time.perf_counter() - t0


def first_bytes(mnt: str) -> tuple[float, list[float]]:
    """(first read on this fresh mount, connection set-up included; first reads of files never
    read, connections open)."""
    os.listdir(mnt)
    fresh = pread_time(os.path.join(mnt, "t0.bin"), 0)
    return fresh, [pread_time(os.path.join(mnt, f"t{k}.bin"), 0) for k in range(1, FIRST_FILES)]


def random_reads(mnt: str, offsets: list[int], count: Callable[[], int] | None = None
                 ) -> tuple[list[float], list[int]]:
    """Seconds of each 4 KiB pread at OFFSETS (one open file), the first one left out; and,
    with COUNT (the relay's request counter, read between reads, outside the timing), the
    relayed requests each read caused."""
    fd = os.open(os.path.join(mnt, "rand.bin"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        times, requests = [], []
        before = count() if count else 0
        for off in offsets:
            t0 = time.perf_counter()
            got = os.pread(fd, 4096, off)
            times.append(time.perf_counter() - t0)
            if len(got) != 4096:
                raise RuntimeError(f"short read at {off}")
            if count:
                now = count()
                requests.append(now - before)
                before = now
    finally:
        os.close(fd)
    return times[1:], requests[1:]


def round_trips(kb: KbfsWan, sha1: str, size: int) -> dict[str, float]:
    """What one request of each kind costs over link A, in ms, on one kept-alive connection of
    this process (not a mount's): /api/find, one 64 KiB piece with its proof, one 1 MiB range
    (the v1 block). Shows what a read's round trips are made of."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(kb.reader_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
    out: dict[str, float] = {}
    try:
        def get(name: str, path: str, headers: dict[str, str]) -> None:
            t0 = time.perf_counter()
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out[name] = (time.perf_counter() - t0) * 1e3
            if resp.status not in (200, 206):
                raise RuntimeError(f"{path}: {resp.status} {body[:200]!r}")
            if name == "piece_with_proof" and not resp.getheader("Kbfs-Proof"):
                raise RuntimeError(f"{path}: no Kbfs-Proof in the answer")
        get("handshake_health", "/api/health", {})  # the connection's set-up, not a measure
        get("find", f"/api/find/{sha1}", {})
        get("piece_with_proof", f"/sha1/{sha1}",
            {"Range": f"bytes=0-{min(PIECE, size) - 1}", "Kbfs-Want-Proof": f"bs={PIECE}"})
        get("block_1mib", f"/sha1/{sha1}", {"Range": f"bytes={MIB}-{min(2 * MIB, size) - 1}"})
    finally:
        conn.close()
    del out["handshake_health"]
    return out


def h5_slices(mnt: str) -> float:
    """Seconds to open data.h5 and read a small slice of each of its datasets."""
    import h5py

    os.listdir(mnt)
    t0 = time.perf_counter()
    total = 0.0
    with h5py.File(os.path.join(mnt, "data.h5"), "r") as f:
        for k in range(H5_DATASETS):
            ds = f[f"group{k % 4}/ds{k:02d}"]
            start = (k * 7919) % (ds.shape[0] - H5_SLICE)
            total += float(ds[start : start + H5_SLICE].sum())
    return time.perf_counter() - t0


def sequential(path: str, want: str) -> float:
    """MB/s of one pass over PATH in 1 MiB reads (its SHA-1 checked)."""
    h = hashlib.sha1()
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MIB):
            h.update(chunk)
            n += len(chunk)
    secs = time.perf_counter() - t0
    if h.hexdigest() != want:
        raise RuntimeError(f"{path}: wrong bytes (sha1 {h.hexdigest()})")
    return n / secs / 1e6


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process PID has used so far (0.0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


DOWNLOAD_PROBE = """
import json, sys, time
from kbfs import client
c = client.get_client(relays=[sys.argv[3]], cache_dir=sys.argv[4])
t0 = time.perf_counter()
c.download(sys.argv[1], sys.argv[2], local=False)
secs = time.perf_counter() - t0
keep = ("reads", "misses", "fetches", "pieces_fetched", "readahead_fetches", "readahead_pieces",
        "joined", "max_calling_bytes", "window", "bandwidth", "delay", "fallback_reads")
st = c.pieces.statistics()
print(json.dumps({"seconds": secs, **{k: st[k] for k in keep if k in st}}))
"""


def timed_run(cmd: list[str], env: dict[str, str], out: Path, want: str, timeout: float,
              cpu: dict[str, Any] | None = None) -> float:
    """Seconds of CMD writing OUT (its SHA-1 checked); CPU: gets the child's CPU seconds."""
    out.unlink(missing_ok=True)
    c0 = children_cpu()
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=timeout)
    secs = time.perf_counter() - t0
    if cpu is not None:
        cpu["cpu"] = children_cpu() - c0
        cpu["stdout"] = res.stdout
    if res.returncode:
        raise RuntimeError(f"{cmd[0:4]} failed: {res.stderr[-1000:]}")
    with open(out, "rb") as f:
        got = hashlib.file_digest(f, "sha1").hexdigest()
    if got != want:
        raise RuntimeError(f"{cmd[0:4]}: wrong bytes (sha1 {got})")
    out.unlink()
    return secs


# ---------------------------------------------------------------------------------------------
# one run over one pair of links


# The mount of v1 pointers (1 MiB blocks), of v2 ones (64 KiB pieces), and of v2 ones with
# read-around off (KBFS_READ_AROUND=0: the A/B of kbfs/readahead2.py's ReadAround, for the
# random, first-byte and h5py phases only).
KBFS = ("kbfs", "kbfs2", "kbfs2off")
MOUNTS = (*KBFS, "rclone")
SEQ_MOUNTS = ("kbfs", "kbfs2", "rclone")
MOUNT_ENV = {"kbfs2off": {"KBFS_READ_AROUND": "0"}}


def run_links(name: str, base: Path, data: Path, sums: dict[str, str], trees: dict[str, dict[str, Any]],
              args: argparse.Namespace) -> dict[str, Any]:
    link_a, link_b = LINKS[name]
    narrow = min(link_a["mbit"], link_b["mbit"]) * 1e6 / 8
    r: dict[str, Any] = {"name": name, "narrow_MBps": narrow / 1e6, "errors": [],
                         "load_before": os.getloadavg()[0]}
    work = base / f"work-{name}"
    work.mkdir()
    rng = random.Random(3)
    regions = list(range(RAND_SIZE // RAND_REGION))
    rng.shuffle(regions)
    offsets = [reg * RAND_REGION + rng.randrange(0, RAND_REGION // 4096) * 4096
               for reg in regions[: args.random + 1]]
    slow = 10.0 if name == "100m" else 1.0  # transfer-bound bounds scale with the link

    def phase(key: str, seconds: float, fn: Callable[[], Any]) -> None:
        log(f"{name}: {key}")
        try:
            with bounded(seconds, f"{name} {key}"):
                r[key] = fn()
        except Exception as exc:  # noqa: BLE001 - the other phases still run; the table says so
            r["errors"].append(f"{key}: {exc}")
            log(f"{name}: {key} FAILED: {exc}")

    def pieces_of(st: dict[str, Any]) -> dict[str, Any]:
        """What the status says of the piece cache (a v2 read that fell back shows here)."""
        pc = st.get("pieces") or {}
        keep = ("reads", "misses", "fetches", "pieces_fetched", "readahead_fetches", "joined",
                "around_planned", "around_used", "fallback_contents", "fallback_reads")
        return {k: pc[k] for k in keep if k in pc}

    with kbfs_wan(data, work, link_a, link_b) as kb, nginx_wan(data, work, link_a, link_b) as nginx_url:
        pointers = {"kbfs": work / "pointers", "kbfs2": work / "pointers64", "kbfs2off": work / "pointers64"}
        write_pointers(kb, pointers["kbfs"])
        write_pointers(kb, pointers["kbfs2"], trees)
        mounts = Mounts(work, pointers, kb.reader_url, nginx_url)
        env = isolated_env(work / "dl")
        count = lambda: relay_requests(kb)  # noqa: E731

        def servers() -> tuple[float, float, int]:
            """CPU seconds of the share and the relay so far, and the relay's request count."""
            return proc_cpu(kb.share.pid), proc_cpu(kb.relay.pid), count()

        def servers_since(before: tuple[float, float, int]) -> dict[str, float]:
            now = servers()
            return {"share_cpu_s": round(now[0] - before[0], 1), "relay_cpu_s": round(now[1] - before[1], 1),
                    "relayed_requests": now[2] - before[2]}
        phase("round_trips", 60, lambda: round_trips(kb, sums["t0.bin"], FIRST_SIZE))
        for kind in MOUNTS:
            def small(kind: str = kind) -> dict[str, Any]:
                with mounts.fresh(kind) as mnt:
                    c0 = count()
                    fresh, firsts = first_bytes(mnt)
                    c1 = count()
                    times, reqs = random_reads(mnt, offsets, count if kind in KBFS else None)
                    since = time.time()
                    return {"fresh": fresh, "first": firsts, "random": times, "random_requests": reqs,
                            "first_requests": (c1 - c0) if kind in KBFS else None,
                            "pieces": pieces_of(mounts.status(since)) if kind.startswith("kbfs2") else None}
            phase(f"{kind}_small", 60 + args.random * 3 * slow, small)
        for rnd in range(args.h5_rounds):
            for kind in MOUNTS if rnd % 2 == 0 else MOUNTS[::-1]:
                def h5(kind: str = kind) -> dict[str, Any]:
                    with mounts.fresh(kind) as mnt:
                        c0, p0 = count(), proc_cpu(mounts.pid) if kind in KBFS else 0.0
                        secs = h5_slices(mnt)
                        since = time.time()
                        return {"seconds": secs, "requests": count() - c0 if kind in KBFS else None,
                                "daemon_cpu_s": round(proc_cpu(mounts.pid) - p0, 2) if kind in KBFS else None,
                                "pieces": pieces_of(mounts.status(since)) if kind.startswith("kbfs2") else None}
                phase(f"{kind}_h5_{rnd}", 60 + 6 * slow, h5)
        for kind in SEQ_MOUNTS:
            def seq(kind: str = kind) -> float:
                with mounts.fresh(kind) as mnt:
                    c0, s0 = proc_cpu(mounts.pid) if kind in KBFS else 0.0, servers()
                    mbps = sequential(os.path.join(mnt, "seq.bin"), sums["seq.bin"])
                    if kind in KBFS:
                        since = time.time()
                        r[f"{kind}_seq_diag"] = {"daemon_cpu_s": round(proc_cpu(mounts.pid) - c0, 1),
                                                 **servers_since(s0), "pieces": pieces_of(mounts.status(since))}
                    return mbps
            phase(f"{kind}_seq", 60 + 6 * slow * SEQ_SIZE / narrow, seq)
        out = work / "out.bin"
        limit = 60 + 6 * slow * SEQ_SIZE / narrow
        for rnd in range(args.dl_rounds):
            cpu: dict[str, Any] = {}
            phase(f"curl_{rnd}", limit, lambda cpu=cpu: timed_run(
                ["curl", "-sSf", "-o", str(out), nginx_url + "seq.bin"], env, out, sums["seq.bin"], limit, cpu))
            r[f"curl_cpu_{rnd}"] = cpu.get("cpu")
            for kind, key in (("kbfs", "download"), ("kbfs2", "download2")):
                cpu = {}
                s0 = servers()
                phase(f"{key}_{rnd}", limit, lambda rnd=rnd, kind=kind, cpu=cpu: timed_run(
                    [sys.executable, "-m", "kbfs", "download", str(pointers[kind] / "seq.bin.prv"), "-o",
                     str(out), "--relay", kb.reader_url, "--no-local",
                     "--cache-dir", str(work / f"dl-cache-{kind}-{rnd}")],
                    env, out, sums["seq.bin"], limit, cpu))
                r[f"{key}_cpu_{rnd}"] = {"child_cpu_s": round(cpu.get("cpu", 0.0), 1), **servers_since(s0)}
        # Not a measure: the v2 download once more, in a child that prints its piece cache's
        # counters (what the CLI does not show), to see what its time is made of.
        probe: dict[str, Any] = {}
        s0 = servers()
        phase("download2_probe", limit, lambda: timed_run(
            [sys.executable, "-c", DOWNLOAD_PROBE, str(pointers["kbfs2"] / "seq.bin.prv"), str(out),
             kb.reader_url, str(work / "dl-cache-probe")], env, out, sums["seq.bin"], limit, probe))
        with contextlib.suppress(ValueError, KeyError):
            r["download2_probe"] = {**json.loads(str(probe["stdout"])), "cpu_s": round(probe["cpu"], 1),
                                    **servers_since(s0)}
    r["load_after"] = os.getloadavg()[0]
    shutil.rmtree(work, ignore_errors=True)
    return r


# ---------------------------------------------------------------------------------------------
# the table


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _rtt(s: float) -> str:
    return f"{s / RTT:.2f} RTT ({s * 1e3:.0f} ms)"


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _vals(r: dict[str, Any], prefix: str, field: str | None = None) -> list[float]:
    """The figures of the rounds named PREFIX<n> (FIELD of each when they are dicts)."""
    out = []
    for k, v in r.items():
        if k.startswith(prefix) and k[len(prefix):].isdigit():
            out.append(float(v[field] if field else v))
    return out


def table(r: dict[str, Any]) -> str:
    """One row per measure: v1 and v2 kbfs beside the reference, each judged by the goal."""
    rows = [f"| measure ({r['name']}) | kbfs v1 (1 MiB) | kbfs v2 (64 KiB) | reference | v1 / ref | "
            "v2 / ref | goal | v1 | v2 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]

    def row(measure: str, v1: float | None, v2: float | None, ref: float, fmt: Callable[[float], str],
            reff: str, goal: str, ok: Callable[[float], bool] | None, ratio: Callable[[float], float]) -> None:
        cells = [fmt(v) if v is not None else "-" for v in (v1, v2)]
        rat = [f"{ratio(v):.2f}x" if v is not None else "-" for v in (v1, v2)]
        res = [(_met(ok(v)) if v is not None else "-") if ok else "" for v in (v1, v2)]
        rows.append(f"| {measure} | {cells[0]} | {cells[1]} | {reff} | {rat[0]} | {rat[1]} | {goal} | "
                    f"{res[0]} | {res[1]} |")

    small = {k: r.get(f"{k}_small") for k in MOUNTS}
    rs = small["rclone"]
    if rs and (small["kbfs"] or small["kbfs2"]):
        def med(k: str, f: str, q: float | None = None) -> float | None:
            v = small[k]
            if not v:
                return None
            return statistics.median(v[f]) if q is None else _pct(v[f], q)
        rp = statistics.median(rs["random"])
        n = len(rs["random"])
        row(f"random 4 KiB cold, p50 (n={n})", med("kbfs", "random"), med("kbfs2", "random"), rp, _rtt,
            f"rclone {_rtt(rp)}", "<= 1.3 RTT", lambda v: v <= 1.3 * RTT, lambda v: v / rp)
        r9 = _pct(rs["random"], 0.9)
        row("random 4 KiB cold, p90", med("kbfs", "random", 0.9), med("kbfs2", "random", 0.9), r9, _rtt,
            f"rclone {_rtt(r9)}", "", None, lambda v: v / r9)
        rf = statistics.median(rs["first"])
        row(f"first byte of a file never read, median of {len(rs['first'])}", med("kbfs", "first"),
            med("kbfs2", "first"), rf, _rtt, f"rclone {_rtt(rf)}", "<= 1.5 RTT", lambda v: v <= 1.5 * RTT,
            lambda v: v / rf)
        fr = rs["fresh"]
        row("first read on a fresh mount (connections set up)",
            small["kbfs"]["fresh"] if small["kbfs"] else None, small["kbfs2"]["fresh"] if small["kbfs2"] else None,
            fr, _rtt, f"rclone {_rtt(fr)}", "", None, lambda v: v / fr)
    kh = {k: _vals(r, f"{k}_h5_", "seconds") for k in MOUNTS}
    if kh["rclone"]:
        rm = statistics.median(kh["rclone"])
        h1, h2 = (statistics.median(kh[k]) if kh[k] else None for k in ("kbfs", "kbfs2"))
        row(f"h5py: open, slice 40 datasets (median of {len(kh['rclone'])})", h1, h2, rm,
            lambda v: f"{v:.2f} s", f"rclone {rm:.2f} s", "<= 0.4x rclone", lambda v: v / rm <= 0.4,
            lambda v: v / rm)
    narrow = r["narrow_MBps"] * 1e6
    if "rclone_seq" in r:
        c = r["rclone_seq"] * 1e6
        row(f"sequential cold, {SEQ_SIZE // MIB} MiB", r.get("kbfs_seq") and r["kbfs_seq"] * 1e6,
            r.get("kbfs2_seq") and r["kbfs2_seq"] * 1e6, c,
            lambda v: f"{v / 1e6:.1f} MB/s = {v / narrow:.0%} of link", f"rclone {c / 1e6:.1f} MB/s = {c / narrow:.0%}",
            ">= 90% of link", lambda v: v >= 0.9 * narrow, lambda v: v / c)
    cd = _vals(r, "curl_")
    if cd:
        cm = statistics.median(cd)
        mb = SEQ_SIZE / 1e6
        d1, d2 = (statistics.median(_vals(r, f"{k}_")) if _vals(r, f"{k}_") else None
                  for k in ("download", "download2"))
        row(f"`kbfs download` vs curl, {SEQ_SIZE // MIB} MiB", d1, d2, cm,
            lambda v: f"{v:.2f} s = {mb / v:.1f} MB/s ({mb / v / narrow * 1e6:.0%})",
            f"curl {cm:.2f} s = {mb / cm:.1f} MB/s ({mb / cm / narrow * 1e6:.0%})", ">= 0.95x curl",
            lambda v: cm / v >= 0.95, lambda v: cm / v)
    return "\n".join(rows)


def ab_table(r: dict[str, Any]) -> str:
    """Read-around on ("kbfs2") against off ("kbfs2off"), v2 pointers, same run."""
    rows = [f"| read-around A/B ({r['name']}), v2 mount | on | off | on / off |", "| --- | ---: | ---: | ---: |"]

    def add(measure: str, on: float | None, off: float | None, fmt: Callable[[float], str]) -> None:
        if on is None or off is None:
            return
        rows.append(f"| {measure} | {fmt(on)} | {fmt(off)} | {on / off:.2f}x |")

    son, soff = r.get("kbfs2_small"), r.get("kbfs2off_small")
    if son and soff:
        add("random 4 KiB cold, p50", statistics.median(son["random"]), statistics.median(soff["random"]), _rtt)
        add("random 4 KiB cold, p90", _pct(son["random"], 0.9), _pct(soff["random"], 0.9), _rtt)
        add("first byte, median", statistics.median(son["first"]), statistics.median(soff["first"]), _rtt)
    hon, hoff = _vals(r, "kbfs2_h5_", "seconds"), _vals(r, "kbfs2off_h5_", "seconds")
    if hon and hoff:
        add(f"h5py, median of {len(hon)}", statistics.median(hon), statistics.median(hoff), lambda v: f"{v:.2f} s")
        add("h5py, best", min(hon), min(hoff), lambda v: f"{v:.2f} s")
        add("h5py, worst", max(hon), max(hoff), lambda v: f"{v:.2f} s")
    return "\n".join(rows) if len(rows) > 2 else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--links", choices=["100m", "1g", "both"], default=os.environ.get("BENCH_WAN_LINKS", "both"))
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR"), help="work folder parent")
    ap.add_argument("--random", type=int, default=24, help="random 4 KiB reads per mount")
    ap.add_argument("--h5-rounds", type=int, default=3)
    ap.add_argument("--dl-rounds", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="small files, few reads: checks the harness only")
    args = ap.parse_args()
    if args.smoke:
        global SEQ_SIZE, RAND_SIZE
        SEQ_SIZE, RAND_SIZE = 16 * MIB, 256 * MIB
        args.random, args.h5_rounds = min(args.random, 5), 1
    if not 1 <= args.random < RAND_SIZE // RAND_REGION:
        ap.error(f"--random: 1 to {RAND_SIZE // RAND_REGION - 1}")
    for tool in ("rclone", "nginx", "curl", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench_wan: {tool} is not installed (make bench installs it)", file=sys.stderr)
            return 0
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="kbfs-bench-wan-", dir=args.dir))
    base.chmod(0o755)  # nginx's workers run unprivileged and read the data
    results = []
    try:
        log(f"writing {(SEQ_SIZE + RAND_SIZE + H5_SIZE + FIRST_FILES * FIRST_SIZE) / MIB:.0f} MiB of data")
        sums = make_data(base / "data")
        log("hashing the data into v2 trees (64 KiB leaves)")
        trees = v2_trees(base / "data")
        for name in (["100m", "1g"] if args.links == "both" else [args.links]):
            results.append(run_links(name, base, base / "data", sums, trees, args))
    finally:
        for mnt in base.glob("work-*/*/mnt"):
            force_unmount(str(mnt), None)
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"bench_wan, {time.strftime('%Y-%m-%d %H:%M')}, {time.monotonic() - started:.0f} s. Path RTT 60 ms "
          "(A 40 ms + B 20 ms); cold = fresh mount and cache each round, bytes never read before.")
    for r in results:
        print()
        a, b = LINKS[r["name"]]
        print(f"Links A {a['rtt_ms']:.0f} ms {a['mbit']:.0f} Mbit/s, B {b['rtt_ms']:.0f} ms {b['mbit']:.0f} Mbit/s "
              f"(narrow link {r['narrow_MBps']:.1f} MB/s); load average {r['load_before']:.1f} before, "
              f"{r['load_after']:.1f} after.")
        print()
        print(table(r))
        ab = ab_table(r)
        if ab:
            print()
            print(ab)
            print()
        for err in r["errors"]:
            print(f"- failed: {err}")
        if "round_trips" in r:
            print(f"- one request over link A, ms (this process, kept-alive connection): "
                  f"{ {k: round(v) for k, v in r['round_trips'].items()} }")
        for k, v in r.items():
            if k.endswith("_small") and v:
                print(f"- {k}: random ms {[round(x * 1e3) for x in v['random']]}; first bytes ms "
                      f"{[round(x * 1e3) for x in v['first']]}; fresh {v['fresh'] * 1e3:.0f}")
                if v.get("random_requests"):
                    print(f"  relayed requests per random read {v['random_requests']}; "
                          f"during the 6 first reads {v['first_requests']}")
                if v.get("pieces"):
                    print(f"  piece cache {v['pieces']}")
        for k, v in r.items():
            if k.endswith("_seq_diag") or k == "download2_probe" or "_cpu_" in k:
                print(f"- {k}: {v if not isinstance(v, float) else round(v, 1)}")
        for k, v in r.items():
            if "_h5_" in k:
                extra = f", {v['requests']} relayed requests" if v.get("requests") is not None else ""
                extra += f", daemon CPU {v['daemon_cpu_s']} s" if v.get("daemon_cpu_s") is not None else ""
                extra += f", piece cache {v['pieces']}" if v.get("pieces") else ""
                print(f"- {k}: {v['seconds']:.2f} s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

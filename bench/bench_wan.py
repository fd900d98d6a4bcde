"""Benchmark: kbfs against rclone and curl over an emulated wide-area path, side by side in one run.

The path (bench/wanpath.py, bench/linkemu.py, every emulator a process of its own):

    kbfs:       reader -[A]- kbfs relay -[B]- kbfs share        (real processes on 127.0.0.1)
    reference:  reader -[A]- -[B]- nginx                         (nginx where the share is)

A = 40 ms RTT, 100 Mbit/s; B = 20 ms RTT, 200 Mbit/s (`--links 100m`); or both at 1 Gbit/s
(`--links 1g`); `--links both` runs the two one after the other. Path RTT = 60 ms: latencies are
given in units of it. The contenders read the same bytes over the same two links:

- the kbfs mount: `kbfs mount` of a folder of pointers (as a collaborator has them: no local
  copy, `--no-local`), through the relay at link A;
- rclone mount: `rclone mount :http: --vfs-cache-mode full` of nginx through the links;
- `kbfs download` of a pointer, and `curl -o` of the same file from nginx.

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


def write_pointers(kb: KbfsWan, folder: Path) -> None:
    """The share's listing as pointers with no local copy (a reader elsewhere)."""
    folder.mkdir(exist_ok=True)
    with urllib.request.urlopen(f"{kb.relay_url}/s/{kb.share_id}/list/", timeout=30) as r:
        listing = json.load(r)
    for item in listing["files"]:
        pointer = dict(item["prv"], original_path="")
        (folder / f"{item['name']}.prv").write_text(json.dumps(pointer, indent=4))


# ---------------------------------------------------------------------------------------------
# the two mounts


class Mounts:
    """Fresh mounts of either contender, always unmounted and stopped afterwards."""

    def __init__(self, work: Path, pointers: Path, reader_url: str, nginx_url: str) -> None:
        self.work, self.pointers, self.reader_url, self.nginx_url = work, pointers, reader_url, nginx_url
        self.n = 0

    @contextlib.contextmanager
    def fresh(self, kind: str) -> Iterator[str]:
        self.n += 1
        base = self.work / f"{kind}-{self.n}"
        base.mkdir()
        if kind == "kbfs":
            m = start_mount(str(self.pointers), base, relays=[self.reader_url], extra=["--no-local"])
            try:
                yield m.mountpoint
            finally:
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


def random_reads(mnt: str, offsets: list[int]) -> list[float]:
    """Seconds of each 4 KiB pread at OFFSETS (one open file), the first one left out."""
    fd = os.open(os.path.join(mnt, "rand.bin"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        times = []
        for off in offsets:
            t0 = time.perf_counter()
            got = os.pread(fd, 4096, off)
            times.append(time.perf_counter() - t0)
            if len(got) != 4096:
                raise RuntimeError(f"short read at {off}")
    finally:
        os.close(fd)
    return times[1:]


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


def timed_run(cmd: list[str], env: dict[str, str], out: Path, want: str, timeout: float) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=timeout)
    secs = time.perf_counter() - t0
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


def run_links(name: str, base: Path, data: Path, sums: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
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

    with kbfs_wan(data, work, link_a, link_b) as kb, nginx_wan(data, work, link_a, link_b) as nginx_url:
        pointers = work / "pointers"
        write_pointers(kb, pointers)
        mounts = Mounts(work, pointers, kb.reader_url, nginx_url)
        env = isolated_env(work / "dl")
        for kind in ("kbfs", "rclone"):
            def small(kind: str = kind) -> dict[str, Any]:
                with mounts.fresh(kind) as mnt:
                    fresh, firsts = first_bytes(mnt)
                    return {"fresh": fresh, "first": firsts, "random": random_reads(mnt, offsets)}
            phase(f"{kind}_small", 60 + args.random * 3 * slow, small)
        for rnd in range(args.h5_rounds):
            for kind in ("kbfs", "rclone") if rnd % 2 == 0 else ("rclone", "kbfs"):
                def h5(kind: str = kind) -> float:
                    with mounts.fresh(kind) as mnt:
                        return h5_slices(mnt)
                phase(f"{kind}_h5_{rnd}", 60 + 6 * slow, h5)
        for kind in ("kbfs", "rclone"):
            def seq(kind: str = kind) -> float:
                with mounts.fresh(kind) as mnt:
                    return sequential(os.path.join(mnt, "seq.bin"), sums["seq.bin"])
            phase(f"{kind}_seq", 60 + 6 * slow * SEQ_SIZE / narrow, seq)
        out = work / "out.bin"
        limit = 60 + 6 * slow * SEQ_SIZE / narrow
        for rnd in range(args.dl_rounds):
            phase(f"curl_{rnd}", limit, lambda: timed_run(
                ["curl", "-sSf", "-o", str(out), nginx_url + "seq.bin"], env, out, sums["seq.bin"], limit))
            phase(f"download_{rnd}", limit, lambda rnd=rnd: timed_run(
                [sys.executable, "-m", "kbfs", "download", str(pointers / "seq.bin.prv"), "-o", str(out),
                 "--relay", kb.reader_url, "--no-local", "--cache-dir", str(work / f"dl-cache-{rnd}")],
                env, out, sums["seq.bin"], limit))
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


def table(r: dict[str, Any]) -> str:
    rows = [f"| measure ({r['name']}) | kbfs | reference | kbfs vs reference | goal | result |",
            "| --- | ---: | ---: | ---: | --- | --- |"]
    ks, rs = r.get("kbfs_small"), r.get("rclone_small")
    if ks and rs:
        kp, rp = statistics.median(ks["random"]), statistics.median(rs["random"])
        rows.append(f"| random 4 KiB cold, p50 (n={len(ks['random'])}) | {_rtt(kp)} | rclone {_rtt(rp)} | "
                    f"{kp / rp:.2f}x | <= 1.3 RTT | {_met(kp <= 1.3 * RTT)} |")
        k9, r9 = _pct(ks["random"], 0.9), _pct(rs["random"], 0.9)
        rows.append(f"| random 4 KiB cold, p90 | {_rtt(k9)} | rclone {_rtt(r9)} | {k9 / r9:.2f}x | | |")
        kf, rf = statistics.median(ks["first"]), statistics.median(rs["first"])
        rows.append(f"| first byte of a file never read, median of {len(ks['first'])} | {_rtt(kf)} | "
                    f"rclone {_rtt(rf)} | {kf / rf:.2f}x | <= 1.5 RTT | {_met(kf <= 1.5 * RTT)} |")
        rows.append(f"| first read on a fresh mount (connections set up) | {_rtt(ks['fresh'])} | "
                    f"rclone {_rtt(rs['fresh'])} | {ks['fresh'] / rs['fresh']:.2f}x | | |")
    kh = [v for k, v in r.items() if k.startswith("kbfs_h5_")]
    rh = [v for k, v in r.items() if k.startswith("rclone_h5_")]
    if kh and rh:
        km, rm = statistics.median(kh), statistics.median(rh)
        rows.append(f"| h5py: open, slice 40 datasets (median of {len(kh)}) | {km:.2f} s | rclone {rm:.2f} s | "
                    f"{km / rm:.2f}x | <= 0.4x | {_met(km / rm <= 0.4)} |")
    narrow = r["narrow_MBps"]
    if "kbfs_seq" in r and "rclone_seq" in r:
        k, c = r["kbfs_seq"], r["rclone_seq"]
        rows.append(f"| sequential cold, {SEQ_SIZE // MIB} MiB | {k:.1f} MB/s = {k / narrow:.0%} of link | "
                    f"rclone {c:.1f} MB/s = {c / narrow:.0%} | {k / c:.2f}x | >= 90% of link | "
                    f"{_met(k >= 0.9 * narrow)} |")
    kd = [v for k, v in r.items() if k.startswith("download_")]
    cd = [v for k, v in r.items() if k.startswith("curl_")]
    if kd and cd:
        km, cm = statistics.median(kd), statistics.median(cd)
        mb = SEQ_SIZE / 1e6
        rows.append(f"| `kbfs download` vs curl, {SEQ_SIZE // MIB} MiB | "
                    f"{km:.2f} s = {mb / km:.1f} MB/s ({mb / km / narrow:.0%}) | "
                    f"curl {cm:.2f} s = {mb / cm:.1f} MB/s ({mb / cm / narrow:.0%}) | {cm / km:.2f}x curl | "
                    f">= 0.95x | {_met(cm / km >= 0.95)} |")
    return "\n".join(rows)


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
        for name in (["100m", "1g"] if args.links == "both" else [args.links]):
            results.append(run_links(name, base, base / "data", sums, args))
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
        for err in r["errors"]:
            print(f"- failed: {err}")
        details = {k: v for k, v in r.items() if k.endswith("_small")}
        for k, v in details.items():
            print(f"- {k}: random ms {[round(x * 1e3) for x in v['random']]}; first bytes ms "
                  f"{[round(x * 1e3) for x in v['first']]}; fresh {v['fresh'] * 1e3:.0f}")
        h5 = {k: round(v, 2) for k, v in r.items() if "_h5_" in k}
        print(f"- h5py seconds: {h5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

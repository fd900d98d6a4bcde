"""Relay throughput and latency, side by side in one run, on loopback.

Starts a real `kbfs relay` and a `kbfs share --listen` on a folder holding one random
file (512 MiB by default), then measures with `requests` (streaming, 1 MiB chunks):

- a whole-file download through the relay (`/sha1/`) and from the share's direct
  `--listen` server, alternating, best and median of N rounds each;
- the whole file again as consecutive 8 MiB range requests through the relay (what a
  mount's read-ahead asks for), with the relay's and share's CPU per GB;
- the latency of 64 KiB range requests at random offsets through the relay (and
  direct, for comparison): median and 90th percentile.

It also reports how much of what the relay sent went through its kernel splice
(`httpserve.BodySplice`; `KBFS_SPLICE=0` in the environment turns that off, for an
A/B comparison on the same machine).

Goals (issue 3): relay >= 0.6x direct and >= 800 MB/s; 64 KiB median <= 3 ms.
Prints a markdown table (MB = 10^6 bytes); exit status 0 whatever the figures.

    python bench/bench_relay.py [--size 512M] [--rounds 3] [--ranges 300] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import netutil  # noqa: E402

from kbfs.config import parse_size  # noqa: E402


def make_file(path: Path, size: int) -> str:
    import hashlib

    h = hashlib.sha1()
    rng = random.Random(1)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 8 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def bench_file(work: Path, size: int) -> str:
    """SHA-1 of WORK/data/big.bin, a random file of SIZE bytes, written unless a run with
    the same WORK (`--workdir`) left it there."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    target = data / "big.bin"
    sha_file = work / "big.sha1"
    if target.exists() and target.stat().st_size == size and sha_file.exists():
        return sha_file.read_text().strip()
    print(f"writing a {size} byte test file...", file=sys.stderr)
    sha1 = make_file(target, size)
    sha_file.write_text(sha1)
    return sha1


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of PID so far (Linux /proc), or 0 when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def download(session: requests.Session, url: str, size: int) -> float:
    """Seconds to stream URL whole; checks the length."""
    t0 = time.perf_counter()
    got = 0
    with session.get(url, stream=True, timeout=60) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_content(1 << 20):
            got += len(chunk)
    seconds = time.perf_counter() - t0
    if got != size:
        raise SystemExit(f"short download from {url}: {got} of {size} bytes")
    return seconds


def ranged_download(session: requests.Session, url: str, size: int, step: int) -> float:
    """Seconds to fetch URL whole as consecutive STEP-byte range requests."""
    t0 = time.perf_counter()
    for start in range(0, size, step):
        end = min(size, start + step)
        got = 0
        with session.get(url, headers={"Range": f"bytes={start}-{end - 1}"}, stream=True,
                         timeout=60) as resp:
            for chunk in resp.iter_content(1 << 20):
                got += len(chunk)
        if resp.status_code != 206 or got != end - start:
            raise SystemExit(f"bad range answer {resp.status_code}, {got} bytes")
    return time.perf_counter() - t0


def range_latencies(session: requests.Session, url: str, size: int, n: int) -> list[float]:
    rng = random.Random(2)
    out = []
    for _ in range(n):
        start = rng.randrange(0, size - 65536)
        t0 = time.perf_counter()
        resp = session.get(url, headers={"Range": f"bytes={start}-{start + 65535}"}, timeout=10)
        body = resp.content
        out.append(time.perf_counter() - t0)
        if resp.status_code != 206 or len(body) != 65536:
            raise SystemExit(f"bad range answer {resp.status_code}, {len(body)} bytes")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ranges", type=int, default=300)
    ap.add_argument("--workdir", default=None, help="keep the test file here between runs")
    args = ap.parse_args()
    size = parse_size(args.size)

    with tempfile.TemporaryDirectory(prefix="kbfs-bench-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        sha1 = bench_file(work, size)
        data = work / "data"
        logs = Path(tmp) / "logs"
        relay = netutil.start_relay(logs)
        share = None
        try:
            t0 = time.perf_counter()
            share = netutil.start_share(data, relay.url, logs, listen=True,
                                        state_dir=work / "state")
            index_seconds = time.perf_counter() - t0
            via_relay = f"{relay.url}/sha1/{sha1}"
            direct = f"{share.direct_url}/sha1/{sha1}"
            session = requests.Session()
            download(session, direct, size)  # warm the page cache and both paths
            download(session, via_relay, size)
            times: dict[str, list[float]] = {"direct": [], "relay": []}
            cpu = {"relay": 0.0, "share_relayed": 0.0, "share_direct": 0.0}
            for _ in range(args.rounds):
                s0 = cpu_seconds(share.pid)
                times["direct"].append(download(session, direct, size))
                r0, s1 = cpu_seconds(relay.pid), cpu_seconds(share.pid)
                times["relay"].append(download(session, via_relay, size))
                cpu["relay"] += cpu_seconds(relay.pid) - r0
                cpu["share_relayed"] += cpu_seconds(share.pid) - s1
                cpu["share_direct"] += s1 - s0
            r0, s0 = cpu_seconds(relay.pid), cpu_seconds(share.pid)
            ranged = [ranged_download(session, via_relay, size, 8 << 20)
                      for _ in range(args.rounds)]
            cpu["relay_ranged"] = cpu_seconds(relay.pid) - r0
            cpu["share_ranged"] = cpu_seconds(share.pid) - s0
            health = session.get(f"{relay.url}/api/health", timeout=10).json()
            load = os.getloadavg()[0]
            lat_relay = range_latencies(session, via_relay, size, args.ranges)
            lat_direct = range_latencies(session, direct, size, args.ranges)
        finally:
            if share is not None:
                share.stop()
            relay.stop()

    def mbps(seconds: float) -> float:
        return size / seconds / 1e6

    best = {k: mbps(min(v)) for k, v in times.items()}
    med = {k: mbps(statistics.median(v)) for k, v in times.items()}

    def ms(values: list[float], q: float) -> float:
        return sorted(values)[int(q * (len(values) - 1))] * 1000

    ratio = best["relay"] / best["direct"]
    print(f"\n## relay benchmark ({size / (1 << 20):.0f} MiB file, {os.cpu_count()} CPUs, "
          f"loopback, requests client; first scan took {index_seconds:.1f} s)\n")
    print("| measure | direct --listen | through relay | goal |")
    print("| --- | --- | --- | --- |")
    print(f"| download, best of {args.rounds} | {best['direct']:.0f} MB/s | {best['relay']:.0f} MB/s "
          f"| relay >= 800 MB/s and >= 0.6x direct (got {ratio:.2f}x) |")
    print(f"| download, median | {med['direct']:.0f} MB/s | {med['relay']:.0f} MB/s | |")
    print(f"| 8 MiB ranges, median of {args.rounds} | | "
          f"{mbps(statistics.median(ranged)):.0f} MB/s | |")
    print(f"| 64 KiB range, median of {args.ranges} | {ms(lat_direct, 0.5):.2f} ms "
          f"| {ms(lat_relay, 0.5):.2f} ms | relay <= 3 ms |")
    print(f"| 64 KiB range, p90 | {ms(lat_direct, 0.9):.2f} ms | {ms(lat_relay, 0.9):.2f} ms | |")
    gb = size * args.rounds / 1e9
    print(f"\nCPU per GB moved: relay {cpu['relay'] / gb:.2f} s, share {cpu['share_relayed'] / gb:.2f} s "
          f"(relayed) / {cpu['share_direct'] / gb:.2f} s (direct); 1-min load average {load:.1f}")
    print(f"8 MiB ranges, CPU per GB: relay {cpu['relay_ranged'] / gb:.2f} s, "
          f"share {cpu['share_ranged'] / gb:.2f} s")
    spliced = health.get("bytes_spliced", 0) / max(1, health.get("bytes_out", 0))
    print(f"relay bytes moved by splice: {spliced:.0%} "
          f"(KBFS_SPLICE={os.environ.get('KBFS_SPLICE', '1')})")
    ok = best["relay"] >= 800 and ratio >= 0.6 and ms(lat_relay, 0.5) <= 3
    print(f"\ngoals {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()

"""Latency and CPU cost of one range request through the relay, against the direct server.

Starts a real `kbfs relay` and a `kbfs share --listen` on a folder holding one random
file (256 MiB by default), then measures, interleaved so that noise from other load
falls on both sides alike:

- median and p90 latency of 4 KiB and of 1 MiB (block-aligned) range requests at random
  offsets, with one keep-alive `requests.Session` (as `kbfs.fetch` uses), via the relay's
  `/sha1/` and via the share's direct `--listen` server;
- median and p90 of a `Fetcher` block fetch for one random 1 MiB block via the relay and
  direct (range request + BLAKE3 verification: what a cold 4 KiB read on a mount costs);
- CPU milliseconds per 4 KiB request of the relay, share and reader, via each path;
- CPU-seconds per GiB of the relay and share processes (from /proc/PID/stat) and of the
  reader (this process's thread CPU time) when streaming GIB GiB through the relay, both
  as whole-file downloads and as 1 MiB block fetches (`Fetcher`'s streaming verified read, one block
  per request: the per-request cost a cold sequential read of a mount pays).

Prints a markdown table; exit status 0 whatever the figures. Wall-clock figures are noisy
on a shared machine: compare the two columns of one run, and trust CPU-seconds.

    python bench/bench_latency.py [--size 256M] [--n 300] [--gib 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import netutil  # noqa: E402
from bench_relay import bench_file, cpu_seconds  # noqa: E402

from kbfs import tree  # noqa: E402
from kbfs.config import parse_size  # noqa: E402
from kbfs.fetch import Fetcher  # noqa: E402

BLOCK = tree.BLOCK_SIZE


def ranged_get(session: requests.Session, url: str, start: int, length: int) -> float:
    t0 = time.perf_counter()
    resp = session.get(url, headers={"Range": f"bytes={start}-{start + length - 1}"}, timeout=10)
    body = resp.content
    seconds = time.perf_counter() - t0
    if resp.status_code != 206 or len(body) != length:
        raise SystemExit(f"bad range answer from {url}: {resp.status_code}, {len(body)} bytes")
    return seconds


def q(values: list[float], frac: float) -> float:
    """The FRAC quantile of VALUES, in milliseconds."""
    return sorted(values)[int(frac * (len(values) - 1))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--n", type=int, default=300, help="requests per latency figure")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB streamed for the CPU figures")
    ap.add_argument("--workdir", default=None, help="keep the test file here between runs")
    ap.add_argument("--hold", action="store_true",
                    help="print the pids and URLs, then make 4 KiB requests via the relay until "
                         "SIGINT/SIGTERM "
                         "(to attach a profiler)")
    args = ap.parse_args()
    size = parse_size(args.size)

    with tempfile.TemporaryDirectory(prefix="kbfs-bench-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        sha1 = bench_file(work, size)
        data = work / "data"
        target = data / "big.bin"
        logs = Path(tmp) / "logs"
        relay = netutil.start_relay(logs)
        share = None
        try:
            share = netutil.start_share(data, relay.url, logs, listen=True,
                                        state_dir=work / "state")
            urls = {"relay": f"{relay.url}/sha1/{sha1}",
                    "direct": f"{share.direct_url}/sha1/{sha1}"}
            session = requests.Session()
            session.trust_env = False
            with open(target, "rb") as f:  # warm the page cache
                while f.read(8 << 20):
                    pass
            fetcher = Fetcher([relay.url])
            leaves_blob = fetcher.fetch_tree(sha1, size)
            leaves = tree.split_leaves(leaves_blob)
            nblocks = len(leaves)

            def fetch_block(which: str, i: int) -> float:
                # Fetcher's own range request and streaming verification, pinned to one
                # URL (its /api/find would prefer the share's direct URL over the relay).
                t0 = time.perf_counter()
                buf = bytearray(min(BLOCK, size - i * BLOCK))
                got, _ = fetcher._stream(urls[which], i * BLOCK, i * BLOCK + len(buf), size, i,
                                         leaves, BLOCK, memoryview(buf), time.monotonic() + 10)
                if got != 1:
                    raise SystemExit(f"{which} block fetch failed")
                return time.perf_counter() - t0

            if args.hold:
                print(f"relay pid {relay.pid} {relay.url}\nshare pid {share.pid} "
                      f"{share.direct_url}\nsha1 {sha1}", flush=True)
                rng = random.Random(3)

                def stop(*_: object) -> None:
                    raise KeyboardInterrupt

                signal.signal(signal.SIGTERM, stop)
                try:
                    while True:
                        ranged_get(session, urls["relay"], rng.randrange(0, size - 4096), 4096)
                except KeyboardInterrupt:
                    return

            # Warm both paths (connections, leaves cache, /api/find answer).
            for which in ("relay", "direct"):
                for _ in range(20):
                    ranged_get(session, urls[which], 0, 4096)
                    fetch_block(which, 0)

            lat: dict[tuple[str, str], list[float]] = {}
            rng = random.Random(2)
            for _ in range(args.n):
                off4 = rng.randrange(0, size - 4096)
                blk = rng.randrange(0, nblocks - 1)
                for which in ("relay", "direct"):
                    lat.setdefault(("4 KiB range", which), []).append(
                        ranged_get(session, urls[which], off4, 4096))
                    lat.setdefault(("1 MiB range", which), []).append(
                        ranged_get(session, urls[which], blk * BLOCK, BLOCK))
                    lat.setdefault(("1 MiB block fetch+verify", which), []).append(
                        fetch_block(which, blk))

            # CPU per 4 KiB request, each path on its own (the per-request overhead).
            per_req: dict[str, dict[str, float]] = {}
            for which in ("relay", "direct"):
                r0, s0, c0 = cpu_seconds(relay.pid), cpu_seconds(share.pid), time.thread_time()
                for _ in range(args.n * 2):
                    ranged_get(session, urls[which], rng.randrange(0, size - 4096), 4096)
                per_req[which] = {
                    "relay": (cpu_seconds(relay.pid) - r0) / (args.n * 2) * 1000,
                    "share": (cpu_seconds(share.pid) - s0) / (args.n * 2) * 1000,
                    "reader": (time.thread_time() - c0) / (args.n * 2) * 1000}

            # CPU per GiB streamed through the relay.
            total = int(args.gib * (1 << 30))

            def per_gib(stream: Callable[[], int]) -> dict[str, float]:
                """CPU-s per GiB of relay, share and this thread, and MB/s, while STREAM
                moves at least TOTAL bytes (it returns how many it moved)."""
                r0, s0, c0, t0 = (cpu_seconds(relay.pid), cpu_seconds(share.pid),
                                  time.thread_time(), time.perf_counter())
                moved = stream()
                gib = moved / (1 << 30)
                return {"relay": (cpu_seconds(relay.pid) - r0) / gib,
                        "share": (cpu_seconds(share.pid) - s0) / gib,
                        "reader": (time.thread_time() - c0) / gib,
                        "MB/s": moved / (time.perf_counter() - t0) / 1e6}

            def whole_files() -> int:
                moved = 0
                while moved < total:
                    with session.get(urls["relay"], stream=True, timeout=60) as resp:
                        resp.raise_for_status()
                        for chunk in resp.iter_content(1 << 20):
                            moved += len(chunk)
                return moved

            def block_fetches() -> int:  # one verified 1 MiB block per request
                moved = i = 0
                while moved < total:
                    fetch_block("relay", i)
                    moved += min(BLOCK, size - i * BLOCK)
                    i = (i + 1) % nblocks
                return moved

            cpu = {"whole-file download": per_gib(whole_files),
                   # a cold sequential mount read
                   "1 MiB block fetches": per_gib(block_fetches)}
            load = os.getloadavg()[0]
            fetcher.close()
        finally:
            if share is not None:
                share.stop()
            relay.stop()

    print(f"\n## one range request through the relay ({size >> 20} MiB file, "
          f"{os.cpu_count()} CPUs, loopback, {args.n} requests each, interleaved; "
          f"1-min load {load:.1f})\n")
    print("| request | relay median | relay p90 | direct median | direct p90 |")
    print("| --- | --- | --- | --- | --- |")
    for what in ("4 KiB range", "1 MiB range", "1 MiB block fetch+verify"):
        r, d = lat[(what, "relay")], lat[(what, "direct")]
        print(f"| {what} | {q(r, .5):.2f} ms | {q(r, .9):.2f} ms | {q(d, .5):.2f} ms "
              f"| {q(d, .9):.2f} ms |")
    print("\n| 4 KiB range, CPU ms per request | relay | share | reader |")
    print("| --- | --- | --- | --- |")
    for which, c in per_req.items():
        print(f"| {which} | {c['relay']:.2f} | {c['share']:.2f} | {c['reader']:.2f} |")
    print(f"\n| streaming {args.gib:g} GiB via relay | relay CPU-s/GiB | share CPU-s/GiB "
          "| reader CPU-s/GiB | MB/s |")
    print("| --- | --- | --- | --- | --- |")
    for what, c in cpu.items():
        print(f"| {what} | {c['relay']:.2f} | {c['share']:.2f} | {c['reader']:.2f} "
              f"| {c['MB/s']:.0f} |")


if __name__ == "__main__":
    main()

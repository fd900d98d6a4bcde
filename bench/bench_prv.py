"""Benchmark: `kbfs prv create` against coreutils `sha1sum` on one file in the page cache.

Makes a random file (1 GiB by default) in a temporary folder under /tmp, reads it
twice so both tools hash from memory, then runs `sha1sum FILE` and
`kbfs prv create FILE -o OUT --block-size N` for each N (default: 65536, the default of
new pointers, and 1048576, the older 1 MiB tree: one BLAKE3 call per 64 KiB leaf is 16x
the calls) as real processes, rotating the order, ROUNDS times each, and prints best and
median throughput, the ratio (goal: kbfs >= 1.5x sha1sum), the 64 KiB / 1 MiB ratio and a
markdown snippet for docs/benchmarks.md. The temporary folder is removed afterwards.
This is a benchmark, not a test: it asserts nothing except that both tools agree
on the SHA-1.

    .venv/bin/python bench/bench_prv.py [--size-mib 1024] [--rounds 3] [--block-size N]...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

KBFS = os.path.join(os.path.dirname(sys.executable), "kbfs")
CHUNK = 64 << 20


def make_random_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def warm(path: str) -> None:
    for _ in range(2):
        with open(path, "rb", buffering=0) as f:
            while f.read(CHUNK):
                pass


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block-size", action="append", dest="block_sizes", metavar="N",
                    help="a --block-size for kbfs prv create (repeatable; default 65536 and "
                         "1048576); the first is judged against the goal")
    args = ap.parse_args()
    block_sizes = args.block_sizes or ["65536", "1048576"]
    kbfs_tools = {f"kbfs prv create --block-size {bs}": bs for bs in block_sizes}
    size = args.size_mib << 20

    tmp = tempfile.mkdtemp(prefix="kbfs-bench-prv-", dir="/tmp")
    try:
        data = os.path.join(tmp, "data.bin")
        out = os.path.join(tmp, "data.bin.prv")
        print(f"making {args.size_mib} MiB of random data in {tmp} ...", flush=True)
        make_random_file(data, size)
        warm(data)

        times: dict[str, list[float]] = {"sha1sum": [], **{t: [] for t in kbfs_tools}}
        sums: set[str] = set()
        for r in range(args.rounds):
            # Rotate which tool goes first, so none always runs on a cooler machine.
            order = list(times)
            order = order[r % len(order):] + order[:r % len(order)]
            for tool in order:
                if tool == "sha1sum":
                    seconds, stdout = timed(["sha1sum", data])
                    sums.add(stdout.split()[0])
                else:
                    seconds, _ = timed([KBFS, "prv", "create", data, "-o", out, "--no-hints",
                                        "--block-size", kbfs_tools[tool]])
                    with open(out, encoding="utf-8") as f:
                        sums.add(json.load(f)["original_checksum"])
                times[tool].append(seconds)
                print(f"round {r + 1}: {tool:40} {seconds:6.3f} s  {size / seconds / 1e9:5.2f} GB/s",
                      flush=True)
        # What a bare start-up of the command costs (imports), to tell it apart from hashing.
        startup = min(timed([KBFS, "--version"])[0] for _ in range(3))
        if len(sums) != 1:
            raise SystemExit(f"the tools disagree on the SHA-1: {sorted(sums)}")

        rate = {tool: [size / s / 1e9 for s in ts] for tool, ts in times.items()}
        best = {tool: max(v) for tool, v in rate.items()}
        median = {tool: statistics.median(v) for tool, v in rate.items()}
        first = next(iter(kbfs_tools))  # judged against the goal
        ratio_best = best[first] / best["sha1sum"]
        ratio_median = median[first] / median["sha1sum"]
        cpu = platform.processor() or platform.machine()
        print()
        print(f"### `kbfs prv create` vs `sha1sum`, {args.size_mib} MiB file in the page cache")
        print()
        print(f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
              f"{args.rounds} alternating rounds each, real processes (start-up included).")
        print()
        print("| tool | best GB/s | median GB/s |")
        print("| --- | ---: | ---: |")
        for tool in times:
            print(f"| `{tool}` | {best[tool]:.2f} | {median[tool]:.2f} |")
        print()
        verdict = "meets" if ratio_best >= 1.5 else "misses"
        print(f"Ratio `{first}` / sha1sum: **{ratio_best:.2f}x** best, {ratio_median:.2f}x "
              f"median (goal >= 1.5x: {verdict}).")
        for tool in list(kbfs_tools)[1:]:
            print(f"`{first}` / `{tool}`: {best[first] / best[tool]:.2f}x best, "
                  f"{median[first] / median[tool]:.2f}x median.")
        hashing = min(times[first]) - startup
        print(f"Start-up of the `kbfs` command alone (`kbfs --version`, best of 3): "
              f"{startup:.3f} s; the best `prv create` less that: {hashing:.3f} s "
              f"({size / hashing / 1e9:.2f} GB/s, {size / hashing / 1e9 / best['sha1sum']:.2f}x "
              f"sha1sum).")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

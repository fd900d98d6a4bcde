"""Benchmark: rescanning 100,000 unchanged files with the share-side index.

Creates FOLDERS x FILES small files (100 x 1000 files of 100 bytes by default) in a
temporary folder under /tmp, runs a first scan (which hashes everything), then
times ROUNDS rescans of the unchanged tree (each must hash nothing) and prints
files per second and a markdown snippet. The temporary folder is removed afterwards.
This is a benchmark, not a test.

    .venv/bin/python bench/bench_index.py [--folders 100] [--files 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from kbfs.index import ShareIndex


def make_tree(root: str, folders: int, files: int, size: int) -> None:
    for d in range(folders):
        folder = os.path.join(root, f"dir{d:04}")
        os.mkdir(folder)
        for i in range(files):
            with open(os.path.join(folder, f"file{i:05}.dat"), "wb") as f:
                f.write(os.urandom(size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folders", type=int, default=100)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = args.folders * args.files

    tmp = tempfile.mkdtemp(prefix="kbfs-bench-index-", dir="/tmp")
    try:
        data = os.path.join(tmp, "data")
        os.mkdir(data)
        print(f"making {n} files of {args.size} bytes in {data} ...", flush=True)
        make_tree(data, args.folders, args.files, args.size)
        index = ShareIndex(data, os.path.join(tmp, "state"))
        first = index.scan()
        print(f"first scan: {first.added} files hashed in {first.seconds:.2f} s "
              f"({first.added / first.seconds:,.0f} files/s)", flush=True)
        if first.added != n:
            sys.exit(f"first scan indexed {first.added} files, expected {n}")

        seconds: list[float] = []
        for r in range(args.rounds):
            start = time.perf_counter()
            stats = index.scan()
            seconds.append(time.perf_counter() - start)
            if stats.hashed_bytes or stats.unchanged != n:
                sys.exit(f"rescan {r + 1} was not a no-op: {stats}")
            print(f"rescan {r + 1}: {seconds[-1]:.3f} s  {n / seconds[-1]:,.0f} files/s", flush=True)
        index.close()

        best, median = min(seconds), statistics.median(seconds)
        print()
        print(f"### Index rescan of {n:,} unchanged files")
        print()
        print(f"{os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, "
              f"{args.folders} folders x {args.files} files of {args.size} bytes, warm dentry cache.")
        print()
        print("| pass | seconds | files/s |")
        print("| --- | ---: | ---: |")
        print(f"| first scan (hash all) | {first.seconds:.2f} | {first.added / first.seconds:,.0f} |")
        print(f"| rescan, best of {args.rounds} | {best:.3f} | {n / best:,.0f} |")
        print(f"| rescan, median | {median:.3f} | {n / median:,.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

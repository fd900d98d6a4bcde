"""Micro-benchmark of the block cache over a running relay (no FUSE, no CLI).

Usage: bench_cache.py --relay URL --sha1 SHA1 --size BYTES [--root ROOT]
       [--read 131072] [--run N] [--workers N] [--window N] [--random 100]

Measures, each with a fresh cache folder: cold sequential MB/s (reads of --read bytes with a
`ReadAhead`, the way the FUSE daemon reads), cold random 4 KiB median latency (`read`), warm
random 4 KiB median latency (`read_cached`, page cache not dropped), and one plain
`fetch_blocks_into` latency for a single block (the network floor of a cold random read).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kbfs import cache as kcache  # noqa: E402
from kbfs import tree  # noqa: E402
from kbfs.fetch import Fetcher  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--relay", required=True)
    ap.add_argument("--sha1", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--root", default=None)
    ap.add_argument("--read", type=int, default=128 << 10)
    ap.add_argument("--run", type=int, default=kcache.PREFETCH_RUN)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--random", type=int, default=100)
    ap.add_argument("--sync-stores", action="store_true")
    args = ap.parse_args()
    kcache.PREFETCH_RUN = args.run
    ref = kcache.FileRef(args.sha1, args.size, args.root)
    rng = random.Random(3)
    offsets = [rng.randrange(0, args.size - 4096) for _ in range(args.random)]
    with tempfile.TemporaryDirectory(prefix="kbfs-bench-cache-") as d, Fetcher([args.relay]) as f:
        c = kcache.BlockCache(d + "/seq", f, 1 << 40, min_free=0, workers=args.workers,
                              background_stores=not args.sync_stores)
        c.read(ref, 0, 1)  # the tree and a warm connection, as after open()
        ra = kcache.ReadAhead(c, ref, max_window=args.window)
        t0 = time.perf_counter()
        for off in range(0, args.size, args.read):
            ra.on_read(off, args.read)
            c.read(ref, off, args.read)
        seq = args.size / (time.perf_counter() - t0) / 1e6
        c.close()
        c = kcache.BlockCache(d + "/rand", f, 1 << 40, min_free=0, workers=args.workers,
                              background_stores=not args.sync_stores)
        c.read(ref, 0, 1)
        cold = []
        for off in offsets:
            t = time.perf_counter()
            c.read(ref, off, 4096)
            cold.append(time.perf_counter() - t)
        c.wait_idle(30)
        warm = []
        for off in offsets:
            t = time.perf_counter()
            got = c.read_cached(ref, off, 4096)
            warm.append(time.perf_counter() - t)
            assert got is not None and len(got) == 4096
        leaves = tree.split_leaves(f.fetch_tree(args.sha1, args.size))
        buf = memoryview(bytearray(tree.BLOCK_SIZE))
        net = []
        for off in offsets[:50]:
            t = time.perf_counter()
            f.fetch_blocks_into(args.sha1, args.size, off // tree.BLOCK_SIZE, 1, leaves, buf)
            net.append(time.perf_counter() - t)
        c.close()
    print(f"run={args.run} workers={args.workers} window={args.window} read={args.read} "
          f"stores={'sync' if args.sync_stores else 'background'}")
    print(f"  cold sequential        {seq:8.0f} MB/s")
    print(f"  cold random 4 KiB      {statistics.median(cold) * 1e3:8.2f} ms median")
    print(f"  one block fetch        {statistics.median(net) * 1e3:8.2f} ms median")
    print(f"  warm random 4 KiB      {statistics.median(warm) * 1e6:8.1f} us median (read_cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

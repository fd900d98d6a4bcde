"""Micro-benchmark of the piece cache over a running relay or source (no FUSE, no CLI).

Usage: bench_cache.py --relay URL --sha1 SHA1 --size BYTES [--root ROOT]
       [--block-size 65536] [--read 131072] [--workers 16] [--random 100]

Measures `kbfs.piececache.PieceCache`, each part with a fresh cache folder: cold sequential
MB/s (reads of --read bytes in order: the cache's own link-sized read-ahead), cold random
4 KiB median latency (`read`), warm random 4 KiB median latency (the same offsets again,
from the piece store, page cache not dropped), and one plain source call for the piece of a
random offset (`fetch_pieces` for 64 KiB pieces, else `fetch_blocks` with the leaf list:
the network floor of a cold random read). The pointer: ROOT and BLOCK_SIZE as it says
(without ROOT the first read is the whole-SHA-1 pass).

It replaces the BlockCache's micro-benchmark (kbfs/cache.py, retired): its knobs
(--run, --window, --sync-stores) belonged to that cache and are gone.
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

from kbfs.fetch import Fetcher  # noqa: E402
from kbfs.fileref import FileRef  # noqa: E402
from kbfs.piececache import PieceCache  # noqa: E402

PIECE = 64 << 10


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--relay", required=True)
    ap.add_argument("--sha1", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--root", default=None)
    ap.add_argument("--block-size", type=int, default=PIECE)
    ap.add_argument("--read", type=int, default=128 << 10)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--random", type=int, default=100)
    args = ap.parse_args()
    ref = FileRef(args.sha1, args.size, args.root, args.block_size)
    bs = ref.block_size
    rng = random.Random(3)
    offsets = [rng.randrange(0, max(1, args.size - 4096)) for _ in range(args.random)]
    with tempfile.TemporaryDirectory(prefix="kbfs-bench-cache-") as d, Fetcher([args.relay]) as f:
        with PieceCache(d + "/seq/pieces", f, 1 << 40, min_free=0, workers=args.workers) as c:
            c.read(ref, 0, 1)  # a warm connection (and the leaf list or the SHA-1 pass), as after open()
            t0 = time.perf_counter()
            for off in range(0, args.size, args.read):
                c.read(ref, off, args.read)
            seq = args.size / (time.perf_counter() - t0) / 1e6
            ahead = c.statistics()["readahead_pieces"]
        with PieceCache(d + "/rand/pieces", f, 1 << 40, min_free=0, workers=args.workers) as c:
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
                got = c.read(ref, off, 4096)
                warm.append(time.perf_counter() - t)
                assert len(got) == min(4096, args.size - off)
            leaves = c.leaves(ref) if bs != PIECE or ref.root is None else None
        net = []
        for off in offsets[:50]:
            t = time.perf_counter()
            if leaves is None:
                f.fetch_pieces(args.sha1, args.size, args.root, bs, off // bs, 1)
            else:
                f.fetch_blocks(args.sha1, args.size, off // bs, 1, leaves, bs)
            net.append(time.perf_counter() - t)
    print(f"block_size={bs} workers={args.workers} read={args.read} root={'yes' if args.root else 'no'}")
    print(f"  cold sequential        {seq:8.0f} MB/s ({ahead} pieces read ahead)")
    print(f"  cold random 4 KiB      {statistics.median(cold) * 1e3:8.2f} ms median")
    print(f"  one piece fetch        {statistics.median(net) * 1e3:8.2f} ms median")
    print(f"  warm random 4 KiB      {statistics.median(warm) * 1e6:8.1f} us median (piece store)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

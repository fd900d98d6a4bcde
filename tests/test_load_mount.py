"""Load over the mount: 64 readers at once (32 threads, 32 processes), all bytes checked.

A real relay and a real share (tests/netutil.py) serve six files of 3-23 MiB; one
`kbfs mount kbfs://RELAY/SHARE` (tests/mountutil.py) is read by 64 concurrent readers,
half sequential, half random (4 KiB to 1 MiB preads), spread over the files. Each reader
compares every piece with the original file. Rounds alternate cold (half the contents
evicted from the piece store by another process, as a second mount's eviction would, and
the kernel's page cache dropped) and warm. The daemon's RSS, open
descriptors and threads are sampled after every round: they must stay flat (no leak).
The quick run (3 rounds) is part of `make test`; `make soak` runs 20 rounds.
Figures go to stdout (`-s`) and docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.mountutil import NEEDS_FUSE, alive, mounted
from tests.netutil import start_relay, start_share
from tests.test_faults import (
    MiB,
    Outcome,
    check_cache,
    daemon_figures,
    data_of,
    drop_page_cache,
    read_checked,
    run_bounded,
)

pytestmark = NEEDS_FUSE

THREADS = 32
PROCESSES = 32
ROUND_BOUND = 240.0

# A reader process: compares every piece it reads through the mount with the original.
# Exit 0: all true; 5: an OSError (errno printed); 3: wrong bytes (always a failure).
_READER = r"""
import os, random, sys
mnt, orig, mode, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
truth = open(orig, "rb").read()
rng = random.Random(seed)
try:
    with open(mnt, "rb", buffering=0) as f:
        if mode == "seq":
            pos = 0
            while True:
                piece = f.read(1 << 20)
                if not piece:
                    break
                if piece != truth[pos:pos + len(piece)]:
                    print("wrong at", pos); sys.exit(3)
                pos += len(piece)
            if pos != len(truth):
                print("ended at", pos); sys.exit(3)
        else:
            for _ in range(40):
                off = rng.randrange(len(truth))
                n = rng.choice((4096, 65536, 300000, 1 << 20))
                piece = os.pread(f.fileno(), n, off)
                if piece != truth[off:off + len(piece)]:
                    print("wrong pread", n, off); sys.exit(3)
except OSError as exc:
    print("errno", exc.errno); sys.exit(5)
"""


def _round(m_path: Callable[[str], str], data: Path, truths: dict[str, bytes], r: int
           ) -> tuple[dict[str, Outcome], list[tuple[str, int, str]], float]:
    names = sorted(truths)
    procs = []
    t0 = time.monotonic()
    for i in range(PROCESSES):
        name = names[i % len(names)]
        mode = "seq" if i % 2 == 0 else "random"
        procs.append((f"proc-{i}-{mode}-{name}", subprocess.Popen(
            [sys.executable, "-c", _READER, m_path(name), str(data / name), mode,
             str(r * 1000 + i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    jobs: dict[str, Callable[[Outcome], object]] = {}
    for i in range(THREADS):
        name = names[(i + 3) % len(names)]
        mode = "seq" if i % 2 else "random"
        jobs[f"thread-{i}-{mode}-{name}"] = (
            lambda o, p=m_path(name), t=truths[name], mode=mode, s=r * 1000 + 500 + i:
            read_checked(p, t, o, mode=mode, count=40, seed=s))
    outcomes = run_bounded(jobs, ROUND_BOUND)
    results = []
    for label, p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, ROUND_BOUND - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            results.append((label, -9, "HUNG: " + out))
            continue
        results.append((label, p.returncode, out.strip()))
    return outcomes, results, time.monotonic() - t0


def _load(tmp_path: Path, rounds: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    truths = {f"f{i}.bin": data_of((3 + 4 * i) * MiB + 17 * i, 300 + i) for i in range(6)}
    for name, d in truths.items():
        (data / name).write_bytes(d)
    by_sha1 = {hashlib.sha1(d).hexdigest(): d for d in truths.values()}
    total = sum(len(d) for d in truths.values())
    rng = random.Random(rounds)
    with start_relay(tmp_path) as relay, start_share(data, relay.url, tmp_path) as share:
        src = f"kbfs://{relay.url.removeprefix('http://')}/{share.id}"
        with mounted(src, tmp_path, extra=["--timeout", "30"]) as m:
            for name in truths:
                os.stat(m.path(name))
            figures = [("mounted", daemon_figures(m.pid), 0.0)]
            for r in range(rounds):
                cold = r % 2 == 0
                if cold and r:
                    _evict_half(Path(m.cache_dir) / "pieces", rng)
                for name in truths:
                    drop_page_cache(m.path(name))
                outcomes, results, seconds = _round(m.path, data, truths, r)
                bad_threads = {n: o for n, o in outcomes.items() if not o.ok}
                bad_procs = [x for x in results if x[1] != 0]
                assert not bad_threads and not bad_procs, (r, bad_threads, bad_procs)
                read = sum(o.good_bytes for o in outcomes.values())
                figures.append((f"round {r} ({'cold' if cold else 'warm'}, {read >> 20} MiB by "
                                "threads)", daemon_figures(m.pid), seconds))
                assert alive(m.pid)
            n = check_cache(m.cache_dir, by_sha1)
            fs = m.kbfs("status", "--json").stdout
        print(f"\n64 readers x {rounds} rounds over {len(truths)} files ({total >> 20} MiB); "
              f"{n} verified pieces in the cache")
        for label, fig, seconds in figures:
            print(f"  {label:34s} rss {fig['rss'] / MiB:6.1f} MiB  fds {fig['fds']:4d} (blocks {fig['block_fds']:3d})  "
                  f"threads {fig['threads']:3d}  {seconds:5.1f} s")
        assert fs
    # Flat: compare the end with the first loaded round (the pools and sessions exist by then).
    first, last = figures[1][1], figures[-1][1]
    # Open data files are the piece store's bounded set (one per content it uses, an evicted
    # one until its handle goes); everything else (sockets, pipes, logs) must not grow.
    assert last["other_fds"] <= first["other_fds"] + 8, figures
    assert last["block_fds"] <= 2 * len(truths), figures
    assert last["rss"] <= first["rss"] + 64 * MiB, figures
    assert last["threads"] <= first["threads"] + 8, figures


def _evict_half(pieces: Path, rng: random.Random) -> None:
    """Remove half the contents as the store's eviction does (rows first, then the files):
    the daemon's next reads of them fetch and store them again (it may still serve what it
    holds open: the unlinked file's bytes are still the verified ones)."""
    from kbfs import piecefile
    from kbfs.piecestore import PieceStore

    with PieceStore(str(pieces), 1 << 40, 0) as store:
        keys = store.catalog.keys()
        gone = rng.sample(keys, len(keys) // 2)
        store.catalog.remove(gone)
    for key in gone:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(piecefile.data_path(str(pieces), key))


def test_64_readers_over_the_mount(tmp_path: Path) -> None:
    _load(tmp_path, 3)


@pytest.mark.soak
def test_64_readers_over_the_mount_soak(tmp_path: Path) -> None:
    _load(tmp_path, 20)

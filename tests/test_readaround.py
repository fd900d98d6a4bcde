"""Read-around (kbfs/readahead2.py `ReadAround`, hooked into kbfs/piececache.py): what it asks
for and when, alone (a LinkEstimate on a fake clock); through a PieceCache over an in-process
source that verifies by proof and takes a link's time (tests/fakepieces.py), with h5py itself
opening a file of 40 datasets; and through a real mount of v2 pointers over a real relay and
share (its status file's counters)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from fakepieces import Content, HonestSource, P

from kbfs import proof, prv, tree
from kbfs.piececache import PieceCache
from kbfs.readahead2 import AROUND_GAIN, SCORE_MIN, LinkEstimate, ReadAround

KB = 1024


def link_of(bandwidth: float, delay: float) -> LinkEstimate:
    """A LinkEstimate that has seen one idle call of DELAY seconds delivering at BANDWIDTH."""
    now = [0.0]
    link = LinkEstimate(4 << 20, 64 << 20, clock=lambda: now[0])
    call = link.begin()
    now[0] += delay
    link.end(call, int(bandwidth * delay))
    return link


def span(runs: list[tuple[int, int]] | None) -> tuple[int, int] | None:
    """The pieces a plan covers, checking its runs: adjacent, nearest first, doubling."""
    if runs is None:
        return None
    for (a0, a1), (b0, b1) in zip(runs, runs[1:], strict=False):
        assert a1 == b0 and b1 - b0 <= 2 * (a1 - a0)
    return runs[0][0], runs[-1][1]


def test_local_misses_get_a_link_sized_neighbourhood_after_the_reader() -> None:
    ra = ReadAround()
    link = link_of(12.5e6, 0.07)           # 100 Mbit/s, 70 ms: 4 x bw x delay = 3.5 MB
    k = int(AROUND_GAIN * 12.5e6 * 0.07 // P)        # 53 pieces
    assert ra.plan("c", 0, 1, True, 1000, link, P) is None        # first miss: no history
    runs = ra.plan("c", 26, 27, True, 1000, link, P)
    assert span(runs) == (27, 27 + k)                             # local: what follows it
    assert runs is not None and runs[0] == (27, 31)               # the nearest 256 KiB first
    assert ra.plan("c", 990, 992, True, 1000, link, P) is None    # far from every recent miss
    assert span(ra.plan("c", 985, 986, True, 1000, link, P)) == (986, 1000)  # near 990: cut at the end
    assert ra.plan("c", 999, 1000, True, 1000, link, P) is None   # nothing after the last piece
    fast = link_of(125e6, 0.07)            # 1 Gbit/s: 534 pieces, under max_window (1024)
    assert ra.plan("d", 0, 1, True, 4000, fast, P) is None
    runs = ra.plan("d", 30, 32, True, 4000, fast, P)
    assert span(runs) == (32, 32 + int(AROUND_GAIN * 125e6 * 0.07 // P))
    assert runs is not None and max(b - a for a, b in runs) == 64   # 4 MiB at most per request
    none = LinkEstimate(4 << 20, 64 << 20)  # nothing measured yet: the minimum
    assert ra.plan("e", 0, 1, True, 4000, none, P) is None
    assert ra.plan("e", 5, 6, True, 4000, none, P) == [(6, 10)]
    mib = ReadAround()                      # 1 MiB pieces (v1 trees): whole pieces, at least one
    assert mib.plan("m", 0, 1, True, 100, none, 1 << 20) is None
    assert mib.plan("m", 3, 4, True, 100, none, 1 << 20) == [(4, 5)]


def test_random_misses_and_hits_plan_nothing() -> None:
    ra = ReadAround()
    link = link_of(125e6, 0.07)
    rng = random.Random(3)
    regions = list(range(32))
    rng.shuffle(regions)
    for reg in regions:                     # bench_wan's random reads: distinct 32 MiB regions
        first = reg * 512 + rng.randrange(512)
        assert ra.plan("big", first, first + 1, True, 16384, link, P) is None
    assert ra.plan("big", 3, 4, False, 16384, link, P) is None    # a hit plans nothing
    assert ra.planned == 0


def test_unread_neighbourhoods_stop_and_read_ones_go_on() -> None:
    link = link_of(12.5e6, 0.07)
    ra = ReadAround()
    # Local misses whose neighbourhoods nobody reads: each costs one, until the score is
    # at SCORE_MIN; then local misses get nothing.
    got = [ra.plan("c", i * 60, i * 60 + 1, True, 100000, link, P) for i in range(12)]
    planned = [g for g in got if g is not None]
    assert len(planned) == -SCORE_MIN and got[0] is None
    # A reader that keeps reading what was planned keeps getting it, far misses included.
    ra2 = ReadAround()
    assert ra2.plan("h", 0, 1, True, 100000, link, P) is None
    lo, hi = span(ra2.plan("h", 10, 11, True, 100000, link, P)) or (0, 0)
    assert ra2.plan("h", lo + 3, lo + 4, False, 100000, link, P) is None   # read from it: a hit
    assert ra2.used == 1
    far = span(ra2.plan("h", 50000, 50001, True, 100000, link, P))   # score > 0: far misses too
    assert far == (50001, 50001 + (hi - lo))


class _Raw(io.RawIOBase):
    """A file object over a PieceCache (what h5py's fileobj driver reads)."""

    def __init__(self, cache: PieceCache, c: Content) -> None:
        self.cache, self.c, self.ref, self.pos = cache, c, c.ref(), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.c.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        data = self.cache.read(self.ref, self.pos, len(b))
        assert data == self.c.data[self.pos : self.pos + len(data)]   # every byte the true one
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _h5_file(path: Path) -> bytes:
    """bench_wan's h5py file, smaller: 40 chunked float32 datasets, 2 attributes each."""
    h5py = pytest.importorskip("h5py")
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(7)
    with h5py.File(path, "w") as f:
        for k in range(40):
            ds = f.create_dataset(f"group{k % 4}/ds{k:02d}", data=rng.random(65536, dtype=np.float32),
                                  chunks=(16384,))
            ds.attrs["units"] = "mV"
            ds.attrs["index"] = k
    return path.read_bytes()


def _h5_slices(cache: PieceCache, c: Content) -> float:
    import h5py

    total = 0.0
    with h5py.File(_Raw(cache, c), "r") as f:
        for k in range(40):
            ds = f[f"group{k % 4}/ds{k:02d}"]
            start = (k * 7919) % (ds.shape[0] - 64)
            total += float(ds[start : start + 64].sum())
    return total


def test_h5py_over_the_piece_cache_needs_fewer_round_trips(tmp_path: Path) -> None:
    """h5py opening 40 datasets and slicing each, over a source with a 30 ms delay: with
    read-around its reader waits on fewer source calls of its own (demand fetches) and the
    whole takes less time; every byte is the true one (checked in _Raw); without it, every
    source call is the reader's own."""
    c2 = _content_of(_h5_file(tmp_path / "d.h5"))
    out = {}
    for around in (False, True):
        src = HonestSource({c2.sha1: c2}, delay=0.03, bandwidth=100e6)
        cache = PieceCache(str(tmp_path / f"cache-{around}"), src, capacity=1 << 34, min_free=0,
                           flush_interval=3600, read_around=around)
        try:
            t0 = time.perf_counter()
            total = _h5_slices(cache, c2)
            secs = time.perf_counter() - t0
            st = cache.statistics()
        finally:
            cache.close()
        out[around] = (secs, st["fetches"] - st["readahead_fetches"], st, total)
    (t_off, demand_off, st_off, sum_off), (t_on, demand_on, st_on, sum_on) = out[False], out[True]
    assert sum_on == sum_off
    assert st_off["readahead_fetches"] == 0 and "around_planned" not in st_off
    assert st_on["around_planned"] > 0 and st_on["around_used"] >= st_on["around_planned"] // 2, st_on
    assert demand_on <= 0.7 * demand_off, (demand_on, demand_off)
    assert t_on < t_off, (t_on, t_off)


def _content_of(data: bytes) -> Content:
    """A fakepieces.Content whose bytes are DATA."""
    c = Content.__new__(Content)
    c.seed, c.size, c.block_size = "given", len(data), P
    c.data = data
    c.sha1 = hashlib.sha1(data).hexdigest()
    c.shape = proof.Shape(len(data), P)
    view = memoryview(data)
    leaves = [tree.leaf_hash(view[i * P : (i + 1) * P]) for i in range(c.shape.leaves)]
    c.levels = proof.levels_from(leaves, c.shape)
    c.root = proof.root_of(c.shape, c.levels[-1][0])
    return c


def test_random_4k_reads_through_the_cache_fetch_exactly_their_pieces(tmp_path: Path) -> None:
    """bench_wan's random reads (one per region, regions farther apart than LOCAL_SPAN) get
    exactly their pieces; uniformly random ones (bench_mount's) get at most the few
    neighbourhoods the score allows before it stops them."""
    c = Content("big", 4096 * P)
    src = HonestSource({c.sha1: c})
    with PieceCache(str(tmp_path / "cache"), src, capacity=1 << 34, min_free=0, flush_interval=3600,
                    read_around=True) as cache:
        rng = random.Random(8)
        regions = list(range(32))
        rng.shuffle(regions)
        for reg in regions:
            off = (reg * 128 + rng.randrange(40, 88)) * P + rng.randrange(P - 4096)
            assert cache.read(c.ref(), off, 4096) == c.data[off : off + 4096]
        st = cache.statistics()
        assert st["readahead_fetches"] == 0 and st["around_planned"] == 0
        assert st["pieces_fetched"] == sum(x.count for x in src.calls) == 32
        for _ in range(300):
            off = rng.randrange(c.size - 4096)
            assert cache.read(c.ref(), off, 4096) == c.data[off : off + 4096]
        st = cache.statistics()
    assert 0 < st["around_planned"] <= -SCORE_MIN + 2, st


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse and fusermount3")
def test_mount_reads_around_h5py_metadata(tmp_path: Path) -> None:
    """A real mount of a v2 pointer (real relay + share): h5py's slices of 40 datasets read
    the true values, the mount's piece cache planned neighbourhoods and most were read."""
    h5py = pytest.importorskip("h5py")
    import mountutil
    import netutil

    data_dir, ptrs = tmp_path / "data", tmp_path / "ptrs"
    data_dir.mkdir()
    ptrs.mkdir()
    _h5_file(data_dir / "d.h5")
    p = prv.create_pointer(data_dir / "d.h5", block_size=P)
    p = prv.Pointer(p.sha1, p.size, p.fcs, "/nonexistent/d.h5", p.prv_version, p.tree)
    (ptrs / "d.h5.prv").write_text(p.to_json())
    with h5py.File(data_dir / "d.h5", "r") as f:
        want = [float(f[f"group{k % 4}/ds{k:02d}"][(k * 7919) % (65536 - 64):][:64].sum()) for k in range(40)]
    with netutil.start_relay(tmp_path) as relay, netutil.start_share(data_dir, relay.url, tmp_path), \
            mountutil.mounted(str(ptrs), tmp_path, relays=[relay.url]) as m:
        with h5py.File(m.path("d.h5"), "r") as f:
            got = [float(f[f"group{k % 4}/ds{k:02d}"][(k * 7919) % (65536 - 64):][:64].sum()) for k in range(40)]
        assert got == want
        end = time.monotonic() + 15
        while True:
            res = m.kbfs("status", m.mountpoint, "--json")
            st = json.loads(res.stdout)[0] if res.returncode == 0 and res.stdout.strip() else {}
            pieces = st.get("pieces") or {}
            if pieces.get("around_planned") or time.monotonic() > end:
                break
            time.sleep(0.5)
    assert pieces.get("around_planned", 0) > 0, pieces
    assert pieces["around_used"] > 0, pieces
    assert pieces["pieces_fetched"] <= -(-p.size // P), pieces   # never a piece twice

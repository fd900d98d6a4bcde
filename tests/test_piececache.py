"""The piece cache's read layer (kbfs/piececache.py, flights.py, readahead2.py) against
in-process sources that verify by proof (tests/fakepieces.py): bytes, single flight,
read-ahead sized to the link, lying sources, shorter second proofs, capacity and open
files, and kill -9 of a reading child process (every piece present verifies after)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakepieces import Content, HonestSource, LyingSource, P
from httpsource import HTTPSource

from kbfs import fetch, piececache, proof
from kbfs.errors import SourceError, VerificationError
from kbfs.fetch import Fetcher
from kbfs.fileref import FileRef
from kbfs.flights import Flights
from kbfs.piececache import PieceCache
from kbfs.piecestore import PieceStore
from kbfs.readahead2 import LinkEstimate, Streams

REPO = Path(__file__).resolve().parent.parent
KB = 1024


def make(tmp_path: Path, source: HonestSource, **kw: object) -> PieceCache:
    args: dict = dict(capacity=1 << 34, min_free=0, flush_interval=3600, min_ahead=256 * KB)
    args.update(kw)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return PieceCache(str(tmp_path / "cache"), source, **args)


def test_random_reads_get_their_bytes_and_exactly_their_pieces(tmp_path: Path) -> None:
    c = Content("random", 2000 * P + 1234)
    src = HonestSource({c.sha1: c})
    rng = random.Random(5)
    with make(tmp_path, src) as cache:
        ref = c.ref()
        for _ in range(150):
            offset = rng.randrange(c.size)
            length = rng.choice((1, 4 * KB, 4 * KB, 100 * KB, 300 * KB))
            before = len(src.calls)
            pieces = set(range(offset // P, (min(offset + length, c.size) - 1) // P + 1))
            missing = set(cache.store.missing(ref.key, min(pieces), max(pieces)))
            assert cache.read(ref, offset, length) == c.data[offset : offset + length]
            asked = {i for call in src.calls[before:] for i in range(call.first, call.first + call.count)}
            assert asked == missing   # no read-ahead, no re-fetch: exactly the missing pieces
        assert cache.read(ref, c.size, 10) == b"" and cache.read(ref, c.size - 3, 10) == c.data[-3:]
        stats = cache.statistics()
        assert stats["readahead_fetches"] == 0 and stats["window"] == 256 * KB
        assert cache.cached_bytes(ref) == sum(min((i + 1) * P, c.size) - i * P
                                              for a, b in cache.store.ranges(ref.key) for i in range(a, b + 1))
    src.calls.clear()
    with make(tmp_path, src) as cache:  # a new process: the pieces stored are read, not fetched
        present = [i for a, b in cache.store.ranges(ref.key) for i in range(a, b + 1)]
        assert len(present) > 100
        rng.shuffle(present)
        for i in present:
            assert cache.read(ref, i * P + 5, 4 * KB) == c.data[i * P + 5 : i * P + 5 + 4 * KB]
        assert src.calls == []


def test_a_4k_read_fetches_one_piece(tmp_path: Path) -> None:
    c = Content("one", 64 * P)
    src = HonestSource({c.sha1: c})
    with make(tmp_path, src) as cache:
        assert cache.read(c.ref(), 10 * P + 5000, 4 * KB) == c.data[10 * P + 5000 : 10 * P + 5000 + 4 * KB]
        assert [(x.first, x.count) for x in src.calls] == [(10, 1)]


def stream(cache: PieceCache, ref: object, data: bytes, chunk: int = 128 * KB) -> None:
    for off in range(0, len(data), chunk):
        assert cache.read(ref, off, chunk) == data[off : off + chunk]  # type: ignore[arg-type]


def test_sequential_stream_reads_ahead_in_growing_runs(tmp_path: Path) -> None:
    c = Content("seq", 48 * (1 << 20) + 777)
    src = HonestSource({c.sha1: c}, delay=0.01, bandwidth=200e6)
    with make(tmp_path, src) as cache:
        stream(cache, c.ref(), c.data)
        stats = cache.statistics()
        sizes = [x.count for x in src.calls]
        leaves = proof.Shape(c.size, P).leaves
        assert stats["readahead_fetches"] > 10 and stats["readahead_pieces"] > 0.9 * leaves
        assert sizes[0] <= 2 and max(sizes) >= 8          # began with the reader's pieces, grew to runs
        assert stats["window"] > 256 * KB                  # the window grew past its floor
        assert stats["pieces_fetched"] == leaves   # each piece once
        assert stats["misses"] < stats["reads"] / 2        # the reader mostly found pieces ahead


def test_h5py_like_small_near_reads_read_nothing_ahead(tmp_path: Path) -> None:
    """h5py opening a file of 40 datasets and slicing each: small reads a few bytes to a few
    pieces apart, now and then two exactly adjacent ones (the kernel's page reads), repeats,
    jumps back to the superblock. Near is not sequential: every source call is a reader's."""
    c = Content("h5", 1024 * P)
    src = HonestSource({c.sha1: c})
    rng = random.Random(15)
    touched: set[int] = set()
    with make(tmp_path, src) as cache:
        ref = c.ref()

        def read(offset: int, length: int) -> None:
            assert cache.read(ref, offset, length) == c.data[offset : offset + length]
            touched.update(range(offset // P, (min(offset + length, c.size) - 1) // P + 1))

        read(0, 96)
        read(96, 512)                                        # adjacent, but two reads, tiny
        for ds in range(40):
            pos = 4096 + ds * (c.size // 41) + rng.randrange(P)
            for _ in range(rng.randrange(3, 9)):             # header, B-tree, heap: near, forward
                length = rng.choice((8, 40, 272, 512, 544, 2048, 4096))
                read(pos, length)
                if rng.random() < 0.3:
                    read(pos + length, rng.choice((8, 512, 4096)))   # an adjacent pair
                if rng.random() < 0.2:
                    read(pos, length)                                # a repeat
                pos += length + rng.choice((1, 8, 100, 3000, P, 3 * P))
            if rng.random() < 0.3:
                read(rng.randrange(2 * P), 512)                      # back to the root group
        stats = cache.statistics()
        assert stats["readahead_fetches"] == 0, stats
        assert stats["pieces_fetched"] == len(touched) == sum(x.count for x in src.calls)


def test_single_flight(tmp_path: Path) -> None:
    c = Content("flight", 20 * P)
    src = HonestSource({c.sha1: c}, delay=0.3)
    out: list[bytes] = []
    with make(tmp_path, src) as cache:
        ref = c.ref()
        barrier = threading.Barrier(16)

        def reader() -> None:
            barrier.wait()
            out.append(cache.read(ref, 3 * P + 100, 4 * KB))

        threads = [threading.Thread(target=reader) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == [c.data[3 * P + 100 : 3 * P + 100 + 4 * KB]] * 16
        assert len(src.calls) == 1 and cache.statistics()["joined"] >= 1


def run_stream(tmp_path: Path, name: str, delay: float, bandwidth: float, size: int) -> tuple[float, float]:
    """(mean bytes in flight, bytes/s) over the second half of a cold stream."""
    c = Content(name, size)
    src = HonestSource({c.sha1: c}, delay=delay, bandwidth=bandwidth)
    with PieceCache(str(tmp_path / name), src, 1 << 34, min_free=0, flush_interval=3600,
                    min_ahead=256 * KB) as cache:
        ref = c.ref()
        chunk = 128 * KB
        half = None
        for off in range(0, size, chunk):
            if half is None and off >= size // 2:
                half = (time.monotonic(), off)
            assert cache.read(ref, off, chunk) == c.data[off : off + chunk]
        end = time.monotonic()
    assert half is not None
    return src.outstanding_between(half[0], end), (size - half[1]) / (end - half[0])


def test_bytes_in_flight_follow_bandwidth_times_delay(tmp_path: Path) -> None:
    bw = 25e6
    short, rate_short = run_stream(tmp_path, "short", 0.04, bw, 56 << 20)
    long, rate_long = run_stream(tmp_path, "long", 0.16, bw, 56 << 20)
    for inflight, delay, rate in ((short, 0.04, rate_short), (long, 0.16, rate_long)):
        bdp = bw * delay
        assert 0.8 * bdp <= inflight <= 4 * bdp, (delay, inflight / bdp)
        assert rate >= 0.6 * bw, (delay, rate / bw)   # the window keeps the link busy
    assert 2 <= long / short <= 8, long / short        # 4x the delay, ~4x the bytes in flight


@pytest.mark.parametrize("tamper", ["data", "proof"])
def test_lying_source_stores_nothing(tmp_path: Path, tamper: str) -> None:
    c = Content("lie", 40 * P + 5)
    liar = LyingSource({c.sha1: c}, delay=0.1, tamper=tamper)
    errors: list[BaseException] = []
    with make(tmp_path, liar) as cache:
        ref = c.ref()

        def reader(offset: int) -> None:
            try:
                cache.read(ref, offset, 4 * KB)
            except BaseException as exc:   # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(7 * P,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with pytest.raises(VerificationError):
            cache.read(ref, 0, 3 * P)
        assert len(errors) == 4 and all(isinstance(e, VerificationError) for e in errors)
        cache.store.flush()
        assert cache.cached_bytes(ref) == 0 and cache.store.present(ref.key) in (None, bytes(5))
        assert cache.statistics()["known_nodes"] == 0     # the liar's scribbles were not kept
        cache.source = HonestSource({c.sha1: c})
        assert cache.read(ref, 7 * P, 4 * KB) == c.data[7 * P : 7 * P + 4 * KB]


def test_short_answer_is_a_source_error(tmp_path: Path) -> None:
    c = Content("short", 10 * P)

    class Short(HonestSource):
        def fetch_pieces(self, *a: object, **kw: object) -> bytes:
            return super().fetch_pieces(*a, **kw)[:-1]  # type: ignore[arg-type]

    with make(tmp_path, Short({c.sha1: c})) as cache:
        with pytest.raises(SourceError):
            cache.read(c.ref(), 0, 10)
        assert cache.cached_bytes(c.ref()) == 0


def test_second_proof_of_a_content_is_shorter(tmp_path: Path) -> None:
    c = Content("proofs", 4096 * P)   # 256 MiB of pieces: 12 levels
    src = HonestSource({c.sha1: c})
    with make(tmp_path, src) as cache:
        ref = c.ref()
        cache.read(ref, 100 * P, 10)
        cache.read(ref, 3000 * P, 10)
        cache.read(ref, 3001 * P, 10)
        first, second, third = (x.proof_bytes for x in src.calls)
        assert first == 12 * 32 and second < first and third <= 32
    with make(tmp_path / "other", src) as cache:   # nothing known: the full proof again
        cache.read(c.ref(), 2000 * P, 10)
        assert src.calls[-1].proof_bytes == first


def test_known_nodes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(piececache, "MAX_KNOWN_CONTENTS", 3)
    monkeypatch.setattr(piececache, "MAX_KNOWN_NODES", 20)
    contents = [Content(f"k{i}", 1024 * P) for i in range(5)]
    src = HonestSource({c.sha1: c for c in contents})
    with make(tmp_path, src) as cache:
        for c in contents:
            for i in range(0, 1024, 97):
                cache.read(c.ref(), i * P, 1)
        stats = cache.statistics()
        assert stats["known_contents"] == 3 and stats["known_nodes"] <= 60
        assert all(min(level for level, _ in nodes) >= 2 for nodes in cache._known.values())


def test_capacity_evicts_least_recently_used_and_spares_open_files(tmp_path: Path) -> None:
    contents = [Content(f"cap{i}", 16 * P) for i in range(4)]
    src = HonestSource({c.sha1: c for c in contents})
    for hold in (True, False):
        with make(tmp_path / str(hold), src, capacity=2 * 16 * P) as cache:
            a = contents[0].ref()
            if hold:
                cache.open_file(a)
            stream(cache, a, contents[0].data)
            cache.store.flush()
            for c in contents[1:]:
                stream(cache, c.ref(), c.data)
                cache.store.flush()
            kept = [cache.cached_bytes(c.ref()) for c in contents]
            assert cache.store.statistics()["used"] <= 2 * 16 * P + 16 * P   # the open one beyond
            if hold:
                assert kept[0] == 16 * P and kept[3] == 16 * P and sum(kept) <= 3 * 16 * P
                cache.close_file(a)
                cache.store.evict_to(16 * P)   # room for one: the least recently used goes
                assert cache.cached_bytes(a) == 0     # closed: evictable again
            else:
                assert kept[0] == 0 and kept[3] == 16 * P   # the least recently used went first


def test_a_size_the_root_does_not_bind_is_refused(tmp_path: Path) -> None:
    c = Content("shape", 10 * P + 3)
    with make(tmp_path, HonestSource({c.sha1: c})) as cache:
        assert cache.read(c.ref(), 0, 5) == c.data[:5]
        with pytest.raises(VerificationError):   # the root binds the size
            cache.read(c.ref(size=c.size - 1), 0, 5)
        # A source without leaf lists cannot serve root-less content: an error, no bytes.
        with pytest.raises(AttributeError):
            cache.read(c.ref(root=None), 0, 5)
        cache.prefetch(c.ref(root=None), 0, 3)   # never raises


def test_prefetch_fetches_in_the_background(tmp_path: Path) -> None:
    c = Content("pre", 40 * P)
    src = HonestSource({c.sha1: c})
    with make(tmp_path, src) as cache:
        cache.prefetch(c.ref(), 8, 20)
        deadline = time.monotonic() + 10
        while cache.cached_bytes(c.ref()) < 20 * P and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache.store.ranges(c.ref().key) == [(8, 27)]
        n = len(src.calls)
        assert cache.read(c.ref(), 8 * P, 20 * P) == c.data[8 * P : 28 * P] and len(src.calls) == n


def test_flights_and_streams_units() -> None:
    f = Flights()
    mine, theirs = f.claim("k" * 3, [0, 1, 2, 3, 5, 6, 7, 8, 9], max_run=3, speculative=True, align=4)
    assert [(x.first, x.count) for x in mine] == [(0, 3), (3, 1), (5, 3), (8, 2)] and theirs == []
    mine2, theirs2 = f.claim("k" * 3, [2, 3, 4], max_run=8, speculative=False)
    assert [(x.first, x.count) for x in mine2] == [(4, 1)] and {x.first for x in theirs2} == {0, 3}
    # Without ALIGN a reader's own consecutive pieces are one run (one request), not one each.
    mine3, _ = f.claim("j" * 3, range(10, 18), max_run=256, speculative=False)
    assert [(x.first, x.count) for x in mine3] == [(10, 8)]
    f.finish(mine[0], b"x")
    assert mine[0].future.result() == b"x" and not f.in_flight("k" * 3, 0) and f.in_flight("k" * 3, 3)
    s = Streams()
    assert s.plan("key", 0, 4096, P, 100, 8 * P, 4) is None            # a first read: no plan
    assert s.plan("key", 50 * P, 50 * P + 10, P, 100, 8 * P, 4) is None  # a jump: another stream
    assert s.plan("key", 4096, 8192, P, 100, 8 * P, 4) is None         # two reads: not yet a stream
    assert s.plan("key", 8192, 3 * P, P, 100, 8 * P, 4) == (3, 8)      # three, over 2 pieces:
    assert s.plan("key", 3 * P, 3 * P + 100, P, 100, 8 * P, 4) is None  # 2x its extent, whole runs
    for a, b in ((5000, 6000), (6000, 7000), (5000, 5500), (7000, 7100)):  # near, then adjacent
        assert s.plan("key", 50 * P + a, 50 * P + b, P, 100, 8 * P, 4) is None  # (a repeat between)
    # Reordered arrivals: the read between two extents joins them.
    for first in (20, 22):
        assert s.plan("key", first * P, (first + 1) * P, P, 100, 8 * P, 4) is None
    assert s.plan("key", 21 * P, 22 * P, P, 100, 8 * P, 4) == (23, 28)
    # A stream of 128 KiB reads (4 MiB window, runs of 8) reads ahead from its third read.
    s2 = Streams()
    plans = [s2.plan("k", i * 2 * P, (i + 1) * 2 * P, P, 1000, 64 * P, 8) for i in range(4)]
    assert plans[:2] == [None, None] and plans[2] == (6, 16)
    t = [0.0]
    link = LinkEstimate(1000, 10**9, clock=lambda: t[0])
    call = link.begin()
    t[0] = 0.1
    link.end(call, 1_000_000)
    assert link.bandwidth == pytest.approx(1e7) and link.delay == pytest.approx(0.1)


def test_real_fetcher_over_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kbfs.fetch.Fetcher against tests/httpsource.py making Kbfs-Proof headers: one
    piece-aligned request for a 4 KiB read, a later request asks below= a known node, a
    stream matches; a source whose proofs are wrong: VerificationError, nothing stored."""
    monkeypatch.setattr(fetch, "PENALTY", 0.5)
    data = os.urandom(5 * (1 << 20) + 4321)
    with HTTPSource() as src:
        src.proofs = "ok"
        info = src.add(data, block_size=P)
        ref = FileRef(info.sha1, info.size, info.root, P)
        with Fetcher([src.url], deadline=10) as f, make(tmp_path / "ok", f) as cache:  # type: ignore[arg-type]
            src.reset_counts()
            assert cache.read(ref, 40 * P + 9, 4 * KB) == data[40 * P + 9 : 40 * P + 9 + 4 * KB]
            assert src.ranges() == [(f"/sha1/{info.sha1}", f"bytes={40 * P}-{41 * P - 1}")]
            assert cache.read(ref, 41 * P + 9, 10) == data[41 * P + 9 : 41 * P + 19]
            assert src.proof_log()[-1][1] is not None             # asked below a known node
            stream(cache, ref, data)
            assert cache.statistics()["readahead_fetches"] > 3
        src.proofs = "wrong"
        with Fetcher([src.url], deadline=5) as f, make(tmp_path / "lie", f) as cache:  # type: ignore[arg-type]
            with pytest.raises(VerificationError):
                cache.read(ref, 7 * P, 4 * KB)
            assert cache.cached_bytes(ref) == 0


CHILD = r"""
import random, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
from fakepieces import Content, HonestSource, LyingSource, P
from kbfs.errors import VerificationError
from kbfs.piececache import PieceCache
directory, seed = sys.argv[2], int(sys.argv[3])
contents = [Content(f"crash{i}", 40 * P + 99 * i) for i in range(3)]
rng = random.Random(seed)

class Sometimes(LyingSource):  # one call in ten crosses a lying wire (and fails verification)
    def serve(self, *a):
        return (LyingSource if rng.random() < 0.1 else HonestSource).serve(self, *a)

src = Sometimes({c.sha1: c for c in contents}, delay=0.001)
cache = PieceCache(directory, src, capacity=2 * 40 * P, min_free=0, flush_interval=0.005,
                   min_ahead=256 * 1024, workers=4)
print("ready", flush=True)
while True:
    c = rng.choice(contents)
    try:
        if rng.random() < 0.5:
            for off in range(rng.randrange(c.size), c.size, 128 * 1024):
                assert cache.read(c.ref(), off, 128 * 1024) == c.data[off:off + 128 * 1024]
        else:
            off = rng.randrange(c.size)
            assert cache.read(c.ref(), off, 4096) == c.data[off:off + 4096]
    except VerificationError:
        pass
"""


def test_kill_9_while_reading_every_present_piece_verifies(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    contents = [Content(f"crash{i}", 40 * P + 99 * i) for i in range(3)]
    rng = random.Random(99)
    claimed = 0
    for loop in range(16):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), d, str(loop)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.5))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            if child.stdout is not None:
                child.stdout.close()
        assert child.returncode == -signal.SIGKILL, "the child died before the kill (a wrong byte?)"
        with PieceStore(d, 1 << 40, 0, flush_interval=3600) as store:
            for c in contents:
                for a, b in store.ranges(c.root):
                    for i in range(a, b + 1):
                        data = store.read(c.root, i * P, P)
                        assert data is not None
                        proof.verify_range(c.root, c.size, P, i, i + 1, data,
                                           proof.make_proof(c.node, c.shape, i, i + 1))
                        claimed += 1
    assert claimed > 16   # the children got pieces committed between the kills

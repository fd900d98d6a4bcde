"""The piece cache's read layer: verified pieces from the piece store or from a source.

`PieceCache(directory, source, capacity, ...)` answers `read(ref, offset, length)` with
verified bytes of a content whose pointer has a root (v2 pointers: 64 KiB pieces; any
block size the source can prove works). Every reader of v2 content uses it through
`kbfs.reader.PieceReads` (which also falls back to the block cache on NoProof).

- Pieces present in the `PieceStore` (its bitmap) count as verified: the store's crash rule
  keeps bits from outrunning durable bytes. Missing pieces come from the source's
  `fetch_pieces`, which verifies them by proof against `ref.root` before returning; they
  are stored (`put`), then returned. A source answering the wrong number of bytes is a
  SourceError and nothing is stored.
- Single flight (`kbfs.flights`): concurrent readers of a piece share one source call.
- Random readers, and near-but-not-adjacent ones such as h5py's, get exactly their pieces
  (a 4 KiB read fetches one piece). Sequential streams (`kbfs.readahead2.Streams`: exactly
  adjacent reads) get read-ahead growing with the stream up to `LinkEstimate.window()` bytes
  (about twice bandwidth x delay, measured on every source call; clamped to
  [min_ahead, max_ahead]), in aligned runs of several pieces, fetched by `workers` threads.
  A reader's own pieces are fetched on its own thread, never queued behind read-ahead.
- Upper tree nodes the source verified (`known`) are kept per content in memory
  (`MAX_KNOWN_CONTENTS` contents, `MAX_KNOWN_NODES` nodes each, the lowest levels dropped
  first), so a later proof of the same content stops at a node already verified. A call
  works on a copy; only a call that succeeded merges its nodes back. Nodes are not written
  to disk: stored nodes would be hints that have to be checked up to the root anyway.
- Capacity is the store's: LRU over whole contents, a free-space floor; open files
  (`open_file`/`close_file`) are held in memory against eviction.

A pointer whose size or block size differs from what the store holds under its root is
refused (VerificationError): the root binds both, so one of them is not that content.

Page cache: `read_cached` answers without waiting on anything (a complete content, every
byte in memory: the mount's inline reads). No drop-behind: measured, it did not pay
(docs/internals.md).

Not here: root-less pointers (ValueError: no root to prove pieces against), v1 block
reads, source selection and proof checking (the source's).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from kbfs import catalog, piecefile
from kbfs.errors import CacheError, KbfsError, SourceError, VerificationError
from kbfs.flights import Flight, Flights
from kbfs.piecestore import PieceStore
from kbfs.readahead2 import LinkEstimate, ReadAround, Streams
from kbfs.verifiers import Source, Verifiers, staging_dir

log = logging.getLogger(__name__)

Node = tuple[int, int]
MAX_RUN_BYTES = 16 << 20      # bytes of one demand request (256 pieces of 64 KiB, 16 of 1 MiB)
# KBFS_ALIGNED_RUNS=1: every request is whole aligned 1 MiB groups, whatever the link
# estimate, so that readers behind one shared HTTP cache ask the same ranges and its lock
# joins them (docs/deploy.md, "Many readers at once"; docs/benchmarks.md, bench_many).
ALIGNED_RUN_BYTES = (1 << 20) if os.environ.get("KBFS_ALIGNED_RUNS") == "1" else 0
RUN_MIN, RUN_MAX = 4, 64      # pieces of one read-ahead request
MAX_KNOWN_CONTENTS = 64
MAX_KNOWN_NODES = 1024        # about 1024 x 150 bytes per content



PieceSource = Source   # what the cache fetches from (kbfs.verifiers.Source)


class ContentRef(Protocol):
    """A content as its pointer commits to it (kbfs.cache.FileRef is one)."""

    @property
    def sha1(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def root(self) -> str | None: ...
    @property
    def block_size(self) -> int: ...
    @property
    def key(self) -> str: ...


class PieceCache:
    """Verified reads through a piece store; see the module docstring."""

    def __init__(self, directory: str, source: PieceSource, capacity: int,
                 min_free: int = 1 << 30, workers: int = 16, *, min_ahead: int = 4 << 20,
                 max_ahead: int = 64 << 20, flush_interval: float = 1.0, read_around: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        try:
            parent = os.path.dirname(self.directory)
            piecefile.private_folder(parent)      # the cache folder: ours, 0700
            piecefile.discard_legacy(parent)      # the block cache's layout: one log line
            self.store = PieceStore(directory, capacity, min_free, flush_interval)
        except PermissionError as exc:
            raise CacheError(f"cache folder {exc.filename}: {exc.strerror}; not using it") from None
        self.verifiers = Verifiers(self.store, source, staging_dir(self.directory))
        self.workers = workers
        self.link = LinkEstimate(min_ahead, max_ahead)
        self.flights = Flights()
        self.streams = Streams()
        # Neighbourhoods after local misses (h5py's metadata); the mount turns it on.
        self.around = ReadAround() if read_around and ReadAround.enabled() else None
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kbfs-piece")
        self._lock = threading.Lock()
        self._known: OrderedDict[str, dict[Node, bytes]] = OrderedDict()
        self._checked: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._closing = False
        self._calling = 0   # bytes asked of the source by calls not yet returned
        self._stats: dict[str, int] = dict.fromkeys(
            ("reads", "hits", "misses", "bytes_served", "fetches", "pieces_fetched",
             "bytes_fetched", "readahead_fetches", "readahead_pieces", "joined",
             "fetch_errors", "max_calling_bytes", "inline_reads"), 0)

    @property
    def source(self) -> PieceSource:
        return self.verifiers.source

    @source.setter
    def source(self, source: PieceSource) -> None:
        self.verifiers.source = source
        self.verifiers.leaves.source = source

    # ---- the entry points
    def read(self, ref: ContentRef, offset: int, length: int) -> bytes:
        """Verified bytes [OFFSET, OFFSET+LENGTH) of REF (cut at its end); blocks until
        they are here. Raises what the source raised (SourceError, VerificationError)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        self._check(ref)
        end = min(offset + length, ref.size)
        if end <= offset:
            return b""
        bs, key = ref.block_size, ref.key
        first, last = offset // bs, (end - 1) // bs + 1
        data = self.store.read(key, offset, end - offset)
        self._count(reads=1, hits=data is not None, misses=data is None)
        self._read_ahead(ref, offset, end)
        if self.around is not None:
            self._read_around(ref, first, last, data is None)
        if data is None:
            data = self._fetch_and_assemble(ref, offset, end, first, last)
        self._count(bytes_served=len(data))
        return data

    def read_cached(self, ref: ContentRef, offset: int, length: int) -> bytearray | None:
        """Bytes [OFFSET, OFFSET+LENGTH) of REF without waiting on anything (the mount's
        inline reads on its event loop): only when REF was checked already (`open_file`),
        every piece of it is present, and all the bytes are in the page cache of its data
        file (`PieceStore.read_cached`); else None, and the caller does a `read` in a thread.
        A complete content needs no read-ahead or read-around, so skipping them changes no
        fetch."""
        if offset < 0 or length < 0:
            return None
        with self._lock:
            if (ref.key, ref.size, ref.block_size) not in self._checked:
                return None
        data = self.store.read_cached(ref.key, offset, length)
        if data is not None:
            self._count(reads=1, hits=1, inline_reads=1, bytes_served=len(data))
        return data

    def _fetch_and_assemble(self, ref: ContentRef, offset: int, end: int, first: int, last: int) -> bytes:
        got: dict[int, memoryview] = {}    # pieces this read received from flights
        need = self.store.missing(ref.key, first, last - 1)
        for _ in range(4):
            run = max(1, (ALIGNED_RUN_BYTES or MAX_RUN_BYTES) // ref.block_size)
            mine, theirs = self.flights.claim(ref.key, need, run, speculative=False,
                                              align=run if ALIGNED_RUN_BYTES else 1)
            for flight in mine:
                self._keep(got, flight, self._fetch(ref, flight), ref.block_size)
            for flight in theirs:
                self._count(joined=1)
                try:
                    self._keep(got, flight, flight.future.result(), ref.block_size)
                except KbfsError:
                    if not flight.speculative:
                        raise   # a reader's own fetch failed: so does this read
            data, need = self._assemble(ref, offset, end, got)
            if data is not None:
                return data
        raise CacheError(f"content {ref.key}: pieces {need[:4]} keep vanishing from the cache")

    @staticmethod
    def _keep(got: dict[int, memoryview], flight: Flight, data: bytes | None, bs: int) -> None:
        if data is None:   # the pieces turned out to be stored already
            return
        view = memoryview(data)
        for i in range(flight.count):
            got[flight.first + i] = view[i * bs : (i + 1) * bs]

    def _assemble(self, ref: ContentRef, offset: int, end: int,
                  got: dict[int, memoryview]) -> tuple[bytes | None, list[int]]:
        """The bytes from GOT and the store, or (None, the pieces neither has)."""
        bs = ref.block_size
        parts: list[bytes | memoryview] = []
        lost: list[int] = []
        i = offset // bs
        while i * bs < end:
            lo, hi = max(offset, i * bs), min(end, (i + 1) * bs)
            if i in got:
                parts.append(got[i][lo - i * bs : hi - i * bs])
                i += 1
                continue
            j = i + 1                       # a run of pieces to read from the store at once
            while j * bs < end and j not in got:
                j += 1
            hi = min(end, j * bs)
            stored = self.store.read(ref.key, lo, hi - lo)
            if stored is None:
                lost.extend(self.store.missing(ref.key, i, j - 1))
                lost = lost or list(range(i, j))
            else:
                parts.append(stored)
            i = j
        return (None, lost) if lost else (b"".join(parts), [])

    def prefetch(self, ref: ContentRef, first: int, count: int) -> None:
        """Fetch pieces [FIRST, FIRST+COUNT) of REF in the background; never raises."""
        try:
            self._check(ref)
            n = catalog.piece_count(ref.size, ref.block_size)
            first, last = max(0, first), min(n, first + count)
            if last > first:
                self._start(ref, self.store.missing(ref.key, first, last - 1), RUN_MAX, RUN_MAX)
        except Exception as exc:  # noqa: BLE001 - a hint; the read that needs it will say
            log.debug("prefetch of %s failed: %s", getattr(ref, "key", ref), exc)

    def _read_ahead(self, ref: ContentRef, offset: int, end: int) -> None:
        window = self.link.window()
        run = self._run_pieces(window, ref.block_size)
        n = catalog.piece_count(ref.size, ref.block_size)
        plan = self.streams.plan(ref.key, offset, end, ref.block_size, n, window, run)
        if plan is not None:
            self._start(ref, self.store.missing(ref.key, plan[0], plan[1] - 1), run, run)

    def _read_around(self, ref: ContentRef, first: int, last: int, maybe_miss: bool) -> None:
        """kbfs.readahead2.ReadAround's hook: on a true miss, its neighbourhood in the background."""
        miss = maybe_miss and any(not self.flights.in_flight(ref.key, i)
                                  for i in self.store.missing(ref.key, first, last - 1))
        n = catalog.piece_count(ref.size, ref.block_size)
        plan = self.around.plan(ref.key, first, last, miss, n, self.link, ref.block_size) if self.around else None
        for lo, hi in plan or ():
            self._start(ref, self.store.missing(ref.key, lo, hi - 1), hi - lo, 1)

    def _run_pieces(self, window: int, bs: int) -> int:
        """Pieces per read-ahead request: a power of two in [RUN_MIN, RUN_MAX], so that the
        window is about half the workers' worth of requests."""
        if ALIGNED_RUN_BYTES:
            return max(1, ALIGNED_RUN_BYTES // bs)
        want = max(1, window // max(1, self.workers // 2) // bs)
        return min(RUN_MAX, max(RUN_MIN, 1 << (want.bit_length() - 1)), max(1, window // bs))

    def _start(self, ref: ContentRef, pieces: list[int], run: int, align: int) -> None:
        mine, _ = self.flights.claim(ref.key, pieces, run, speculative=True, align=align)
        for flight in mine:
            self._count(readahead_fetches=1, readahead_pieces=flight.count)
            try:
                self._pool.submit(self._background, ref, flight)
            except RuntimeError as exc:   # the pool is shut down
                self.flights.finish(flight, error=SourceError(f"piece cache closed: {exc}"))

    def _background(self, ref: ContentRef, flight: Flight) -> None:
        if self._closing:
            self.flights.finish(flight, error=SourceError("piece cache closed"))
            return
        try:
            self._fetch(ref, flight)
        except Exception as exc:  # noqa: BLE001 - speculative: a reader retries on its own
            log.debug("read-ahead of %s pieces %d+%d failed: %s", ref.key, flight.first, flight.count, exc)

    # ---- one source call
    def _fetch(self, ref: ContentRef, flight: Flight) -> bytes | None:
        """Fetch FLIGHT's pieces, store them, finish the flight; its bytes (None if they
        were stored meanwhile). Raises the source's error after finishing the flight with it."""
        key, bs = ref.key, ref.block_size
        try:
            if ref.root is None:
                self.verifiers.prepare(ref)   # root-less: proven whole once (stores its pieces)
            if not self.store.missing(key, flight.first, flight.end - 1):
                self.flights.finish(flight, None)   # another flight stored them meanwhile
                return None
            start, stop = flight.first * bs, min(flight.end * bs, ref.size)
            known = self._known_of(key) if self.verifiers.by_proof(ref) else None
            with self._lock:
                self._calling += stop - start
                self._stats["max_calling_bytes"] = max(self._stats["max_calling_bytes"], self._calling)
            call = self.link.begin()
            got = 0
            try:
                data = self.verifiers.fetch(ref, flight.first, flight.count, known)
                if len(data) != stop - start:
                    raise SourceError(f"source sent {len(data)} bytes for pieces {flight.first}+"
                                      f"{flight.count} of {ref.sha1}; expected {stop - start}")
                got = len(data)
            finally:
                self.link.end(call, got)
                with self._lock:
                    self._calling -= stop - start
            if known:
                self._merge_known(key, known)
            self._count(fetches=1, pieces_fetched=flight.count, bytes_fetched=got)
            try:
                if not self.store.put(key, ref.size, bs, flight.first, data):
                    log.info("piece cache: no room for %s pieces %d+%d", key, flight.first, flight.count)
            except (OSError, ValueError) as exc:   # served from memory all the same
                log.warning("piece cache: cannot store %s pieces %d+%d: %s", key, flight.first, flight.count, exc)
        except BaseException as exc:
            self._count(fetch_errors=1)
            self.flights.finish(flight, error=exc)
            raise
        self.flights.finish(flight, bytes(data))
        return data

    # ---- verified upper nodes, per content, in memory
    def _known_of(self, key: str) -> dict[Node, bytes]:
        with self._lock:
            nodes = self._known.get(key)
            if nodes is None:
                return {}
            self._known.move_to_end(key)
            return dict(nodes)

    def _merge_known(self, key: str, nodes: dict[Node, bytes]) -> None:
        if not nodes:
            return
        with self._lock:
            kept = self._known.setdefault(key, {})
            kept.update(nodes)
            if len(kept) > MAX_KNOWN_NODES:  # keep the highest levels: they anchor any range
                top = sorted(kept, key=lambda n: -n[0])[:MAX_KNOWN_NODES]
                self._known[key] = {n: kept[n] for n in top}
            self._known.move_to_end(key)
            while len(self._known) > MAX_KNOWN_CONTENTS:
                self._known.popitem(last=False)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no fetch (a reader's or read-ahead) is in flight, at most TIMEOUT
        seconds; whether it is idle. For tests and benchmarks that count what is stored."""
        deadline = time.monotonic() + timeout
        while self.flights.pieces_in_flight():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # ---- pins, sizes, statistics
    def open_file(self, ref: ContentRef) -> None:
        """REF is open: keep its pieces from eviction until `close_file` (in memory only)."""
        self._check(ref)
        self.store.hold(ref.key)

    def close_file(self, ref: ContentRef) -> None:
        self.store.release(ref.key)

    def cached_bytes(self, ref: ContentRef) -> int:
        """Bytes of REF whose pieces are present."""
        bs = ref.block_size
        return sum(min((b + 1) * bs, ref.size) - a * bs for a, b in self.store.ranges(ref.key))

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            stats: dict[str, Any] = dict(self._stats, calling_bytes=self._calling,
                                         known_contents=len(self._known),
                                         known_nodes=sum(len(n) for n in self._known.values()))
        ver = self.verifiers.statistics()
        stats["bytes_fetched"] += ver["whole_bytes"]
        stats.update(ver)
        stats.update(window=self.link.window(), bandwidth=self.link.bandwidth, delay=self.link.delay,
                     pieces_in_flight=self.flights.pieces_in_flight(), stream_jumps=self.streams.jumps,
                     store=self.store.statistics())
        if self.around is not None:
            stats.update(around_planned=self.around.planned, around_used=self.around.used)
        return stats

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, n in amounts.items():
                self._stats[name] += int(n)

    def _check(self, ref: ContentRef) -> None:
        """Refuse a size/block size the content's key does not bind."""
        if ref.block_size <= 0 or ref.size < 0:
            raise ValueError(f"content {ref.key}: bad size {ref.size} or block size {ref.block_size}")
        shape = (ref.key, ref.size, ref.block_size)
        with self._lock:
            if shape in self._checked:
                return
        row = self.store.catalog.row(ref.key)
        if row is not None and (row.size, row.piece_size) != (ref.size, ref.block_size):
            raise VerificationError(
                f"the pointer says {ref.size} bytes in pieces of {ref.block_size}, but its key "
                f"{ref.key} is cached as {row.size} bytes in pieces of {row.piece_size}")
        with self._lock:
            self._checked[shape] = None
            while len(self._checked) > 4096:
                self._checked.popitem(last=False)

    # ---- what readers other than read() need
    def takes(self, ref: ContentRef) -> bool:
        """Every content is read here (kept for callers that asked which cache reads REF)."""
        return True

    def leaves(self, ref: ContentRef) -> list[bytes]:
        """REF's verified leaves at its block size (fetched once: a download fetching blocks
        itself checks them against these); root-less REF is proven whole first."""
        self._check(ref)
        return self.verifiers.leaves.get(ref) if ref.root is not None else self.verifiers.prepare(ref)

    def check_whole(self, ref: ContentRef, sink: Any = None) -> bool:
        """Root-less REF: make sure it matched its SHA-1 once; True when this call ran that
        pass (SINK(offset, bytes) then received all of it, in order). False otherwise."""
        if ref.root is not None:
            return False
        self._check(ref)
        ran: list[bool] = []
        self.verifiers.prepare(ref, sink, lambda: ran.append(True))
        return bool(ran)

    def verified(self, ref: ContentRef) -> str:
        return self.verifiers.verified(ref)

    def clear(self) -> None:
        """Forget every piece and node (open files stay held)."""
        self.store.clear()
        self.verifiers.leaves.forget()
        with self._lock:
            self._known.clear()
            self._checked.clear()
        self.streams.clear()

    def close(self) -> None:
        """Stop read-ahead (queued requests are dropped), then close the store."""
        self._closing = True
        self._pool.shutdown(wait=True)
        self.store.close()

    def __enter__(self) -> PieceCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

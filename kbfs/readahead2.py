"""Read-ahead sized to the link, for the piece cache: a bandwidth x delay estimate and
sequential-stream detection. No I/O, no fetching: `kbfs.piececache` asks these two objects
how far ahead to fetch, and does the fetching.

`LinkEstimate` watches every source call (bytes, start, end) and keeps two figures:

- bandwidth: the highest *delivery rate* among the last `samples` calls, where a call's rate
  is the bytes every call delivered while it was in flight, divided by its duration (BBR's
  delivery-rate sample: with several calls sharing a link it measures the link, not the
  call's share of it);
- delay: the shortest duration of a call that started while nothing else was in flight
  (its transfer time included: one call cannot tell delay from bandwidth, and subtracting
  bytes/bandwidth with a bandwidth inflated by bursty completions gave delays near zero;
  the shortest calls are a reader's one or two pieces, whose transfer time is small).
  Only idle starts count, because a call queued behind others measures the queue:
  counting those would let a long stream inflate its own window (bufferbloat). The figure
  is kept until an idle call replaces it, and renewed (the old one forgotten) when the
  last idle sample is older than `DELAY_MAX_AGE`.

`window()` is `GAIN x bandwidth x delay`, clamped to [min_window, max_window]. The gain is
2 because the estimate can only grow if the reader keeps more than it in flight: with
exactly bandwidth x delay in flight a call's rate never exceeds what the window gave, and
the window would stay at its floor. With gain 2 the window doubles each round trip until the
link is full, then holds at about twice its bandwidth x delay (BBR's cwnd gain is also 2).

`Streams` tells sequential readers from random ones, per content key, by exact adjacency:
a stream is an extent of reads each of which starts exactly where another of its reads
ended (or, arriving out of order, ends exactly where one began: FUSE serves the kernel's
read-ahead on several threads). Reads merely *near* a stream are not its reads: h5py's
metadata reads land a few hundred bytes to a few pieces apart, and counting them (as a
4-piece tolerance once did) made read-ahead move most of a 64 MiB file for 40 small
slices. Any other read (a forward gap, a backward or far jump) starts a stream of its own;
a read inside an extent (a repeat, concurrent readers of one spot) is no evidence either
way. Read-ahead starts once a stream has `MIN_READS` reads covering more than
`MIN_PIECES` pieces, and then may run at most twice its extent ahead of it (at least one
run), up to `window`: what a stream gets ahead is bounded by what it has shown it reads,
so it grows from one run to the window as the stream goes on (doubling as in slow start)
instead of starting at bandwidth x delay. `plan` returns the pieces to fetch next: from
what the stream already scheduled up to that allowance past its end, ending at a multiple
of `run` pieces, only once at least a whole run is free (so requests go out in full,
aligned runs, not a piece at a time).

`ReadAround` is the policy for a reader that is not a stream but reads *near* where it read
before (h5py's and MATLAB's scattered metadata: an object header, then its B-tree node a
few pieces on, then a chunk a few dozen pieces on, then the next header). On a true miss
(a piece neither stored nor in flight) that lands within `LOCAL_SPAN` pieces of one of the
content's recent misses, it asks for the link-sized neighbourhood after the reader's
pieces: [last, last + K) with K = AROUND_GAIN (4) x bandwidth x delay in pieces, at least
`AROUND_MIN` bytes, in runs that double in size (nearest and smallest first). The gain is
4, not read-ahead's 2, because a fresh mount's estimate starts from one small call and
grows by about the gain per miss: with 2, h5py's reads overtook it (in-process A/B, h5py
over a 70 ms, 1 Gbit/s source: 24 misses, 1.9 s; with 4: 11-13 misses, 1.4-1.6 s; with 6,
1.3 s; over 100 Mbit/s no gain beat plain misses: there the link, not the round trips, is
what h5py waits for once neighbourhoods fill it).
The caller fetches the reader's own pieces in their own request, and the neighbourhood
in parallel requests: the reader never waits for bytes it did not ask
for. A miss far from every recent one (a random reader: a 4 KiB read somewhere in a big
file; the first read of a file) gets nothing around it, so random reads stay one piece
per round trip. Each content keeps a score: a neighbourhood later read from (a hit or a
joined flight) nets one, one never read from costs one (charged when it is planned), so a
content whose neighbourhoods go unread stops getting them even when its misses are local
(below `SCORE_MIN`), and one whose neighbourhoods keep paying gets them for far misses too
(score above 0). Measured in docs/benchmarks.md ("read-around"): bench_wan's h5py A/B.
`KBFS_READ_AROUND=0` in the environment turns it off (for that A/B).

Not here: what is present or in flight (the caller filters the plan through the store and
its flights), the fetching itself, several streams' windows sharing one link (each stream
gets the whole window), memory across processes of which regions were hot (a fresh cache
starts with no history).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

GAIN = 2.0
DELAY_MAX_AGE = 60.0   # seconds an idle-start delay sample stays unchallenged
MIN_READS = 3          # reads of one extent before it is a stream
MIN_PIECES = 2         # ... and pieces it must cover more than
STREAMS_PER_CONTENT = 4
CONTENTS = 256
AROUND_MIN = 256 << 10    # bytes: the smallest neighbourhood, and its first run
AROUND_RUN_MAX = 4 << 20  # bytes: the largest run of one neighbourhood request
LOCAL_SPAN = 64        # pieces: a miss this close to a recent miss of its content is local
RECENT_MISSES = 8      # misses remembered per content
AROUND_REGIONS = 8     # neighbourhoods per content watched for being read
SCORE_MIN, SCORE_MAX = -4, 4
AROUND_GAIN = 4.0      # neighbourhood = AROUND_GAIN x bandwidth x delay (see ReadAround)


@dataclass
class Call:
    """One source call in flight (what `LinkEstimate.begin` hands out)."""

    start: float
    delivered: int     # bytes delivered by all calls when this one started
    idle: bool         # nothing else was in flight when it started


class LinkEstimate:
    """Bandwidth and delay of the link to the sources, from the calls made over it."""

    def __init__(self, min_window: int, max_window: int, samples: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < min_window <= max_window:
            raise ValueError("need 0 < min_window <= max_window")
        self.min_window, self.max_window = min_window, max_window
        self._clock = clock
        self._lock = threading.Lock()
        self._rates: deque[float] = deque(maxlen=samples)
        self._delay: float | None = None
        self._delay_at = 0.0
        self._delivered = 0
        self._in_flight = 0

    def begin(self) -> Call:
        with self._lock:
            call = Call(self._clock(), self._delivered, self._in_flight == 0)
            self._in_flight += 1
            return call

    def end(self, call: Call, nbytes: int) -> None:
        """CALL is over, having delivered NBYTES (0 for a failed call: it counts for nothing)."""
        now = self._clock()
        with self._lock:
            self._in_flight -= 1
            if nbytes <= 0:
                return
            self._delivered += nbytes
            took = max(now - call.start, 1e-6)
            if call.idle:
                sample = took
                if self._delay is None or sample < self._delay or now - self._delay_at > DELAY_MAX_AGE:
                    self._delay, self._delay_at = sample, now
            self._rates.append((self._delivered - call.delivered) / took)

    @property
    def bandwidth(self) -> float:
        """Bytes per second (0.0 before the first call)."""
        with self._lock:
            return max(self._rates, default=0.0)

    @property
    def delay(self) -> float:
        """Seconds from a request to its first byte, about (0.0 before the first call)."""
        with self._lock:
            return self._delay or 0.0

    def window(self) -> int:
        """Bytes a sequential stream should keep in flight ahead of its reader."""
        want = GAIN * self.bandwidth * self.delay
        return int(min(max(want, self.min_window), self.max_window))


@dataclass
class _Stream:
    start: int       # the extent's first byte
    next: int        # byte just past the extent
    reads: int = 1   # reads that built the extent, each adjacent to another
    ahead: int = 0   # pieces below this index were handed out by `plan`


class Streams:
    """Recent readers of each content, to tell a sequential stream from random reads."""

    def __init__(self, min_reads: int = MIN_READS, min_pieces: int = MIN_PIECES) -> None:
        self.min_reads, self.min_pieces = min_reads, min_pieces
        self._lock = threading.Lock()
        self._by_key: OrderedDict[str, list[_Stream]] = OrderedDict()
        self.jumps = 0

    def plan(self, key: str, offset: int, end: int, piece_size: int, pieces: int,
             window: int, run: int) -> tuple[int, int] | None:
        """Note a read of [OFFSET, END) of KEY; the pieces [first, last) to fetch ahead of it,
        or None (not a stream yet, or less than a run free in its allowance yet)."""
        with self._lock:
            streams = self._by_key.get(key)
            if streams is None:
                streams = self._by_key[key] = []
                while len(self._by_key) > CONTENTS:
                    self._by_key.popitem(last=False)
            self._by_key.move_to_end(key)
            s = self._note(streams, offset, end)
            if s is None or s.reads < self.min_reads or s.next - s.start <= self.min_pieces * piece_size:
                return None
            allow = min(window, max(run * piece_size, 2 * (s.next - s.start)))
            first = max(s.ahead, s.next // piece_size)
            last = -(-(s.next + allow) // piece_size)
            last = pieces if last >= pieces else last - last % run   # whole, aligned runs
            if last - first < min(run, pieces - first) or last <= first:
                return None
            s.ahead = last
            return first, last

    def _note(self, streams: list[_Stream], offset: int, end: int) -> _Stream | None:
        """Add [OFFSET, END) to the stream it is adjacent to (joining two streams it sits
        between); the stream, or None for a read that starts or repeats none."""
        after = next((s for s in reversed(streams) if s.next == offset), None)
        before = next((s for s in reversed(streams) if s.start == end and s is not after), None)
        if after is None and before is None:
            if not any(s.start <= offset and end <= s.next for s in streams):   # not a repeat
                if streams:
                    self.jumps += 1
                streams.append(_Stream(offset, end))
                del streams[:-STREAMS_PER_CONTENT]
            return None
        s = after or before
        assert s is not None
        if after is not None and before is not None:   # the missing read between two extents
            streams.remove(before)
            s.next, s.reads, s.ahead = before.next, s.reads + before.reads, max(s.ahead, before.ahead)
        s.start, s.next, s.reads = min(s.start, offset), max(s.next, end), s.reads + 1
        streams.remove(s)
        streams.append(s)   # the most recently used last
        return s

    def clear(self) -> None:
        with self._lock:
            self._by_key.clear()


@dataclass
class _Region:
    first: int
    last: int
    used: bool = False


@dataclass
class _Near:
    """One content's recent true misses and the neighbourhoods planned for it."""

    misses: deque[int]
    regions: deque[_Region]
    score: int = 0


class ReadAround:
    """Neighbourhoods after local misses of non-sequential readers; see the module docstring."""

    def __init__(self, min_bytes: int = AROUND_MIN, local_span: int = LOCAL_SPAN) -> None:
        if min_bytes < 1 or local_span < 0:
            raise ValueError("need min_bytes >= 1 and local_span >= 0")
        self.min_bytes, self.local_span = min_bytes, local_span
        self._lock = threading.Lock()
        self._by_key: OrderedDict[str, _Near] = OrderedDict()
        self.planned = 0   # neighbourhoods handed out
        self.used = 0      # ... of which a later read used a piece

    @staticmethod
    def enabled() -> bool:
        """False when KBFS_READ_AROUND=0 (a benchmark's A/B switch)."""
        return os.environ.get("KBFS_READ_AROUND", "1").strip() != "0"

    def plan(self, key: str, first: int, last: int, miss: bool, pieces: int, link: LinkEstimate,
             piece_size: int) -> list[tuple[int, int]] | None:
        """Note a read of pieces [FIRST, LAST) of KEY (MISS: one of them was neither stored
        nor in flight); the runs of pieces [lo, hi) to fetch around it, nearest first, or None.

        The runs double in size from `min_bytes` (up to AROUND_RUN_MAX): requests that share
        a link progress together, so the nearest pieces, which the reader wants first, come
        in the smallest request and arrive first; a flight is usable only once complete."""
        with self._lock:
            st = self._by_key.get(key)
            if st is None:
                st = self._by_key[key] = _Near(deque(maxlen=RECENT_MISSES), deque(maxlen=AROUND_REGIONS))
                while len(self._by_key) > CONTENTS:
                    self._by_key.popitem(last=False)
            self._by_key.move_to_end(key)
            for r in st.regions:
                if not r.used and r.first < last and first < r.last:
                    r.used = True
                    self.used += 1
                    st.score = min(SCORE_MAX, st.score + 2)   # refunds its cost and earns one
            if not miss:
                return None
            local = any(abs(first - q) <= self.local_span or abs(last - 1 - q) <= self.local_span
                        for q in st.misses)
            st.misses.append(first)
            if not (st.score > 0 or (local and st.score > SCORE_MIN)):
                return None
            want = min(AROUND_GAIN * link.bandwidth * link.delay, link.max_window)
            k = max(self.min_bytes, int(want)) // piece_size or 1
            lo, hi = last, min(pieces, last + k)
            if hi <= lo:
                return None
            st.score -= 1
            st.regions.append(_Region(lo, hi))
            self.planned += 1
        runs, run, top = [], max(1, self.min_bytes // piece_size), max(1, AROUND_RUN_MAX // piece_size)
        while lo < hi:
            runs.append((lo, min(hi, lo + run)))
            lo, run = lo + run, min(top, 2 * run)
        return runs

    def clear(self) -> None:
        with self._lock:
            self._by_key.clear()

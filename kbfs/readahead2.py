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

`Streams` tells sequential readers from random ones, per content key: a read that begins
within `REORDER` pieces of where a recent read of the same content ended is that stream's
next read (FUSE serves the kernel's read-ahead on several threads, so reads of one stream
arrive slightly out of order); any other read starts a new stream. Read-ahead starts once
a stream scores 2: a read starting exactly where the stream ended scores 2, one merely
near it 1 (so one random read landing near another is not yet a stream; two in a row
are, and cost one window), a read of bytes the stream already covered (concurrent readers
of one spot) 0. `plan` returns the pieces to fetch next: from what the stream already
scheduled up to `window` bytes past its position, ending at a multiple of `run` pieces,
only once at least a whole run is free (so requests go out in full, aligned runs, not a
piece at a time).

Not here: what is present or in flight (the caller filters the plan through the store and
its flights), the fetching itself, several streams' windows sharing one link (each stream
gets the whole window).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

GAIN = 2.0
DELAY_MAX_AGE = 60.0   # seconds an idle-start delay sample stays unchallenged
REORDER = 4            # pieces a stream's reads may arrive out of order
STREAMS_PER_CONTENT = 4
CONTENTS = 256


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
    start: int       # the stream's first byte read
    next: int        # byte just past the stream's furthest read
    ahead: int = 0   # pieces below this index were handed out by `plan`
    score: int = 0   # 2 for a read that starts where the stream ended, 1 for one near it


class Streams:
    """Recent readers of each content, to tell a sequential stream from random reads."""

    def __init__(self, reorder: int = REORDER) -> None:
        self.reorder = reorder
        self._lock = threading.Lock()
        self._by_key: OrderedDict[str, list[_Stream]] = OrderedDict()
        self.jumps = 0

    def plan(self, key: str, offset: int, end: int, piece_size: int, pieces: int,
             window: int, run: int) -> tuple[int, int] | None:
        """Note a read of [OFFSET, END) of KEY; the pieces [first, last) to fetch ahead of it,
        or None (a random read, or less than a run free in the window yet)."""
        slack = self.reorder * piece_size
        with self._lock:
            streams = self._by_key.get(key)
            if streams is None:
                streams = self._by_key[key] = []
                while len(self._by_key) > CONTENTS:
                    self._by_key.popitem(last=False)
            self._by_key.move_to_end(key)
            s = next((s for s in streams if s.next - slack <= offset <= s.next + slack), None)
            if s is None:
                if streams:
                    self.jumps += 1
                streams.append(_Stream(offset, end))
                del streams[:-STREAMS_PER_CONTENT]
                return None
            streams.remove(s)
            streams.append(s)   # the most recently used last
            if not (s.start <= offset and end <= s.next):   # a repeat is no evidence
                s.score += 2 if offset == s.next else 1
            s.start, s.next = min(s.start, offset), max(s.next, end)
            if s.score < 2:
                return None
            first = max(s.ahead, s.next // piece_size)
            last = -(-(s.next + window) // piece_size)
            last = pieces if last >= pieces else last - last % run   # whole, aligned runs
            if last - first < min(run, pieces - first) or last <= first:
                return None
            s.ahead = last
            return first, last

    def clear(self) -> None:
        with self._lock:
            self._by_key.clear()

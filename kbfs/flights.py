"""Single flight for pieces: concurrent readers of a piece share one fetch.

`Flights` maps (content key, piece index) to the `Flight` fetching it: one Future per run
of pieces. `claim(key, pieces, ...)` splits the pieces a caller needs into runs it must
fetch itself (new flights, now registered) and flights others already started that cover
the rest (to wait on). The owner of a flight calls `finish` exactly once, with the run's
bytes or with the error; everyone waiting on its Future then sees the same outcome.

A flight is `speculative` when read-ahead or prefetch started it: a reader that waited on
one and got an error fetches the pieces itself, since nobody asked for them in the
reader's name. A reader's own (demand) flight's error is its waiters' error.

Not here: what is already stored (the caller asks the piece store first, and the owner
stores the bytes before it finishes, so a piece is always findable in one place or the
other), the fetching, any policy about run sizes beyond cutting where asked.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass(eq=False)
class Flight:
    """Pieces [first, first + count) of content KEY, being fetched once."""

    key: str
    first: int
    count: int
    speculative: bool
    future: Future[bytes | None] = field(default_factory=Future)

    @property
    def end(self) -> int:
        return self.first + self.count


class Flights:
    """The pieces in flight, by content; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, dict[int, Flight]] = {}
        self._pieces = 0

    def claim(self, key: str, pieces: Iterable[int], max_run: int, speculative: bool,
              align: int = 1) -> tuple[list[Flight], list[Flight]]:
        """(flights the caller now owns, flights of others to wait on) covering PIECES.

        The caller's runs are consecutive pieces nobody has in flight, at most MAX_RUN long,
        and cut where an index is a multiple of ALIGN (so read-ahead asks for aligned runs).
        """
        if max_run < 1 or align < 1:
            raise ValueError("max_run and align must be positive")
        mine: list[Flight] = []
        theirs: dict[int, Flight] = {}
        with self._lock:
            table = self._by_key.setdefault(key, {})
            run: list[int] = []
            for i in sorted(set(pieces)):
                other = table.get(i)
                if other is not None:
                    theirs[id(other)] = other
                    continue
                # ALIGN 1 means no alignment cut (every index is a multiple of 1: cutting
                # there split a read's own pieces into one request each).
                if run and (i != run[-1] + 1 or len(run) >= max_run or (align > 1 and i % align == 0)):
                    mine.append(self._register(table, key, run, speculative))
                    run = []
                run.append(i)
            if run:
                mine.append(self._register(table, key, run, speculative))
            if not table:
                del self._by_key[key]
        return mine, list(theirs.values())

    def _register(self, table: dict[int, Flight], key: str, run: list[int], speculative: bool) -> Flight:
        flight = Flight(key, run[0], len(run), speculative)
        for i in run:
            table[i] = flight
        self._pieces += len(run)
        return flight

    def finish(self, flight: Flight, data: bytes | None = None, error: BaseException | None = None) -> None:
        """End FLIGHT: its pieces leave the table, then its Future gets DATA or ERROR."""
        with self._lock:
            table = self._by_key.get(flight.key, {})
            for i in range(flight.first, flight.end):
                if table.get(i) is flight:
                    del table[i]
                    self._pieces -= 1
            if not table:
                self._by_key.pop(flight.key, None)
        if flight.future.done():
            return
        if error is not None:
            flight.future.set_exception(error)
        else:
            flight.future.set_result(data)

    def pieces_in_flight(self, key: str | None = None) -> int:
        """Pieces claimed and not finished (of KEY, or of every content)."""
        with self._lock:
            if key is None:
                return self._pieces
            return len(self._by_key.get(key, {}))

    def in_flight(self, key: str, index: int) -> bool:
        with self._lock:
            return index in self._by_key.get(key, {})

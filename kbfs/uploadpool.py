"""A small pool of kept-alive upload connections to one relay (used by `kbfs.share`).

Why: each read through a relay ends with the share POSTing the body to the relay. A POST
on a new connection first pays its TCP handshake (and TLS's, and a proxy's CONNECT) over
the share's link: one or more extra round trips on every read. Connections used to
belong to one upload thread each and closed with it (an idle thread ends after 10 s), and
the first read after a quiet spell always paid a handshake. Here they belong to the relay:
any upload thread takes the most recently used idle one (LIFO: the warmest; the others age
out), gives it back after a clean answer, and `warm` (called every few seconds from the
share's relay connection) keeps `spare` idle connections open ahead of the next requests and
drops those that are stale. (Two are kept by the share: a request that comes right after
another may find the one just used not yet given back.)

What it does: `take` (an idle, still open connection younger than `idle_seconds`, else a
new unconnected one from `make`), `fresh` (always a new one: the retry after a kept
connection turned out dead), `give`, `warm`, `close`. At most `max_idle` idle connections
are kept; a connection handed out is the caller's alone until given back.

What it does not do: open connections on `take` (the caller's first use connects), send
anything, retry, or know HTTP: the connections are `PooledConnection`s (kbfs.share's
`_Uploader`: `alive`, `open`, `close`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class PooledConnection(Protocol):
    def alive(self) -> bool:
        """Connected, and not closed by the peer (checked without blocking)."""

    def open(self) -> None:
        """Connect now (raises OSError and the like when it cannot)."""

    def close(self) -> None:
        """Close (idempotent)."""


C = TypeVar("C", bound=PooledConnection)


class UploadPool(Generic[C]):
    """Idle kept-alive connections to one relay, newest first. Thread-safe."""

    def __init__(self, make: Callable[[], C], max_idle: int, idle_seconds: float,
                 clock: Callable[[], float] = time.monotonic, spare: int = 1) -> None:
        self._make = make
        self.max_idle = max_idle
        self.spare = min(spare, max_idle)  # idle connections `warm` keeps open
        # Below the relay's keep-alive timeout (75 s by default, nginx's too): a connection
        # idle longer is closed here, not found closed by the relay mid-send.
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._idle: list[tuple[float, C]] = []  # (given back at, connection), oldest first
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> C:
        """The newest idle connection that is still open, else a new unconnected one."""
        while True:
            with self._lock:
                if not self._idle:
                    break
                since, conn = self._idle.pop()
            if self._clock() - since < self.idle_seconds and conn.alive():
                return conn
            conn.close()
        return self._make()

    def fresh(self) -> C:
        """A new unconnected connection (a retry must not take another kept one)."""
        return self._make()

    def give(self, conn: C) -> None:
        """CONN is done with: kept if still open and there is room, else closed."""
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle and conn.alive():
                self._idle.append((self._clock(), conn))
                return
        conn.close()

    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)

    def warm(self) -> None:
        """Drop stale idle connections; open new ones up to `spare` idle (blocking: a
        thread's work). A connection that cannot be opened is not kept; the error
        propagates."""
        now = self._clock()
        with self._lock:
            stale = [e for e in self._idle if now - e[0] >= self.idle_seconds]
            self._idle = [e for e in self._idle if now - e[0] < self.idle_seconds]
            check = list(self._idle)
        for _, conn in stale:
            conn.close()
        for entry in check:  # one at a time out of the list: take() is never left without
            with self._lock:
                if entry not in self._idle:
                    continue  # taken meanwhile
                at = self._idle.index(entry)
                del self._idle[at]
            if not entry[1].alive():
                entry[1].close()
                continue
            with self._lock:
                self._idle.insert(min(at, len(self._idle)), entry)
        with self._lock:
            missing = 0 if self._closed else self.spare - len(self._idle)
        for _ in range(missing):
            conn = self._make()
            try:
                conn.open()
            except BaseException:
                conn.close()
                raise
            with self._lock:  # oldest: a connection just used (warmer) goes first
                if self._closed or len(self._idle) >= self.max_idle:
                    conn.close()
                    return
                self._idle.insert(0, (self._clock(), conn))

    def close_idle(self) -> None:
        """Close the idle connections (the relay connection ended: they may be dead)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()

    def close(self) -> None:
        """Close the idle connections; those given back later are closed too."""
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for _, conn in idle:
            conn.close()

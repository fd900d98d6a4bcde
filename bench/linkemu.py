#!/usr/bin/env python3
"""A wide-area link emulator: a TCP forwarder, run as a process of its own.

This machine's kernel has no netem, so benchmarks put one of these in front of a server to get a
path with a given round-trip time and bandwidth:

    python bench/linkemu.py --listen 127.0.0.1:0 --to 127.0.0.1:PORT --rtt-ms 40 --mbit 100 \
        [--window-kib 4096] [--ready-file F] [--no-handshake] [--slow-start] [-v]

prints (and writes to F) the port it listens on, then forwards every accepted connection to the
target, both directions, with

* a one-way delay of rtt/2 per direction: what is read from one side is held in a timestamped
  queue and written to the other side when its time comes (a FIN too, after the data);
* a bandwidth cap per direction shared by all connections over the link: one serialisation clock
  per direction, so 4 parallel connections together get --mbit, not 4x (payload bytes; TCP/IP
  header overhead is not counted);
* a per-connection, per-direction in-flight window like TCP's: bytes read from the sender and not
  yet delivered and acknowledged (an ack takes rtt/2 to come back) are at most --window-kib, so
  one connection gets min(window/RTT, link rate); --slow-start starts that window at 10 segments,
  grows it by what is acked (doubling per RTT) and restarts it after an idle RTO;
* the handshake's round trip (unless --no-handshake): the client's first bytes reach the target
  no sooner than 1.5 RTT after it connected and the target's first bytes reach the client no
  sooner than 2 RTT after, as over a real path (the local connect itself returns at once);
* EOF (half-close) and resets propagating, each after the one-way delay.

It does not model loss, reordering, jitter or real congestion control. One selectors event loop
(epoll), large reads, no per-byte Python work. SIGTERM/SIGINT: close everything, exit 0.

Python API, for benchmarks (the process is started and stopped by pid):

    with LinkEmu(target_port, rtt_ms=40, mbit=100) as link:
        connect to 127.0.0.1:link.port

    with relay_path(relay_port) as path:       # the kbfs reader -> relay -> share path
        reader uses http://127.0.0.1:{path.reader_port}, share uses --relay http://127.0.0.1:{path.share_port}

The share dials the relay, so both links sit in front of the relay: link A between the reader and
the relay, link B between the share and the relay (its connections are opened by the share). A
reader's range request crosses A then B; the data comes back over B then A.

`python bench/linkemu.py --measure` prints the throughput and CPU of the emulator itself.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import itertools
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
MAX_CHUNK = 256 << 10  # largest read from a socket
MIN_CHUNK = 16 << 10  # smallest read target when throttled
CHUNK_TIME = 0.001  # a throttled read is about this much link time
HORIZON = 0.003  # read more only while the link has at most this much queued
# A timer that fires late (epoll rounds to ms; a loaded machine) is not charged to the connection:
LATE_SLACK = 0.002  # an ack up to this late still opens the window when it was due
WAKE_SLACK = 0.010  # the link stays busy when waiting senders are woken up to this late
INIT_CWND = 10 * 1448  # --slow-start's initial window (Linux's 10 segments)
RTO_MIN = 0.2
READS_PER_EVENT = 16
DEFAULT_WINDOW_KIB = 4096
LINGER_RST = struct.pack("ii", 1, 0)

monotonic = time.monotonic


# ---------------------------------------------------------------------------------------------
# the event loop


class Loop:
    """Selectors loop with a timer heap (no cancellation: callbacks check their own state)."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.stopping = False

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), fn))

    def run(self) -> None:
        timers = self.timers
        select = self.sel.select
        while not self.stopping:
            now = monotonic()
            while timers and timers[0][0] <= now:
                heapq.heappop(timers)[2]()
            if self.stopping:
                break
            timeout = max(0.0, timers[0][0] - monotonic()) if timers else None
            for key, mask in select(timeout):
                s: Sock = key.data
                if mask & READ and s.on_read is not None and not s.closed:
                    s.on_read()
                if mask & WRITE and s.on_write is not None and not s.closed:
                    s.on_write()


class Sock:
    """A non-blocking socket and its selector interest (read for one pipe, write for the other)."""

    __slots__ = ("sock", "loop", "events", "closed", "on_read", "on_write")

    def __init__(self, loop: Loop, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.events = 0
        self.closed = False
        self.on_read: Callable[[], None] | None = None
        self.on_write: Callable[[], None] | None = None

    def _set(self, events: int) -> None:
        if events == self.events or self.closed:
            return
        sel = self.loop.sel
        if not self.events:
            sel.register(self.sock, events, self)
        elif not events:
            sel.unregister(self.sock)
        else:
            sel.modify(self.sock, events, self)
        self.events = events

    def want_read(self, on: bool) -> None:
        self._set(self.events | READ if on else self.events & ~READ)

    def want_write(self, on: bool) -> None:
        self._set(self.events | WRITE if on else self.events & ~WRITE)

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self._set(0)
        self.closed = True
        if reset:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# the link model


class Link:
    """One direction of the link: one-way delay and a serialisation clock common to all pipes."""

    def __init__(self, loop: Loop, delay: float, bytes_per_s: float | None) -> None:
        self.loop = loop
        self.delay = delay
        self.rate = bytes_per_s
        self.free_at = 0.0  # when the link has sent everything booked so far
        self.waiters: deque[Pipe] = deque()
        self.wake_pending = False
        self.wake_at = 0.0
        if bytes_per_s:
            self.chunk = int(min(MAX_CHUNK, max(MIN_CHUNK, bytes_per_s * CHUNK_TIME)))
        else:
            self.chunk = MAX_CHUNK
        self.bytes = 0

    def has_room(self, now: float) -> bool:
        return not self.rate or self.free_at - now <= HORIZON

    def book(self, n: int, now: float) -> float:
        """Put N bytes on the link now; return when they are all at the far end."""
        self.bytes += n
        if not self.rate:
            return now + self.delay
        end = max(now, self.free_at) + n / self.rate
        self.free_at = end
        return end + self.delay

    def wait(self, pipe: Pipe, now: float) -> None:
        if not pipe.waiting_link:
            pipe.waiting_link = now  # its data has been waiting since
            self.waiters.append(pipe)
        self._schedule()

    def _schedule(self) -> None:
        if not self.wake_pending:
            self.wake_pending = True
            self.wake_at = self.free_at - HORIZON
            self.loop.call_at(self.wake_at, self._wake)

    def _wake(self) -> None:
        self.wake_pending = False
        waiters = self.waiters
        for _ in range(len(waiters)):  # FIFO: each reads a chunk or two, then goes to the back
            if not self.has_room(monotonic()):
                break
            pipe = waiters.popleft()
            since = max(self.wake_at, pipe.waiting_link)
            pipe.waiting_link = 0.0
            pipe.try_read(since, WAKE_SLACK)
        if waiters:
            self._schedule()


class Pipe:
    """One direction of one connection: src -> timestamped queue -> dst, with a window."""

    def __init__(self, conn: Conn, src: Sock, dst: Sock, link: Link, window: int, slow_start: bool) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.src = src
        self.dst = dst
        self.link = link
        self.window = window
        self.slow_start = slow_start
        self.cwnd = min(INIT_CWND, window) if slow_start else window
        self.rto = RTO_MIN + 2 * link.delay
        self.inflight = 0
        self.last_active = 0.0
        self.q: deque[tuple[float, Any]] = deque()  # (deliver at, bytes | memoryview | None=EOF)
        self.acks: deque[tuple[float, int]] = deque()
        self.gate = 0.0  # no reads before this (the handshake)
        self.gate_pending = False
        self.timer_pending = False
        self.ack_pending = False
        self.waiting_link = 0.0  # when it joined the link's waiters (0: it has not)
        self.dst_ready = True
        self.eof_in = False  # no more reads (EOF seen, or the connection is being reset)
        self.eof_out = False
        self.dead = False

    # -- sender side

    def try_read(self, since: float = 0.0, slack: float = LATE_SLACK) -> None:
        """Read what the window and the link allow. SINCE: when this became possible (an ack or
        the link's turn due then): up to SLACK of the loop's own lateness is not charged."""
        if self.eof_in or self.dead:
            return
        src = self.src
        now = monotonic()
        if since and since < now:
            now = max(since, now - slack)
        if now < self.gate:
            src.want_read(False)
            if not self.gate_pending:
                self.gate_pending = True
                self.loop.call_at(self.gate, self._gate_open)
            return
        link = self.link
        for _ in range(READS_PER_EVENT):
            if self.slow_start and not self.inflight and now - self.last_active > self.rto:
                self.cwnd = min(self.cwnd, INIT_CWND)  # restart after idle
            room = self.cwnd - self.inflight
            if room <= 0:
                src.want_read(False)  # an ack reopens
                return
            if not link.has_room(now):
                try:  # wait for the link only with data to send (its wait is then not charged)
                    src.sock.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    src.want_read(True)
                    return
                except OSError:
                    self.conn.abort_from(src)
                    return
                src.want_read(False)
                link.wait(self, monotonic())
                return
            try:
                data = src.sock.recv(min(room, link.chunk))
            except BlockingIOError:
                src.want_read(True)
                return
            except OSError:
                self.conn.abort_from(src)
                return
            if not data:
                self.eof_in = True
                src.want_read(False)
                self._queue(link.book(0, now), None)
                return
            n = len(data)
            self.inflight += n
            self.last_active = now
            self._queue(link.book(n, now), data)
            if self.dead or self.eof_in:
                return
        src.want_read(True)  # more may be waiting; let other sockets have a turn

    def _gate_open(self) -> None:
        self.gate_pending = False
        self.try_read()

    def _queue(self, at: float, data: Any) -> None:
        q = self.q
        q.append((at, data))
        if len(q) == 1 and self.dst_ready and not self.dst.events & WRITE:
            if at <= monotonic():
                self.deliver()
            elif not self.timer_pending:
                self.timer_pending = True
                self.loop.call_at(at, self._deliver_timer)

    # -- receiver side

    def _deliver_timer(self) -> None:
        self.timer_pending = False
        self.deliver()

    def deliver(self) -> None:
        """Write everything that is due to dst (timer or writable)."""
        if self.dead or not self.dst_ready:
            return
        q = self.q
        dst = self.dst
        now = monotonic()
        blocked = dst.events & WRITE  # (waiting for the receiver: the wait counts)
        sent_total = 0
        last_at = now
        while q:
            at, data = q[0]
            if at > now:
                if not self.timer_pending:
                    self.timer_pending = True
                    self.loop.call_at(at, self._deliver_timer)
                break
            if data is None:
                q.popleft()
                dst.want_write(False)
                try:
                    dst.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self.conn.abort_from(dst)
                    return
                self.eof_out = True
                self.conn.maybe_done()
                break
            try:
                sent = dst.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.conn.abort_from(dst)
                return
            sent_total += sent
            last_at = at
            if sent < len(data):
                q[0] = (at, memoryview(data)[sent:])
                dst.want_write(True)
                break
            q.popleft()
        else:
            dst.want_write(False)
        if sent_total:
            self.conn.delivered += sent_total
            base = now if blocked else max(last_at, now - LATE_SLACK)
            self.acks.append((base + self.link.delay, sent_total))
            if not self.ack_pending:
                self.ack_pending = True
                self.loop.call_at(self.acks[0][0], self._ack_timer)

    def _ack_timer(self) -> None:
        self.ack_pending = False
        if self.dead:
            return
        acks = self.acks
        now = monotonic()
        freed = 0
        due = now
        while acks and acks[0][0] <= now:
            due, n = acks.popleft()
            freed += n
        if acks:
            self.ack_pending = True
            self.loop.call_at(acks[0][0], self._ack_timer)
        if freed:
            self.inflight -= freed
            self.last_active = now
            if self.slow_start and self.cwnd < self.window:
                self.cwnd = min(self.window, self.cwnd + freed)
            self.try_read(due)


class Conn:
    """One accepted connection and its upstream connection to the target."""

    def __init__(self, emu: Emulator, csock: socket.socket) -> None:
        self.emu = emu
        self.loop = loop = emu.loop
        self.closed = False
        self.aborting = False
        self.delivered = 0
        self.t0 = now = monotonic()
        csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tsock = socket.socket(socket.AF_INET6 if ":" in emu.target[0] else socket.AF_INET, socket.SOCK_STREAM)
        tsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = Sock(loop, csock)
        self.target = Sock(loop, tsock)
        self.up = Pipe(self, self.client, self.target, emu.up, emu.window, emu.slow_start)
        self.down = Pipe(self, self.target, self.client, emu.down, emu.window, emu.slow_start)
        if emu.handshake:
            rtt = emu.up.delay + emu.down.delay
            self.up.gate = now + rtt
            self.down.gate = now + rtt + emu.up.delay
        self.client.on_read = self.up.try_read
        self.client.on_write = self.down.deliver
        self.target.on_read = self.down.try_read
        self.target.on_write = self._connected
        self.up.dst_ready = False
        err = tsock.connect_ex(emu.target)
        if err not in (0, errno.EINPROGRESS):
            self.abort_from(self.target, not_before=self.up.gate)
            return
        self.target.want_write(True)
        self.up.try_read()

    def _connected(self) -> None:
        err = self.target.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.abort_from(self.target, not_before=self.up.gate)  # refused: the client sees a reset
            return
        self.target.want_write(False)
        self.target.on_write = self.up.deliver
        self.up.dst_ready = True
        self.up.deliver()
        self.down.try_read()

    def maybe_done(self) -> None:
        if self.up.eof_out and self.down.eof_out:
            self.close()

    def abort_from(self, bad: Sock, not_before: float = 0.0) -> None:
        """BAD was reset (or failed): reset the other side after the one-way delay."""
        if self.closed:
            return
        if self.aborting:  # the other side failed too while its reset was pending
            self.close()
            return
        self.aborting = True
        good, toward_good, toward_bad = (
            (self.target, self.up, self.down) if bad is self.client else (self.client, self.down, self.up)
        )
        toward_bad.dead = True
        toward_good.eof_in = True  # nothing more is read from BAD
        bad.close(reset=True)
        last = toward_good.q[-1][0] if toward_good.q else 0.0
        at = max(monotonic() + toward_good.link.delay, last, not_before)

        def finish() -> None:
            if self.closed:
                return
            toward_good.deliver()  # what was due before the reset, if the socket takes it
            toward_good.dead = True
            good.close(reset=True)
            self.close()

        self.loop.call_at(at, finish)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.dead = self.down.dead = True
        self.client.close()
        self.target.close()
        self.emu.conns.discard(self)


class Emulator:
    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        rtt_ms: float,
        mbit: float | None,
        window_kib: int = DEFAULT_WINDOW_KIB,
        handshake: bool = True,
        slow_start: bool = False,
    ) -> None:
        self.loop = Loop()
        self.target = target
        delay = rtt_ms / 2000.0
        rate = mbit * 1e6 / 8 if mbit else None
        self.up = Link(self.loop, delay, rate)  # client -> target
        self.down = Link(self.loop, delay, rate)  # target -> client
        self.window = window_kib << 10
        self.handshake = handshake and delay > 0
        self.slow_start = slow_start
        self.conns: set[Conn] = set()
        self.accepted = 0
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(listen)
        ls.listen(512)
        self.port = ls.getsockname()[1]
        self.listener = Sock(self.loop, ls)
        self.listener.on_read = self._accept
        self.listener.want_read(True)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                csock, _addr = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: try again on the next event
                return
            self.accepted += 1
            self.conns.add(Conn(self, csock))

    def run(self) -> None:
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        wake = Sock(self.loop, rfd)

        def on_wake() -> None:
            with contextlib.suppress(OSError):
                rfd.recv(4096)
            self.loop.stopping = True

        wake.on_read = on_wake
        wake.want_read(True)
        old_fd = signal.set_wakeup_fd(wfd.fileno())
        old = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.loop.run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_fd)
            for conn in list(self.conns):
                conn.close()
            self.listener.close()
            wake.close()
            wfd.close()
            self.loop.sel.close()


# ---------------------------------------------------------------------------------------------
# command line


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0", type=_hostport)
    ap.add_argument("--to", type=_hostport, help="target HOST:PORT")
    ap.add_argument("--rtt-ms", type=float, default=0.0)
    ap.add_argument("--mbit", type=float, default=None, help="cap per direction (default: none)")
    ap.add_argument("--window-kib", type=int, default=DEFAULT_WINDOW_KIB)
    ap.add_argument("--ready-file", default=None)
    ap.add_argument("--no-handshake", action="store_true", help="do not charge the connect's round trip")
    ap.add_argument("--slow-start", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="a summary on stderr at exit")
    ap.add_argument("--measure", action="store_true", help="measure this emulator's throughput and CPU")
    args = ap.parse_args(argv)
    if args.measure:
        return measure()
    if args.to is None:
        ap.error("--to is required")
    emu = Emulator(
        args.listen, args.to, args.rtt_ms, args.mbit, args.window_kib, not args.no_handshake, args.slow_start
    )
    print(emu.port, flush=True)
    if args.ready_file:
        tmp = f"{args.ready_file}.tmp{os.getpid()}"
        Path(tmp).write_text(f"{emu.port}\n")
        os.replace(tmp, args.ready_file)
    t0 = time.monotonic()
    emu.run()
    if args.verbose:
        cpu = sum(os.times()[:2])
        print(
            f"linkemu :{emu.port}: {emu.accepted} connections, {emu.up.bytes} bytes up, {emu.down.bytes} bytes down,"
            f" {time.monotonic() - t0:.1f} s, {cpu:.2f} CPU-s",
            file=sys.stderr,
        )
    return 0


# ---------------------------------------------------------------------------------------------
# Python API


class LinkEmu:
    """The emulator as a child process: `with LinkEmu(port, rtt_ms=40, mbit=100) as link: link.port`."""

    def __init__(
        self,
        target_port: int,
        rtt_ms: float = 0.0,
        mbit: float | None = None,
        *,
        window_kib: int | None = None,
        target_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
        handshake: bool = True,
        slow_start: bool = False,
        verbose: bool = False,
        startup_timeout: float = 10.0,
    ) -> None:
        self.target_port = target_port
        self.rtt_ms = rtt_ms
        self.mbit = mbit
        self.args = [
            "--listen", f"{listen_host}:0", "--to", f"{target_host}:{target_port}", "--rtt-ms", str(rtt_ms),
        ]  # fmt: skip
        if mbit:
            self.args += ["--mbit", str(mbit)]
        if window_kib is not None:
            self.args += ["--window-kib", str(window_kib)]
        if not handshake:
            self.args.append("--no-handshake")
        if slow_start:
            self.args.append("--slow-start")
        if verbose:
            self.args.append("-v")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> LinkEmu:
        with tempfile.TemporaryDirectory(prefix="linkemu-") as tmp:
            ready = Path(tmp) / "port"
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *self.args, "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + self.startup_timeout
            while not ready.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"linkemu exited at start with status {self.proc.returncode}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("linkemu did not start")
                time.sleep(0.005)
            self.port = int(ready.read_text())
        return self

    def cpu_seconds(self) -> float:
        """User+system CPU the emulator process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM by pid, then SIGKILL if it does not exit; return its exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def __enter__(self) -> LinkEmu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Canned links for the benchmarks' wide-area path (each value: rtt_ms, mbit).
WAN_A = {"rtt_ms": 40.0, "mbit": 100.0}  # reader <-> relay
WAN_B = {"rtt_ms": 20.0, "mbit": 200.0}  # share <-> relay
WAN_A_GBIT = {"rtt_ms": 40.0, "mbit": 1000.0}
WAN_B_GBIT = {"rtt_ms": 20.0, "mbit": 1000.0}


@contextlib.contextmanager
def chain(target_port: int, *links: dict[str, Any]) -> Iterator[list[LinkEmu]]:
    """Links in series in front of one target: client -> links[0] -> links[1] ... -> target.

    Yields the started LinkEmus (the client dials `result[0].port`). The RTTs add up and the
    slowest link is the cap; each link charges its own handshake, as a chain of TCP proxies would.
    """
    with contextlib.ExitStack() as stack:
        started: list[LinkEmu] = []
        port = target_port
        for spec in reversed(links):
            link = stack.enter_context(LinkEmu(port, **spec))
            started.insert(0, link)
            port = link.port
        yield started


@dataclass
class RelayPath:
    reader: LinkEmu  # link A: reader -> relay
    share: LinkEmu  # link B: share -> relay

    @property
    def reader_port(self) -> int:
        return self.reader.port

    @property
    def share_port(self) -> int:
        return self.share.port


@contextlib.contextmanager
def relay_path(
    relay_port: int, reader: dict[str, Any] | None = None, share: dict[str, Any] | None = None
) -> Iterator[RelayPath]:
    """The reader -> relay -> share path: link A and link B both forward to the relay.

    The reader dials `reader_port` (link A, default 40 ms / 100 Mbit/s); the share dials the relay
    too, through `share_port` (link B, default 20 ms / 200 Mbit/s). A range request goes reader ->
    A -> relay -> B -> share and its bytes come back share -> B -> relay -> A -> reader: 60 ms of
    round trip plus the relay's own time, capped by the slower link.
    """
    with LinkEmu(relay_port, **(reader or WAN_A)) as a, LinkEmu(relay_port, **(share or WAN_B)) as b:
        yield RelayPath(a, b)


# ---------------------------------------------------------------------------------------------
# self-measurement


def _sink_server() -> tuple[socket.socket, threading.Thread]:
    ls = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=_drain, args=(c,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return ls, t


def _drain(c: socket.socket) -> None:
    buf = bytearray(1 << 20)
    total = 0
    with c:
        while True:
            n = c.recv_into(buf)
            if not n:
                break
            total += n
        c.sendall(total.to_bytes(8, "big"))


def push(port: int, nbytes: int, block: int = 1 << 20) -> float:
    """Send NBYTES to a sink through PORT, wait for its byte count back; return seconds."""
    data = memoryview(bytes(block))
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        left = nbytes
        while left > 0:
            n = min(left, block)
            s.sendall(data[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            part = s.recv(8 - len(got))
            if not part:
                raise RuntimeError("sink closed early")
            got += part
    assert int.from_bytes(got, "big") == nbytes
    return time.monotonic() - t0


def measure() -> int:
    ls, _ = _sink_server()
    port = ls.getsockname()[1]
    print("throughput through linkemu on loopback (pusher and sink threads in this process)")
    for label, kw, size in (
        ("direct (no emulator)", None, 2 << 30),
        ("unthrottled, rtt 0", {"rtt_ms": 0}, 2 << 30),
        ("1 Gbit/s, rtt 0", {"rtt_ms": 0, "mbit": 1000}, 500 << 20),
        ("1 Gbit/s, rtt 40 ms, window 16 MiB", {"rtt_ms": 40, "mbit": 1000, "window_kib": 16384}, 500 << 20),
        ("1 Gbit/s, rtt 40 ms, default 4 MiB window", {"rtt_ms": 40, "mbit": 1000}, 300 << 20),
        ("100 Mbit/s, rtt 40 ms", {"rtt_ms": 40, "mbit": 100}, 50 << 20),
        ("4 connections, 1 Gbit/s, rtt 40 ms", {"rtt_ms": 40, "mbit": 1000, "parallel": 4}, 500 << 20),
        ("4 connections, unthrottled, rtt 0", {"rtt_ms": 0, "parallel": 4}, 2 << 30),
    ):
        if kw is None:
            secs = push(port, size)
            print(f"  {label:42s} {size / secs / 1e6:8.0f} MB/s ({size * 8 / secs / 1e6:6.0f} Mbit/s)")
            continue
        kw = dict(kw)
        parallel = kw.pop("parallel", 1)
        with LinkEmu(port, **kw) as link:
            cpu0 = link.cpu_seconds()
            t0 = time.monotonic()
            threads = [threading.Thread(target=push, args=(link.port, size // parallel)) for _ in range(parallel)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            secs = time.monotonic() - t0
            cpu = link.cpu_seconds() - cpu0
        print(
            f"  {label:42s} {size / secs / 1e6:8.0f} MB/s ({size * 8 / secs / 1e6:6.0f} Mbit/s),"
            f" emulator CPU {cpu / secs * 100:3.0f}% of a core, {cpu / (size / 2**30):.2f} CPU-s/GiB"
        )
    ls.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

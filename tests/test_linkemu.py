"""bench/linkemu.py, the wide-area link emulator: delay, shared bandwidth cap, window, EOF, resets.

Real sockets on 127.0.0.1 and a real emulator process. Timing bounds are loose (shared, noisy
machines) but an emulator that forgot the delay, the cap, its sharing or the window fails them.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import socket
import socketserver
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("linkemu", REPO / "bench" / "linkemu.py")
assert _spec is not None and _spec.loader is not None
linkemu = importlib.util.module_from_spec(_spec)
sys.modules["linkemu"] = linkemu
_spec.loader.exec_module(linkemu)
LinkEmu = linkemu.LinkEmu

MB = 1_000_000


# ---------------------------------------------------------------------------------------------
# the far end: one server, the first byte of a connection picks what it does


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        srv = self.server
        try:
            mode = sock.recv(1)
            if mode == b"E":  # echo until EOF, then half-close
                while True:
                    data = sock.recv(65536)
                    if not data:
                        srv.events.put(("eof", time.monotonic()))
                        sock.shutdown(socket.SHUT_WR)
                        return
                    sock.sendall(data)
            elif mode == b"S":  # sink: count until EOF, report first/last byte times, answer the count
                buf = bytearray(1 << 20)
                total, first, last = 0, 0.0, 0.0
                while True:
                    n = sock.recv_into(buf)
                    if not n:
                        break
                    last = time.monotonic()
                    if not total:
                        first = last
                    total += n
                srv.sinks.put((total, first, last))
                sock.sendall(struct.pack(">Q", total))
            elif mode == b"G":  # source: 8-byte length, then that many bytes, then close
                n = struct.unpack(">Q", _recv_exact(sock, 8))[0]
                block = memoryview(bytes(1 << 20))
                while n > 0:
                    sock.sendall(block[: min(n, len(block))])
                    n -= min(n, len(block))
            elif mode == b"R":  # answer one byte, then reset
                sock.recv(1)
                sock.sendall(b"r")
                time.sleep(0.05)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # now: socketserver would shut down (a FIN) before closing
        except ConnectionResetError:
            srv.events.put(("reset", time.monotonic()))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.events: queue.Queue[tuple[str, float]] = queue.Queue()
        self.sinks: queue.Queue[tuple[int, float, float]] = queue.Queue()

    @property
    def port(self) -> int:
        return self.server_address[1]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += part
    return bytes(out)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _ping(s: socket.socket) -> float:
    t0 = time.monotonic()
    s.sendall(b"p")
    assert _recv_exact(s, 1) == b"p"
    return time.monotonic() - t0


def _push(port: int, nbytes: int) -> None:
    """Upload NBYTES to the sink through PORT; wait for the sink's count."""
    block = memoryview(bytes(1 << 20))
    with _connect(port) as s:
        s.sendall(b"S")
        left = nbytes
        while left > 0:
            n = min(left, len(block))
            s.sendall(block[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        assert struct.unpack(">Q", _recv_exact(s, 8))[0] == nbytes


def _sink_rate(server: _Server, count: int) -> float:
    """Bytes/s the sink saw over COUNT transfers together (first byte to last byte)."""
    results = [server.sinks.get(timeout=10) for _ in range(count)]
    total = sum(r[0] for r in results)
    return total / (max(r[2] for r in results) - min(r[1] for r in results))


def _retry(measure: Callable[[], float], lo: float, hi: float, tries: int = 3) -> list[float]:
    """Measure up to TRIES times until a value falls in [LO, HI]; fail with all values if none does.

    Load on a shared machine only ever slows things down, so a retry absorbs a bad moment; an
    emulator that is wrong is wrong every time.
    """
    seen: list[float] = []
    for _ in range(tries):
        seen.append(measure())
        if lo <= seen[-1] <= hi:
            return seen
    pytest.fail(f"{seen} not within [{lo:.4g}, {hi:.4g}] in {tries} tries")


def _median_ping(port: int, rtt: float, n: int = 8) -> float:
    """Median request/response time on an established connection; every one must be >= RTT."""
    with _connect(port) as s:
        s.sendall(b"E")
        _ping(s)  # the first also pays the handshake (a test below)
        pings = [_ping(s) for _ in range(n)]
    assert min(pings) >= rtt, pings  # never faster than the delay, however noisy the machine
    return statistics.median(pings)


# ---------------------------------------------------------------------------------------------
# delay


def test_request_response_pays_one_rtt(server: _Server) -> None:
    with LinkEmu(server.port, rtt_ms=40, mbit=100) as link:
        _retry(lambda: _median_ping(link.port, 0.040), 0.040, 0.040 + 0.015)


def _fresh_exchange(port: int) -> float:
    t0 = time.monotonic()
    with _connect(port) as s:
        s.sendall(b"Ep")
        assert _recv_exact(s, 1) == b"p"
    return time.monotonic() - t0


def test_fresh_connection_pays_the_handshake(server: _Server) -> None:
    """Connect + one exchange: the handshake's round trip, then the request's (2 RTT)."""
    with LinkEmu(server.port, rtt_ms=40) as link:
        seen = _retry(lambda: _fresh_exchange(link.port), 0.080, 0.080 + 0.020)
    assert min(seen) >= 0.080, seen
    with LinkEmu(server.port, rtt_ms=40, handshake=False) as link:
        seen = _retry(lambda: _fresh_exchange(link.port), 0.040, 0.040 + 0.020)
    assert min(seen) >= 0.040, seen


def test_delay_is_not_a_sleep_per_chunk(server: _Server) -> None:
    """4 MB at 40 ms RTT unthrottled: the delay is paid once, not once per read."""

    def took() -> float:
        t0 = time.monotonic()
        _push(link.port, 4 * MB)
        return time.monotonic() - t0

    # the data reaches the sink at 1.5 RTT (handshake), the count comes back at 2 RTT = 80 ms,
    # plus copying; a delay per 256 KiB read would be >= 16 x 20 ms more
    with LinkEmu(server.port, rtt_ms=40) as link:
        seen = _retry(took, 0.080, 0.250)
    assert min(seen) >= 0.080, seen


def test_chain_adds_rtts(server: _Server) -> None:
    with linkemu.chain(server.port, {"rtt_ms": 20}, {"rtt_ms": 10}) as links:
        _retry(lambda: _median_ping(links[0].port, 0.030), 0.030, 0.030 + 0.015)


def test_relay_path_puts_both_links_in_front_of_the_relay(server: _Server) -> None:
    """The reader's link A (40 ms) and the share's link B (20 ms) both lead to the relay's port."""
    with linkemu.relay_path(server.port) as path:
        assert path.reader.rtt_ms == 40 and path.reader.mbit == 100
        assert path.share.rtt_ms == 20 and path.share.mbit == 200
        _retry(lambda: _median_ping(path.reader_port, 0.040), 0.040, 0.040 + 0.015)
        _retry(lambda: _median_ping(path.share_port, 0.020), 0.020, 0.020 + 0.015)


# ---------------------------------------------------------------------------------------------
# bandwidth and window

CAP = 12.5 * MB  # 100 Mbit/s in bytes/s


def test_bulk_upload_takes_size_over_rate(server: _Server) -> None:
    def rate() -> float:
        _push(link.port, 12 * MB)  # ~1 s
        return _sink_rate(server, 1)

    # The upper bound is the point (a cap per connection gives ~2x CAP); the lower one only
    # says the link carried data at all: under a full test suite on 2 cores the two senders
    # and the emulator's own process were seen at 0.79-0.83x CAP in every try.
    with LinkEmu(server.port, rtt_ms=20, mbit=100) as link:
        _retry(rate, 0.5 * CAP, 1.15 * CAP)


def test_bulk_download_takes_size_over_rate(server: _Server) -> None:
    size = 12 * MB

    def rate() -> float:
        with _connect(link.port) as s:
            s.sendall(b"G" + struct.pack(">Q", size))
            first = got = len(s.recv(1 << 20))
            t_first = time.monotonic()
            while n := len(s.recv(1 << 20)):
                got += n
            took = time.monotonic() - t_first
        assert got == size
        return (size - first) / took

    # The upper bound is the point (a cap per connection gives ~2x CAP); the lower one only
    # says the link carried data at all: under a full test suite on 2 cores the two senders
    # and the emulator's own process were seen at 0.79-0.83x CAP in every try.
    with LinkEmu(server.port, rtt_ms=20, mbit=100) as link:
        _retry(rate, 0.5 * CAP, 1.15 * CAP)


def test_parallel_connections_share_the_cap(server: _Server) -> None:
    """Two connections at once get 100 Mbit/s together (a cap per connection would give 2x)."""

    def rate() -> float:
        threads = [threading.Thread(target=_push, args=(link.port, 6 * MB)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return _sink_rate(server, 2)

    # The upper bound is the point (a cap per connection gives ~2x CAP); the lower one only
    # says the link carried data at all: under a full test suite on 2 cores the two senders
    # and the emulator's own process were seen at 0.79-0.83x CAP in every try.
    with LinkEmu(server.port, rtt_ms=20, mbit=100) as link:
        _retry(rate, 0.5 * CAP, 1.15 * CAP)


def test_a_request_behind_a_bulk_transfer_still_pays_the_delay(server: _Server) -> None:
    """The link's queue is short (a few ms), and a waiting sender never gains on the delay."""
    with LinkEmu(server.port, rtt_ms=40, mbit=100) as link:
        bulk = threading.Thread(target=_push, args=(link.port, 8 * MB))
        bulk.start()
        time.sleep(0.2)
        try:
            _retry(lambda: _median_ping(link.port, 0.040), 0.040, 0.040 + 0.020)
        finally:
            bulk.join(30)
    server.sinks.get(timeout=10)


def test_window_limits_one_connection(server: _Server) -> None:
    """64 KiB window, 40 ms RTT: 64 KiB per round trip, ~1.6 MB/s, though the link could do 125."""

    def rate() -> float:
        _push(link.port, 2 * MB)
        return _sink_rate(server, 1)

    expected = 65536 / 0.040
    with LinkEmu(server.port, rtt_ms=40, mbit=1000, window_kib=64) as link:
        _retry(rate, 0.85 * expected, 1.15 * expected)


def test_slow_start_costs_round_trips(server: _Server) -> None:
    """1 MB at 1 Gbit/s, 40 ms: one window without slow start, ~7 doubling rounds with it."""

    def push_time(link: linkemu.LinkEmu) -> float:
        t0 = time.monotonic()
        _push(link.port, 1 * MB)
        return time.monotonic() - t0

    with (
        LinkEmu(server.port, rtt_ms=40, mbit=1000) as plain,
        LinkEmu(server.port, rtt_ms=40, mbit=1000, slow_start=True) as slow,
    ):
        _retry(lambda: push_time(plain), 0.080, 0.200)
        # a fresh connection each time, so each one starts slow
        _retry(lambda: push_time(slow) - push_time(plain), 4 * 0.040, 1.0)


def test_bytes_arrive_intact_both_ways(server: _Server) -> None:
    """Random bytes echoed through a capped link, with the client reading slowly (partial writes)."""
    data = os.urandom(3 * MB)
    with LinkEmu(server.port, rtt_ms=10, mbit=400, window_kib=256) as link, _connect(link.port) as s:
        s.sendall(b"E")
        sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while part := s.recv(100_000):
            got += part
            if len(got) < MB:
                time.sleep(0.002)
        sender.join(10)
    assert got == data


# ---------------------------------------------------------------------------------------------
# EOF, resets, exit


def test_half_close_propagates_after_the_delay(server: _Server) -> None:
    with LinkEmu(server.port, rtt_ms=40) as link, _connect(link.port) as s:
        s.sendall(b"E")
        _ping(s)
        t0 = time.monotonic()
        s.sendall(b"last words")
        s.shutdown(socket.SHUT_WR)  # our half closes; the echo still comes back
        assert _recv_exact(s, 10) == b"last words"
        assert s.recv(10) == b""  # the server's half-close, after the data
        t_eof = time.monotonic()
        kind, t_server = server.events.get(timeout=5)
    assert kind == "eof"
    assert t_server - t0 >= 0.020  # one way
    assert t_eof - t0 >= 0.040


def test_server_close_propagates_after_the_data(server: _Server) -> None:
    with LinkEmu(server.port, rtt_ms=10, mbit=200) as link, _connect(link.port) as s:
        s.sendall(b"G" + struct.pack(">Q", 3 * MB))
        got = 0
        while True:
            n = len(s.recv(1 << 20))
            if not n:
                break
            got += n
    assert got == 3 * MB


def test_client_reset_reaches_the_server(server: _Server) -> None:
    with LinkEmu(server.port, rtt_ms=40) as link:
        s = _connect(link.port)
        s.sendall(b"E")
        _ping(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t0 = time.monotonic()
        s.close()
        kind, t = server.events.get(timeout=5)
    assert kind == "reset"
    assert t - t0 >= 0.020


def test_server_reset_reaches_the_client(server: _Server) -> None:
    with LinkEmu(server.port, rtt_ms=20) as link, _connect(link.port) as s:
        s.sendall(b"Rx")
        assert _recv_exact(s, 1) == b"r"
        with pytest.raises(ConnectionResetError):
            s.recv(10)


def test_refused_target_resets_the_client() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with LinkEmu(dead_port, rtt_ms=20) as link, _connect(link.port) as s:
        t0 = time.monotonic()
        with pytest.raises(ConnectionResetError):
            s.sendall(b"hello")
            s.recv(10)
        assert time.monotonic() - t0 >= 0.020


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_no_leaked_sockets_and_clean_sigterm(server: _Server) -> None:
    link = LinkEmu(server.port, rtt_ms=2).start()
    try:
        base = _fds(link.pid)
        for i in range(20):  # closed, half-closed and reset connections
            with _connect(link.port) as s:
                s.sendall(b"Ep")
                assert _recv_exact(s, 1) == b"p"
                if i % 2:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    s.shutdown(socket.SHUT_WR)
                    assert s.recv(1) == b""
        deadline = time.monotonic() + 5
        while _fds(link.pid) != base and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _fds(link.pid) == base
        held = _connect(link.port)  # open at SIGTERM
        held.sendall(b"E")
        assert _ping(held) < 1
    finally:
        status = link.stop()
    assert status == 0
    assert held.recv(10) == b""  # closed, not left hanging
    held.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", link.port), timeout=2)

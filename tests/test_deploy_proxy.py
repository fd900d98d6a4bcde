"""A share and readers whose only way out is an HTTP proxy (Debian's tinyproxy), on loopback.

The share and the readers run in a network namespace of their own (`ip netns`) that has
nothing but its own loopback: the relay (in this test's namespace, on 127.0.0.1) cannot
be reached from there. One port of that loopback is forwarded to tinyproxy, like an
institution's firewall that lets only its proxy out: a socket made inside the namespace
(by a thread that enters it with setns(2) and leaves again) whose connections are piped
to tinyproxy here. So the relay is reachable only through `CONNECT` (HTTPS_PROXY for an
https relay, HTTP_PROXY for an http one) and NO_PROXY sends a connection straight into
the wall (connection refused).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.netutil as netutil
from tests.deployutil import Pki, free_port, make_pki, start_tls_relay, wait_port
from tests.netutil import run_kbfs, start_relay, start_share

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
IP = shutil.which("ip") or "/usr/sbin/ip"
CLONE_NEWNET = 0x40000000
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY",
              "no_proxy", "ALL_PROXY", "all_proxy", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def _netns_works() -> bool:
    if os.geteuid() != 0 or not os.path.exists(IP):
        return False
    name = f"kbfs-probe-{os.getpid()}"
    ok = subprocess.run([IP, "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run([IP, "netns", "del", name], capture_output=True)
    return ok


pytestmark = [
    pytest.mark.skipif(not os.path.exists(TINYPROXY),
                       reason="needs tinyproxy (Debian; make test installs it)"),
    pytest.mark.skipif(not _netns_works(), reason="needs root and `ip netns` (network namespaces)"),
]


class Wall:
    """A network namespace with only loopback, and one of its ports piped to TARGET_PORT
    on this namespace's loopback (the proxy)."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        self.name = f"kbfs-wall-{os.getpid()}-{target_port}"
        subprocess.run([IP, "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run([IP, "-n", self.name, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        self.target = target_port
        self.port = 3128
        self.listener = self._listen_inside()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()
        # Run kbfs inside: netutil's helpers start PYTHON; point it at a wrapper.
        self.python = tmp / "python-in-wall"
        self.python.write_text(f"#!/bin/sh\nexec {IP} netns exec {self.name} "
                               f"{sys.executable} \"$@\"\n")
        self.python.chmod(0o755)

    def _listen_inside(self) -> socket.socket:
        libc = ctypes.CDLL(None, use_errno=True)
        made: list[socket.socket] = []

        def enter_and_bind() -> None:
            # setns changes only this thread's namespace; the socket stays in it for good.
            with open(f"/var/run/netns/{self.name}") as ns:
                if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(64)
            made.append(s)

        t = threading.Thread(target=enter_and_bind)  # a thread of its own, then dropped
        t.start()
        t.join()
        assert made, "could not listen inside the namespace"
        return made[0]

    def _accept(self) -> None:
        while not self.closing:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                inside.close()
                continue
            outside.settimeout(None)
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([IP, "netns", "exec", self.name, *args], capture_output=True,
                              text=True, timeout=timeout, env=env)

    def close(self) -> None:
        self.closing = True
        self.listener.close()
        subprocess.run([IP, "netns", "del", self.name], capture_output=True)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Tinyproxy:
    """tinyproxy on a free loopback port, logging each connection it makes."""

    def __init__(self) -> None:
        # It drops to nobody and writes its log there: not under pytest's 0700 folders.
        tmp = self.dir = Path(tempfile.mkdtemp(prefix="kbfs-tinyproxy-"))
        tmp.chmod(0o777)
        self.port = free_port()
        self.log = tmp / "tinyproxy.log"
        conf = tmp / "tinyproxy.conf"
        # No ConnectPort line: CONNECT to any port (the relay's is random).
        conf.write_text(f"User nobody\nGroup nogroup\nPort {self.port}\nListen 127.0.0.1\n"
                        f"Timeout 600\nLogFile \"{self.log}\"\nLogLevel Connect\n"
                        f"MaxClients 100\nAllow 127.0.0.1\n")
        self.popen = subprocess.Popen([TINYPROXY, "-d", "-c", str(conf)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def connects(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def walled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Wall, Tinyproxy]]:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    proxy = Tinyproxy()
    wall = None
    try:
        wall = Wall(tmp_path, proxy.port)
        yield wall, proxy
    finally:
        if wall is not None:
            wall.close()
        proxy.stop()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "f.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 4321))
    return d


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_share_and_readers_reach_the_relay_only_through_the_proxy(
        walled: tuple[Wall, Tinyproxy], pki: Pki, data: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    wall, proxy = walled
    if scheme == "https":
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
        relay = start_tls_relay(tmp_path, pki.good)
    else:
        relay = start_relay(tmp_path)
    try:
        port = int(relay.url.rpartition(":")[2])
        # The wall holds: straight to the relay is refused in there.
        direct = wall.run(sys.executable, "-c",
                          f"import socket; socket.create_connection(('127.0.0.1', {port}), 3)")
        assert direct.returncode != 0 and "ConnectionRefusedError" in direct.stderr
        # Without the proxy variable the share cannot get out ...
        monkeypatch.setattr(netutil, "PYTHON", str(wall.python))
        stuck = start_share(data, relay.url, tmp_path, wait=False)
        try:
            line = stuck.proc.wait_line(r"unreachable \(.*", timeout=20).group(0)
            assert "connection refused" in line, line
        finally:
            stuck.stop()
        # ... and NO_PROXY naming the relay's host sends it straight into the wall.
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", f"http://127.0.0.1:{wall.port}")
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        bypass = start_share(data, relay.url, tmp_path, wait=False)
        try:
            line = bypass.proc.wait_line(r"unreachable \(.*", timeout=20).group(0)
            assert "connection refused" in line, line
        finally:
            bypass.stop()
        assert f"127.0.0.1:{port}" not in proxy.connects()
        monkeypatch.setenv("NO_PROXY", "example.org")
        share = start_share(data, relay.url, tmp_path, wait=False)
        try:
            share.proc.wait_line(f"kbfs share connected to {relay.url}", timeout=30)
            share.proc.wait_line("kbfs share indexed")
            with monkeypatch.context() as here:  # this process is outside the wall
                here.delenv(f"{scheme.upper()}_PROXY")
                netutil.wait_share_ready(relay.url, share.id)
            want = (data / "f.bin").read_bytes()
            prv = tmp_path / "f.prv"
            assert run_kbfs("prv", "create", str(data / "f.bin"), "-o", str(prv)).returncode == 0
            out = tmp_path / "out.bin"
            got = run_kbfs("download", str(prv), "--relay", relay.url, "--no-local",
                           "--cache-dir", str(tmp_path / "c1"), "-o", str(out), timeout=90)
            assert got.returncode == 0, got.stderr
            assert hashlib.sha1(out.read_bytes()).digest() == hashlib.sha1(want).digest()
            # Tunnels for the websocket, the uploads and (https) the reader's requests.
            log = proxy.connects()
            assert f"127.0.0.1:{port}" in log, log[-2000:]
            # A reader told NO_PROXY for the relay goes straight into the wall.
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            refused = run_kbfs("download", str(prv), "--relay", relay.url, "--no-local",
                               "--cache-dir", str(tmp_path / "c2"), "-o",
                               str(tmp_path / "o2.bin"), timeout=90)
            assert refused.returncode != 0 and "connection refused" in refused.stderr, \
                refused.stderr
        finally:
            share.stop()
    finally:
        relay.stop()

"""The relay behind a real Caddy (Debian's caddy 2.6) with a private CA, on loopback.

The Caddyfile is docs/deploy.md's own block (between its `Caddyfile begin` and `end`
markers) with the site address, the relay's port and the certificate swapped for the
test's (the block's commented `tls` line taken), and a global block of the test's own
that keeps Caddy off the internet (no ACME, no OCSP, no admin endpoint: `auto_https off`,
`ocsp_stapling off`, `admin off`), bound to 127.0.0.1, its storage in the test's folder.
Share (over WSS through Caddy), download, cat, ls and a mount go through it; the relay,
with `--trust-proxy`, logs the address Caddy saw, not a forged X-Forwarded-For.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import trio
import trio_websocket

from tests.deployutil import Pki, env_with, free_port, make_pki, wait_port
from tests.mountutil import mounted
from tests.netutil import RelayProc, run_kbfs, start_relay, start_share

CADDY = shutil.which("caddy") or "/usr/bin/caddy"
REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "deploy.md"
FORGED = "203.0.113.7"

pytestmark = pytest.mark.skipif(not os.path.exists(CADDY),
                                reason="needs caddy (Debian caddy; make test installs it)")

# The test's global options: nothing here may reach the network beyond loopback.
GLOBAL = """{
    admin off
    auto_https off
    ocsp_stapling off
    grace_period 2s
    servers {
        protocols h1 h2
    }
    storage file_system {
        root %s
    }
}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def trust_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Pki:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy",
                 "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    return pki


def doc_block() -> str:
    m = re.search(r"<!-- Caddyfile begin.*?```caddy\n(.*?)```", DOC.read_text(), re.S)
    assert m, "docs/deploy.md lost its Caddyfile block"
    return m.group(1)


def _swap(text: str, old: str, new: str) -> str:
    assert old in text, f"docs/deploy.md's Caddyfile block no longer has {old!r}"
    return text.replace(old, new)


class Caddy:
    """`caddy run` of DOC's block in front of RELAY_PORT on 127.0.0.1:PORT (https)."""

    def __init__(self, tmp: Path, relay_port: int, pki: Pki, port: int) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.url = f"https://localhost:{port}"
        conf = doc_block()
        conf = _swap(conf, "relay.example.org {", f"https://localhost:{port} {{\n    bind 127.0.0.1")
        conf = _swap(conf, "127.0.0.1:8080", f"127.0.0.1:{relay_port}")
        conf = _swap(conf, "# tls /etc/ssl/kbfs/fullchain.pem /etc/ssl/kbfs/privkey.pem",
                     f"tls {pki.good[0]} {pki.good[1]}")
        (tmp / "Caddyfile").write_text(GLOBAL % (tmp / "storage") + conf)
        # Caddy writes its state under $HOME / XDG folders: the test's, never /root's.
        self.env = env_with(HOME=str(tmp), XDG_DATA_HOME=str(tmp / "data"),
                            XDG_CONFIG_HOME=str(tmp / "config"))
        args = [CADDY, "run", "--config", str(tmp / "Caddyfile"), "--adapter", "caddyfile"]
        checked = subprocess.run([CADDY, "validate", *args[2:]], capture_output=True,
                                 text=True, timeout=30, env=self.env)
        assert checked.returncode == 0, checked.stderr[-3000:]
        self.log = tmp / "caddy.log"
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=self.env, cwd=tmp)
        try:
            wait_port(port)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # graceful, bounded by grace_period
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@contextlib.contextmanager
def relay_behind_caddy(tmp: Path, pki: Pki, *relay_args: str) -> Iterator[tuple[RelayProc, Caddy]]:
    port = free_port()
    relay = start_relay(tmp, "--public-url", f"https://localhost:{port}", *relay_args)
    try:
        caddy = Caddy(tmp / "caddy", int(relay.url.rpartition(":")[2]), pki, port)
        try:
            yield relay, caddy
        finally:
            caddy.stop()
    finally:
        relay.stop()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    return d


def pointer(tmp: Path, path: Path) -> Path:
    folder = tmp / "pointers"
    folder.mkdir(exist_ok=True)
    out = folder / (path.name + ".prv")
    made = run_kbfs("prv", "create", str(path), "--no-hints", "-o", str(out))
    assert made.returncode == 0, made.stderr
    return out


def kbfs_bytes(*args: str) -> bytes:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "kbfs", *args], capture_output=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def test_share_download_cat_mount_and_ls_through_caddy(trust_ca: Pki, data: Path,
                                                       tmp_path: Path) -> None:
    with relay_behind_caddy(tmp_path, trust_ca, "--trust-proxy") as (relay, caddy):
        share = start_share(data, caddy.url, tmp_path)
        try:
            assert f"kbfs share connected to {caddy.url}" in "\n".join(share.proc.lines)
            big = (data / "big.bin").read_bytes()
            sha1 = hashlib.sha1(big).hexdigest()
            prv = pointer(tmp_path, data / "big.bin")
            out = tmp_path / "out.bin"
            got = run_kbfs("download", str(prv), "--relay", caddy.url, "--no-local",
                           "--cache-dir", str(tmp_path / "c1"), "-o", str(out), timeout=60)
            assert got.returncode == 0, got.stderr
            assert out.read_bytes() == big
            cat = kbfs_bytes("cat", f"sha1://{sha1}", "--relay", caddy.url, "--no-local",
                             "--cache-dir", str(tmp_path / "c2"), "--offset", "1000000",
                             "--length", "70000")
            assert cat == big[1000000:1070000]
            listed = run_kbfs("ls", caddy.url)
            assert listed.returncode == 0 and share.id in listed.stdout, listed.stderr
            # Host and X-Forwarded-Proto came through: the relay names Caddy's https URL.
            found = requests.get(f"{caddy.url}/api/find/{sha1}", timeout=10,
                                 verify=str(trust_ca.ca)).json()
            assert f"{caddy.url}/sha1/{sha1}" in found["urls"], found
            # Ranges and the relay's cache headers pass as they are.
            r = requests.get(f"{caddy.url}/sha1/{sha1}", headers={"Range": "bytes=5-65540"},
                             timeout=10, verify=str(trust_ca.ca))
            assert r.status_code == 206 and r.content == big[5:65541]
            assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
            if os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
                with mounted(str(prv.parent), tmp_path / "m", relays=[caddy.url],
                             extra=["--no-local"],
                             env_extra={"SSL_CERT_FILE": str(trust_ca.ca)}) as m:
                    with open(m.path("big.bin"), "rb") as f:
                        f.seek(2 * 1024 * 1024 + 5)
                        want = big[2 * 1024 * 1024 + 5:2 * 1024 * 1024 + 100_005]
                        assert f.read(100_000) == want
        finally:
            share.stop()


async def _knock(url: str, forged: str) -> None:
    """Open the relay's control websocket with a forged X-Forwarded-For and send a hello
    it refuses (so it logs the peer)."""
    from kbfs import tlsconf

    async with trio_websocket.open_websocket_url(
            url, ssl_context=tlsconf.client_context(),
            extra_headers=[(b"x-forwarded-for", forged.encode())],
            connect_timeout=10, disconnect_timeout=2) as ws:
        await ws.get_message()  # the challenge
        await ws.send_message(json.dumps({"type": "not-a-hello"}))
        with trio.move_on_after(5):
            await ws.get_message()


def test_the_relay_logs_caddys_client_address_not_a_forged_one(trust_ca: Pki,
                                                               tmp_path: Path) -> None:
    with relay_behind_caddy(tmp_path, trust_ca, "--trust-proxy") as (relay, caddy):
        trio.run(_knock, caddy.url.replace("https", "wss", 1) + "/_control", FORGED)
        deadline = time.monotonic() + 10
        peer = ""
        while not peer and time.monotonic() < deadline:
            m = re.search(r"share refused from (\S+):", relay.proc.err_path.read_text())
            peer = m.group(1) if m else ""
            time.sleep(0.05)
        assert peer == "127.0.0.1:0", peer  # from X-Forwarded-For, as Caddy wrote it

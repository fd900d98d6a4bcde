"""The relay behind a real nginx (Debian's nginx-light) with a private CA, on loopback.

The nginx configuration is docs/deploy.md's own block (between its `nginx.conf begin`
and `end` markers), with the addresses, paths and certificate swapped for the test's:
what the docs say is what runs. Share (over WSS through nginx), download, cat, mount and
ls go through it; its cache keeps /sha1/ ranges (a second reader never reaches the
relay) but never a private share's bytes; `--trust-proxy` takes the client address from
X-Forwarded-For, and without it a forged header is ignored.
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
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import trio
import trio_websocket

from tests.deployutil import Pki, free_port, make_pki, wait_port
from tests.mountutil import mounted
from tests.netutil import RelayProc, get_json, run_kbfs, start_relay, start_share

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DOC = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX),
                                reason="needs nginx (Debian nginx-light; make test installs it)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def trust_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Pki:
    """Every kbfs process (and this test's own clients) trusts the private CA."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy",
                 "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    return pki


def doc_block() -> str:
    m = re.search(r"<!-- nginx.conf begin.*?```nginx\n(.*?)```", DOC.read_text(), re.S)
    assert m, "docs/deploy.md lost its nginx.conf block"
    return m.group(1)


def _swap(text: str, old: str, new: str) -> str:
    assert old in text, f"docs/deploy.md's nginx block no longer has {old!r}"
    return text.replace(old, new)


class Nginx:
    """nginx -p TMP running DOC's server block in front of RELAY_PORT, on PORT (chosen
    before the relay starts when its --public-url must name it). DROP: leave out the
    block's lines holding this text."""

    def __init__(self, tmp: Path, relay_port: int, pki: Pki, port: int = 0,
                 drop: str = "") -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.port = port or free_port()
        self.url = f"https://localhost:{self.port}"
        conf = doc_block()
        conf = _swap(conf, "/var/cache/nginx/kbfs", str(tmp / "cache"))
        conf = _swap(conf, "server 127.0.0.1:8080;", f"server 127.0.0.1:{relay_port};")
        conf = _swap(conf, "listen 443 ssl;", f"listen 127.0.0.1:{self.port} ssl;")
        conf = _swap(conf, "/etc/ssl/kbfs/fullchain.pem", str(pki.good[0]))
        conf = _swap(conf, "/etc/ssl/kbfs/privkey.pem", str(pki.good[1]))
        if drop:
            kept = [line for line in conf.splitlines() if drop not in line]
            assert len(kept) < len(conf.splitlines())
            conf = "\n".join(kept) + "\n"
        (tmp / "kbfs.conf").write_text(conf)
        temps = "".join(f"    {kind}_temp_path {tmp}/{kind};\n"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # Root runs the worker as root too: the test's files are 0700 (pytest's tmp).
        (tmp / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\n"
            f"error_log {tmp}/error.log info;\nevents {{ worker_connections 512; }}\n"
            f"http {{\n    access_log {tmp}/access.log;\n{temps}"
            f"    include {tmp}/kbfs.conf;\n}}\n")
        args = [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
        test = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
        assert test.returncode == 0, test.stderr
        self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGQUIT)  # graceful: the master stops its worker
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    (d / "small.txt").write_bytes(b"hello through nginx\n" * 100)
    return d


def relay_requests(relay: RelayProc) -> int:
    """The relay's count of content requests it passed to shares."""
    return int(get_json(relay.url + "/api/health")["requests"])


@contextlib.contextmanager
def relay_behind_nginx(tmp: Path, pki: Pki, *relay_args: str,
                       drop: str = "") -> Iterator[tuple[RelayProc, Nginx]]:
    """A relay on loopback (its public URL nginx's) and nginx before it; both stopped."""
    port = free_port()
    relay = start_relay(tmp, "--public-url", f"https://localhost:{port}", *relay_args)
    try:
        nginx = Nginx(tmp / "nginx", int(relay.url.rpartition(":")[2]), pki, port, drop)
        try:
            yield relay, nginx
        finally:
            nginx.stop()
    finally:
        relay.stop()


def pointer(tmp: Path, path: Path) -> Path:
    """A .prv of PATH in a folder of its own (for a mount of that folder)."""
    folder = tmp / "pointers"
    folder.mkdir(exist_ok=True)
    out = folder / (path.name + ".prv")
    made = run_kbfs("prv", "create", str(path), "-o", str(out))
    assert made.returncode == 0, made.stderr
    return out


def test_share_download_cat_mount_and_ls_through_nginx(trust_ca: Pki, data: Path,
                                                       tmp_path: Path) -> None:
    with relay_behind_nginx(tmp_path, trust_ca, "--trust-proxy") as (relay, nginx):
        share = start_share(data, nginx.url, tmp_path)
        try:
            assert f"kbfs share connected to {nginx.url}" in "\n".join(share.proc.lines)
            big = (data / "big.bin").read_bytes()
            prv = pointer(tmp_path, data / "big.bin")
            out = tmp_path / "out.bin"
            got = run_kbfs("download", str(prv), "--relay", nginx.url, "--no-local",
                           "--cache-dir", str(tmp_path / "c1"), "-o", str(out), timeout=60)
            assert got.returncode == 0, got.stderr
            assert out.read_bytes() == big
            sha1 = hashlib.sha1(big).hexdigest()
            cat = kbfs_bytes("cat", f"sha1://{sha1}", "--relay", nginx.url, "--no-local",
                             "--cache-dir", str(tmp_path / "c2"), "--offset", "1000000",
                             "--length", "70000")
            assert cat == big[1000000:1070000]
            listed = run_kbfs("ls", nginx.url)
            assert listed.returncode == 0, listed.stderr
            assert share.id in listed.stdout
            # The relay's own URL in /api/find is nginx's https one (X-Forwarded-Proto).
            found = requests.get(f"{nginx.url}/api/find/{sha1}", timeout=10,
                                 verify=str(trust_ca.ca)).json()
            assert f"{nginx.url}/sha1/{sha1}" in found["urls"], found
            if os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
                with mounted(str(prv.parent), tmp_path / "m", relays=[nginx.url],
                             extra=["--no-local"],
                             env_extra={"SSL_CERT_FILE": str(trust_ca.ca)}) as m:
                    with open(m.path("big.bin"), "rb") as f:
                        f.seek(2 * 1024 * 1024 + 5)
                        assert f.read(100_000) == big[2 * 1024 * 1024 + 5:2 * 1024 * 1024 + 100_005]
        finally:
            share.stop()


def kbfs_bytes(*args: str) -> bytes:
    """stdout of a `kbfs ...` command that must succeed, as bytes."""
    env = dict(os.environ, PYTHONPATH=str(DOC.parent.parent))
    done = subprocess.run([sys.executable, "-m", "kbfs", *args], capture_output=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def _get(url: str, pki: Pki, headers: dict[str, str]) -> requests.Response:
    return requests.get(url, headers=headers, timeout=20, verify=str(pki.ca))


def test_a_second_reader_is_served_from_the_cache(trust_ca: Pki, data: Path,
                                                  tmp_path: Path) -> None:
    with relay_behind_nginx(tmp_path, trust_ca, "--trust-proxy") as (relay, nginx):
        share = start_share(data, nginx.url, tmp_path)
        try:
            big = (data / "big.bin").read_bytes()
            prv = pointer(tmp_path, data / "big.bin")
            ranges = [(0, 4096), (1 << 20, 100_000), (3 << 20, 12345)]
            first = [kbfs_bytes("cat", str(prv), "--relay", nginx.url, "--no-local",
                                "--cache-dir", str(tmp_path / "ca"), "--offset", str(o),
                                "--length", str(n)) for o, n in ranges]
            asked = relay_requests(relay)
            assert asked > 0
            second = [kbfs_bytes("cat", str(prv), "--relay", nginx.url, "--no-local",
                                 "--cache-dir", str(tmp_path / "cb"), "--offset", str(o),
                                 "--length", str(n)) for o, n in ranges]
            assert first == second == [big[o:o + n] for o, n in ranges]
            assert relay_requests(relay) == asked, "the second reader reached the relay"
            # The same range twice by hand: nginx says HIT, and the relay still saw nothing.
            sha1 = hashlib.sha1(big).hexdigest()
            url, rng = f"{nginx.url}/sha1/{sha1}", {"Range": "bytes=65536-131071"}
            one, two = _get(url, trust_ca, rng), _get(url, trust_ca, rng)
            assert one.status_code == two.status_code == 206
            assert one.content == two.content == big[65536:131072]
            assert one.headers["Cache-Control"] == "public, max-age=31536000, immutable"
            assert two.headers["X-Cache-Status"] == "HIT", two.headers
            assert relay_requests(relay) == asked + 1
        finally:
            share.stop()


@pytest.mark.parametrize("drop", ["", "$http_authorization"],
                         ids=["doc-config", "without-the-authorization-bypass"])
def test_a_private_shares_bytes_never_reach_a_reader_without_its_token(
        trust_ca: Pki, data: Path, tmp_path: Path, drop: str) -> None:
    """Hostile: a reader with the token fills the cache; one without it asks for the
    same URL and range. The relay's `private, no-store` must keep nginx from keeping
    the answer even when the config forgot to bypass the cache for Authorization."""
    with relay_behind_nginx(tmp_path, trust_ca, "--trust-proxy", drop=drop) as (relay, nginx):
        share = start_share(data, nginx.url, tmp_path, "--private")
        try:
            big = (data / "big.bin").read_bytes()
            sha1 = hashlib.sha1(big).hexdigest()
            token = {"Authorization": f"Bearer {share.token}"}
            for path, rng in ((f"/sha1/{sha1}", "bytes=0-65535"), (f"/tree/{sha1}", "bytes=0-31")):
                url = nginx.url + path
                for _ in range(2):
                    ok = _get(url, trust_ca, {**token, "Range": rng})
                    assert ok.status_code in (200, 206), ok.status_code  # /tree/: whole
                    assert ok.headers["Cache-Control"] == "private, no-store"
                if path.startswith("/sha1/"):
                    assert ok.content == big[:65536]
                for headers in ({"Range": rng}, {}):
                    bad = _get(url, trust_ca, headers)
                    assert bad.status_code == 404, (path, headers, bad.status_code)
                    assert bad.headers.get("X-Cache-Status") != "HIT"
                    assert big[:4096] not in bad.content
            assert not list((tmp_path / "nginx" / "cache").rglob("*")) or all(
                big[:4096] not in p.read_bytes()
                for p in (tmp_path / "nginx" / "cache").rglob("*") if p.is_file())
        finally:
            share.stop()


async def _knock(url: str, forged: str) -> None:
    """Open the relay's control websocket with a forged X-Forwarded-For and send a
    hello it refuses (so it logs the peer)."""
    from kbfs import tlsconf

    ctx = tlsconf.client_context() if url.startswith("wss") else None
    async with trio_websocket.open_websocket_url(
            url, ssl_context=ctx, extra_headers=[(b"x-forwarded-for", forged.encode())],
            connect_timeout=10, disconnect_timeout=2) as ws:
        await ws.get_message()  # the challenge
        await ws.send_message(json.dumps({"type": "not-a-hello"}))
        with trio.move_on_after(5):
            await ws.get_message()


def _refusal_peer(relay: RelayProc) -> str:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = re.search(r"share refused from (\S+):", relay.proc.err_path.read_text())
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise AssertionError("the relay logged no refusal")


FORGED = "203.0.113.7"


def test_x_forwarded_for_only_with_trust_proxy(trust_ca: Pki, tmp_path: Path) -> None:
    plain = start_relay(tmp_path / "a")
    try:
        trio.run(_knock, plain.url.replace("http", "ws", 1) + "/_control", FORGED)
        peer = _refusal_peer(plain)
        assert peer.startswith("127.0.0.1:") and FORGED not in peer
    finally:
        plain.stop()
    # Reached directly, a trusting relay believes anyone: why it must sit behind a proxy.
    trusting = start_relay(tmp_path / "b", "--trust-proxy")
    try:
        trio.run(_knock, trusting.url.replace("http", "ws", 1) + "/_control", FORGED)
        assert _refusal_peer(trusting) == f"{FORGED}:0"
    finally:
        trusting.stop()
    # Behind the documented nginx: the forged value is replaced by the real address.
    with relay_behind_nginx(tmp_path / "c", trust_ca, "--trust-proxy") as (relay, nginx):
        trio.run(_knock, nginx.url.replace("https", "wss", 1) + "/_control", FORGED)
        assert _refusal_peer(relay) == "127.0.0.1:0"

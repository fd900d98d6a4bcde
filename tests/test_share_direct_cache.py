"""A shared HTTP cache in front of a share's own --listen server (real nginx proxy_cache).

`kbfs share --listen` serves /sha1/ and /tree/ itself, and /api/find hands that URL (or
its --public-url) to readers, so a site may put a cache in front of it as it does for
the relay. A public share's answers are named by their hash and may be kept for ever;
a private share's must not be kept at all (`Cache-Control: private, no-store`), nor an
answer to a request that carried a token: else the cache hands a private share's bytes
to the next reader without a token. Hostile on purpose, the nginx here has no
Authorization bypass (an operator who did not think of tokens): only the share's own
header keeps the cache from storing the answer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.deployutil import free_port, wait_port
from tests.netutil import ShareProc, start_relay, start_share

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.path.exists(NGINX),
                                reason="needs nginx (Debian nginx-light; make test installs it)")


def nginx_conf(tmp: Path, port: int, upstream: str) -> str:
    """A cache in front of UPSTREAM keeping every range it may (no Authorization rule)."""
    temps = "".join(f"    {kind}_temp_path {tmp}/{kind};\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (("user root;\n" if os.geteuid() == 0 else "")
            + f"daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\n"
            f"error_log {tmp}/error.log info;\nevents {{ worker_connections 64; }}\n"
            f"http {{\n    access_log {tmp}/access.log;\n{temps}"
            f"    proxy_cache_path {tmp}/cache levels=1:2 keys_zone=direct:1m max_size=1g;\n"
            f"    server {{\n        listen 127.0.0.1:{port};\n"
            f"        location / {{\n            proxy_pass {upstream};\n"
            "            proxy_http_version 1.1;\n"
            "            proxy_set_header Range $http_range;\n"
            "            proxy_cache direct;\n"
            "            proxy_cache_key \"$uri|$http_range\";\n"
            "            add_header X-Cache-Status $upstream_cache_status always;\n"
            "        }\n    }\n}\n")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "f.bin").write_bytes(os.urandom(1024 * 1024 + 4321))
    return d


def start_nginx(tmp: Path, port: int, upstream: str) -> subprocess.Popen[bytes]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, port, upstream))
    args = [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
    checked = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
    except BaseException:
        stop_nginx(popen)
        raise
    return popen


def stop_nginx(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        popen.send_signal(signal.SIGQUIT)
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)


@pytest.fixture
def cached_share(request: pytest.FixtureRequest, data: Path,
                 tmp_path: Path) -> Iterator[tuple[ShareProc, str, str]]:
    """A share (private when the test's param says so) with --listen, and nginx caching
    in front of it; the share advertises nginx's URL (--public-url), as a site would.
    Yields (share, nginx's URL, the share's own --listen URL)."""
    port = free_port()
    relay = start_relay(tmp_path)
    try:
        # A port of its own: the share prints its --public-url, not the address it bound.
        own = free_port()
        extra = ["--listen", f"127.0.0.1:{own}", "--public-url", f"http://127.0.0.1:{port}"]
        if request.param == "private":
            extra.append("--private")
        share = start_share(data, relay.url, tmp_path, *extra)
        try:
            wait_port(own)
            nginx = start_nginx(tmp_path / "nginx", port, f"http://127.0.0.1:{own}")
            try:
                yield share, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{own}"
            finally:
                stop_nginx(nginx)
        finally:
            share.stop()
    finally:
        relay.stop()


def get(url: str, headers: dict[str, str]) -> requests.Response:
    return requests.get(url, headers=headers, timeout=20, proxies={"http": "", "https": ""})


@pytest.mark.parametrize("cached_share", ["public"], indirect=True)
def test_a_public_shares_direct_answers_are_cached(cached_share: tuple[ShareProc, str, str],
                                                   data: Path) -> None:
    """The control: this cache does keep what it may (so the private test can fail)."""
    _, cache, _ = cached_share
    body = (data / "f.bin").read_bytes()
    url = f"{cache}/sha1/{hashlib.sha1(body).hexdigest()}"
    one, two = (get(url, {"Range": "bytes=0-65535"}) for _ in range(2))
    assert one.status_code == two.status_code == 206
    assert one.content == two.content == body[:65536]
    assert one.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert two.headers["X-Cache-Status"] == "HIT", two.headers
    # A request with a token is answered private even by a public share (the relay's rule).
    rng = {"Range": "bytes=65536-131071"}
    carried = get(url, {"Authorization": "Bearer anything", **rng})
    assert carried.status_code == 206 and carried.headers["Cache-Control"] == "private, no-store"
    assert get(url, rng).headers["X-Cache-Status"] != "HIT"


@pytest.mark.parametrize("cached_share", ["private"], indirect=True)
def test_a_private_shares_direct_answers_never_reach_a_reader_without_its_token(
        cached_share: tuple[ShareProc, str, str], data: Path, tmp_path: Path) -> None:
    share, cache, own = cached_share
    body = (data / "f.bin").read_bytes()
    sha1 = hashlib.sha1(body).hexdigest()
    token = {"Authorization": f"Bearer {share.token}"}
    for path, rng in ((f"/sha1/{sha1}", "bytes=0-65535"), (f"/tree/{sha1}", ""),
                      (f"/sha1/{sha1}", "")):
        ask = {"Range": rng} if rng else {}
        for _ in range(2):  # twice: a second request would be the one a cache answers
            ok = get(cache + path, {**token, **ask})
            assert ok.status_code in (200, 206), (path, ok.status_code)
            assert ok.headers["Cache-Control"] == "private, no-store", (path, ok.headers)
        if path.startswith("/sha1/"):
            assert ok.content == (body[:65536] if rng else body)
        bad = get(cache + path, ask)
        assert bad.status_code == 401, (path, rng, bad.status_code, bad.headers)
        assert bad.headers.get("X-Cache-Status") != "HIT"
        assert body[:4096] not in bad.content
    # A revalidation's 304 carries the same rule (asked of the share itself: nginx drops
    # If-None-Match on its way to an upstream it caches).
    etag = get(f"{own}/sha1/{sha1}", {**token, "Range": "bytes=0-9"}).headers["ETag"]
    same = get(f"{own}/sha1/{sha1}", {**token, "If-None-Match": etag})
    assert same.status_code == 304 and same.headers["Cache-Control"] == "private, no-store"
    kept = [p for p in (tmp_path / "nginx" / "cache").rglob("*") if p.is_file()]
    assert all(body[:4096] not in p.read_bytes() for p in kept), kept

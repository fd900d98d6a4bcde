"""Readers behind a site HTTP cache (docs/deploy.md, "An HTTP cache in front of the relay"),
with real processes on loopback: Debian's nginx running the doc's sliced cache block in
front of a real relay and share, and the doc's mirror-cache block in front of a static
mirror (`kbfs mirror export` served by nginx).

- `HTTP_PROXY=http://CACHE` with an http:// relay: the reader sends absolute-form requests
  to nginx, whose one server answers them from its cache; a second reader with an empty
  piece cache reads every byte without the relay seeing a request.
- `--mirror http://CACHE` where the cache fronts a static mirror: the same, the mirror's
  nginx seeing nothing the second time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_many import Nginx, cache_block, doc_block, free_port, wait_port
from kbfs import prv
from tests.lyingmirror import NGINX
from tests.lyingmirror import Nginx as StaticNginx
from tests.netutil import get_json, run_kbfs, start_relay, start_share

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx (nginx-light) missing")

REPO = str(Path(__file__).resolve().parent.parent)
SIZE = 5 * (1 << 20) + 777
MANY_SIZE = 48 << 20


def _cat(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("KBFS_", "AWS_")) and k.lower() not in ("http_proxy", "https_proxy",
                                                                        "no_proxy", "all_proxy")}
    e.update(PYTHONPATH=REPO, XDG_CONFIG_HOME=str(tmp / "config"), HOME=str(tmp / "home"),
             KBFS_CACHE_DIR=str(tmp / f"cache-{os.urandom(4).hex()}"))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kbfs", "cat", "--no-local", *args],
                          capture_output=True, timeout=90, env=e, stdin=subprocess.DEVNULL)


@pytest.fixture
def content(tmp_path: Path) -> dict[str, object]:
    data = tmp_path / "data"
    data.mkdir()
    blob = os.urandom(SIZE)
    (data / "f.bin").write_bytes(blob)
    ptrs, orig = tmp_path / "pointers", tmp_path / "originals"
    ptrs.mkdir()
    orig.mkdir()
    for name, bs in (("v2", 1 << 16), ("v1", 1 << 20)):
        text = prv.create_pointer(data / "f.bin", block_size=bs).to_json()
        (orig / f"{name}.prv").write_text(text)
        obj = json.loads(text)
        obj["original_path"] = "/nonexistent/f.bin"  # readers find no local copy
        (ptrs / f"{name}.prv").write_text(json.dumps(obj))
    return {"data": data, "blob": blob, "ptrs": ptrs, "orig": orig}


@pytest.mark.parametrize("name", ["v2", "v1"])
def test_http_proxy_names_the_cache(content: dict[str, object], tmp_path: Path, name: str) -> None:
    data, blob, ptrs = content["data"], content["blob"], content["ptrs"]
    assert isinstance(data, Path) and isinstance(ptrs, Path)
    port, relay_port = free_port(), free_port()
    relay = start_relay(tmp_path, port=relay_port)
    cache = Nginx(tmp_path / "nginx", cache_block(relay_port, port, tmp_path / "c", sliced=True))
    try:
        wait_port(port)
        share = start_share(data, relay.url, tmp_path)
        try:
            proxy = {"HTTP_PROXY": f"http://127.0.0.1:{port}"}
            first = _cat(tmp_path, "--relay", relay.url, str(ptrs / f"{name}.prv"), env=proxy)
            assert first.returncode == 0, first.stderr
            assert first.stdout == blob
            # Every request went through the cache: its log has them in absolute form.
            log = (tmp_path / "nginx" / "access.log").read_text()
            assert "/sha1/" in log, log
            before = get_json(relay.url + "/api/health")["requests"]
            second = _cat(tmp_path, "--relay", relay.url, str(ptrs / f"{name}.prv"), env=proxy)
            assert second.returncode == 0, second.stderr
            assert second.stdout == blob
            assert get_json(relay.url + "/api/health")["requests"] == before
        finally:
            share.stop()
    finally:
        cache.stop()
        relay.stop()


@pytest.mark.parametrize("name", ["v2", "v1"])
def test_a_cache_in_front_of_a_mirror_is_a_mirror_url(content: dict[str, object], tmp_path: Path,
                                                      name: str) -> None:
    blob, ptrs = content["blob"], content["ptrs"]
    assert isinstance(ptrs, Path)
    made = run_kbfs("mirror", "export", str(content["orig"]), str(tmp_path / "m"), timeout=60)
    assert made.returncode == 0, made.stderr
    with StaticNginx(tmp_path / "m", tmp_path) as origin:
        port = free_port()
        conf = doc_block("nginx-mirror-cache.conf")
        conf = conf.replace("/var/cache/nginx/kbfs-mirror", str(tmp_path / "mc"))
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        conf = conf.replace("https://mirror.example.org", origin.url)
        conf = conf.replace("proxy_set_header Host mirror.example.org;", "")
        cache = Nginx(tmp_path / "nginx-mc", conf)
        try:
            wait_port(port)
            seen = []
            for _ in range(2):
                got = _cat(tmp_path, "--mirror", f"http://127.0.0.1:{port}", str(ptrs / f"{name}.prv"))
                assert got.returncode == 0, got.stderr
                assert got.stdout == blob
                seen.append(len(origin.requests()))
            assert seen[0] > 0 and seen[1] == seen[0]  # the second reader: all from the cache
        finally:
            cache.stop()


def test_many_readers_at_once_cost_the_share_one_copy(tmp_path: Path) -> None:
    """Readers started together through the sliced block with KBFS_ALIGNED_RUNS=1 (v2:
    proof requests keyed by their range and `bs` alone) all read correct bytes, and the
    relay sends the cache at most 1.1x the file (docs/benchmarks.md: without aligned runs
    readers ask different ranges and the share sends several copies)."""
    # Big enough for read-ahead to size runs by the link (a small file is one `cat` read).
    data = tmp_path / "many"
    data.mkdir()
    blob = os.urandom(MANY_SIZE)
    (data / "m.bin").write_bytes(blob)
    ptr = tmp_path / "m.prv"
    obj = json.loads(prv.create_pointer(data / "m.bin", block_size=1 << 16).to_json())
    obj["original_path"] = "/nonexistent/m.bin"
    ptr.write_text(json.dumps(obj))
    port, relay_port = free_port(), free_port()
    relay = start_relay(tmp_path, "--public-url", f"http://127.0.0.1:{port}",
                        "--public-url", f"http://127.0.0.1:{relay_port}", port=relay_port)
    cache = Nginx(tmp_path / "nginx", cache_block(relay_port, port, tmp_path / "c", sliced=True))
    try:
        wait_port(port)
        share = start_share(data, relay.url, tmp_path)
        try:
            e = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")
                 and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
            e.update(PYTHONPATH=REPO, XDG_CONFIG_HOME=str(tmp_path / "config"),
                     KBFS_ALIGNED_RUNS="1")
            outs = [tmp_path / f"out{i}" for i in range(4)]
            procs = [subprocess.Popen(
                [sys.executable, "-m", "kbfs", "cat", "--no-local", "--relay",
                 f"http://127.0.0.1:{port}", "--cache-dir", str(tmp_path / f"rc{i}"),
                 str(ptr)], stdout=open(out, "wb"), stderr=subprocess.PIPE,  # noqa: SIM115
                env=e, stdin=subprocess.DEVNULL) for i, out in enumerate(outs)]
            try:
                errs = [p.communicate(timeout=90)[1] for p in procs]
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            assert [p.returncode for p in procs] == [0] * 4, errs
            assert all(out.read_bytes() == blob for out in outs)
            sent = get_json(relay.url + "/api/health")["bytes_out"]
            assert sent <= 1.1 * MANY_SIZE, (sent, MANY_SIZE)
        finally:
            share.stop()
    finally:
        cache.stop()
        relay.stop()

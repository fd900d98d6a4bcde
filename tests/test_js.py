"""kbfs.js (js/) against a real relay and real shares: the Node test suite, run from pytest.

The fixture starts a `kbfs relay` and two `kbfs share` processes on 127.0.0.1 (a public one
and a --private one with a reader token), makes pointers of their files (64 KiB and 1 MiB
trees, and the original tools' root-less pointer), writes what the Node tests need to a
JSON file and runs `node --test js/test/` with its path in KBFS_JS_WORLD. The Node tests
(js/test/relay.test.js) read true bytes through the relay, and check that tampered bytes,
proofs, lengths and positions from a lying server (js/testlib/lying.js) are refused and
failed over. Also: the browser copy of kbfs.js in kbfs/web/static/lib/ is current.

Skipped, with the reason printed, only when `node` is not installed (`make test` installs
it and the npm packages: `npm ci` in js/).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kbfs import prv, tree
from tests.httpsource import free_port
from tests.netutil import RelayProc, ShareProc, start_relay, start_share

REPO = Path(__file__).resolve().parent.parent
JS = REPO / "js"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NODE = shutil.which("node")


def _need_node() -> str:
    if NODE is None:
        print("SKIP test_js: node is not installed (make test installs nodejs and npm)")
        pytest.skip("node is not installed (make test installs nodejs and npm)")
    if not (JS / "node_modules" / "hash-wasm").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True,
                       capture_output=True, timeout=300)
    return NODE


def _pointer(path: Path, block_size: int, relpath: str) -> dict[str, Any]:
    p = prv.create_pointer(path, block_size=block_size).to_dict()
    p["original_path"] = relpath
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    _need_node()
    tmp = tmp_path_factory.mktemp("js")
    rng = random.Random(18)
    pub, priv = tmp / "pub", tmp / "priv"
    (pub / "sub").mkdir(parents=True)
    priv.mkdir()
    files = {
        "big": ("big.bin", rng.randbytes(5 * 1024 * 1024 + 12345)),
        "spaced": ("sub/name with space.bin", rng.randbytes(70000)),
        "empty": ("empty.bin", b""),
        "legacy": ("legacy-content.bin", (FIXTURES / "legacy-content.bin").read_bytes()),
    }
    for rel, data in files.values():
        (pub / rel).write_bytes(data)
    (priv / "secret.bin").write_bytes(rng.randbytes(300000))
    relay: RelayProc = start_relay(tmp)
    procs: list[Any] = [relay]
    try:
        share: ShareProc = start_share(pub, relay.url, tmp)
        procs.append(share)
        private: ShareProc = start_share(priv, relay.url, tmp, "--private")
        procs.append(private)
        desc: dict[str, Any] = {
            "relay": relay.url,
            "dead": f"http://127.0.0.1:{free_port()}",
            "share": share.id,
            "private": private.id,
            "token": private.token,
            "files": {},
        }
        for key, (rel, _) in files.items():
            path = pub / rel
            desc["files"][key] = {
                "path": str(path), "rel": rel, "sha1": prv.create_pointer(path).sha1,
                "size": path.stat().st_size,
                "v2": _pointer(path, 65536, rel), "v1": _pointer(path, tree.BLOCK_SIZE, rel),
            }
        legacy = json.loads((FIXTURES / "legacy-content.bin.prv").read_text())
        assert "kbfs_tree" not in legacy
        desc["files"]["legacy"]["rootless"] = legacy
        secret = priv / "secret.bin"
        desc["files"]["secret"] = {"path": str(secret), "rel": "secret.bin",
                                   "sha1": prv.create_pointer(secret).sha1,
                                   "size": secret.stat().st_size,
                                   "v2": _pointer(secret, 65536, "secret.bin")}
        out = tmp / "world.json"
        out.write_text(json.dumps(desc))
        yield out
    finally:
        for p in reversed(procs):
            p.stop()


def test_node_suite_against_a_real_relay(world: Path) -> None:
    """`node --test js/test/`: every Node test, with the relay and shares of `world`."""
    node = _need_node()
    env = dict(os.environ, KBFS_JS_WORLD=str(world))
    run = subprocess.run([node, "--test", "--test-reporter=spec", "js/test/"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    print(run.stdout[-20000:])
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert "# fail 0" in run.stdout or "ℹ fail 0" in run.stdout
    assert "skipped 0" in run.stdout.replace("ℹ ", "# ")


def test_browser_copy_is_current() -> None:
    """kbfs/web/static/lib/ holds js/*.js and hash-wasm's ESM build as js/vendor.mjs makes
    them (run `node js/vendor.mjs` after changing js/)."""
    node = _need_node()
    run = subprocess.run([node, "js/vendor.mjs", "--check"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


_PAGE_JS = """import { openContent } from './lib/kbfs.js';
const p = await (await fetch('params.json')).json();
const hex = (b) => [...new Uint8Array(b)].map((x) => x.toString(16).padStart(2, '0')).join('');
try {
  const out = {};
  for (const [key, ptr] of Object.entries(p.pointers)) {
    const f = await openContent(ptr, { relays: p.relays });
    // A part first: its pieces need a proof (a whole-file read would not), so the relay's
    // CORS headers must expose Kbfs-Proof for this to verify.
    const part = await f.read(3 * 65536 + 5, 100000);
    const bytes = await f.read(0, f.size);
    const same = part.every((x, i) => x === bytes[3 * 65536 + 5 + i]);
    out[key] = { kind: f.kind, sha1: hex(await crypto.subtle.digest('SHA-1', bytes)), same };
  }
  window.testResult = out;
} catch (e) {
  window.testResult = { error: String(e && e.stack || e) };
}
"""


def test_chromium_reads_verified_bytes_through_the_relay(world: Path, tmp_path: Path) -> None:
    """The browser copy (kbfs/web/static/lib/) in headless Chromium, on a page of another
    origin than the relay's: v2 pieces (their Kbfs-Proof must be exposed by the relay's CORS
    headers, or no read verifies), v1 blocks and root-less content, SHA-1 checked in the page."""
    import functools
    import threading
    import time
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    chromium, driver_path = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not chromium.exists() or not driver_path.exists():
        print("SKIP: no /usr/bin/chromium or /usr/bin/chromedriver (Debian chromium, chromium-driver)")
        pytest.skip("Chromium is not installed (Debian chromium, chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        print("SKIP: selenium is not installed (setup.cfg test extra)")
        pytest.skip("selenium is not installed")
    desc = json.loads(world.read_text())
    big = desc["files"]["big"]
    pointers = {"v2": big["v2"], "v1": big["v1"], "rootless": desc["files"]["legacy"]["rootless"]}
    (tmp_path / "lib").symlink_to(REPO / "kbfs" / "web" / "static" / "lib")
    (tmp_path / "index.html").write_text('<!doctype html><meta charset="utf-8">'
                                         '<script type="module" src="page.js"></script>')
    (tmp_path / "page.js").write_text(_PAGE_JS)
    (tmp_path / "params.json").write_text(json.dumps({"pointers": pointers, "relays": [desc["relay"]]}))

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ.setdefault("SE_OFFLINE", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(str(driver_path)))
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        result = None
        deadline = time.monotonic() + 60
        while result is None and time.monotonic() < deadline:
            result = driver.execute_script("return window.testResult || null")
            time.sleep(0.1)
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    assert result is not None and "error" not in result, result
    assert result["v2"] == {"kind": "proofs", "sha1": big["sha1"], "same": True}
    assert result["v1"] == {"kind": "leaves", "sha1": big["sha1"], "same": True}
    assert result["rootless"]["sha1"] == desc["files"]["legacy"]["sha1"]

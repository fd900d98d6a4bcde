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

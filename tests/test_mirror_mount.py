"""`kbfs mount --mirror URL` with real processes, and a mirror's refusal said as it is.

- A real FUSE mount of a folder of v2 and v1 pointers, with a relay whose only share has
  stopped and a `kbfs mirror export` of the pointers served by Debian's nginx: every byte
  read through the mount is the file's, and nginx served them (without `--mirror`, the
  same mount cannot read: the relay alone has nothing to give).
- A mirror answering 403 to everything (tests/lyingmirror.py, as S3 answers an anonymous
  reader of a private bucket): the one error line speaks of credentials, not tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kbfs import prv
from tests.lyingmirror import NGINX, LyingMirror, Nginx
from tests.mountutil import NEEDS_FUSE, mounted
from tests.netutil import run_kbfs, start_relay, start_share

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx (nginx-light) missing")

REPO = str(Path(__file__).resolve().parent.parent)
SIZE = 3 * (1 << 20) + 54321  # four 1 MiB blocks, 49 64 KiB pieces, both with a short last one


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """data/big.bin, pointers/{v2,v1}.prv naming a path that does not exist, mirror/."""
    d = tmp_path_factory.mktemp("mirrormount")
    (d / "data").mkdir()
    (d / "data" / "big.bin").write_bytes(os.urandom(SIZE))
    made = d / "made"
    made.mkdir()
    for name, bs in (("v2", 1 << 16), ("v1", 1 << 20)):
        (made / f"{name}.prv").write_text(
            prv.create_pointer(d / "data" / "big.bin", block_size=bs).to_json())
    r = run_kbfs("mirror", "export", str(made / "v2.prv"), str(made / "v1.prv"), str(d / "mirror"),
                 timeout=60)
    assert r.returncode == 0, r.stderr
    folder = d / "pointers"
    folder.mkdir()
    for name in ("v2", "v1"):
        obj = json.loads((made / f"{name}.prv").read_text())
        obj["original_path"] = f"/nonexistent/{name}.bin"  # no local copy to fall back on
        (folder / f"{name}.prv").write_text(json.dumps(obj))
    return {"dir": d, "data": d / "data", "pointers": folder, "mirror": d / "mirror"}


@NEEDS_FUSE[0]
@NEEDS_FUSE[1]
def test_mount_reads_from_the_mirror_when_the_share_is_gone(exported: dict[str, Path],
                                                            tmp_path: Path) -> None:
    data = (exported["data"] / "big.bin").read_bytes()
    relay = start_relay(tmp_path)
    try:
        share = start_share(exported["data"], relay.url, tmp_path)
        share.stop()  # the relay is up, the only share holding the file is not
        with Nginx(exported["mirror"], tmp_path) as web:
            with mounted(str(exported["pointers"]), tmp_path / "m", relays=[relay.url],
                         extra=["--mirror", web.url, "--no-local"]) as m:
                for name in ("v2", "v1"):
                    with open(m.path(name), "rb") as f:
                        f.seek(2_000_000)
                        assert f.read(100_000) == data[2_000_000:2_100_000], name
                        f.seek(0)
                        assert f.read() == data, name
            assert any("/data/" in line and " 206" in line for line in web.requests())
            assert any("/outboard/65536/" in line for line in web.requests())
            assert any("/outboard/1048576/" in line for line in web.requests())
        # The same mount without the mirror has nowhere to read from: what served was it.
        with mounted(str(exported["pointers"]), tmp_path / "n", relays=[relay.url],
                     extra=["--no-local"], name="n") as m:
            with pytest.raises(OSError), open(m.path("v2"), "rb") as f:
                f.read(4096)
    finally:
        relay.stop()


def _cat(tmp: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KBFS_", "AWS_"))}
    env.update(PYTHONPATH=REPO, XDG_CONFIG_HOME=str(tmp / "config"), HOME=str(tmp / "home"),
               KBFS_CACHE_DIR=str(tmp / f"cache-{os.urandom(4).hex()}"))
    return subprocess.run([sys.executable, "-m", "kbfs", "cat", "--no-local", *args],
                          capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("name", ["v2", "v1"])
def test_a_refusing_mirror_is_about_credentials_not_tokens(exported: dict[str, Path],
                                                           tmp_path: Path, name: str) -> None:
    with LyingMirror(exported["mirror"], "forbidden") as liar:
        r = _cat(tmp_path, "--mirror", liar.url, str(exported["pointers"] / f"{name}.prv"))
    assert r.returncode == 1 and r.stdout == b""
    err = r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("kbfs: error: the mirrors refused"), err
    assert "credentials" in err and "--token" not in err and "HTTP 403" in err, err
    assert "Traceback" not in err


def test_a_refusing_mirror_beside_a_relay_keeps_the_token_advice(exported: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """Not every refusal is a mirror's: with a relay that has no share of it, the line is
    the relay's (not found), not the credentials advice."""
    relay = start_relay(tmp_path)
    try:
        with LyingMirror(exported["mirror"], "forbidden") as liar:
            r = _cat(tmp_path, "--mirror", liar.url, "--relay", relay.url,
                     str(exported["pointers"] / "v1.prv"))
        assert r.returncode == 1
        assert "the mirrors refused" not in r.stderr.decode(), r.stderr
    finally:
        relay.stop()


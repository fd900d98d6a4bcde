"""Private shares read with kbfs's own tools (issue 16): tokens from `--token`,
`KBFS_TOKEN` and the config file reach the relays they are meant for, and no other.

A real relay and a `kbfs share --private --listen` (tests/netutil.py; `ShareProc.token`)
serve a small folder for the module; a tiny HTTP server that records request headers
stands in for a relay only a pointer's hint names.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import pytest
from netutil import RelayProc, ShareProc, start_relay, start_share

import kbfs
from kbfs import client, config, prv
from kbfs.errors import AccessDenied, ConfigError

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
CSV = b"unit,quality\n" + b"".join(b"%d,%s\n" % (i, b"good" if i % 3 else b"mua")
                                   for i in range(2000))


@dataclass
class Net:
    relay: RelayProc
    share: ShareProc
    data_dir: Path
    files: dict[str, bytes]

    @property
    def hostport(self) -> str:
        return self.relay.url.split("://", 1)[1]

    def url(self, rel: str) -> str:
        return f"kbfs://{self.hostport}/{self.share.id}/{rel}"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    tmp = tmp_path_factory.mktemp("priv")
    data_dir = tmp / "data"
    files = {"units.csv": CSV, "rec.bin": os.urandom(2 * MiB + 3)}
    for rel, data in files.items():
        (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / rel).write_bytes(data)
    relay = start_relay(tmp)
    try:
        share = start_share(data_dir, relay.url, tmp, "--private", listen=True)
    except BaseException:
        relay.stop()
        raise
    assert share.token.startswith("kbfs1.")
    try:
        yield Net(relay, share, data_dir, files)
    finally:
        share.stop()
        relay.stop()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("KBFS_RELAY", "KBFS_CACHE_DIR", "KBFS_CACHE_SIZE", "KBFS_SEARCH_DIRS",
                "KBFS_TOKEN", "KBFS_DIRECT"):
        monkeypatch.delenv(var, raising=False)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KBFS_")}
    e.update(XDG_CONFIG_HOME=str(tmp_path / "config"), KBFS_CACHE_DIR=str(tmp_path / "cache"),
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return e


def _kbfs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kbfs", *args], env=env, capture_output=True,
                          timeout=90, stdin=subprocess.DEVNULL)


def _write_config(tmp_path: Path, obj: dict[str, Any]) -> None:
    folder = tmp_path / "config" / "kbfs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(obj))


# ---------------------------------------------------------------- without a token


def test_without_a_token_one_line_says_private_and_how(net: Net, tmp_path: Path) -> None:
    """Was: `HTTP 401 listing / of share ...`."""
    out = tmp_path / "units.csv"
    proc = _kbfs(_env(tmp_path), "download", net.url("units.csv"), "--no-local", "-o", str(out))
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"share {net.share.id} is private" in err and "--token" in err, err
    assert "KBFS_TOKEN" in err and "401" not in err, err
    assert not out.exists()
    with pytest.raises(AccessDenied, match="is private"):
        kbfs.open(net.url("units.csv"), cache_dir=str(tmp_path / "cache"))
    fs = fsspec.filesystem("kbfs", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(PermissionError):
        fs.cat_file(f"{net.hostport}/{net.share.id}/units.csv")


def test_a_wrong_token_says_it_was_not_accepted(net: Net, tmp_path: Path) -> None:
    body, _, mac = net.share.token.rpartition(".")
    forged = body + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
    proc = _kbfs(_env(tmp_path), "cat", net.url("units.csv"), "--token", forged)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert "did not accept the token" in err, err


# ---------------------------------------------------------------- the three places


@pytest.mark.parametrize("how", ["flag", "env", "config-map", "config-list"])
def test_download_and_cat_with_a_token(net: Net, tmp_path: Path, how: str) -> None:
    token = net.share.token
    env = _env(tmp_path)
    flags: list[str] = []
    if how == "flag":
        flags = ["--token", token]
    elif how == "env":
        env["KBFS_TOKEN"] = f"{token}"
    elif how == "config-map":
        _write_config(tmp_path, {"tokens": {net.share.id: token}})  # as `kbfs share token` says
    else:
        _write_config(tmp_path, {"tokens": [token]})
    out = tmp_path / "got.bin"
    proc = _kbfs(env, "download", net.url("rec.bin"), "--no-local", "-o", str(out), *flags)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == net.files["rec.bin"]
    proc = _kbfs(env, "cat", net.url("units.csv"), "--no-local", *flags)
    assert proc.returncode == 0 and proc.stdout == CSV, proc.stderr.decode()


def test_pointer_file_of_a_private_share_with_token(net: Net, tmp_path: Path) -> None:
    """A .prv (no share named): /api/find, /tree/ and /sha1/ carry the token."""
    pointer = tmp_path / "rec.bin.prv"
    pointer.write_text(prv.create_pointer(net.data_dir / "rec.bin").to_json())
    env = _env(tmp_path)
    proc = _kbfs(env, "cat", str(pointer), "--no-local", "--relay", net.relay.url)
    assert proc.returncode == 1 and b"no connected share has this file" in proc.stderr
    assert b"give its token" in proc.stderr  # the hint, since no token was given
    proc = _kbfs(env, "cat", str(pointer), "--no-local", "--relay", net.relay.url,
                 "--token", net.share.token)
    assert proc.returncode == 0 and proc.stdout == net.files["rec.bin"], proc.stderr.decode()


def test_python_and_fsspec_with_a_token(net: Net, tmp_path: Path) -> None:
    import pandas as pd

    cache_dir = str(tmp_path / "cache")
    token = net.share.token
    with kbfs.open(net.url("rec.bin"), cache_dir=cache_dir, local=False, tokens=[token]) as f:
        assert f.read() == net.files["rec.bin"]
    fs = fsspec.filesystem("kbfs", cache_dir=cache_dir, local=False, token=token)
    top = f"{net.hostport}/{net.share.id}"
    assert {e["name"] for e in fs.ls(top)} == {f"{top}/units.csv", f"{top}/rec.bin"}
    assert fs.cat_file(f"{top}/units.csv") == CSV
    df = pd.read_csv(net.url("units.csv"), storage_options={"tokens": [token],
                                                            "cache_dir": cache_dir})
    assert len(df) == 2000 and (df["quality"] == "mua").sum() == 667
    sha1 = hashlib.sha1(CSV).hexdigest()
    with fsspec.open(f"sha1://{sha1}/units.csv", "rb", relays=[net.relay.url],
                     cache_dir=cache_dir, local=False, tokens=token) as f:
        assert f.read() == CSV


def test_token_goes_to_the_share_direct_url_only_when_find_says_it_is_its_own(
        net: Net, tmp_path: Path) -> None:
    from kbfs.fetch import Fetcher

    sha1 = hashlib.sha1(net.files["rec.bin"]).hexdigest()
    size = len(net.files["rec.bin"])
    token = net.share.token
    with Fetcher([net.relay.url], tokens={net.relay.url: [token]}) as f:
        found = f.find(sha1)
        assert found is not None and found.token == token
        assert found.shares[0]["id"] == net.share.id
        assert found.shares[0]["url"] == f"{net.share.direct_url}/sha1/{sha1}"
        sources = {s.url: s.auth for s in f._sources(sha1, size, time.monotonic() + 10)}
        assert sources[f"{net.share.direct_url}/sha1/{sha1}"] == token
        assert sources[f"{net.relay.url}/sha1/{sha1}"] == token
    # A find answer that lists the URL under another share's id: no token goes there.
    from kbfs.fetch import FindResult, _direct_auth

    other = FindResult(net.relay.url, size, [f"{net.share.direct_url}/sha1/{sha1}"],
                       [{"id": "b" * 32, "url": f"{net.share.direct_url}/sha1/{sha1}"}], token)
    assert _direct_auth(other, net.share.direct_url, sha1) is None


# ---------------------------------------------------------------- not to other relays


class _Recorder:
    """A tiny HTTP server that answers 404 to everything and records each request's
    Authorization header (a relay that only a pointer's hint names)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                rec.seen.append((self.path, self.headers.get("Authorization")))
                body = b'{"error": "nothing here"}'
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    rec = _Recorder()
    yield rec
    rec.close()


def test_token_is_not_sent_to_a_relay_only_a_hint_names(net: Net, tmp_path: Path,
                                                        recorder: _Recorder) -> None:
    ptr = prv.create_pointer(net.data_dir / "rec.bin").with_sources([recorder.url])
    pointer = tmp_path / "rec.bin.prv"
    pointer.write_text(ptr.to_json())
    token = net.share.token
    env = _env(tmp_path, KBFS_TOKEN=token)
    # The configured relay is down, so the read goes on to the hint.
    proc = _kbfs(env, "cat", str(pointer), "--no-local", "--relay", "http://127.0.0.1:1",
                 "--token", token)
    assert proc.returncode == 1
    assert recorder.seen, "the hint was never asked"
    assert all(auth is None for _, auth in recorder.seen), recorder.seen
    # Unless the config file files the token under that relay's URL.
    recorder.seen.clear()
    _write_config(tmp_path, {"tokens": {recorder.url: token}})
    proc = _kbfs(env, "cat", str(pointer), "--no-local", "--relay", "http://127.0.0.1:1")
    assert recorder.seen and all(auth == f"Bearer {token}" for _, auth in recorder.seen)


def test_token_is_not_sent_to_another_kbfs_url_relay_than_configured(
        net: Net, tmp_path: Path, recorder: _Recorder) -> None:
    """A kbfs:// URL names its relay, which gets the user's tokens (the user chose it);
    the configured relays of the same run get them too, a hint-only relay does not."""
    host = recorder.url.split("://", 1)[1]
    proc = _kbfs(_env(tmp_path), "cat", f"kbfs://{host}/{net.share.id}/units.csv",
                 "--token", net.share.token)
    assert proc.returncode == 1
    assert recorder.seen and recorder.seen[0][1] == f"Bearer {net.share.token}"


# ---------------------------------------------------------------- settings


def test_settings_refuse_what_is_not_a_token(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="--token: 'hello' is not a kbfs share token"):
        config.load_settings(tokens=["hello"])
    monkeypatch.setenv("KBFS_TOKEN", "kbfs1.bm90.x")
    with pytest.raises(ConfigError, match="KBFS_TOKEN"):
        config.load_settings()
    monkeypatch.delenv("KBFS_TOKEN")
    good = client.__name__ and "kbfs1." + __import__("base64").urlsafe_b64encode(
        json.dumps({"s": "a" * 32, "e": 0}).encode()).decode().rstrip("=") + ".mac"
    _write_config(tmp_path, {"tokens": {"b" * 32: good}})
    with pytest.raises(ConfigError, match="filed under share b+ is for share a+"):
        config.load_settings()
    _write_config(tmp_path, {"tokens": {"a" * 32: good, "relay.example.org:8080": good}})
    s = config.load_settings(relays=["http://r1:1"])
    assert s.tokens == [good] and s.relay_tokens == {"http://relay.example.org:8080": [good]}
    assert s.tokens_for(["http://r1:1", "http://hint:2", "http://relay.example.org:8080"]) == {
        "http://r1:1": (good,), "http://relay.example.org:8080": (good,)}
    assert s.tokens_for(["http://named:3"], named=["http://named:3"]) == {"http://named:3": (good,)}

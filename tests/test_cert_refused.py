"""A refused TLS certificate ends a read at once and says so (not "within 30 s").

A certificate that does not verify is not transient: kbfs.fetch stops its retry rounds
when every failure of a round was a refused certificate, and the error is the
certificate's one line (tlsconf.advice), not a time-out story. A `sha1://` source whose
relays all refuse their certificate says it could not ask (not "no relay knows this
content"). When another source failed in a way that may pass (a relay down), the rounds
go on as before and the error says how long they really lasted.

Real TLS relays (kbfs relay --certfile) with a private CA on 127.0.0.1; the CA is not
trusted, so every certificate is refused ("unable to get local issuer certificate").
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbfs import prv, tree
from kbfs.errors import SourceUnavailable
from kbfs.fetch import RETRY_WINDOW, Fetcher
from tests.deployutil import CA_VARS, Pki, free_port, make_pki, start_tls_relay
from tests.netutil import RelayProc, run_kbfs

QUICK = RETRY_WINDOW / 2  # seconds: well under one retry window
WORDS = "TLS certificate refused: unable to get local issuer certificate"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def untrusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing trusts the private CA: every certificate of this module is refused."""
    for name in CA_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def relay(pki: Pki, tmp_path: Path) -> Iterator[RelayProc]:
    proc = start_tls_relay(tmp_path, pki.good)
    yield proc
    proc.stop()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "f.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 777))
    return d


def pointer(tmp: Path, path: Path, *extra: str) -> Path:
    out = tmp / (path.name + ".prv")
    made = run_kbfs("prv", "create", str(path), "--no-hints", *extra, "-o", str(out))
    assert made.returncode == 0, made.stderr
    return out


def one_quick_line(tmp: Path, *args: str) -> str:
    t0 = time.monotonic()
    got = run_kbfs(*args, "--no-local", "--cache-dir", str(tmp / "cache"), timeout=60)
    took = time.monotonic() - t0
    assert got.returncode != 0
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in got.stderr, got.stderr
    assert took < QUICK + 2, f"{args[0]} took {took:.1f} s to report a refused certificate"
    return lines[0]


def test_readers_say_certificate_refused_at_once(relay: RelayProc, data: Path,
                                                 tmp_path: Path) -> None:
    url = relay.url.replace("127.0.0.1", "localhost")
    prv_file = pointer(tmp_path, data / "f.bin")
    sha1 = hashlib.sha1((data / "f.bin").read_bytes()).hexdigest()
    for args in (("download", str(prv_file), "-o", str(tmp_path / "o.bin")),
                 ("cat", str(prv_file), "--length", "10"),
                 ("cat", f"sha1://{sha1}", "--length", "10")):
        line = one_quick_line(tmp_path, *args, "--relay", url)
        assert WORDS in line and "SSL_CERT_FILE" in line, (args[0], line)
        assert "within" not in line and "no relay knows" not in line, (args[0], line)
        assert f"relay {url}" in line, line
    assert not (tmp_path / "o.bin").exists()


def test_fetcher_stops_its_retry_rounds_for_a_refused_certificate(
        relay: RelayProc, data: Path, tmp_path: Path) -> None:
    """Both read paths of kbfs.fetch, in this process: v1 blocks and v2 pieces."""
    body = (data / "f.bin").read_bytes()
    sha1 = hashlib.sha1(body).hexdigest()
    size = len(body)
    big = tree.BLOCK_SIZE
    leaves = [tree.leaf_hash(body[i:i + big]) for i in range(0, size, big)]
    root = prv.load_pointer(str(pointer(tmp_path, data / "f.bin"))).tree.root
    with Fetcher([relay.url.replace("127.0.0.1", "localhost")], direct=False) as f:
        for read in (lambda: f.fetch_blocks(sha1, size, 0, 2, leaves, big),
                     lambda: f.fetch_pieces(sha1, size, root, 65536, 0, 3)):
            t0 = time.monotonic()
            with pytest.raises(SourceUnavailable) as err:
                read()
            assert time.monotonic() - t0 < QUICK, time.monotonic() - t0
            assert WORDS in str(err.value) and "within" not in str(err.value), err.value


def test_a_relay_down_beside_it_is_still_retried(relay: RelayProc, data: Path,
                                                 tmp_path: Path) -> None:
    """A relay that is down may come back: the rounds go on for the retry window, and the
    message names both failures and the real time tried (not the 30 s deadline)."""
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    prv_file = pointer(tmp_path, data / "f.bin")
    t0 = time.monotonic()
    got = run_kbfs("cat", str(prv_file), "--length", "10", "--no-local", "--cache-dir",
                   str(tmp_path / "cache"), "--relay", relay.url.replace("127.0.0.1", "localhost"),
                   "--relay", down, timeout=60)
    took = time.monotonic() - t0
    assert got.returncode != 0
    line = got.stderr.strip()
    assert took >= RETRY_WINDOW * 0.7, took
    assert WORDS in line and "connection refused" in line, line
    assert "of retries" in line and "within the read's" not in line, line

"""`kbfs relay --certfile/--keyfile`: HTTPS and WSS by the relay itself, with a private CA
made by `openssl` for this module; shares and readers verify the certificate (system
store + SSL_CERT_FILE / REQUESTS_CA_BUNDLE) and refuse a wrong host, an unknown CA or
an expired certificate with one line saying what to do.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deployutil import CA_VARS, Pki, make_pki, start_tls_relay
from tests.netutil import run_kbfs, start_share

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CA_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "f.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 777))
    return d


def pointer(tmp: Path, path: Path) -> Path:
    out = tmp / (path.name + ".prv")
    made = run_kbfs("prv", "create", str(path), "-o", str(out))
    assert made.returncode == 0, made.stderr
    return out


def kbfs_bytes(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "kbfs", *args], capture_output=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("ca_var", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_share_and_readers_over_the_relays_own_tls(pki: Pki, data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   ca_var: str) -> None:
    monkeypatch.setenv(ca_var, str(pki.ca))
    relay = start_tls_relay(tmp_path, pki.good)
    try:
        # (not waited for through the relay's listing: this test's urllib reads only
        # SSL_CERT_FILE, and the share must do with REQUESTS_CA_BUNDLE alone)
        share = start_share(data, relay.url, tmp_path, wait=False)
        try:
            share.proc.wait_line(f"kbfs share connected to {relay.url}")
            share.proc.wait_line("kbfs share indexed")
            want = (data / "f.bin").read_bytes()
            prv = pointer(tmp_path, data / "f.bin")
            out = tmp_path / "out.bin"
            got = run_kbfs("download", str(prv), "--relay", relay.url, "--no-local",
                           "--cache-dir", str(tmp_path / "c1"), "-o", str(out), timeout=60)
            assert got.returncode == 0, got.stderr
            assert out.read_bytes() == want
            cat = kbfs_bytes("cat", f"sha1://{hashlib.sha1(want).hexdigest()}", "--relay",
                             relay.url, "--no-local", "--cache-dir", str(tmp_path / "c2"),
                             "--offset", "1048570", "--length", "20")
            assert cat.returncode == 0, cat.stderr
            assert cat.stdout == want[1048570:1048590]
            listed = run_kbfs("ls", relay.url)
            assert listed.returncode == 0 and share.id in listed.stdout, listed.stderr
        finally:
            share.stop()
    finally:
        relay.stop()


BAD = {
    # certificate, URL host, CA trusted?, words the one line must hold
    "wrong-host": ("wrong_host", "127.0.0.1", True, "not for this host name"),
    "unknown-ca": ("unknown_ca", "127.0.0.1", True, "for a private CA set SSL_CERT_FILE"),
    "untrusted-private-ca": ("good", "localhost", False, "for a private CA set SSL_CERT_FILE"),
    "expired": ("expired", "localhost", True, "must renew it"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_certificate_is_refused_with_one_line(pki: Pki, data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    case: str) -> None:
    cert_name, host, trusted, words = BAD[case]
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    relay = start_tls_relay(tmp_path, getattr(pki, cert_name))
    url = relay.url.replace("127.0.0.1", host)
    try:
        share = start_share(data, url, tmp_path, wait=False)
        try:
            line = share.proc.wait_line(r"kbfs share: relay \S+ unreachable .*", timeout=20).group(0)
            assert "TLS certificate refused" in line and words in line, line
        finally:
            share.stop()
        prv = pointer(tmp_path, data / "f.bin")
        got = run_kbfs("download", str(prv), "--relay", url, "--no-local",
                       "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "o.bin"),
                       timeout=60)
        assert got.returncode != 0
        assert not (tmp_path / "o.bin").exists()
        lines = got.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in got.stderr, got.stderr
        assert "TLS certificate refused" in lines[0] and words in lines[0], lines[0]
        listed = run_kbfs("ls", url)
        assert listed.returncode != 0 and words in listed.stderr, listed.stderr
    finally:
        relay.stop()


def test_a_bad_certificate_pair_stops_the_relay_at_start(pki: Pki, tmp_path: Path) -> None:
    cases = [
        (["--certfile", str(pki.good[0]), "--keyfile", str(pki.wrong_host[1])], "not a PEM"),
        (["--certfile", str(tmp_path / "none.pem"), "--keyfile", str(pki.good[1])],
         "no such file"),
        (["--certfile", str(pki.good[0])], "go together"),
        (["--certfile", str(pki.good[1]), "--keyfile", str(pki.good[1])], "not a PEM"),
    ]
    for args, words in cases:
        got = run_kbfs("relay", "--host", "127.0.0.1", "--port", "0", *args, timeout=20)
        assert got.returncode != 0, args
        assert words in got.stderr and "Traceback" not in got.stderr, (args, got.stderr)
        assert len(got.stderr.strip().splitlines()) == 1, got.stderr

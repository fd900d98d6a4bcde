"""Helpers for the deployment tests (TLS relay, nginx in front, forward proxies).

`make_pki(DIR)` makes, with the `openssl` command, one private CA and the certificates
the tests need: `good` (localhost and 127.0.0.1, valid), `wrong_host` (valid, for
another name only), `expired` (signed by the CA, its validity over) and `unknown_ca`
(self-signed, valid, for localhost). `start_tls_relay` starts `kbfs relay` with a
certificate; `free_port` finds a loopback port for servers that cannot bind port 0 and
report it (nginx, tinyproxy).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.netutil import RelayProc, _spawn

OPENSSL = shutil.which("openssl") or "openssl"
# What a test clears so that only the CA it names (or none) is trusted and no proxy applies.
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY",
           "https_proxy", "HTTP_PROXY", "http_proxy")


@dataclass
class Pki:
    dir: Path
    ca: Path          # the CA's certificate (what SSL_CERT_FILE names)
    good: tuple[Path, Path]  # (certfile, keyfile)
    wrong_host: tuple[Path, Path]
    expired: tuple[Path, Path]
    unknown_ca: tuple[Path, Path]


def _ssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ext(d: Path, name: str, san: str) -> Path:
    path = d / f"{name}.ext"
    path.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    return path


def make_pki(d: Path) -> Pki:
    """One CA and four server certificates under D (EC P-256 keys: fast to make)."""
    d.mkdir(parents=True, exist_ok=True)
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _ssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
         "-subj", "/CN=kbfs test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)

    def signed(name: str, cn: str, san: str) -> tuple[Path, Path]:
        _ssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
             cwd=d)
        _ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", str(_ext(d, name, san)), cwd=d)
        return d / f"{name}.pem", d / f"{name}.key"

    good = signed("good", "localhost", "DNS:localhost,IP:127.0.0.1")
    wrong = signed("wrong", "wrong.example", "DNS:wrong.example")
    # Expired: `openssl ca` is the one command of OpenSSL 3.0 that takes explicit dates.
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca=c\n[c]\ndatabase=index.txt\nserial=serial\nnew_certs_dir=.\n"
        "default_md=sha256\npolicy=p\ncopy_extensions=none\nunique_subject=no\n"
        "[p]\ncommonName=supplied\n")
    _ssl("req", *key, "-keyout", "expired.key", "-out", "expired.csr", "-subj", "/CN=localhost",
         cwd=d)
    _ssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
         "-in", "expired.csr", "-out", "expired.pem", "-startdate", "20200101000000Z",
         "-enddate", "20200102000000Z", "-extfile", str(_ext(d, "expired", "DNS:localhost,IP:127.0.0.1")),
         "-notext", cwd=d)
    _ssl("req", "-x509", *key, "-keyout", "self.key", "-out", "self.pem", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", cwd=d)
    return Pki(d, d / "ca.pem", good, wrong, (d / "expired.pem", d / "expired.key"),
               (d / "self.pem", d / "self.key"))


def start_tls_relay(tmp: Path, cert: tuple[Path, Path], *extra: str) -> RelayProc:
    """`kbfs relay --certfile C --keyfile K` on 127.0.0.1:0; its URL is https://."""
    proc = _spawn(["relay", "--host", "127.0.0.1", "--port", "0", "--certfile", str(cert[0]),
                   "--keyfile", str(cert[1]), *extra], tmp, "relay")
    try:
        m = proc.wait_line(r"kbfs relay listening on (https://\S+)")
    except BaseException:
        proc.kill()
        raise
    return RelayProc(m.group(1), proc)


def free_port() -> int:
    """A loopback TCP port free right now (for servers told their port in a config)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Wait until something accepts on 127.0.0.1:PORT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def env_with(**values: str | None) -> dict[str, str]:
    """os.environ with VALUES set (None: removed); proxies cleared unless given."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy",
                                "ssl_cert_file", "requests_ca_bundle", "curl_ca_bundle")}
    for k, v in values.items():
        if v is not None:
            env[k] = v
    return env

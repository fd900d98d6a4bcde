"""Mirror parties for tests: nginx serving an exported folder, moto's S3 server, a lying mirror.

- `Nginx(folder)`: Debian's nginx (nginx-light) serving FOLDER as it is on 127.0.0.1 (a
  free port), its access log recording each request's Range and Authorization headers
  (`requests()`), stopped by pid.
- `MotoS3()`: `python -m moto.server` on 127.0.0.1 port 0 (an S3-compatible server from
  PyPI, moto[server]; no real S3 server installs from Debian), with test credentials in
  `env`, stopped by pid.
- `LyingMirror(folder, mode)`: a threaded HTTP server serving the exported FOLDER with Range
  support, misbehaving on purpose (`MODES`); it records every request's headers.

Test support only: no limits, loopback only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

MODES = (
    "ok",           # honest
    "wrong_bytes",  # data: a byte of every 4 KiB flipped
    "wrong_nodes",  # outboards: a byte of every node flipped
    "short",        # announces the full length, sends half, closes
    "missing",      # 404 to everything
    "no_range",     # ignores Range: 200 with the whole object
    "huge",         # 200 announcing 2^40 bytes, then zeros until the reader goes
    "forbidden",    # 403 to everything (what S3 says to an anonymous reader)
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class Nginx:
    """nginx serving FOLDER at http://127.0.0.1:PORT (GET + Range, as any static host)."""

    def __init__(self, folder: Path, tmp: Path) -> None:
        self.port = _free_port()
        self.dir = tmp / f"nginx-{self.port}"
        self.dir.mkdir(parents=True)
        self.log = self.dir / "access.log"
        conf = self.dir / "nginx.conf"
        temps = " ".join(f"{k}_temp_path {self.dir}/{k};" for k in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf.write_text(f"""daemon off;
master_process off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 128; }}
http {{
  log_format kbfs '$request_method $uri range=[$http_range] auth=[$http_authorization] $status';
  access_log {self.log} kbfs;
  {temps}
  server {{ listen 127.0.0.1:{self.port}; root {folder}; }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(self.dir), "-e",
                                      str(self.dir / "error.log")], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoS3:
    """moto's S3 server on loopback; `env` holds the endpoint and test credentials."""

    def __init__(self, tmp: Path) -> None:
        self.err = tmp / "moto.err"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                      "-p", "0"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.err, "w"))  # noqa: SIM115
        end = time.monotonic() + 30
        m = None
        while time.monotonic() < end and m is None:
            m = re.search(r"Running on http://127\.0\.0\.1:(\d+)", self.err.read_text())
            time.sleep(0.1)
        if m is None:
            self.stop()
            raise RuntimeError("moto.server did not start: " + self.err.read_text()[-500:])
        self.url = f"http://127.0.0.1:{m.group(1)}"
        self.env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url}

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test",
                                     region_name="us-east-1").client("s3", endpoint_url=self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> MotoS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        with srv.lock:
            srv.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        mode = srv.mode
        path = srv.folder / self.path.lstrip("/").split("?")[0]
        if mode in ("missing", "forbidden") or ".." in self.path or not path.is_file():
            self._plain(403 if mode == "forbidden" else 404)
            return
        data = path.read_bytes()
        if mode == "huge":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            try:
                for _ in range(4096):  # 4 GiB at most, the reader should go long before
                    self.wfile.write(b"\0" * (1 << 20))
            except OSError:
                pass
            self.close_connection = True
            return
        if (mode == "wrong_bytes" and self.path.startswith("/data/")) or (
                mode == "wrong_nodes" and self.path.startswith("/outboard/")):
            step = 4096 if mode == "wrong_bytes" else 32  # a byte of every 4 KiB / every node
            flipped = bytearray(data)
            flipped[0::step] = bytes(c ^ 1 for c in flipped[0::step])
            data = bytes(flipped)
        m = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if m is None or mode == "no_range":
            body, status, extra = data, 200, {}
        else:
            a = int(m.group(1))
            b = min(int(m.group(2)) + 1 if m.group(2) else len(data), len(data))
            body, status = data[a:b], 206
            extra = {"Content-Range": f"bytes {a}-{b - 1}/{len(data)}"}
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if mode == "short":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def _plain(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folder = folder
        self.mode = mode
        self.lock = threading.Lock()
        self.seen: list[dict[str, str]] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a reader hanging up on a lie is expected


class LyingMirror:
    """A mirror of FOLDER that behaves as MODE says (see `MODES`)."""

    def __init__(self, folder: Path, mode: str = "ok") -> None:
        assert mode in MODES, mode
        self.server = _Server(folder, mode)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def seen(self) -> list[dict[str, str]]:
        with self.server.lock:
            return list(self.server.seen)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> LyingMirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

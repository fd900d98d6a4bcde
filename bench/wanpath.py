"""The wide-area paths of the WAN benchmark: kbfs's reader -[A]- relay -[B]- share, and the same
two links chained in front of nginx for the reference tools.

    with kbfs_wan(data_dir, work, WAN_A, WAN_B) as kb:     # real `kbfs relay` + `kbfs share`
        kb.reader_url    # http://127.0.0.1:PORT: the relay as a reader sees it, through link A
        kb.share_id
    with nginx_wan(data_dir, work, WAN_A, WAN_B) as url:   # nginx where the share is
        url              # http://127.0.0.1:PORT/: nginx reached through link A, then link B

kbfs: the share dials the relay, so both links sit in front of the relay (linkemu.relay_path):
the reader dials link A, the share dials link B. A share signs the host it connects to and the
relay admits only its own hosts, so the relay is started with `--public-url` at link B's
address; link B needs the relay's port first, so that one port is picked in advance (bind to
port 0, close, reuse; retried on the rare collision). Everything else binds port 0.

nginx: our own configuration (foreground, no daemon, every temp path under WORK), serving
DATA_DIR with autoindex (rclone's http remote lists folders from it), behind `linkemu.chain`:
client -> link A -> link B -> nginx, so its bytes cross the same two links in the same order
as a share's do (B then A), with each link's own handshake, as a chain of TCP proxies has.

Every process is started and stopped by pid (SIGTERM, then SIGKILL), also when a start fails.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import netutil  # noqa: E402
from linkemu import chain, relay_path  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class KbfsWan:
    reader_url: str  # the relay through link A
    share_url: str  # the relay through link B (what the share dials)
    relay_url: str  # the relay itself, no link (setup only: never for a measured read)
    share_id: str
    relay: netutil.RelayProc
    share: netutil.ShareProc


@contextlib.contextmanager
def kbfs_wan(data: Path, work: Path, reader: dict[str, Any], share: dict[str, Any],
             attempts: int = 3) -> Iterator[KbfsWan]:
    """A relay and a share of DATA (state in WORK) with link A before the reader, B before the share."""
    last: Exception | None = None
    for _ in range(attempts):
        relay_port = free_port()
        with relay_path(relay_port, reader=reader, share=share) as path:
            share_url = f"http://127.0.0.1:{path.share_port}"
            try:
                relay = netutil.start_relay(work, "--public-url", share_url, port=relay_port)
            except netutil.ProcessFailed as exc:  # the port was taken meanwhile: another one
                last = exc
                continue
            try:
                sh = netutil.start_share(data, share_url, work, state_dir=work / "share-state")
                try:
                    yield KbfsWan(f"http://127.0.0.1:{path.reader_port}", share_url, relay.url, sh.id,
                                  relay, sh)
                finally:
                    sh.stop()
            finally:
                relay.stop()
            return
    raise RuntimeError(f"no relay started in {attempts} attempts: {last}")


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {base}/body;
    proxy_temp_path {base}/proxy;
    fastcgi_temp_path {base}/fastcgi;
    uwsgi_temp_path {base}/uwsgi;
    scgi_temp_path {base}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex on;
    }}
}}
"""


@contextlib.contextmanager
def nginx_wan(data: Path, work: Path, *links: dict[str, Any], attempts: int = 3) -> Iterator[str]:
    """nginx serving DATA behind LINKS (client side first); yields its URL through them.
    DATA and its parents must be readable by nginx's unprivileged workers."""
    base = work / "nginx"
    base.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        port = free_port()
        conf = base / "nginx.conf"
        conf.write_text(NGINX_CONF.format(base=base, port=port, root=data))
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(base)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(base / "stderr", "w"))  # noqa: SIM115
        try:
            if not _wait_http(f"http://127.0.0.1:{port}/", proc):
                continue
            with chain(port, *links) as hops:
                yield f"http://127.0.0.1:{hops[0].port}/"
            return
        finally:
            stop_proc(proc)
    raise RuntimeError(f"nginx did not start: {(base / 'error.log').read_text(errors='replace')[-1000:]}")


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_proc(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM by pid, SIGKILL if it lingers (nginx's master takes its workers with it)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

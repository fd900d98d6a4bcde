"""Start real `kbfs relay` / `kbfs share` processes on 127.0.0.1 for end-to-end tests.

    relay = start_relay(tmp_path)                      # RelayProc(url, pid, stop())
    share = start_share(data_dir, relay.url, tmp_path, listen=True)
    ...                                                # ShareProc(id, direct_url, pid, stop())
    share.stop(); relay.stop()

Every process binds port 0 and is ready when these return: the relay once it printed
`kbfs relay listening on URL`, a share once the relay lists it with its first scan done
(or, with `relay_url=None`, once its --listen server answers). Output goes to files in
TMP (`relay-N.out`, `share-N.err`, ...) for post-mortems. `stop()` sends SIGTERM to the
process's own pid, waits, and falls back to SIGKILL; `kill()` is SIGKILL at once (for
fault tests). Use the fixtures' finalizers (or `with`) so processes die on failures too:

    @pytest.fixture
    def relay(tmp_path):
        proc = start_relay(tmp_path)
        yield proc
        proc.stop()
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

PYTHON = sys.executable
READY_TIMEOUT = 30.0
_counter = itertools.count(1)


class ProcessFailed(RuntimeError):
    """A relay/share process exited or never became ready; the message has its stderr."""


@dataclass
class _Proc:
    popen: subprocess.Popen[str]
    out_path: Path
    err_path: Path
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        with open(self.out_path, "a", encoding="utf-8") as log:
            for line in self.popen.stdout:
                log.write(line)
                log.flush()
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        """Wait for a stdout line matching the regex PATTERN; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and seen == len(self.lines)):
                    break
                self._cond.wait(min(left, 0.2))
        raise ProcessFailed(f"no line matching {pattern!r} from pid {self.pid}; "
                            f"stdout: {self.lines[-10:]}; stderr: {self.stderr()[-2000:]}")

    def stderr(self) -> str:
        try:
            return self.err_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM this process (by pid), wait, SIGKILL if it lingers; returns its exit code."""
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.wait()

    def kill(self) -> None:
        """SIGKILL this process by pid and reap it."""
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait()


def _spawn(args: list[str], tmp: Path, tag: str) -> _Proc:
    n = next(_counter)
    tmp.mkdir(parents=True, exist_ok=True)
    out_path, err_path = tmp / f"{tag}-{n}.out", tmp / f"{tag}-{n}.err"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    popen = subprocess.Popen(
        [PYTHON, "-m", "kbfs", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=open(err_path, "w", encoding="utf-8"), text=True, env=env,  # noqa: SIM115
    )
    proc = _Proc(popen, out_path, err_path)
    threading.Thread(target=proc._drain, daemon=True).start()
    return proc


def get_json(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> Any:
    """GET URL and decode its JSON body (stdlib only, so helpers need no requests)."""
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class _Running:
    """What every started process offers: its pid, stop (SIGTERM, then SIGKILL), kill -9,
    and use as a context manager that stops it."""

    proc: _Proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int | None:
        return self.proc.stop()

    def kill(self) -> None:
        self.proc.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RelayProc(_Running):
    """A running `kbfs relay`: its base URL, pid and the process handle."""

    url: str
    proc: _Proc

    def shares(self) -> list[dict[str, Any]]:
        return get_json(self.url + "/api/shares")


@dataclass
class ShareProc(_Running):
    """A running `kbfs share`: its id, --listen URL (or ''), pid and process handle."""

    id: str
    direct_url: str
    proc: _Proc
    state_dir: Path
    token: str = ""  # a reader token, for a --private share


def start_relay(tmp_path: Path | str, *extra: str, port: int = 0) -> RelayProc:
    """Start `kbfs relay --host 127.0.0.1 --port PORT` and wait for its URL line."""
    tmp = Path(tmp_path)
    proc = _spawn(["relay", "--host", "127.0.0.1", "--port", str(port), *extra], tmp, "relay")
    try:
        m = proc.wait_line(r"kbfs relay listening on (http://\S+)")
    except BaseException:
        proc.kill()
        raise
    return RelayProc(m.group(1), proc)


def wait_share_ready(relay_url: str, share_id: str, timeout: float = READY_TIMEOUT,
                     files: int | None = None, token: str = "") -> dict[str, Any]:
    """Poll RELAY_URL/api/shares until SHARE_ID is listed with its scan done (and, if
    given, FILES files); return its entry. A private share is listed only to a request
    with its TOKEN."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = get_json(relay_url + "/api/shares", timeout=2, headers=headers)
            for entry in last:
                if entry["id"] == share_id and not entry.get("scanning") and (
                        files is None or entry["files"] == files):
                    return entry
        except OSError:
            pass
        time.sleep(0.05)
    raise ProcessFailed(f"share {share_id} not ready at {relay_url} within {timeout}s: {last}")


def start_share(directory: Path | str, relay_url: str | None, tmp_path: Path | str, *extra: str,
                listen: bool = False, state_dir: Path | str | None = None,
                wait: bool = True) -> ShareProc:
    """Start `kbfs share DIRECTORY --relay RELAY_URL` (state in TMP unless STATE_DIR).

    With LISTEN it also serves directly on 127.0.0.1:0 (`direct_url`). With WAIT (the
    default) it returns once the relay lists the share with its first scan done. A
    --private share gets a reader token first (`token`).
    """
    tmp = Path(tmp_path)
    state = Path(state_dir) if state_dir else tmp / f"share-state-{next(_counter)}"
    args = ["share", str(directory), "--state-dir", str(state)]
    if relay_url:
        args += ["--relay", relay_url]
    if listen:
        args += ["--listen", "127.0.0.1:0"]
    token = ""
    if "--private" in extra:
        made = run_kbfs("share", "token", str(directory), "--state-dir", str(state))
        if made.returncode != 0:
            raise ProcessFailed(f"kbfs share token failed: {made.stderr[-2000:]}")
        token = made.stdout.strip()
    proc = _spawn([*args, *extra], tmp, "share")
    try:
        share_id = proc.wait_line(r"kbfs share id ([a-z2-7]+)").group(1)
        direct = proc.wait_line(r"kbfs share listening on (http://\S+)").group(1) if listen else ""
        if wait and relay_url:
            wait_share_ready(relay_url, share_id, token=token)
        elif wait:
            proc.wait_line(r"kbfs share indexed")
    except BaseException:
        proc.kill()
        raise
    return ShareProc(share_id, direct, proc, state, token)


def run_kbfs(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run one short `kbfs ...` command to completion (captured output)."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([PYTHON, "-m", "kbfs", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)

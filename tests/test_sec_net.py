"""Attacks on the relay and the share (issue 14), each against real processes: a real
`kbfs relay`, real `kbfs share` processes, and hostile parties from hostileutil (a fake
share speaking the control protocol with its own key, a rogue relay).

- a fake public share listing a private file's SHA-1 never sees the reader's token;
- a rogue relay passing on the real relay's challenge does not get a share admitted;
- nothing about a private share (size, ETag, name, existence) is answered without its token;
- a silent share (lists content, never serves it) does not stall reads;
- listings carry share-relative paths; share names and listen URLs are checked at hello;
- a cached yes ends with the token's expiry; tokens expire by default and can be revoked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import netutil
import pytest
import requests
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hostileutil import closed_within, control_socket, fake_share, hello, rogue_relay

from kbfs import prv, share


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _data(tmp: Path, name: str = "data", size: int = 300_000) -> tuple[Path, bytes]:
    data = tmp / name
    data.mkdir()
    body = os.urandom(size)
    (data / "f.bin").write_bytes(body)
    return data, body


def _entry(path: str, body: bytes) -> list[Any]:
    """A catalogue entry for BODY as a fake share would list it."""
    digest = hashlib.sha1(body).hexdigest()
    return [path, digest, len(body), 1.0, "head1000-" + hashlib.sha1(body[:1000]).hexdigest(),
            "0" * 64]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def relay(tmp_path: Path) -> Any:
    proc = netutil.start_relay(tmp_path / "logs")
    yield proc
    proc.stop()


# ---------------------------------------------------------------- 3: tokens go to their share


def test_token_goes_only_to_the_share_that_issued_it(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path)
    sha = hashlib.sha1(body).hexdigest()
    seen_public: list[str] = []
    seen_private: list[str] = []
    with netutil.start_share(data, relay.url, tmp_path, "--private",
                             state_dir=tmp_path / "pstate") as priv:
        token = priv.token
        secret_part = token.rpartition(".")[2]

        def reads() -> None:
            h = _auth(token)
            r = requests.get(f"{relay.url}/sha1/{sha}", headers={**h, "Range": "bytes=7-99"},
                             timeout=20)
            assert r.status_code == 206 and r.content == body[7:100]
            assert requests.head(f"{relay.url}/sha1/{sha}", headers=h, timeout=20).ok
            assert requests.get(f"{relay.url}/tree/{sha}", headers=h, timeout=20).ok
            found = requests.get(f"{relay.url}/api/find/{sha}", headers=h, timeout=20).json()
            assert [s["id"] for s in found["shares"]][-1] == priv.id
            listing = requests.get(f"{relay.url}/s/{priv.id}/list/", headers=h, timeout=20)
            assert listing.json()["files"][0]["name"] == "f.bin"
            r = requests.get(f"{relay.url}/s/{priv.id}/file/f.bin", headers=h, timeout=20)
            assert r.content == body
            ids = [s["id"] for s in requests.get(f"{relay.url}/api/shares", headers=h,
                                                 timeout=20).json()]
            assert priv.id in ids

        async def main() -> None:
            # One public and one private fake share, both listing the private file's SHA-1.
            async with fake_share(relay.url, [_entry("copy.bin", body)]) as pub, \
                    fake_share(relay.url, [_entry("copy.bin", body)], private=True) as fpriv:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pub.record, seen_public, "reject")
                    nursery.start_soon(fpriv.record, seen_private, "reject")
                    await trio.sleep(0.3)
                    await trio.to_thread.run_sync(reads)
                    nursery.cancel_scope.cancel()

        trio.run(main)
    gets = [json.loads(m) for m in seen_public if json.loads(m)["type"] == "get"]
    assert gets, "the fake public share was never asked: the test proves nothing"
    assert all(g["auth"] is None for g in gets), gets
    for text in seen_public + seen_private:
        assert secret_part not in text and token not in text, text[:300]


# ---------------------------------------------------------------- 4: admission is not relayable


def test_rogue_relay_cannot_get_a_share_admitted(relay: Any, tmp_path: Path) -> None:
    data, _ = _data(tmp_path)
    results: dict[str, Any] = {}

    async def main() -> None:
        async with rogue_relay(relay.url) as rogue:
            sh = await trio.to_thread.run_sync(lambda: netutil.start_share(
                data, rogue.url, tmp_path, wait=False))
            try:
                # The share retries with backoff (0.5 s, 1 s, 2 s...): a few attempts.
                with trio.move_on_after(6):
                    while len(rogue.answers) < 3 and not rogue.admitted.is_set():
                        await trio.sleep(0.1)
                await trio.sleep(0.5)
                results["answers"] = list(rogue.answers)
                results["listed"] = [s["id"] for s in await trio.to_thread.run_sync(
                    relay.shares)]
                results["id"] = sh.id
                results["stdout"] = list(sh.proc.lines)
            finally:
                await trio.to_thread.run_sync(sh.stop)

    trio.run(main)
    answers = results["answers"]
    assert answers and all(a["type"] == "refused" for a in answers), answers
    assert "not this relay" in answers[0]["message"]
    assert results["id"] not in results["listed"]
    refusals = [line for line in results["stdout"] if "refused by" in line]
    assert len(refusals) == 1 and "--public-url" in refusals[0], results["stdout"]
    assert len(answers) >= 2  # retried, but said once


def test_relay_identity_options(tmp_path: Path) -> None:
    # A wildcard address without --public-url: one clear line, no start.
    bad = netutil.run_kbfs("relay", "--host", "0.0.0.0", "--port", "0")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "--public-url" in bad.stderr
    bad = netutil.run_kbfs("relay", "--host", "127.0.0.1", "--port", "0", "--public-url", "ftp:x")
    assert bad.returncode == 1 and "--public-url" in bad.stderr and "Traceback" not in bad.stderr
    # With --public-url, shares are admitted only when they connected to that URL.
    port = _free_port()
    data, _ = _data(tmp_path)
    with netutil.start_relay(tmp_path / "logs", "--public-url", f"http://localhost:{port}",
                             port=port) as r:
        assert r.url == f"http://127.0.0.1:{port}"
        with netutil.start_share(data, f"http://localhost:{port}", tmp_path) as ok:
            assert [s["id"] for s in r.shares()] == [ok.id]
        other = netutil.start_share(data, r.url, tmp_path, wait=False)
        try:
            other.proc.wait_line(r"refused by .*not this relay", timeout=15)
            assert r.shares() == []
        finally:
            other.stop()


# ---------------------------------------------------------------- 6: private metadata


def test_nothing_about_a_private_share_without_its_token(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path, "secretlab")
    sha = hashlib.sha1(body).hexdigest()
    absent = "0123456789" * 4
    with netutil.start_share(data, relay.url, tmp_path, "--private", "--name", "secretlab",
                             state_dir=tmp_path / "pstate") as priv:
        base, sid = relay.url, priv.id
        other_token = share.issue_token(str(tmp_path / "other"), "a" * 32)
        for headers in ({}, _auth(other_token), {"Authorization": "Bearer nonsense"}):
            # by path: the same answer whether or not the file exists
            for path in ("f.bin", "nothere.bin"):
                for method, extra in (("HEAD", {}), ("GET", {"If-None-Match": f'"{sha}"'}),
                                      ("GET", {"Range": "bytes=0-0"})):
                    r = requests.request(method, f"{base}/s/{sid}/file/{path}",
                                         headers={**headers, **extra}, timeout=10)
                    assert r.status_code == 401, (method, path, extra, r.status_code)
                    assert sha not in str(r.headers) and r.headers.get("content-range") is None
            # by sha1: content only a private share holds is content nobody holds
            for kind in ("sha1", "tree"):
                for method, extra in (("HEAD", {}), ("GET", {"If-None-Match": f'"{sha}"'}),
                                      ("GET", {"If-None-Match": f'"{sha}-tree"'})):
                    r = requests.request(method, f"{base}/{kind}/{sha}",
                                         headers={**headers, **extra}, timeout=10)
                    n = requests.request(method, f"{base}/{kind}/{absent}",
                                         headers={**headers, **extra}, timeout=10)
                    assert r.status_code == n.status_code == 404, (kind, method, extra)
                    assert sha not in str(r.headers) and str(len(body)) not in str(r.headers)
            assert not requests.get(f"{base}/api/find/{sha}", headers=headers,
                                    timeout=10).json()["found"]
            listed = requests.get(f"{base}/api/shares", headers=headers, timeout=10).text
            assert sid not in listed and "secretlab" not in listed
            assert requests.get(f"{base}/api/health", timeout=10).json()["shares"] == 0
        # and with the token, all of it
        h = _auth(priv.token)
        r = requests.head(f"{base}/s/{sid}/file/f.bin", headers=h, timeout=10)
        assert r.status_code == 200 and r.headers["content-length"] == str(len(body))
        assert requests.get(f"{base}/sha1/{sha}", headers={**h, "If-None-Match": f'"{sha}"'},
                            timeout=10).status_code == 304
        assert requests.head(f"{base}/tree/{sha}", headers=h, timeout=10).status_code == 200
        listed = requests.get(f"{base}/api/shares", headers=h, timeout=10).json()
        assert [s["name"] for s in listed] == ["secretlab"]


# ---------------------------------------------------------------- 9: silent shares


def test_a_silent_share_does_not_stall_reads(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path, size=3 * (1 << 20) + 5)
    (data / "big.bin").write_bytes(os.urandom(64 << 20))
    sha = hashlib.sha1(body).hexdigest()
    big_sha = prv.digest_file(data / "big.bin").sha1
    seen: list[str] = []
    times: list[float] = []
    with netutil.start_share(data, relay.url, tmp_path) as real:

        def reads() -> None:
            # A client that asks for a big file and never reads keeps one request of the
            # real share in progress: the least-busy order then puts the silent share first.
            stalled = socket.create_connection(("127.0.0.1", int(relay.url.rsplit(":", 1)[1])))
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.sendall(f"GET /sha1/{big_sha} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            time.sleep(0.5)
            try:
                for i in range(6):
                    t0 = time.monotonic()
                    r = requests.get(f"{relay.url}/sha1/{sha}",
                                     headers={"Range": f"bytes={i * 1000}-{i * 1000 + 99999}"},
                                     timeout=30)
                    times.append(time.monotonic() - t0)
                    assert r.status_code == 206
                    assert r.content == body[i * 1000:i * 1000 + 100000]
            finally:
                stalled.close()

        async def main() -> None:
            async with fake_share(relay.url, [_entry("same.bin", body)]) as silent:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(silent.record, seen, "silent")
                    await trio.sleep(0.3)
                    await trio.to_thread.run_sync(reads)
                    nursery.cancel_scope.cancel()

        trio.run(main)
        assert real.proc.alive()
    assert all(t < 4.0 for t in times), times
    assert sum(times[1:]) < 3.0, times  # the share that answers is asked first from then on
    kinds = [json.loads(m)["type"] for m in seen]
    assert 1 <= kinds.count("get") <= 2, kinds  # asked, lost, then left alone
    assert "cancel" in kinds


# ---------------------------------------------------------------- 12: paths, names, URLs


def test_listings_carry_share_relative_paths(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path, "labfolder")
    (data / "sub").mkdir()
    (data / "sub" / "g.bin").write_bytes(b"g" * 1000)
    with netutil.start_share(data, relay.url, tmp_path) as sh:
        top = requests.get(f"{relay.url}/s/{sh.id}/list/", timeout=10)
        sub = requests.get(f"{relay.url}/s/{sh.id}/list/sub", timeout=10)
        found = requests.get(f"{relay.url}/api/find/{hashlib.sha1(body).hexdigest()}",
                             timeout=10)
        shares = requests.get(f"{relay.url}/api/shares", timeout=10)
    for answer in (top, sub, found, shares):
        assert str(tmp_path) not in answer.text, answer.text[:500]
    assert top.json()["files"][0]["prv"]["original_path"] == "f.bin"
    assert sub.json()["files"][0]["prv"]["original_path"] == "sub/g.bin"


def test_share_names_and_listen_urls_are_checked_at_hello(relay: Any, tmp_path: Path) -> None:
    forged = "kbfs.relay WARNING share FORGED-LINE connected"
    refused_names = [f"x\n{forged}", "a\rb", "<script>alert(1)</script>", 'x" onmouseover="y',
                     "tab\there", "\u202eevil", "n" * 101]
    refused_urls = ["http://user:pw@127.0.0.1:9/", "http://127.0.0.1:9/?q=1",
                    "http://127.0.0.1:9/#frag", "javascript:alert(1)", "http://",
                    "http://127.0.0.1:9/" + "a" * 600, "http://127.0.0.1:9/x\ny",
                    "http://127.0.0.1:99999/"]
    admitted: list[str] = []

    async def main() -> None:
        for fields in ([{"name": n} for n in refused_names]
                       + [{"listen_url": u} for u in refused_urls]):
            async with control_socket(relay.url) as ws:
                challenge = json.loads(await ws.get_message())
                await ws.send_message(json.dumps(hello(relay.url, challenge,
                                                       Ed25519PrivateKey.generate(), **fields)))
                answer = json.loads(await ws.get_message())
                assert answer["type"] == "refused", (fields, answer)
                assert await closed_within(ws, 5)
        async with fake_share(relay.url, name="Lab 42 (été) ok",
                              listen_url="https://lab.example.org:8443/kbfs/") as fs:
            listed = await trio.to_thread.run_sync(relay.shares)
            admitted.extend(s["name"] for s in listed if s["id"] == fs.id)

    trio.run(main)
    assert admitted == ["Lab 42 (été) ok"]
    log = relay.proc.stderr()
    assert not any(line.startswith(forged) or line.startswith("kbfs.relay WARNING share FORGED")
                   for line in log.splitlines()), log[-2000:]
    assert "FORGED-LINE" in log  # it was logged, escaped, on the refusal's own line
    assert not re.search(r"[\r\x1b]", log)
    # The share's own options: one clear line each.
    data, _ = _data(tmp_path)
    for args in (["--name", "a\nb"], ["--name", "<b>"], ["--public-url", "http://u@h/"]):
        result = netutil.run_kbfs("share", str(data), "--relay", relay.url, "--state-dir",
                                  str(tmp_path / "s"), *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, args
        assert result.stderr.strip().count("\n") == 0, (args, result.stderr)


# ---------------------------------------------------------------- 13: expiry and revocation


def _payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_token_expiry_bounds_the_cached_yes(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path)
    state = tmp_path / "pstate"
    sha = hashlib.sha1(body).hexdigest()
    with netutil.start_share(data, relay.url, tmp_path, "--private", state_dir=state) as priv:
        # default: 30 days; --expires 0: never
        default = _payload(priv.token)["e"]
        assert abs(default - (time.time() + 30 * 86400)) < 120
        never = netutil.run_kbfs("share", "token", str(data), "--state-dir", str(state),
                                 "--expires", "0")
        assert never.returncode == 0 and _payload(never.stdout.strip())["e"] == 0
        made = netutil.run_kbfs("share", "token", str(data), "--state-dir", str(state),
                                "--expires", str(5 / 86400))
        token = made.stdout.strip()
        ends = _payload(token)["e"]
        lst = f"{relay.url}/s/{priv.id}/list/"
        assert requests.get(lst, headers=_auth(token), timeout=10).status_code == 200  # cached
        time.sleep(max(0.0, ends - time.time()) + 0.5)
        assert requests.get(lst, headers=_auth(token), timeout=10).status_code == 401
        assert not requests.get(f"{relay.url}/api/find/{sha}", headers=_auth(token),
                                timeout=10).json()["found"]
        assert requests.get(f"{relay.url}/sha1/{sha}", headers=_auth(token),
                            timeout=10).status_code == 404
        assert requests.get(lst, headers=_auth(priv.token), timeout=10).status_code == 200


def test_revoked_token_is_refused_at_once(relay: Any, tmp_path: Path) -> None:
    data, body = _data(tmp_path)
    state = tmp_path / "pstate"
    sha = hashlib.sha1(body).hexdigest()
    with netutil.start_share(data, relay.url, tmp_path, "--private", listen=True,
                             state_dir=state) as priv:
        keep = priv.token
        made = netutil.run_kbfs("share", "token", str(data), "--state-dir", str(state),
                                "--label", "for bob")
        bob = made.stdout.strip()
        lst = f"{relay.url}/s/{priv.id}/list/"
        urls = [lst, f"{relay.url}/sha1/{sha}", f"{relay.url}/s/{priv.id}/file/f.bin",
                f"{priv.direct_url}/sha1/{sha}"]
        for url in urls:  # works, and the relay now holds a cached yes for it
            assert requests.get(url, headers=_auth(bob), timeout=10).ok, url
        out = netutil.run_kbfs("share", "token", str(data), "--state-dir", str(state),
                               "--revoke", bob)
        assert out.returncode == 0, out.stderr
        revoked_at = time.monotonic()
        for url in urls:
            while requests.get(url, headers=_auth(bob), timeout=10).ok:
                assert time.monotonic() - revoked_at < 2.0, f"{url} still served after revoke"
                time.sleep(0.05)
        assert not requests.get(f"{relay.url}/api/find/{sha}", headers=_auth(bob),
                                timeout=10).json()["found"]
        for url in urls:  # another token is untouched
            assert requests.get(url, headers=_auth(keep), timeout=10).ok, url
        listing = netutil.run_kbfs("share", "token", str(data), "--state-dir", str(state),
                                   "--list")
        assert listing.returncode == 0
        lines = {line.split()[0]: line for line in listing.stdout.splitlines()}
        assert "revoked" in lines[share.token_id(bob)] and "'for bob'" in lines[share.token_id(bob)]
        assert "valid" in lines[share.token_id(keep)]
        # revoking by id works too; something that is not this share's token is one line
        again = netutil.run_kbfs("share", "token", str(data), "--state-dir", str(state),
                                 "--revoke", share.token_id(keep))
        assert again.returncode == 0
        wrong = netutil.run_kbfs("share", "token", str(data), "--state-dir", str(state),
                                 "--revoke", share.issue_token(str(tmp_path / "x"), "b" * 32))
        assert wrong.returncode == 1 and wrong.stderr.strip().count("\n") == 0
        assert "Traceback" not in wrong.stderr

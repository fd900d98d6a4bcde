"""kbfs+https:// links: a share on a TLS relay (`kbfs relay --certfile/--keyfile`, a private
CA made by `openssl`, tests/deployutil.py) prints `kbfs+https://HOST:PORT/ID/`, and that
link is read by `kbfs download`, `kbfs ls`, `kbfs cat`, `kbfs mount`, `kbfs.open` and
fsspec (its entry point, without importing kbfs first). Old `kbfs://HOST:PORT` links keep
meaning plain http. A token the config file files under `https://HOST:PORT` goes to that
relay's links only. Malformed links (user name, bad ports, traversal in the id or path,
upper-case schemes, `kbfs+http://`) get one line from every command that takes a link.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kbfs import config, kbfsurl, protocol
from kbfs.errors import BadRequest
from tests.deployutil import Pki, make_pki, start_tls_relay
from tests.mountutil import NEEDS_FUSE, mounted
from tests.netutil import RelayProc, ShareProc, start_share

REPO = Path(__file__).resolve().parent.parent
ID = "a" * 32
CLEARED = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy",
           "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "XDG_CONFIG_HOME")


@dataclass
class Net:
    pki: Pki
    relay: RelayProc
    share: ShareProc
    private: ShareProc
    link: str          # what the public share printed
    private_link: str  # what the private share printed
    data: dict[str, bytes]
    tmp: Path

    @property
    def hostport(self) -> str:
        return self.relay.url.removeprefix("https://")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    tmp = tmp_path_factory.mktemp("kbfs-https")
    pki = make_pki(tmp / "pki")
    folder = tmp / "data"
    (folder / "sub").mkdir(parents=True)
    data = {"f.bin": os.urandom(3 * 1024 * 1024 + 333), "sub/name with space.txt": b"hello tls\n"}
    for rel, body in data.items():
        (folder / rel).write_bytes(body)
    secret = tmp / "secret"
    secret.mkdir()
    (secret / "s.bin").write_bytes(b"private bytes " * 1000)
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED:
            mp.delenv(name, raising=False)
        mp.setenv("SSL_CERT_FILE", str(pki.ca))  # the share's websocket and uploads trust the CA
        relay = start_tls_relay(tmp, pki.good)
        try:
            share = start_share(folder, relay.url, tmp)
            private = start_share(secret, relay.url, tmp, "--private")
            try:
                link = share.proc.wait_line(r"kbfs share link (\S+)").group(1)
                plink = private.proc.wait_line(r"kbfs share link (\S+)").group(1)
                yield Net(pki, relay, share, private, link, plink, data, tmp)
            finally:
                share.stop()
                private.stop()
        finally:
            relay.stop()


def env_for(net: Net, tmp: Path, ca: bool = True, **extra: str) -> dict[str, str]:
    """A reader's environment: the CA trusted (unless not CA), its own config and cache."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("KBFS_")}
    env.update(XDG_CONFIG_HOME=str(tmp / "config"), KBFS_CACHE_DIR=str(tmp / "cache"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    if ca:
        env["SSL_CERT_FILE"] = str(net.pki.ca)
    return env


def fresh_env(net: Net, tmp: Path) -> dict[str, str]:
    """`env_for` without the repository on PYTHONPATH, for a process started in TMP: fsspec
    then finds kbfs's entry points in the installed metadata (`pip install`), not in a
    `kbfs.egg-info` a build may have left beside the sources."""
    env = env_for(net, tmp)
    env.pop("PYTHONPATH", None)
    return env


def kbfs(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kbfs", *args], env=env, capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The single stderr line of a failed command (asserting it is one, without a traceback)."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, (proc.returncode, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def write_config(tmp: Path, obj: dict[str, object]) -> None:
    (tmp / "config" / "kbfs").mkdir(parents=True, exist_ok=True)
    (tmp / "config" / "kbfs" / "config.json").write_text(json.dumps(obj))


# ---------------------------------------------------------------- the printed link, read


def test_the_share_prints_a_kbfs_https_link(net: Net) -> None:
    assert net.link == f"kbfs+https://{net.hostport}/{net.share.id}/"
    assert net.private_link == f"kbfs+https://{net.hostport}/{net.private.id}/"
    # the share token command prints the same spelling for an https relay
    got = kbfs(env_for(net, net.tmp), "share", "token", str(net.tmp / "secret"), "--state-dir",
               str(net.private.state_dir), "--relay", net.relay.url)
    assert got.returncode == 0, got.stderr
    assert f"kbfs download {net.private_link}PATH --token" in got.stderr.decode()


def test_download_ls_and_cat_through_the_link(net: Net, tmp_path: Path) -> None:
    env = env_for(net, tmp_path)
    out = tmp_path / "f.bin"
    got = kbfs(env, "download", net.link + "f.bin", "--no-local", "-o", str(out))
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == net.data["f.bin"]
    got = kbfs(env, "download", net.link, "--no-local", "-o", str(tmp_path / "all"))
    assert got.returncode == 0, got.stderr
    for rel, body in net.data.items():
        assert (tmp_path / "all" / rel).read_bytes() == body
    listed = kbfs(env, "ls", net.link)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[-1] for line in listed.stdout.decode().splitlines()]
    assert names == ["sub/", "f.bin"], listed.stdout
    sub = kbfs(env, "ls", net.link + "sub", "--json")
    assert [e["name"] for e in json.loads(sub.stdout)] == ["name with space.txt"], sub.stderr
    relay = kbfs(env, "ls", f"kbfs+https://{net.hostport}/", "--json")
    entries = {e["name"]: e for e in json.loads(relay.stdout)}
    assert entries[net.share.id]["url"] == net.link, relay.stdout  # what ls shows, the share printed
    cat = kbfs(env, "cat", net.link + "sub/name%20with%20space.txt")
    assert cat.returncode == 0 and cat.stdout == b"hello tls\n", cat.stderr


def test_the_link_verifies_the_certificate(net: Net, tmp_path: Path) -> None:
    """Without the private CA the same link is refused with the TLS line: it is https."""
    line = one_line(kbfs(env_for(net, tmp_path, ca=False), "cat", net.link + "f.bin"))
    assert "TLS certificate refused" in line and "SSL_CERT_FILE" in line, line
    # the old spelling of the same host and port is plain http: a clear line too
    line = one_line(kbfs(env_for(net, tmp_path), "cat", f"kbfs://{net.hostport}/{net.share.id}/f.bin"))
    assert net.hostport in line, line


def test_kbfs_open_and_fsspec_read_the_link(net: Net, tmp_path: Path) -> None:
    """In a fresh interpreter: fsspec finds "kbfs+https" by its entry point (kbfs not imported
    first); then kbfs.open."""
    want = net.data["f.bin"]
    script = f"""
import hashlib, sys, fsspec
link = {net.link!r}
assert "kbfs" not in sys.modules
with fsspec.open(link + "f.bin", "rb", local=False) as f:
    f.seek(1048570)
    part = f.read(20)
    f.seek(0)
    whole = f.read()
fs = fsspec.filesystem("kbfs+https")
names = sorted(e["name"].rsplit("/", 1)[-1] for e in fs.ls(link))
sub = fs.cat_file(link + "sub/name%20with%20space.txt")
import kbfs
with kbfs.open(link + "f.bin", local=False) as k:
    k.seek(3 * 1024 * 1024)
    tail = k.read()
print(part.hex(), hashlib.sha1(whole).hexdigest(), ",".join(names), sub.hex(), tail.hex())
"""
    got = subprocess.run([sys.executable, "-c", script], env=fresh_env(net, tmp_path),
                         capture_output=True, timeout=120, text=True, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    part, sha1, names, sub, tail = got.stdout.split()
    assert bytes.fromhex(part) == want[1048570:1048590]
    assert sha1 == hashlib.sha1(want).hexdigest()
    assert names == "f.bin,sub" and bytes.fromhex(sub) == b"hello tls\n"
    assert bytes.fromhex(tail) == want[3 * 1024 * 1024:]


@pytest.mark.fuse
@NEEDS_FUSE[1]
def test_mount_of_the_link(net: Net, tmp_path: Path) -> None:
    with mounted(net.link, tmp_path, env_extra={"SSL_CERT_FILE": str(net.pki.ca)}) as m:
        assert sorted(os.listdir(m.path())) == ["f.bin", "sub"]
        with open(m.path("f.bin"), "rb") as f:
            assert f.read() == net.data["f.bin"]
        with open(m.path("sub", "name with space.txt"), "rb") as f:
            assert f.read() == b"hello tls\n"
    with mounted(net.link + "sub", tmp_path, name="sub",
                 env_extra={"SSL_CERT_FILE": str(net.pki.ca)}) as m:
        assert os.listdir(m.path()) == ["name with space.txt"]


# ---------------------------------------------------------------- tokens


def test_a_token_filed_under_the_https_relay_goes_to_its_links_only(net: Net, tmp_path: Path) -> None:
    env = env_for(net, tmp_path)
    src = net.private_link + "s.bin"
    want = b"private bytes " * 1000
    port = int(net.hostport.rpartition(":")[2])
    # filed under another scheme or port: not sent, so the private share refuses
    for key in (f"http://127.0.0.1:{port}", f"https://127.0.0.1:{port + 1}", f"https://localhost:{port}"):
        write_config(tmp_path, {"tokens": {key: net.private.token}})
        line = one_line(kbfs(env, "cat", src))
        assert "private" in line and "token" in line, (key, line)
    for key in (net.relay.url, f" {net.relay.url}/ "):
        write_config(tmp_path, {"tokens": {key: net.private.token}})
        got = kbfs(env, "cat", src)
        assert got.returncode == 0 and got.stdout == want, (key, got.stderr)


def test_a_token_filed_under_port_443_meets_a_link_without_a_port(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`kbfs+https://HOST/...` names https://HOST, the relay `https://HOST:443` in the config
    file is (one spelling of each relay, or the token silently stays home)."""
    token = "kbfs1." + __import__("base64").urlsafe_b64encode(
        json.dumps({"s": ID, "e": 0}).encode()).decode().rstrip("=") + ".mac"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("KBFS_TOKEN", "KBFS_RELAY"):
        monkeypatch.delenv(name, raising=False)
    write_config(tmp_path, {"tokens": {"https://relay.example.org:443": token,
                                       "http://plain.example.org:80/": token}})
    s = config.load_settings()
    for link in (f"kbfs+https://relay.example.org/{ID}/x", f"kbfs+https://relay.example.org:443/{ID}/x",
                 f"kbfs://plain.example.org:80/{ID}/x"):
        relay = kbfsurl.parse(link).relay
        assert s.tokens_for([relay]) == {relay: (token,)}, (link, relay, s.relay_tokens)
    assert s.tokens_for(["http://relay.example.org", "https://relay.example.org:8443"]) == {}


# ---------------------------------------------------------------- spelling


def test_links_are_written_and_read_back() -> None:
    cases = {
        "http://h:8080": f"kbfs://h:8080/{ID}/a%20b/c",
        "http://h": f"kbfs://h:80/{ID}/a%20b/c",
        "https://h:443": f"kbfs+https://h/{ID}/a%20b/c",
        "https://h:8443": f"kbfs+https://h:8443/{ID}/a%20b/c",
        "https://[::1]:8443": f"kbfs+https://[::1]:8443/{ID}/a%20b/c",
    }
    for relay, link in cases.items():
        assert protocol.kbfs_url(relay, ID, "a b/c") == link
        back = kbfsurl.parse(link)
        assert back == (config.normalize_relay(relay), ID, "a b/c"), (link, back)
    assert kbfsurl.parse(f"kbfs+https://h/{ID}").relay == "https://h"
    assert kbfsurl.parse("kbfs+https://h/", want_share=False) == ("https://h", "", "")
    assert kbfsurl.parse("kbfs://h:1", want_share=False) == ("http://h:1", "", "")


BAD = [
    # link, words the one line holds (never the password)
    (f"kbfs://alice:hunter2@127.0.0.1:1/{ID}/x", "no user name or password"),
    (f"kbfs+https://alice@127.0.0.1/{ID}/x", "no user name or password"),
    (f"kbfs://127.0.0.1/{ID}/x", "writes its port"),
    (f"kbfs://127.0.0.1:0/{ID}/x", "port '0'"),
    (f"kbfs+https://127.0.0.1:65536/{ID}/x", "port '65536'"),
    (f"kbfs://127.0.0.1:+80/{ID}/x", "port '+80'"),
    (f"kbfs+https://127.0.0.1:/{ID}/x", "port ''"),
    (f"kbfs://127.0.0.1:1:2/{ID}/x", "port '1:2'"),
    ("kbfs://127.0.0.1:1/../x", "malformed share id"),
    (f"kbfs+https://127.0.0.1/{ID}/a/../../x", "'..'"),
    (f"kbfs+https://127.0.0.1/{ID}/%2e%2e/%2E%2E/x", "'..'"),
    (f"kbfs://127.0.0.1:1/{ID}/a%00b", "NUL"),
    (f"kbfs://127.0.0.1:1/{ID}/a%5cb", "backslash"),
    (f"KBFS://127.0.0.1:1/{ID}/x", "lower case, kbfs://"),
    (f"Kbfs+Https://127.0.0.1/{ID}/x", "lower case, kbfs+https://"),
    (f"kbfs+http://127.0.0.1:1/{ID}/x", "kbfs://HOST:PORT"),
    (f"kbfs+wss://127.0.0.1/{ID}/x", "unknown kind of kbfs link"),
    (f"kbfs://127.0.0.1\n:1/{ID}/x", "control character"),
    (f"kbfs://[::1/{ID}/x", "not HOST:PORT"),
    ("kbfs+https:///", "no host"),
]


@pytest.mark.parametrize(("link", "words"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_malformed_link_is_one_clear_error(link: str, words: str) -> None:
    with pytest.raises(BadRequest) as exc:
        kbfsurl.parse(link)
    msg = str(exc.value)
    assert words in msg and "\n" not in msg and "hunter2" not in msg, msg


def test_every_command_says_one_line_for_a_malformed_link(net: Net, tmp_path: Path) -> None:
    """Each command's own route into the parser (client.resolve, bulk, cli_ls, mount's
    source check, fsspec), with the link's host a live relay so nothing else is wrong."""
    env = env_for(net, tmp_path)
    (tmp_path / "mnt").mkdir()
    bad = {
        "userinfo": (f"kbfs+https://alice:hunter2@{net.hostport}/{net.share.id}/f.bin",
                     "no user name or password"),
        "traversal": (f"kbfs+https://{net.hostport}/{net.share.id}/%2e%2e/f.bin", "'..'"),
        "case": (f"KBFS+HTTPS://{net.hostport}/{net.share.id}/f.bin", "lower case"),
        "kbfs+http": (f"kbfs+http://{net.hostport}/{net.share.id}/f.bin", "kbfs://HOST:PORT"),
    }
    for name, (link, words) in bad.items():
        every = name in ("case", "kbfs+http")  # what each command's own is-it-a-link gate sees
        for args in (["cat", link], ["download", link, "-o", str(tmp_path / "o")], ["ls", link],
                     ["mount", link, str(tmp_path / "mnt")])[: 4 if every else 1]:
            line = one_line(kbfs(env, *args))
            assert words in line and "hunter2" not in line, (name, args[0], line)
        assert not (tmp_path / "o").exists()
    script = ("import fsspec, sys\nfor link in sys.argv[1:]:\n    try:\n"
              "        fsspec.open(link).open().read()\n    except (FileNotFoundError, ValueError) as e:"
              "\n        print(type(e).__name__)\n")
    links = [link for link, _ in bad.values() if link.startswith("kbfs+https://")]
    got = subprocess.run([sys.executable, "-c", script, *links], env=fresh_env(net, tmp_path),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert got.stdout.split() == ["FileNotFoundError"] * len(links), (got.stdout, got.stderr)

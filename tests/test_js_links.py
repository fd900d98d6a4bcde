"""kbfs links in JavaScript (js/kbfsurl.js) against Python's kbfs/kbfsurl.py, word for word.

Each link is given to both: Python's `kbfsurl.parse` and JS's `parseLink` (run by `node`)
must take the same links to the same relay, share and path, and refuse the others with the
same line; `kbfsLink` must write what `kbfsurl.link` writes. The hostile links are those of
tests/test_kbfs_https.py (user info, ports, traversal, capitals, `kbfs+http://`, control
characters) and more. The few links JS refuses and Python takes (a raw '?', '#' or space,
bad %-encoding: js/kbfsurl.js says why) are listed and checked as such. No network.

Skipped, with the reason printed, only when `node` is not installed.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from kbfs import kbfsurl
from kbfs.errors import BadRequest
from tests.test_js import REPO, _need_node
from tests.test_kbfs_https import BAD, ID

MORE = [
    f"kbfs://h:8080/{ID}/a%20b/c", f"kbfs://h:80/{ID}/x", f"kbfs+https://h/{ID}/a%20b/c",
    f"kbfs+https://h:443/{ID}/x", f"kbfs+https://[::1]:8443/{ID}//x//y/", f"kbfs+https://h/{ID}/%E2%82%AC",
    f"kbfs+https://h/{ID}/d/%2e.zarray", f"kbfs+https://h/{ID}", f"kbfs+https://h/{ID}/",
    f"kbfs+https://alice:hunter2@h/{ID}/x", "kbfs+https://alice:hunter2@h/", f"kbfs://127.0.0.1:１/{ID}/x",
    f"kbfs+https://h\t/{ID}/x", f"kbfs+https://h\u200b/{ID}/x", f"kbfs+https://h\u00a0/{ID}/x",
    f"kbfs://[::1]x:1/{ID}/x", "kbfs+https://h//x", f"kbfs+https://h/{ID.upper()}/x",
    f"kbfs+https://h/{ID}/a/%2E/x", f"kbfs://h:1/{ID}/{'a/' * 300}x", f"kbfs://h:1/{ID}/{'a' * 5000}",
    f"kbfs://h:1/{ID}/it's", f"KBFS+HTTPS://h/{ID}/x", f"kbfs+https://h:99999999/{ID}/x",
    f"kbfs+https://h:8443x/{ID}/x", f"kbfs://{'h' * 300}:1/{ID}/x",
]
# taken by Python (as a literal '?', '#', ' ' or '%' in a file name), refused by JS
JS_STRICTER = {f"kbfs://h:1/{ID}/x?y": "no query", f"kbfs://h:1/{ID}/a b": "no query",
               f"kbfs://h:1/{ID}/a#b": "no query", f"kbfs://h:1/{ID}/%zz": "bad percent-encoding"}
WRITTEN = [("http://h:8080", "a b/c"), ("http://h", "x"), ("http://127.0.0.1:80", ""),
           ("https://h:443", "d/"), ("https://h:8443", "it's (1)!*~_.-€ #?%.bin"),
           ("https://[::1]:8443", "a/b"), ("https://relay.example.org", "day1/rec.h5")]

_SCRIPT = """
import { kbfsLink, parseLink } from './js/kbfsurl.js';
const input = JSON.parse(process.argv[1]);
const out = { parsed: input.links.map((l) => {
  try { return parseLink(l); } catch (e) { return { error: e.message, name: e.name }; }
}), written: input.written.map(([r, p]) => kbfsLink(r, input.id, p)) };
process.stdout.write(JSON.stringify(out));
"""


def _python(link: str) -> dict[str, str]:
    try:
        relay, share, path = kbfsurl.parse(link)
    except BadRequest as exc:
        return {"error": str(exc), "name": "SourceError"}
    return {"relay": relay, "share": share, "path": path}


def _js(links: list[str], written: list[tuple[str, str]]) -> dict[str, list[Any]]:
    node = _need_node()
    arg = json.dumps({"links": links, "written": written, "id": ID})
    run = subprocess.run([node, "--input-type=module", "-e", _SCRIPT, arg], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)  # type: ignore[no-any-return]


def test_js_reads_links_as_python_does_word_for_word() -> None:
    links = [link for link, _ in BAD] + MORE
    got = _js(links, [])["parsed"]
    for link, js in zip(links, got, strict=True):
        assert js == _python(link), link


def test_js_refuses_what_python_takes_literally_only_where_listed() -> None:
    got = _js(list(JS_STRICTER), [])["parsed"]
    for (link, words), js in zip(JS_STRICTER.items(), got, strict=True):
        assert "error" not in _python(link), link
        assert words in js.get("error", ""), (link, js)


def test_js_writes_links_as_python_does() -> None:
    written = _js([], WRITTEN)["written"]
    assert written == [kbfsurl.link(r, ID, p) for r, p in WRITTEN]
    for link, (r, p) in zip(written, WRITTEN, strict=True):  # and reads them back
        assert kbfsurl.parse(link) == (kbfsurl.canonical_relay(r), ID, p.rstrip("/"))

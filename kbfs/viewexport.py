"""View links and exported view pages (issue 18; the page side is kbfs/web/static/view.js).

A view link names content by its SHA-1, size and tree root (so a reader verifies every
range from any relay) and a view state, in the URL's fragment:
`RELAY/v/#src=sha1://SHA1/NAME&n=SIZE&r=ROOT&bs=BLOCK[&share=ID]&ch=A-B&t=T&w=W&a=AMP`.
`fragment()` writes that form (the same order as viewstate.js) after checking the state
(`parse_state`, the same rules as the page's); `share=` marks a private share's content,
for which the page asks the token. A token is never written by this module.

`export_page(out, fragment, relays)` writes a static page that works from any web host:
`index.html` (the relay's view page with relative paths, `<body data-exported>` and a
Content-Security-Policy meta tag allowing scripts of its own origin and connections only to
its own origin and to RELAYS), `ui/` (a copy of the page's scripts and vendored libraries)
and `view.json` ({"relays": [...], "view": FRAGMENT}). The relays answer it across origins
through their CORS headers (protocol.CORS_HEADERS: Range, Authorization, Kbfs-Want-Proof
allowed; Content-Range and Kbfs-Proof exposed).

What it does not do: resolve sources (cli_view.py does, through the client), serve the
page, or copy content (the page reads it from the relays).
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from pathlib import Path
from urllib.parse import parse_qsl, quote

from kbfs import protocol
from kbfs.errors import BadRequest

WEB_DIR = Path(__file__).resolve().parent / "web"
STATE_KEYS = ("ch", "t", "w", "a")
_INT = re.compile(r"[0-9]{1,16}\Z")
_CH = re.compile(r"([0-9]{1,6})(?:-([0-9]{1,6}))?\Z")
_AMP = re.compile(r"[0-9.eE+-]{1,24}\Z")
MAX_SAFE = 2**53 - 1
CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
       "img-src 'self' blob:; connect-src 'self' {relays}; base-uri 'none'; form-action 'none'")


def parse_state(text: str) -> dict[str, str]:
    """A view state `ch=0-31&t=0&w=8192&a=2000` (each key optional) -> its checked parts,
    canonical text; BadRequest naming the bad part."""
    out: dict[str, str] = {}
    for key, value in parse_qsl(text.lstrip("#&?"), keep_blank_values=True, max_num_fields=20):
        if key not in STATE_KEYS:
            raise BadRequest(f"--state: unknown key {key[:20]!r} (known: ch, t, w, a)")
        if key == "ch":
            m = _CH.match(value)
            if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                raise BadRequest("--state: ch must be a channel or a range FIRST-LAST (e.g. 0-31)")
            out[key] = f"{m.group(1)}-{m.group(2) or m.group(1)}"
        elif key in ("t", "w"):
            if not _INT.match(value) or int(value) > MAX_SAFE or (key == "w" and int(value) < 1):
                raise BadRequest(f"--state: {key} must be a whole number" + (" from 1" if key == "w" else ""))
            out[key] = str(int(value))
        else:
            amp = float(value) if _AMP.match(value) else math.nan
            if not math.isfinite(amp) or amp <= 0:
                raise BadRequest("--state: a (amplitude) must be a positive number")
            out[key] = value
    return out


def fragment(sha1: str, name: str, size: int, root: str, block_size: int, state: str = "",
             share: str = "") -> str:
    """The fragment of a view link (no '#'), in viewstate.js's order."""
    sha1 = protocol.check_sha1(sha1)
    if not re.fullmatch(r"[0-9a-f]{64}", root or ""):
        raise BadRequest("this content has no tree root (a pointer of the original tools or a "
                         "sha1:// URI): a view needs a .prv pointer with kbfs_tree or a kbfs:// URL")
    if share and not protocol.SHARE_ID_RE.match(share):
        raise BadRequest(f"{share[:70]!r} is not a share id")
    parts = [f"src=sha1://{sha1}/{quote(name, safe='')}", f"n={size}", f"r={root}", f"bs={block_size}"]
    if share:
        parts.append(f"share={share}")
    st = parse_state(state)
    parts += [f"{k}={st[k]}" for k in STATE_KEYS if k in st]
    return "&".join(parts)


def check_relays(relays: list[str]) -> list[str]:
    """Relay base URLs (protocol.relay_base_problem's rule), deduplicated, in order."""
    out: list[str] = []
    for url in relays:
        problem, base = protocol.relay_base_problem(url)
        if problem:
            raise BadRequest(f"--relay {url[:100]!r}: {problem}")
        if base not in out:
            out.append(base)
    if not out:
        raise BadRequest("give --relay URL: the page needs relays to read from")
    return out


def page_html(relays: list[str]) -> str:
    """The exported index.html: the view page, relative paths, a CSP naming RELAYS."""
    text = (WEB_DIR / "view.html").read_text(encoding="utf-8")
    # the relay page's first read (its own relay's /sha1/): not here, and its CSP has no hash
    text = re.sub(r"<!--kbfs-early-->.*?<!--/kbfs-early-->\n?", "", text, flags=re.S)
    csp = CSP.format(relays=" ".join(relays))
    text = text.replace("<!--kbfs-csp-->",
                        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp, quote=False)}">')
    text = text.replace('"/ui/', '"ui/').replace('<a href="/" id="home">kbfs</a>',
                                                  '<span id="home">kbfs</span>')
    return text.replace("<body>", "<body data-exported>")


def export_page(out: Path, frag: str, relays: list[str]) -> int:
    """Write the static view page into OUT (new, empty, or a previous export); the number of
    files written."""
    relays = check_relays(relays)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "view.json").is_file())):
        raise BadRequest(f"{out}: exists and is not an empty folder or a previous view export")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ui").exists():
        shutil.rmtree(out / "ui")
    count = 0
    static = WEB_DIR / "static"
    for src in sorted(static.rglob("*")):
        rel = src.relative_to(static)
        if src.is_symlink() or not src.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        dest = out / "ui" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        count += 1
    (out / "index.html").write_text(page_html(relays), encoding="utf-8")
    (out / "view.json").write_text(json.dumps({"relays": relays, "view": frag}, indent=2) + "\n",
                                   encoding="utf-8")
    return count + 2

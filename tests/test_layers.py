"""The layer rule of ARCHITECTURE.md: every import of a kbfs module points down.

An ast walk over kbfs/*.py (imports inside functions count too). Layers:

    L0  errors, prv, tree, proof, piecewire, protocol, config,
        sharestate, tokens, ...                     may import L0
    L1  index, httpserve                        L0
    L2  share, relay, fetch, piececache         L0, L1; never each other, except that an
        adapter may import its own parts (PARTS: webui, the relay's page, is the relay's)
    L3  fusefs, reader                          L0 and cache only
    L4  mount, client, cli, cliutil, cli_*, bulk, __main__, demo     anything

`import kbfs` / `from kbfs import __version__` (the package root) is allowed
everywhere; `from kbfs import x` counts as importing module x. The package root
itself (`__init__`) may name anything, but only lazily inside functions, so that
`import kbfs` stays cheap. A module missing from the map fails: place it first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kbfs"

L0 = {"errors", "prv", "tree", "proof", "protocol", "config", "piecefile", "catalog", "flights", "readahead2",
      "piecewire", "filehash", "sharestate", "tokens", "sourceurls", "httpread", "osio", "service",
      "tlsconf", "proxyconf", "proxyfix", "kbfsurl",
      "fileref", "buffers", "leaflists", "rootless", "verifiers", "cachefiles",
      "mirrorurl", "mirrorsource", "viewexport", "uploadpool"}
L1 = {"index", "httpserve", "piecestore"}
L2 = {"share", "relay", "fetch", "cache", "piececache", "webui"}
# An L2 module that is one adapter's part (it serves only that adapter: webui is the relay's
# web page, on httpserve like the relay): that adapter may import it, no other L2 module.
PARTS = {"webui": "relay"}
L3 = {"fusefs", "reader"}
L4 = {"mount", "client", "cli", "cliutil", "__main__", "demo", "bulk", "mirror", "mirrorstore", "mirrorverify"}
ROOT_NAMES = {"__version__", "__all__", "open", "realize"}  # names of the package root itself


def layer_of(module: str) -> str | None:
    if module in L0:
        return "L0"
    if module in L1:
        return "L1"
    if module in L2:
        return "L2"
    if module in L3:
        return "L3"
    if module in L4 or module.startswith("cli_"):
        return "L4"
    if module == "__init__":
        return "root"
    return None


def allowed(importer: str, imported: str) -> bool:
    """May module IMPORTER import kbfs module IMPORTED?"""
    layer = layer_of(importer)
    target = layer_of(imported)
    if target is None:
        return False
    if layer in ("L4", "root"):
        return True
    if layer == "L0":
        return target == "L0"
    if layer == "L1":
        return target == "L0"
    if layer == "L2":
        return target in ("L0", "L1") or PARTS.get(imported) == importer
    if layer == "L3":
        return target == "L0" or imported == "cache"
    return False


def kbfs_imports(source: str) -> list[tuple[str, int, bool]]:
    """(kbfs module, line, at module level) for every import of a kbfs module in SOURCE."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kbfs" and len(parts) > 1:
                    found.append((parts[1], node.lineno, id(node) in top_level))
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                raise AssertionError(f"line {node.lineno}: relative import above the package")
            module = node.module or ""
            if node.level == 0 and not (module == "kbfs" or module.startswith("kbfs.")):
                continue
            parts = module.split(".") if module else []
            if node.level == 0:
                parts = parts[1:]  # drop 'kbfs'
            if parts:
                found.append((parts[0], node.lineno, id(node) in top_level))
            else:
                for alias in node.names:  # from kbfs import x: module x, unless a root name
                    if alias.name not in ROOT_NAMES:
                        found.append((alias.name, node.lineno, id(node) in top_level))
    return found


def other_imports(source: str) -> set[str]:
    """Top-level package names of every non-relative import in SOURCE."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def _source(module: str) -> str:
    return (PACKAGE / f"{module}.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("module", MODULES)
def test_module_is_placed_in_a_layer(module: str) -> None:
    assert layer_of(module) is not None, f"kbfs/{module}.py is in no layer: add it to the map"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module: str) -> None:
    bad = [
        f"line {line}: {module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for target, line, _ in kbfs_imports(_source(module))
        if target != module and not allowed(module, target)
    ]
    assert not bad, "\n".join(bad)


def test_package_root_imports_lazily() -> None:
    eager = [f"line {line}: {target}" for target, line, top in kbfs_imports(_source("__init__")) if top]
    assert not eager, "kbfs/__init__.py imports submodules at import time: " + ", ".join(eager)


def test_fusefs_never_reaches_requests() -> None:
    """fusefs must not import requests, directly or through the kbfs modules it imports."""
    if "fusefs" not in MODULES:
        pytest.skip("kbfs/fusefs.py does not exist yet")
    seen: set[str] = set()
    todo = ["fusefs"]
    while todo:
        module = todo.pop()
        if module in seen or module not in MODULES:
            continue
        seen.add(module)
        source = _source(module)
        assert "requests" not in other_imports(source), f"{module} (reached from fusefs) imports requests"
        todo.extend(target for target, _, _ in kbfs_imports(source))


def test_the_checker_catches_violations() -> None:
    """The rules above only protect anything if the walk sees each form of import."""
    cases = {
        "import kbfs.cache": ["cache"],
        "import kbfs.cache as c": ["cache"],
        "from kbfs import cache, __version__": ["cache"],
        "from kbfs.fetch import Fetcher": ["fetch"],
        "from . import share": ["share"],
        "from .relay import x": ["relay"],
        "def f():\n    from kbfs import mount\n": ["mount"],
        "import kbfs\nfrom kbfs import __version__": [],
        "import os, kbfsx\nfrom kbfsy import z": [],
    }
    for source, expected in cases.items():
        assert [t for t, _, _ in kbfs_imports(source)] == expected, source

    assert not allowed("tree", "index")
    assert not allowed("prv", "cache")
    assert allowed("prv", "tree")
    assert allowed("index", "prv")
    assert not allowed("index", "share")
    assert not allowed("share", "relay")
    assert not allowed("cache", "fetch")
    assert allowed("relay", "webui")       # the relay's own part
    assert not allowed("share", "webui")   # ... and nobody else's
    assert not allowed("webui", "relay")
    assert allowed("webui", "httpserve")
    assert allowed("share", "index")
    assert allowed("fusefs", "cache")
    assert not allowed("fusefs", "fetch")
    assert not allowed("fusefs", "index")
    assert not allowed("reader", "client")
    assert allowed("cli_net", "share")
    assert allowed("mount", "fusefs")
    assert not allowed("mount", "brand_new_module")
    assert layer_of("brand_new_module") is None
    assert "requests" in other_imports("def f():\n    import requests.adapters\n")

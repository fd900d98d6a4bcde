# kbfs: two commands on a fresh Debian machine, `make demo` and `make test`.
# Each target installs what it needs first (Debian packages, a venv, the package).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := fuse3 libfuse3-dev pkg-config curl gcc python3-dev python3-venv chromium chromium-driver nginx-light
# issue 17 (tests/test_deploy_*.py): a forward proxy, Caddy, and ip(8) for network namespaces
APT_PACKAGES += tinyproxy caddy iproute2 openssl
BENCH_APT_PACKAGES := rclone nginx-light
# kbfs.js (js/): its npm packages, from the committed package-lock.json
JS_STAMP := js/node_modules/.installed


.PHONY: all deps venv demo demo-stop test test-portable soak lint typecheck bench clean help

help:
	@echo "make demo   - install, then run the whole story on this machine"
	@echo "make test   - install, then lint, type-check and run the test suite (and again: KBFS_PORTABLE=1)"
	@echo "make soak   - the long reliability and load tests"
	@echo "make bench  - benchmarks (writes docs/benchmarks.md figures)"

# Debian packages: only asked for when something is missing.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(STAMP): setup.cfg pyproject.toml | deps
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: deps $(STAMP)

demo: venv
	bash scripts/demo.sh

demo-stop:
	bash scripts/demo.sh stop

lint: venv
	$(PY) -m ruff check kbfs tests bench

typecheck: venv
	$(PY) -m mypy kbfs

$(JS_STAMP): js/package.json js/package-lock.json
	@command -v npm >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm; }
	cd js && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The suite, then again with KBFS_PORTABLE=1: every Linux-only call takes its portable
# fallback (kbfs/osio.py), as on macOS; tests/conftest.py skips the FUSE tests in that pass.
test: venv lint typecheck $(JS_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=600 tests
	KBFS_PORTABLE=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=600 tests

test-portable: venv $(JS_STAMP)
	KBFS_PORTABLE=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=600 tests

soak: venv
	$(PY) -m pytest -q -p no:cacheprovider -m soak --timeout=1800 tests

bench: venv $(JS_STAMP)
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

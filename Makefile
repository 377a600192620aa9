# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# Each creates .venv on first use, installing the pinned dependency set (constraints.txt).
# `make test-fast` is the edit-test loop: the suite less the tests marked `slow` (pyproject.toml's markers).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast browser install lock

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/thalia-ray demo

# The report's browser tests need a headless Chromium (thalia_ray/report/browser.py looks for these names).
BROWSERS := chromium chromium-browser google-chrome
INSTALL_BROWSER := sudo apt-get install -y chromium

test: browser $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Installs Chromium where this user can (root with apt-get, as .ci/run does); otherwise stops at once and
# names the one command to run, instead of failing the browser tests twenty minutes later.
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null 2>&1 && exit 0; done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing headless Chromium for the report's browser tests (apt-get)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && exit 0; \
	fi; \
	echo "make test needs a headless Chromium for the report's browser tests; install it with:" >&2; \
	echo "    $(INSTALL_BROWSER)" >&2; \
	echo "(or run the rest: make test-fast)" >&2; exit 1

# Re-pin after changing dependencies: resolves fresh and rewrites constraints.txt.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -vi '^thalia' > constraints.txt

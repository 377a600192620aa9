# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# Each creates .venv on first use, installing the pinned dependency set (constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lock

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/thalia-ray demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# Re-pin after changing dependencies: resolves fresh and rewrites constraints.txt.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -vi '^thalia' > constraints.txt

# vk: make demo runs the whole pipeline against vk-serve; make test runs the tests.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vk-installed
# The timing tests (pytest -m timing: they pin times to the millisecond) run first, alone in one process, so that
# the suite's own load does not stand in their way; then the rest with pytest-xdist (the test extra), one worker
# per core, the slowest tests first (tests/conftest.py). --durations: the slow ones in every log. make test fails
# when either part fails. PYTEST_ARGS="-n 0" runs the rest in one process too.
PYTEST_ARGS ?= -n auto

.PHONY: install test demo bench lint man clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n 0 -m timing --durations=5; t=$$?; \
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) -m "not timing" --durations=15; r=$$?; \
	test $$t = 0 && test $$r = 0

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

bench: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m vk.bench

lint: install
	$(BIN)/ruff check vk tests

man:
	@# any warning (e.g. "table wider than line width") fails the target
	@for f in man/*.1 man/*.5; do echo "== $$f"; \
	  if command -v man >/dev/null; then err=$$(MANWIDTH=100 man --warnings -l "$$f" 2>&1 >/dev/null); \
	  else err=$$(groff -man -Tutf8 -ww -rLL=93n "$$f" 2>&1 >/dev/null); fi; \
	  if [ -n "$$err" ]; then echo "$$f: $$err" >&2; exit 1; fi; \
	done; echo "man pages render: man -l man/vk-gen.1"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache out

# kvtier: `make serve` runs kvtier on its embedded default, `make test` runs the test suite.
# Both install what is missing first (scripts/install.sh; a second run does nothing slow).
VENV   ?= .venv
PY     := $(VENV)/bin/python
KVTIER := $(VENV)/bin/kvtier
# Test processes: the engine tests spend much of their time importing vLLM on one core, so two
# processes keep two cores busy. A file to a process (tests that share a pod or a server stay
# together), the longest files first (tests/conftest.py). Three on 2 cores were slower: the
# restart test (then three servers) took 14 minutes, against 6.5-7 with two processes.
TEST_JOBS ?= 2
# tests/unit: seconds, no processes; tests/integration: real redis-server, CLI and worker
# processes; tests/e2e: vLLM engines, pods and Chromium (minutes each; started first, see
# tests/conftest.py).
PYTEST := $(PY) -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

.PHONY: install serve test test-fast unit lint typecheck bench clean

install:
	@bash scripts/install.sh

serve: install
	$(KVTIER) serve

test:
	@bash scripts/install.sh --browser
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PYTEST) -q --durations=15

# The edit-test loop: the unit tests (seconds, no processes).
test-fast: install
	$(PY) -m pytest -q -x tests/unit

# Every test that starts no vLLM engine: unit and integration.
unit: install
	$(PYTEST) -q -x tests/unit tests/integration

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/lint-imports

typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(KVTIER) bench store --tier memory
	$(KVTIER) bench store --tier disk
	$(KVTIER) bench store --tier redis
	$(KVTIER) bench store --tier s3

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache src/*.egg-info

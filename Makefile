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
# The files that start vLLM engines (minutes each; tests/conftest.py starts them first).
ENGINE_TESTS := test_pod test_serve test_vllm test_bench_ttft test_pod_pd test_bench_overlap \
	test_readme_serve
PYTEST := $(PY) -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

.PHONY: install serve test unit lint typecheck bench clean

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

# The edit-test loop: every test that starts no vLLM engine (under 3 minutes on 2 cores).
unit: install
	$(PYTEST) -q -x $(ENGINE_TESTS:%=--ignore=tests/%.py)

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache src/*.egg-info

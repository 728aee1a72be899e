# Two commands for a new user: `make demo` and `make test`. Everything else is for the GPU box or development.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel where there is no NVIDIA driver (it lies on this disk, and a bare `torch` would pull a
# multi-GB CUDA build); where nvidia-smi exists, the default (CUDA) build. Override with TORCH_SPEC=...
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

DATA ?= demo-out/data
CACHE ?= demo-out/cache
SPEC ?= cache_spec.yaml
EXTRACT_ARGS ?=
BENCH_ARGS ?= --quick

.PHONY: install test test-fast demo extract bench clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/ahcli demo demo-out

extract: install
	$(BIN)/ahcli extract $(DATA) $(CACHE) --spec $(SPEC) $(EXTRACT_ARGS)

bench: install
	$(BIN)/ahcli bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache

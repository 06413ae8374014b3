# Two commands set everything up on a fresh machine: `make demo` (main job) and `make test` (the suite).
# Both create/refresh a project-local virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the CPU build of torch (a plain install would pull a multi-GB CUDA build).
TORCH_CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),constraints/cuda.txt,constraints/cpu.txt)
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: setup demo test lint format clean

$(STAMP): pyproject.toml constraints/cpu.txt constraints/cuda.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile -c $(TORCH_CONSTRAINTS) -e '.[dev,sa2va,deepspeed]'
	@# pip compiles bytecode on one core; compileall uses them all (-j 0). Files that are not Python 3
	@# (some packages ship them) fail to compile here as under pip, harmlessly: hence -qq and `|| true`.
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raysys demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

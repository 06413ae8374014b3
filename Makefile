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

# uv installs the same packages as pip (same resolution, checked with `pip list`) in ~10 s instead of ~55 s: it
# downloads and unpacks in parallel. It does not read pip's configuration, so pip's find-links (a local wheel of
# torch on some machines) are passed on; where uv cannot install, pip does.
PIP_LINKS = $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV := $(VENV)/bin/uv
EXTRAS := .[dev,sa2va,deepspeed]

$(STAMP): pyproject.toml constraints/cpu.txt constraints/cuda.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'uv>=0.5,<1' && $(UV) pip install --quiet --python $(PY) \
		$(foreach d,$(PIP_LINKS),--find-links $(d)) -c $(TORCH_CONSTRAINTS) -e '$(EXTRAS)' \
		|| $(PY) -m pip install --quiet --no-compile -c $(TORCH_CONSTRAINTS) -e '$(EXTRAS)'
	@# Bytecode for every process the suite starts (where PYTHONDONTWRITEBYTECODE is set, each would compile
	@# what it imports anew: ~15 s per process); compileall uses every core (-j 0). Files that are not Python 3
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

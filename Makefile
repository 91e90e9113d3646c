# `make test` and `make demo` each create or update .venv, install what they need, then run.
# GPU users: `make demo TORCH="torch"` (or any pip spec) installs the CUDA build instead of the CPU one.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install test lint demo clean

$(STAMP): requirements.txt requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m roadseg_utils.synthetic --output_dir $(DEMO_DIR)/data --num_images 300 --num_sequences 12 --seed 0

clean:
	rm -rf $(VENV) runs

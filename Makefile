PY ?= .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install test test-slow lint bench demo

install:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,lm-eval,datasets,trl]" torch==2.13.0

test:
	$(PY) -m pytest -q -n 2

test-slow:
	$(PY) -m pytest -q -m slow

lint:
	$(PY) -m ruff check .

# The paper's experiment in miniature on the shipped base model (docs/reproduce.md); ~10 minutes on 2 CPU cores.
demo: install
	$(PY) -m loramoe.cli reproduce --preset tiny --out runs/demo

bench:
	$(PY) -m benchmarks.run

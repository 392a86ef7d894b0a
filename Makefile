PY ?= .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install test test-slow lint bench demo

install:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,quant,lm-eval,datasets,trl,deepspeed]" torch==2.13.0

# On a fresh clone `make test` installs first: with the default PY (the venv's), its pytest marks the install done.
VENV := $(if $(filter .venv/bin/python,$(PY)),.venv/bin/pytest)

.venv/bin/pytest:
	$(MAKE) install

test: $(VENV)
	$(PY) -m pytest -q -n 2

test-slow: $(VENV)
	$(PY) -m pytest -q -m slow

lint: $(VENV)
	$(PY) -m ruff check .

# The paper's experiment in miniature on the shipped base model (docs/reproduce.md); ~10 minutes on 2 CPU cores.
demo: install
	$(PY) -m loramoe.cli reproduce --preset tiny --out runs/demo

bench:
	$(PY) -m benchmarks.run

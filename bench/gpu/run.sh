#!/bin/bash
# `make test-gpu`: the GPU check (bench/gpu/check.py) on a machine with a CUDA GPU, using its own
# python3 (torch, transformers, accelerate from there) plus the wheels `make gpu-wheels` put in
# bench/gpu/wheels (trl, datasets, peft, deepspeed, transformers at our pins, ...). Needs no
# `make install` and no network. Without a CUDA GPU it says so and exits 0.
# Arguments go to check.py (--parts, --out, ...); figures: $OUT/results.jsonl (or runs/gpu-check/).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "make test-gpu: skipped, no CUDA GPU here ($PYTHON has no torch that sees one); --smoke runs the check on CPU"
    exit 0
fi
WHEELS=bench/gpu/wheels
if ! ls $WHEELS/*.whl >/dev/null 2>&1; then
    echo "make test-gpu: no wheels in $WHEELS: run \`make gpu-wheels\` where pip reaches PyPI, and carry that folder" >&2
    exit 2
fi
# Into a folder put first on PYTHONPATH, not a venv: the GPU image's python3 is itself a venv,
# and a venv made from it with --system-site-packages would not see that venv's torch.
SITE=${GPU_SITE:-$(mktemp -d)/site}
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $WHEELS/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
"$PYTHON" -c 'import torch, transformers, trl, datasets, deepspeed, pyarrow, fsspec
print("python3", __import__("sys").version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "trl", trl.__version__, "datasets", datasets.__version__, "deepspeed", deepspeed.__version__,
      "pyarrow", pyarrow.__version__, "fsspec", fsspec.__version__)'
nvidia-smi -L || true
exec "$PYTHON" bench/gpu/check.py "$@"

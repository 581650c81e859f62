"""The GPU check (bench/gpu/check.py, `make test-gpu`): its --smoke mode runs the same code at toy sizes on
CPU, and without CUDA `make test-gpu` is skipped with a message and exit 0, needing no `make install`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench/gpu/check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(out: Path) -> dict[str, dict]:
    return {r["part"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_make_test_gpu_is_skipped_without_cuda_and_needs_no_install() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test-gpu:\s*$", makefile, re.M), "test-gpu must not depend on $(STAMP) (make install)"
    env = {**os.environ, "PYTHON": sys.executable}  # this machine's torch is the CPU build
    done = subprocess.run(["bash", "bench/gpu/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "skipped, no CUDA GPU" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow  # ~10 s on 2 cores: two tiny models trained a few steps, the loss run in fp32 twice
def test_smoke_kd_step_and_precision_write_their_figures(tmp_path: Path) -> None:
    assert check_module().main(["--smoke", "--parts", "kd_step,precision", "--out", str(tmp_path)]) == 0
    found = records(tmp_path)
    step = found["kd_step"]
    assert step["ok"] and step["smoke"] and step["trained_tokens"] == 112
    for name in ("kd_chunk256", "kd_chunk1024", "kd_chunk256_grad_ckpt", "sft_full_logits"):
        assert step["variants"][name]["tokens_per_s"] > 0, name
    assert step["flops_per_step"]["total"] == step["flops_per_step"]["student"] + step["flops_per_step"]["teacher"]
    assert "6 T N_s" in step["flop_formula"]
    prec = found["precision"]
    # On CPU both paths run fp32 matmuls (logits.py): the same numbers, so no error at all.
    assert prec["ok"] and prec["worst_rel_err"] < 1e-5
    assert prec["cases"]["peaked_logits_std4"]["student_logit_std"] == pytest.approx(4.0, rel=1e-3)


@pytest.mark.slow  # ~20 s: one real `accelerate launch ... -m pipeline sft` of 4 steps
def test_smoke_sft_launch_saves_a_student_transformers_reloads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert check_module().main(["--smoke", "--parts", "fsdp", "--out", str(out), "--work", str(tmp_path)]) == 0
    sft = records(out)["fsdp"]
    assert sft["ok"] and sft["returncode"] == 0 and sft["distributed"] == "1 (NO)"
    assert sft["same_names_and_shapes"] and sft["all_finite"] and sft["params_moved"] == sft["params"]
    assert [h["step"] for h in sft["losses"]] == [1, 2, 3, 4] and all("kd_loss" in h for h in sft["losses"])
    assert (out / "sft-fsdp.log").exists()


@pytest.mark.slow  # processes (bash, a python per version look-up), though quick ones
def test_gpu_wheels_asks_pip_for_the_venvs_versions(tmp_path: Path) -> None:
    """`make gpu-wheels` (bench/gpu/wheels.sh) without PyPI: a stand-in python answers the version look-ups
    as this python does and records what pip is asked for, in a copy (the script empties bench/gpu/wheels)."""
    import importlib.metadata as metadata
    import shutil

    (tmp_path / "bench/gpu").mkdir(parents=True)
    shutil.copy2(ROOT / "bench/gpu/wheels.sh", tmp_path / "bench/gpu/wheels.sh")
    calls = tmp_path / "pip-calls"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/bash\nif [ "$1" = -m ]; then echo "$*" >> {calls}; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    stub.chmod(0o755)
    done = subprocess.run(["bash", "bench/gpu/wheels.sh"], cwd=tmp_path, env={**os.environ, "PY": str(stub)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    download, wheel = (line.split() for line in calls.read_text().splitlines())
    assert download[:3] == ["-m", "pip", "download"] and "--only-binary=:all:" in download
    assert download[download.index("--python-version") + 1] == "3.12"  # the GPU machine's python3
    for name in ("trl", "datasets", "peft", "transformers", "pydantic-core"):
        assert f"{name}=={metadata.version(name)}" in download, name
    assert wheel[:3] == ["-m", "pip", "wheel"] and f"deepspeed=={metadata.version('deepspeed')}" in wheel

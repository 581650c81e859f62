"""A new distillation method edits no stage file: a module that declares METHOD is found by
`pipeline.distill.methods()`, its keys become sft keys (YAML, command line, --help), its check
runs, and its term is added to the loss with its weight. The toy method lives in a folder of its
own added to the package's path, as a file in pipeline/distill/ would be, in a fresh process
(the sft config takes the methods' keys when it is first imported)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TOY = '''
"""Toy: the squared norm of the student's last hidden state at trained positions, per token."""
from dataclasses import dataclass

from pipeline.config import setting
from pipeline.distill import Method


@dataclass
class ToyKeys:
    toy_kd: bool = setting(False, help="the toy term (tests/test_new_method.py)")
    toy_weight: float = setting(0.1, help="weight of the toy term")


def _check(cfg):
    if cfg.toy_weight < 0:
        raise ValueError("toy_weight must be >= 0")


def _loss(batch):
    hidden = batch.states[-1]
    per_token = hidden.pow(2).sum(-1) * batch.mask
    return {"toy_loss": per_token.sum() / batch.mask.sum()}


METHOD = Method(keys=ToyKeys, switch="toy_kd", weights=lambda cfg: {"toy_loss": cfg.toy_weight}, loss=_loss,
                check=_check)
'''


def run_with_toy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    methods = tmp_path / "methods"
    methods.mkdir(exist_ok=True)
    (methods / "toy.py").write_text(TOY)
    script = textwrap.dedent(f"""
        import sys
        import pipeline.distill
        pipeline.distill.__path__.append({str(methods)!r})
        from pipeline.cli import main
        main(sys.argv[1:])
    """)
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_a_toy_method_in_its_own_file_is_a_key_a_check_and_a_term(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path,
                                                                    traces: Path) -> None:
    help_text = run_with_toy(tmp_path, "sft", "--help").stdout
    assert "--toy_kd" in help_text and "weight of the toy term" in help_text
    refused = run_with_toy(tmp_path, "sft", "--config", "configs/sft.yaml", "--output_dir", str(tmp_path / "x"),
                           "--model", str(tiny_qwen),
                           "--dataset", str(traces), "--toy_kd", "true", "--toy_weight", "-1")
    assert refused.returncode == 2 and "toy_weight must be >= 0" in refused.stderr

    out = tmp_path / "student"
    trained = run_with_toy(tmp_path, "sft", "--config", "configs/sft.yaml", "--output_dir", str(out),
                           "--model", str(tiny_qwen), "--dataset", str(traces), "--kd", "online",
                           "--teacher", str(tiny_llama), "--toy_kd", "true", "--toy_weight", "0.1",
                           "--max_steps", "2", "--warmup_steps", "0", "--per_device_train_batch_size", "4",
                           "--logging_steps", "1", "--save_steps", "2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "toy_loss" in h]
    assert len(steps) == 2 and all(h["toy_loss"] > 0 for h in steps)
    for h in steps:  # the loss is CE and KD at 0.5 each, plus 0.1 x the toy term
        assert h["loss"] == pytest.approx(0.5 * h["ce_loss"] + 0.5 * h["kd_loss"] + 0.1 * h["toy_loss"], rel=1e-3)
    assert "weight 0.1 on toy_loss" in (out / "README.md").read_text()
    assert "toy_kd: true" in (out / "config.yaml").read_text()

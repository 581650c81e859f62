"""The eval stage: estimators by hand, reports, errors, 1 vs 2 processes, vLLM vs transformers,
reuse only of the same model files, every model scored on the same prompts, ensembles."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.inference.hf import ensemble_next_token_probs, sample_ensemble, sample_transformers
from pipeline.scoring import majority_correct, metrics, pass_at_k
from pipeline.stages.eval import EvalConfig, common_prompts, main, model_fingerprint, report_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_pass_at_k_by_hand() -> None:
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)


def test_majority_vote_by_hand() -> None:
    assert majority_correct(["4", "4", "5"], ["correct", "correct", "wrong"])
    assert not majority_correct(["5", "5", "4"], ["wrong", "wrong", "correct"])
    assert majority_correct(["4", "5"], ["correct", "wrong"])  # a tie goes to the answer seen first
    assert not majority_correct([None, None], ["wrong", "wrong"])
    # A failed scoring carries its error message as the answer: two alike must not outvote "4".
    boom = "TimeoutException: parsing timed out"
    assert majority_correct([boom, boom, "4"], ["error", "error", "correct"])
    assert majority_correct([boom, boom, "4"], ["timeout", "timeout", "correct"])
    assert not majority_correct([boom, boom], ["error", "error"])


def test_metrics_by_hand() -> None:
    def row(pid: str, correct: bool, answer: str) -> dict:
        return {"prompt_id": pid, "correct": correct, "extracted_answer": answer, "finish_reason": "stop",
                "completion_tokens": 10, "verdict": "correct" if correct else "wrong"}

    rows = [row("a", True, "1"), row("a", True, "1"), row("a", False, "2"), row("a", False, "3"),
            row("b", True, "7"), row("b", True, "7"), row("b", True, "7"), row("b", True, "7")]
    m = metrics(rows, k=4)
    assert m["pass@1"] == 0.75 and m["pass@4"] == 1.0 and m["maj@4"] == 1.0
    half = 1.96 * (0.125 ** 0.5) / 2 ** 0.5  # per-prompt [0.5, 1.0]: sd sqrt(0.125)
    assert m["pass@1_ci95"] == pytest.approx([0.75 - half, 1.0])
    assert m["verdicts"] == {"correct": 6, "wrong": 2} and m["share_truncated"] == 0


def test_only_prompts_every_model_took_are_scored() -> None:
    def rows(model: str, ids: str) -> list[dict]:
        return [{"model": model, "prompt_id": pid, "sample_index": i} for pid in ids for i in range(2)]

    samples = rows("teacher", "abcd") + rows("student", "acd") + rows("base", "abcd")
    # student skipped b as too long; base has no samples for d (its run lost them): both go for everyone.
    samples = [r for r in samples if not (r["model"] == "base" and r["prompt_id"] == "d")]
    kept, n = common_prompts(samples, {"teacher": [], "student": ["b"], "base": []})
    assert n == 2 and {r["prompt_id"] for r in kept} == {"a", "c"} and len(kept) == 3 * 2 * 2
    assert common_prompts(samples, {"teacher": [], "student": ["b", "c"], "base": []})[1] == 1
    assert common_prompts([], {}) == ([], 0)


def test_report_lists_each_models_skipped_prompts() -> None:
    model = {"pass@1": 0.5, "pass@1_ci95": [0.1, 0.9], "pass@2": 0.6, "maj@2": 0.5, "share_truncated": 0.0,
             "mean_completion_tokens": 3.0}
    report = {"protocol": {"prompts": "p", "split": "test", "n_prompts": 2, "k": 2, "temperature": 0.6, "top_p": 0.95,
                           "max_tokens": 8, "seed": 0, "scorer": "math", "backend": "vllm",
                           "models": {"teacher": "t", "student": "s"}},
              "models": {"teacher": {**model, "skipped_too_long": []},
                         "student": {**model, "skipped_too_long": ["id1", "id2"]}}}
    md = report_markdown(report)
    assert "Skipped as too long for `student`: 2 prompts (id1, id2), left out for every model." in md
    assert "for `teacher`" not in md and "(test, 2 prompts)" in md


def test_model_fingerprint_follows_the_files(tmp_path: Path) -> None:
    assert model_fingerprint("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id names one revision-less model
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = model_fingerprint(str(tmp_path))
    (tmp_path / "README.md").write_text("a model card changes nothing")
    assert model_fingerprint(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"weightz")  # retrained in place: same name and size
    assert model_fingerprint(str(tmp_path)) != first
    second = model_fingerprint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert model_fingerprint(str(tmp_path)) != second


@pytest.mark.slow
def test_a_model_retrained_in_place_is_refused_then_sampled_again_on_overwrite(tmp_path: Path, tiny_qwen: Path,
                                                                              tiny_llama: Path, caplog) -> None:
    from pipeline.config import UserError
    from pipeline.demo.tiny import build_model

    model = shutil.copytree(tiny_qwen, tmp_path / "student")
    values = eval_values(tmp_path, [f"student={model}"], "transformers", "eval", max_prompts=2, num_samples=1,
                         max_tokens=8, temperature=1.0)
    caplog.set_level(logging.INFO, logger="pipeline")

    def run(**extra) -> list[str]:
        caplog.clear()
        main(load_config(EvalConfig, None, {**values, **extra}))
        rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").open()]
        return [r["completion"][0]["content"] for r in sorted(rows, key=str) if r["model"] == "student"]

    before = run()
    # A model added: sampled; the other's samples are reused.
    run(models=f"student={model},other={tiny_llama}")
    assert "student: reusing" in caplog.text and "other: reusing" not in caplog.text
    build_model(model, seed=1)  # "retrained": new weights under the same path
    with pytest.raises(UserError, match=r"generations/student was made with other settings \(model \(its files "
                                        r"changed\).*--overwrite"):
        run()
    after = run(overwrite=True)
    assert "reusing" not in caplog.text and after != before and len(after) == 2
    again = run()
    assert "student: reusing" in caplog.text and again == after
    # Scores into the card of a model r1-distill wrote (its tag), which changes no fingerprint.
    from huggingface_hub import ModelCard

    (model / "README.md").write_text("---\ntags:\n- r1-distill\n---\n# a student\n")
    assert run(write_cards=True) == after and "student: reusing" in caplog.text
    card = ModelCard.load(model / "README.md")
    assert "<!-- r1-distill eval" in card.text and "pass@1" in card.text, card.text
    assert {r.metric_type for r in card.data.eval_results} >= {"pass@1"}
    assert run() == after and "student: reusing" in caplog.text


def eval_values(tmp_path: Path, models: list[str], backend: str, out: str, **extra) -> dict:
    return {"models": ",".join(models), "prompt_set": "prompts/arithmetic", "split": "test", "max_prompts": 3,
            "backend": backend, "num_samples": 2, "max_tokens": 12, "dtype": "float32", "max_model_len": 512,
            "enforce_eager": True, "output_dir": str(tmp_path / out), "score_workers": 1, **extra}


def eval_args(*args, **extra) -> list[str]:
    return [token for key, value in eval_values(*args, **extra).items() for token in (f"--{key}", str(value))]


@pytest.mark.slow
def test_two_processes_give_the_same_samples_and_metrics(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path) -> None:
    models = [f"qwen={tiny_qwen}", f"llama={tiny_llama}"]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "-m", "pipeline", "eval",
                          *eval_args(tmp_path, models, "transformers", "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one_args = eval_args(tmp_path, models, "transformers", "one")
    one = subprocess.run([sys.executable, "-m", "pipeline", "eval", *one_args],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    def samples(out: str) -> list[tuple]:
        rows = [json.loads(line) for line in (tmp_path / out / "samples.jsonl").open()]
        return sorted((r["model"], r["prompt_id"], r["sample_index"], r["completion"][0]["content"]) for r in rows)

    assert samples("two") == samples("one") and len(samples("one")) == 2 * 3 * 2
    texts_per_prompt = {}
    for model, pid, _, text in samples("one"):
        texts_per_prompt.setdefault((model, pid), set()).add(text)
    assert any(len(t) == 2 for t in texts_per_prompt.values()), "sampled, not greedy: the k samples should differ"
    report = {o: json.loads((tmp_path / o / "report.json").read_text())["models"] for o in ("one", "two")}
    assert report["one"] == report["two"]

    # The report files, and a rerun reuses the generations on disk.
    md = (tmp_path / "one" / "report.md").read_text()
    assert "| qwen |" in md and "| llama |" in md and "temperature 0.6" in md
    assert (tmp_path / "one" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run([sys.executable, "-m", "pipeline", "eval", *one_args],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("reusing") == 2 and samples("one") == samples("two")


@pytest.mark.slow
def test_vllm_and_transformers_agree_greedily(tmp_path: Path, tiny_qwen: Path) -> None:
    texts = {}
    for backend in ("vllm", "transformers"):
        main(load_config(EvalConfig, None, eval_values(tmp_path, [f"qwen={tiny_qwen}"], backend, backend,
                                                       temperature=0)))
        rows = [json.loads(line) for line in (tmp_path / backend / "samples.jsonl").open()]
        texts[backend] = {r["prompt_id"]: r["completion"][0]["content"] for r in rows}
    assert len(texts["vllm"]) == 3 and texts["vllm"] == texts["transformers"]


@pytest.mark.slow
def test_a_prompt_too_long_for_one_model_is_left_out_for_all(tmp_path: Path, tiny_qwen: Path) -> None:
    from pipeline.demo.tiny import build_model

    short = build_model(tmp_path / "short", max_position_embeddings=128)  # the long prompt does not fit
    rows = [{"id": "p1", "prompt": "What is 1+1?", "answer": "2"},
            {"id": "long", "prompt": "What is 1+1? " + "Think hard. " * 30, "answer": "2"},
            {"id": "p3", "prompt": "What is 2+2?", "answer": "4"}]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = eval_values(tmp_path, [f"big={tiny_qwen}", f"short={short}"], "vllm", "eval",
                         prompt_set=str(tmp_path / "set.jsonl"), split="train", num_samples=1, max_tokens=8,
                         temperature=0, max_model_len="null")
    report = main(load_config(EvalConfig, None, values))
    assert report["protocol"]["n_prompts"] == 2
    assert [report["models"][m]["skipped_too_long"] for m in ("big", "short")] == [[], ["long"]]
    assert {m["prompts"] for m in report["models"].values()} == {2}
    scored = {(r["model"], r["prompt_id"]) for r in map(json.loads, (tmp_path / "eval" / "samples.jsonl").open())}
    assert scored == {(m, p) for m in ("big", "short") for p in ("p1", "p3")}
    assert "Skipped as too long for `short`: 1 prompt (long), left out for every model." in \
        (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.parametrize("change,expected", [
    ({"models": "ghost=/nonexistent/model"}, r"model ghost: /nonexistent/model does not exist"),
    ({"prompt_set": "EMPTY"}, r"the prompt set is empty"),
    ({"prompt_set": "NOANSWER"}, r"no reference answer column"),
])
def test_bad_inputs_fail_with_their_message(tmp_path: Path, tiny_qwen: Path, change: dict, expected: str) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "noanswer.jsonl").write_text('{"id": "a", "prompt": "What is 1+1?"}\n')
    paths = {"EMPTY": str(tmp_path / "empty.jsonl"), "NOANSWER": str(tmp_path / "noanswer.jsonl")}
    change = {k: paths.get(v, v) for k, v in change.items()}
    overrides = {"models": f"qwen={tiny_qwen}", "output_dir": str(tmp_path / "out"), "prompt_set": "prompts/arithmetic",
                 **change}
    if "prompt_set" in change:
        overrides["split"] = "train"
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        main(load_config(EvalConfig, None, overrides))


def test_vllm_backend_refuses_accelerate_processes(tmp_path: Path, tiny_qwen: Path, monkeypatch) -> None:
    """Under `accelerate launch` every process would sample every prompt into the same files."""
    from pipeline.config import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(EvalConfig, None, {"models": f"qwen={tiny_qwen}", "output_dir": str(tmp_path / "out"),
                                         "prompt_set": "prompts/arithmetic"})
    with pytest.raises(UserError, match="--data_parallel_size N"):
        main(cfg)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- ensembles

def test_an_ensemble_averages_probabilities_not_logits() -> None:
    import torch

    a = torch.tensor([[4.0, 0.0, 0.0, 50.0]])  # the last column is vocab padding: cut before the softmax
    b = torch.tensor([[-20.0, 3.0, 3.1, -50.0]])  # sure it is not token 0, unsure between 1 and 2
    probs = ensemble_next_token_probs([a, b], temperature=1.0, top_p=1.0, vocab_size=3)
    expected = (torch.softmax(a[:, :3], -1) + torch.softmax(b[:, :3], -1)) / 2
    assert torch.allclose(probs, expected)
    assert not torch.allclose(probs, torch.softmax((a[:, :3] + b[:, :3]) / 2, -1), atol=0.05)
    assert probs.argmax().item() == 0 and ((a + b)[:, :3]).argmax().item() == 2  # they even pick differently
    hot = ensemble_next_token_probs([a, b], temperature=2.0, top_p=1.0, vocab_size=3)
    assert torch.allclose(hot, (torch.softmax(a[:, :3] / 2, -1) + torch.softmax(b[:, :3] / 2, -1)) / 2)
    assert torch.equal(ensemble_next_token_probs([a, b], 0, 1.0, 3), probs)  # greedy: argmax of the plain mean

    # top-p on the mean: the fewest most likely tokens that reach top_p, renormalized.
    mean = torch.tensor([[0.2, 0.5, 0.3]])
    assert torch.allclose(ensemble_next_token_probs([mean.log()], 1.0, 0.6, 3), torch.tensor([[0.0, 0.625, 0.375]]))
    assert torch.allclose(ensemble_next_token_probs([mean.log()], 1.0, 0.5, 3), torch.tensor([[0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="2 logits for a tokenizer of 3 tokens"):
        ensemble_next_token_probs([a, b[:, :2]], 1.0, 1.0, 3)


@pytest.mark.slow
def test_an_ensemble_of_one_model_is_that_model(tmp_path: Path, tiny_qwen: Path) -> None:
    """Greedy: the ensemble loop (KV caches, stop at EOS) gives HF generate's very records."""
    from pipeline.prompts import load_prompts

    cfg = load_config(EvalConfig, None, eval_values(tmp_path, [f"q={tiny_qwen}"], "transformers", "eval",
                                                   temperature=0, max_tokens=16))
    prompts = load_prompts(cfg, require_answers=True).prompts
    protocol = (cfg.temperature, cfg.dtype)
    reference = sample_transformers(cfg, str(tiny_qwen), prompts, *protocol)
    assert len(reference) == 3 and sample_ensemble(cfg, [str(tiny_qwen)], prompts, *protocol) == reference
    assert sample_ensemble(cfg, [str(tiny_qwen)] * 2, prompts, *protocol) == reference  # one distribution twice

    # Stopping: a copy whose generation_config also ends at a token its greedy completion makes
    # (HF generate and vLLM stop at each of those ids, not only at the tokenizer's EOS).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.prompts import render

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    ids = tokenizer(render(tokenizer, prompts[0]), add_special_tokens=False, return_tensors="pt")
    greedy = AutoModelForCausalLM.from_pretrained(tiny_qwen).generate(**ids, do_sample=False, max_new_tokens=8)
    stopping = shutil.copytree(tiny_qwen, tmp_path / "stopping")
    generation = json.loads((stopping / "generation_config.json").read_text())
    generation["eos_token_id"] = [tokenizer.eos_token_id, int(greedy[0, ids["input_ids"].shape[1] + 5])]
    (stopping / "generation_config.json").write_text(json.dumps(generation))
    reference = sample_transformers(cfg, str(stopping), prompts, *protocol)
    assert reference[0]["finish_reason"] == "stop" and reference[0]["completion_tokens"] <= 6
    assert sample_ensemble(cfg, [str(stopping)], prompts, *protocol) == reference


@pytest.mark.slow
def test_an_ensemble_is_scored_and_its_samples_reused(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path,
                                                      caplog) -> None:
    """Sampled by its own loop under either backend (backend vllm starts no engine here), reused by a rerun."""
    values = eval_values(tmp_path, [f"ens={tiny_qwen}+{tiny_llama}"], "vllm", "eval", max_prompts=2, max_tokens=8)
    report = main(load_config(EvalConfig, None, values))
    assert report["models"]["ens"]["samples"] == 2 * 2 and report["models"]["ens"]["prompts"] == 2
    assert "| ens |" in (tmp_path / "eval" / "report.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").open()]
    assert sorted((r["prompt_id"], r["sample_index"]) for r in rows) == \
        sorted((pid, i) for pid in {r["prompt_id"] for r in rows} for i in range(2))
    texts = {}
    for r in rows:
        texts.setdefault(r["prompt_id"], set()).add(r["completion"][0]["content"])
    assert any(len(t) == 2 for t in texts.values()), "sampled, not greedy: the k samples should differ"
    members = json.dumps([model_fingerprint(str(tiny_qwen)), model_fingerprint(str(tiny_llama))])
    assert report["protocol"]["model_fingerprints"]["ens"] == "sha256:" + hashlib.sha256(members.encode()).hexdigest()

    saved = tmp_path / "eval" / "generations" / "ens" / "samples"
    mtimes = {f: f.stat().st_mtime_ns for f in saved.iterdir()}
    caplog.set_level(logging.INFO, logger="pipeline")
    again = main(load_config(EvalConfig, None, values))
    assert "ens: reusing" in caplog.text and again["models"] == report["models"]
    assert {f: f.stat().st_mtime_ns for f in saved.iterdir()} == mtimes


def test_an_ensemble_of_different_tokenizers_is_refused(tmp_path: Path, tiny_qwen: Path) -> None:
    from pipeline.demo.tiny import build_model, build_tokenizer

    other = build_model(tmp_path / "other", arch="llama", hidden_size=64, num_layers=1,
                        tokenizer=build_tokenizer(merges_from=["What is 12 + 34? Think step by step."] * 4))
    values = {"models": f"ens={tiny_qwen}+{other}", "output_dir": str(tmp_path / "out"),
              "prompt_set": "prompts/arithmetic"}
    with pytest.raises(ValueError, match=f"ensemble members {re.escape(str(tiny_qwen))} and {re.escape(str(other))} "
                                         "have different tokenizers"):
        main(load_config(EvalConfig, None, values))
    with pytest.raises(ValueError, match="model ens: /nonexistent/b does not exist"):
        main(load_config(EvalConfig, None, {**values, "models": f"ens={tiny_qwen}+/nonexistent/b"}))
    assert not (tmp_path / "out").exists()  # refused before anything is written or sampled

"""The eval stage: estimators by hand, reports, errors, 1 vs 2 processes, vLLM vs transformers,
reuse only of the same model files, every model scored on the same prompts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.eval import (EvalConfig, common_prompts, main, majority_correct, metrics, model_fingerprint, pass_at_k,
                           report_markdown)

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
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))  # rewritten in place: same name and size
    assert model_fingerprint(str(tmp_path)) != first
    second = model_fingerprint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert model_fingerprint(str(tmp_path)) != second


@pytest.mark.slow
def test_a_model_retrained_in_place_is_sampled_again(tmp_path: Path, tiny_qwen: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.tiny import build_model

    model = shutil.copytree(tiny_qwen, tmp_path / "student")
    values = eval_values(tmp_path, [f"student={model}"], "transformers", "eval", max_prompts=2, num_samples=1,
                         max_tokens=8, temperature=1.0)

    def run() -> tuple[str, list[str]]:
        capsys.readouterr()
        main(load_config(EvalConfig, None, values))
        rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").open()]
        return capsys.readouterr().out, [r["completion"][0]["content"] for r in sorted(rows, key=str)]

    _, before = run()
    build_model(model, seed=1)  # "retrained": new weights under the same path
    out, after = run()
    assert "reusing" not in out and after != before and len(after) == 2
    out, again = run()
    assert "student: reusing" in out and again == after


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
    one = subprocess.run([sys.executable, "-m", "pipeline", "eval", *eval_args(tmp_path, models, "transformers", "one")],
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
    again = subprocess.run([sys.executable, "-m", "pipeline", "eval", *eval_args(tmp_path, models, "transformers", "one")],
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
    from pipeline.tiny import build_model

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
    overrides = {"models": f"qwen={tiny_qwen}", "output_dir": str(tmp_path / "out"), **change}
    if "prompt_set" in change:
        overrides["split"] = "train"
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        main(load_config(EvalConfig, None, overrides))


def test_vllm_backend_refuses_accelerate_processes(tmp_path: Path, tiny_qwen: Path, monkeypatch) -> None:
    """Under `accelerate launch` every process would sample every prompt into the same files."""
    from pipeline.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(EvalConfig, None, {"models": f"qwen={tiny_qwen}", "output_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="--data_parallel_size N"):
        main(cfg)
    assert not (tmp_path / "out").exists()

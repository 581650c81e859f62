"""The eval stage: estimators by hand, reports, errors, 1 vs 2 processes, vLLM vs transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.eval import EvalConfig, main, majority_correct, metrics, pass_at_k

ROOT = Path(__file__).resolve().parents[1]


def test_pass_at_k_by_hand() -> None:
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)


def test_majority_vote_by_hand() -> None:
    assert majority_correct(["4", "4", "5"], [True, True, False])
    assert not majority_correct(["5", "5", "4"], [False, False, True])
    assert majority_correct(["4", "5"], [True, False])  # a tie goes to the answer seen first
    assert not majority_correct([None, None], [False, False])


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

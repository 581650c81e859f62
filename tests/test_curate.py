"""Curation: scorers on known answers, timeouts and errors as verdicts, filters, decontamination."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from pipeline.curation import CurateConfig, contamination_index, filter_traces, ngrams
from pipeline.rundir import open_run
from pipeline.scoring import score_dataset, score_one
from pipeline.stages.generate import FREE_KEYS, GenerateConfig

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"pattern": r"ANSWER:\s*(\w+)", "tolerance": 1e-6, "choices": "ABCDE", "timeout": 5}
SLOW = ("$(x+1)^{3000}$", "$(x+2)^{3000}$")  # sympy takes seconds to compare these


@pytest.mark.parametrize("scorer,text,reference,verdict", [
    ("math", "so the answer is \\boxed{0.5}.", "\\frac{1}{2}", "correct"),
    ("math", "Halving gives \\boxed{\\frac{1}{2}} in the end", "0.5", "correct"),
    ("math", "First 3+4=7, then 7*2=14. So the answer is \\boxed{14}.", "14", "correct"),
    ("math", "So the answer is \\boxed{15}.", "14", "wrong"),
    ("math", "\\boxed{\\{2, 1\\}}", "\\{1,2\\}", "correct"),
    ("math", "The solution set is \\boxed{[0, 1)}", "[0,1)", "correct"),
    ("math", "The solution set is \\boxed{(0, 1)}", "[0,1)", "wrong"),
    ("math", "I am not sure.", "3", "wrong"),
    ("exact", "The capital is \\boxed{Paris}.", "paris", "correct"),
    ("exact", "\\boxed{Lyon}", "Paris", "wrong"),
    ("numeric", "about \\boxed{3.1416}", "3.14159265", "wrong"),
    ("numeric", "about \\boxed{3.14159265}", "3.14159265", "correct"),
    ("numeric", "the total is 1,234.", "1234", "correct"),
    ("choice", "Looking at the options, the answer is (C).", "C", "correct"),
    ("choice", "\\boxed{B}", "(C)", "wrong"),
    ("regex", "blah ANSWER: yes", "Yes", "correct"),
    ("regex", "blah ANSWER: no", "yes", "wrong"),
    ("math", "\\boxed{4}", None, "no_reference"),
    ("numeric", "\\boxed{4}", "four", "error"),  # an unusable reference is an error, not a crash
])
def test_scorers_on_known_answers(scorer: str, text: str, reference: str | None, verdict: str) -> None:
    assert score_one((scorer, text, reference, OPTIONS))[0] == verdict


def test_math_extracts_the_boxed_answer_inside_prose() -> None:
    verdict, extracted = score_one(("math", "We add them: 2 + 2 = 4, hence \\boxed{4} is it.", "4", OPTIONS))
    assert verdict == "correct" and extracted == "4"


@pytest.mark.slow
def test_timeout_is_a_verdict_even_when_scoring_runs_in_a_thread() -> None:
    import datasets

    rows = [{"completion": [{"role": "assistant", "content": text}], "think_closed": False, "reference_answer": ref}
            for text, ref in ((SLOW[1], SLOW[0]), ("\\boxed{2}", "2"))]
    result = {}
    # math-verify's timeout is signal-based and fails outside a main thread; scoring must not care.
    thread = threading.Thread(target=lambda: result.update(
        ds=score_dataset(datasets.Dataset.from_list(rows), CurateConfig(score_timeout=1, score_workers=1), "math")))
    thread.start()
    thread.join(timeout=120)
    assert result["ds"]["verdict"] == ["timeout", "correct"]
    assert result["ds"]["correct"] == [False, True]


def make_row(pid: str, content: str, *, temperature: float = 0.6, finish: str = "stop", closed: bool = True,
             tokens: int = 50, verdict: str = "correct", problem: str | None = None) -> dict:
    return {"prompt_id": pid, "problem": problem or f"Problem {pid}: compute the thing.", "temperature": temperature,
            "finish_reason": finish, "think_closed": closed, "completion_tokens": tokens,
            "completion": [{"role": "assistant", "content": content}], "verdict": verdict,
            "correct": verdict == "correct"}


def test_filter_counts_on_a_built_dataset(tmp_path: Path) -> None:
    import datasets

    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(json.dumps({"id": "e1", "prompt": "A train leaves the station at noon and travels east "
                                    "at sixty miles per hour until it stops"}) + "\n")
    rows = [
        make_row("a", "x1"), make_row("a", "x1"),  # exact duplicate completion
        make_row("a", "x2", temperature=1.0, verdict="wrong"),
        make_row("b", "y1", finish="length"),  # truncated
        make_row("b", "y2", closed=False),  # no closed think block
        make_row("b", "y3", tokens=5),  # too short
        make_row("c", "z1"), make_row("c", "z2"), make_row("c", "z3", verdict="timeout"),
        make_row("d", "w1",
                 problem="Today a train leaves the station at noon and travels east at sixty miles per hour."),
    ]
    cfg = CurateConfig(decontaminate_against=[f"{eval_set}:train"], require_closed_think=True,
                       min_completion_tokens=10, keep_correct_only=True, max_samples_per_prompt=1)
    kept, report = filter_traces(datasets.Dataset.from_list(rows), cfg, contamination_index(cfg))
    steps = {s["filter"]: (s["in"], s["out"]) for s in report["filters"]}
    assert steps == {"decontaminate": (10, 9), "drop_truncated": (9, 8), "require_closed_think": (8, 7),
                     "min_completion_tokens": (7, 6), "keep_correct_only": (6, 4), "dedupe_completions": (4, 3),
                     "max_samples_per_prompt": (3, 2)}
    assert report["contaminated_prompt_ids"] == ["d"]
    assert [(r["prompt_id"], r["completion"][0]["content"]) for r in kept] == [("a", "x1"), ("c", "z1")]
    assert report["filters"][4]["per_temperature"] == {"0.6": {"in": 5, "out": 4}, "1.0": {"in": 1, "out": 0}}
    assert report["verdicts"] == {"correct": 8, "wrong": 1, "timeout": 1}


def test_short_prompts_are_contaminated_only_when_identical() -> None:
    assert ngrams("What is 2 + 3?", 8) == {("what", "is", "2", "3")}
    index = ngrams("What is 2 + 3?", 8)
    assert ngrams("what is 2+3", 8) & index and not ngrams("What is 2 + 4?", 8) & index


def test_shipped_sets_decontaminate_against_themselves() -> None:
    index = contamination_index(CurateConfig(decontaminate_against=["prompts/word_problems"]))
    problem = json.loads((ROOT / "prompts/word_problems/test.jsonl").open().readline())["question"]
    assert ngrams("Here is one: " + problem, 8) & index


@pytest.mark.slow
def test_curate_stage_alone_rescoring_an_existing_traces_dir(tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "traces"
    rows = [make_row("a", "<think>2+2</think>\\boxed{4}"), make_row("b", "<think>3+3</think>\\boxed{7}")]
    for r, ref in zip(rows, ("4", "6")):
        r.update(reference_answer=ref, prompt=[{"role": "user", "content": r["problem"]}])
        del r["verdict"], r["correct"]
    # A finished generate run's record, as the generate stage leaves it (pipeline/rundir.py).
    made = GenerateConfig(output_dir=str(out), model="teacher", prompt_set=str(ROOT / "prompts/arithmetic"),
                          export=["jsonl"])
    open_run(made, "generate", {}, FREE_KEYS).finish()
    datasets.Dataset.from_list(rows).save_to_disk(str(out / "samples"))

    def curate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "curate", "--output_dir", str(out),
                               "--score_workers", "1", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)

    result = curate("--keep_correct_only")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "keep_correct_only" in result.stdout
    assert yaml.safe_load((out / "curate.config.yaml").read_text())["keep_correct_only"] is True
    assert json.loads((out / "curate.run.json").read_text())["status"] == "complete"
    assert "curated by this config already" in curate("--keep_correct_only").stdout
    refused = curate()  # keep_correct_only back to false: another curated/
    assert refused.returncode == 2 and "keep_correct_only: True -> False" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert datasets.load_from_disk(str(out / "curated"))["prompt_id"] == ["a"]  # untouched
    assert curate("--keep_correct_only", "--overwrite").returncode == 0  # again, into generate's dir: samples kept
    report = json.loads((out / "curation.json").read_text())
    assert report["scorer"] == "math" and report["samples_out"] == 1
    assert report["verdicts"] == {"correct": 1, "wrong": 1}
    assert datasets.load_from_disk(str(out / "curated"))["prompt_id"] == ["a"]
    assert datasets.load_from_disk(str(out / "samples"))["verdict"] == ["correct", "wrong"]
    assert len((out / "curated.jsonl").read_text().splitlines()) == 1
    from huggingface_hub import DatasetCard  # the dataset card is written again with curation's counts

    card = DatasetCard.load(out / "README.md")
    assert "r1-distill" in card.data.tags and "keep_correct_only" in card.text, card.text


def test_regex_scorer_needs_a_pattern() -> None:
    with pytest.raises(ValueError, match="answer_pattern"):
        CurateConfig(scorer="regex")

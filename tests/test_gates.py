"""The keyed bench (prompts/keyed) and its gates (pipeline/study/gates.py): the task's paths check,
slips are injected as make.py trains on them, and the shipped teacher passes its gates (reduced:
a few prompts; the full figures: BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_module():
    spec = importlib.util.spec_from_file_location("keyed_make", ROOT / "prompts/keyed/make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_rows_are_valid_paths_with_slips_only_in_train() -> None:
    make = make_module()
    slipped = {}
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (ROOT / f"prompts/keyed/{split}.jsonl").read_text().splitlines()]
        for row in rows:
            problem = {k: int(v) for k, v in (kv.split("=") for kv in row["question"].split()[1:])}
            assert row["answer"] == str(sum(problem.values()))
            assert len(set(row["solutions"])) == len(row["solutions"]) == 4  # distinct orders
            for text in row["solutions"]:
                make.check_solution(problem, text)
        paths = [text for row in rows for text in row["solutions"]]
        slipped[split] = sum("\nfix >" in text for text in paths) / len(paths)
    assert 0.47 < slipped["train"] < 0.53 and slipped["validation"] == slipped["test"] == 0, slipped
    questions = {s: {json.loads(x)["question"] for x in (ROOT / f"prompts/keyed/{s}.jsonl").read_text().splitlines()}
                 for s in ("train", "validation", "test")}
    assert not (questions["train"] & questions["test"]) and not (questions["validation"] & questions["test"])


def test_the_shipped_rows_are_what_make_py_writes(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "prompts/keyed/make.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for split in ("train", "validation", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / f"prompts/keyed/{split}.jsonl").read_bytes(), split


def test_a_wrong_total_must_be_fixed_on_the_next_line() -> None:
    make = make_module()
    problem = {"a": 7, "b": 3}
    make.check_solution(problem, "<think>\na 7 >7\nb 3 >11\nfix >10\n</think>\nThe answer is \\boxed{10}.")
    with pytest.raises(ValueError, match="is wrong and not fixed"):
        make.check_solution(problem, "<think>\na 7 >7\nb 3 >11\n</think>\nThe answer is \\boxed{11}.")
    with pytest.raises(ValueError, match="unused key"):
        make.check_solution(problem, "<think>\na 7 >7\na 7 >14\n</think>\nThe answer is \\boxed{14}.")


def test_an_injected_slip_is_one_wrong_total_at_the_end_of_a_correct_prefix() -> None:
    from pipeline.study.gates import slip_prefix

    for seed in range(50):
        text = slip_prefix("Sum c=9 a=7 d=4 b=3", random.Random(seed))
        lines = text.removeprefix("<think>\n").splitlines()
        values, total = {"c": 9, "a": 7, "d": 4, "b": 3}, 0
        for i, line in enumerate(lines):
            key, value, written = line.split()
            total += values[key]
            assert int(value) == values[key]
            assert (int(written[1:]) == total) == (i < len(lines) - 1), text  # only the last total is wrong
        assert 1 <= len(lines) <= 3 and text.endswith("\n")


def gates_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, "-m", "pipeline", "gates", "--config", "configs/studies/keyed/gates.yaml",
                             "--output_dir", str(tmp_path), "--max_prompts", "40", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    gates = json.loads((tmp_path / "gates.json").read_text())
    failed = [name for name, ok in gates["gates"].items() if not ok]
    # Both files are written either way; a failed gate is an error that names it.
    assert (result.returncode == 0) == (not failed), result.stderr[-3000:]
    assert not failed or f"fails the gate(s) {', '.join(failed)}" in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "gates.md").read_text().count("| yes |") == len(gates["gates"]) - len(failed)
    return result, gates


@pytest.mark.slow
def test_the_shipped_keyed_teacher_is_strong_has_choices_and_fixes_slips(tmp_path: Path) -> None:
    """`python -m pipeline gates --config configs/studies/keyed/gates.yaml`, on 40 test prompts.
    On all 200 it recovers 0.950 (BENCHMARKS.md); a teacher trained on a tenth of slipped paths
    wrote no fix at all (0.13 recovered)."""
    _, gates = gates_run(tmp_path)
    assert gates["n_prompts"] == 40 and gates["gates"]["strong"] and gates["gates"]["choices"], gates
    assert gates["gates"]["recovers"] and gates["fix_next"] > 0.5, gates

    # A student as good as its teacher leaves no room: that gate fails too.
    report = tmp_path / "student/report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"models": {"student": {"pass@1": gates["pass@1"]}}}))
    (tmp_path / "gates.json").unlink()
    _, again = gates_run(tmp_path, "--student_report", str(report))
    assert again["student_over_teacher"] == 1.0 and again["gates"]["room"] is False


def test_the_room_gate_reads_the_named_student_and_refuses_a_name_its_report_lacks(tmp_path: Path) -> None:
    from pipeline.config import UserError
    from pipeline.study.gates import GatesConfig, student_pass1

    report = tmp_path / "report.json"  # a study's eval names its students by cell
    report.write_text(json.dumps({"models": {"teacher": {"pass@1": 0.99}, "student-quarter__seed-0": {"pass@1": 0.6}}}))
    cfg = GatesConfig(model="prompts/keyed/teacher", prompt_set="prompts/keyed", output_dir=str(tmp_path),
                      student_report=str(report), student_model="student-quarter__seed-0")
    assert student_pass1(cfg) == 0.6
    cfg.student_model = "student"
    with pytest.raises(UserError, match="scores no model 'student', only teacher, student-quarter__seed-0"):
        student_pass1(cfg)

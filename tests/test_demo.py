"""The embedded demo: the shipped teacher and `make teacher`'s data, without training (a reduced
`make demo` and `make teacher`, which trains the teacher on the solutions, run in tests/test_make.py,
as a newcomer types them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.demo import STUDENT, TEACHER

ROOT = Path(__file__).resolve().parents[1]


def parameters(path: Path) -> int:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).num_parameters()


def test_shipped_teacher_is_a_small_qwen2_four_times_the_student(tmp_path: Path) -> None:
    from pipeline.demo.tiny import build_model

    teacher = ROOT / TEACHER
    assert json.loads((teacher / "config.json").read_text())["model_type"] == "qwen2"
    assert sum(f.stat().st_size for f in teacher.iterdir()) <= 10 * 2**20
    student = build_model(tmp_path / "student", **STUDENT)
    assert parameters(student) <= parameters(teacher) / 4


def test_teacher_names_the_row_without_a_solution(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.demo.teacher import TeacherConfig, main

    (tmp_path / "p.jsonl").write_text('{"id": "q1", "question": "What is 1 + 1?", "answer": "2"}\n')
    cfg = load_config(TeacherConfig, ROOT / "configs/teacher.yaml", {
        "prompt_set": str(tmp_path / "p.jsonl"), "output_dir": str(tmp_path / "model"),
        "model": str(tmp_path / "init"), "dataset": str(tmp_path / "solutions"), "hidden_size": "64",
        "eval_config": "null"})
    with pytest.raises(ValueError, match="prompt q1: no 'solution' text"):
        main(cfg)


def test_steps_run_at_once_each_with_its_log_and_a_failure_names_its_log(tmp_path: Path, monkeypatch) -> None:
    """Real processes (`python -m pipeline STAGE --help` and a refused key): each writes its own log, and
    the error of one that fails names its log. (The full demo, with its students side by side, is timed
    by hand: BENCHMARKS.md.)"""
    from pipeline.config import UserError
    from pipeline.demo import PROGRESS, run_at_once, stages

    assert [[name for name, _, _ in step] for step in stages(tmp_path, quick=False)] == [
        ["generate"], ["student-sft", "student-kd"], ["eval"]]
    assert [[name for name, _, _ in step] for step in stages(tmp_path, quick=True)][1] == ["student-sft"]
    monkeypatch.chdir(ROOT)
    seconds = run_at_once([("a", "sft", ["--help"]), ("b", "eval", ["--help"])], tmp_path / "logs")
    assert set(seconds) == {"a", "b"} and all(s > 0 for s in seconds.values())
    assert "--kd_temperature" in (tmp_path / "logs/a.log").read_text()
    assert "--num_samples" in (tmp_path / "logs/b.log").read_text()
    with pytest.raises(UserError, match=r"demo step bad failed with exit status 2 \(its log: .*logs/bad.log\)"):
        run_at_once([("other", "sft", ["--help"]), ("bad", "sft", ["--no_such_key", "1"])], tmp_path / "logs")
    assert "no_such_key" in (tmp_path / "logs/bad.log").read_text()
    assert PROGRESS.findall(" 12%|█▏   | 97/800 [00:21<02:34,  4.55it/s]") == ["97/800"]

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


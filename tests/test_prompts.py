"""Prompt sets: shipped sets, every input format, column mapping, and the errors for bad input."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from pipeline.prompts import PromptSource, UserError, load_prompts

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"qid": "a", "question": "What is 1+1?", "gold": "2", "sys": "Be brief."},
        {"qid": "b", "question": "What is 2+3?", "gold": "5", "sys": None}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name,split,count,ending", [("arithmetic", "train", 5000, "?"),
                                                     ("arithmetic", "test", 200, "?"),
                                                     ("sums", "train", 4000, "?"), ("sums", "test", 200, "?"),
                                                     ("word_problems", "test", 30, "within \\boxed{}.")])
def test_shipped_sets_load_with_answers(name: str, split: str, count: int, ending: str) -> None:
    ps = load_prompts(PromptSource(prompt_set=str(ROOT / "prompts" / name), split=split), require_answers=True)
    assert len(ps.prompts) == count and ps.scorer == "math"
    assert all(p.text.endswith(ending) and p.answer for p in ps.prompts)


@pytest.mark.parametrize("name", ["arithmetic", "sums"])
def test_shipped_splits_are_disjoint_and_made_by_the_script(tmp_path: Path, name: str, monkeypatch) -> None:
    script = str(ROOT / f"prompts/{name}/make.py")
    monkeypatch.setattr(sys, "argv", [script, "--out", str(tmp_path)])
    runpy.run_path(script, run_name="__main__")  # `python make.py --out DIR`, in this process
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / f"prompts/{name}/{split}.jsonl").read_bytes()
    questions = {s: {json.loads(line)["question"] for line in (tmp_path / f"{s}.jsonl").open()}
                 for s in ("train", "test")}
    assert not questions["train"] & questions["test"]


def test_sums_paths_are_distinct_valid_and_a_wrong_one_is_caught() -> None:
    sys.path.insert(0, str(ROOT / "prompts/sums"))
    from make import check_solution  # the script's own checker, which make.py runs on every path

    rows = [json.loads(line) for line in (ROOT / "prompts/sums/train.jsonl").open()]
    assert all(len(set(r["solutions"])) == len(r["solutions"]) == 4 for r in rows)
    terms = [int(t) for t in rows[0]["question"].removeprefix("What is ").removesuffix("?").split(" + ")]
    for text in rows[0]["solutions"]:
        check_solution(terms, text)
    first = rows[0]["solutions"][0].split("\n")[1]  # e.g. "1+7=8: 5 + 8 + 5 + 5"
    a, b = first.split("=")[0].split("+")
    wrong = rows[0]["solutions"][0].replace(first, first.replace(f"={int(a) + int(b)}:", f"={int(a) + int(b) + 1}:"))
    with pytest.raises(ValueError, match="does not follow"):
        check_solution(terms, wrong)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "dataset_dir"])
def test_formats_and_column_mapping(tmp_path: Path, fmt: str) -> None:
    import datasets

    data = datasets.Dataset.from_list(ROWS)
    path = {"jsonl": lambda: write_jsonl(tmp_path / "p.jsonl", ROWS),
            "csv": lambda: (data.to_csv(tmp_path / "p.csv", index=False), tmp_path / "p.csv")[1],
            "parquet": lambda: (data.to_parquet(tmp_path / "p.parquet"), tmp_path / "p.parquet")[1],
            "dataset_dir": lambda: (data.save_to_disk(tmp_path / "d"), tmp_path / "d")[1]}[fmt]()
    src = PromptSource(prompt_set=str(path), id_column="qid", prompt_column="question", answer_column="gold",
                       system_column="sys", system_prompt="Default system.", template="Q: {prompt}")
    prompts = load_prompts(src, require_answers=True).prompts
    assert [(p.id, p.text, p.answer) for p in prompts] == [("a", "Q: What is 1+1?", "2"), ("b", "Q: What is 2+3?", "5")]
    assert [p.system for p in prompts] == ["Be brief.", "Default system."]


def test_ids_are_made_up_when_absent_and_defaults_found(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "set.jsonl", [{"problem": "x?", "answer": 1}, {"problem": "y?", "answer": 2}])
    prompts = load_prompts(PromptSource(prompt_set=str(path))).prompts
    assert [p.id for p in prompts] == ["set-000000", "set-000001"] and prompts[0].answer == "1"


@pytest.mark.parametrize("rows,src_kwargs,expected", [
    ([], {}, r"p\.jsonl: the prompt set is empty"),
    (ROWS, {"prompt_column": "text"},
     r"p\.jsonl: no column 'text' \(set as the prompt column\); columns present: qid, question"),
    ([{"qid": "a", "question": "q1"}, {"qid": "b", "question": "q2"}, {"qid": "a", "question": "q3"}],
     {"id_column": "qid"}, r"p\.jsonl: duplicate id 'a' in rows 1 and 3"),
    ([{"question": "q1"}, {"question": ""}], {}, r"p\.jsonl, row 2: column 'question' is empty"),
    ([{"question": "q1"}], {"__require": True}, r"p\.jsonl: no reference answer column"),
    ([{"other": "q1"}], {}, r"p\.jsonl: no prompt column; set prompt_column to one of: other"),
])
def test_bad_prompt_files_name_file_and_row_or_column(tmp_path: Path, rows, src_kwargs, expected) -> None:
    require = src_kwargs.pop("__require", False)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(UserError, match=expected):
        load_prompts(PromptSource(prompt_set=str(path), **src_kwargs), require_answers=require)


def test_missing_file_split_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"prompt file .*nope\.jsonl does not exist"):
        load_prompts(PromptSource(prompt_set=str(tmp_path / "nope.jsonl")))
    with pytest.raises(UserError, match=r"set\.yaml: no split 'validation'; it has train, test"):
        load_prompts(PromptSource(prompt_set=str(ROOT / "prompts/arithmetic"), split="validation"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_prompts(PromptSource(prompt_set=str(tmp_path / "bad.jsonl")))
    with pytest.raises(UserError, match=r"prompt set .*missing-dir does not exist"):
        load_prompts(PromptSource(prompt_set=str(tmp_path / "missing-dir")))


def test_hub_id_is_tried_and_its_failure_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    # No hub here: the error must still say what was tried. Both libraries read the variable when
    # first imported (an earlier test may have imported them), so their flags are set too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"could not load hub dataset some-org/some-set split 'train'"):
        load_prompts(PromptSource(prompt_set="some-org/some-set"))


def test_max_prompts_reads_only_the_rows_it_uses(tmp_path: Path) -> None:
    """A run of 2 prompts reads 2 rows: a broken row further down the file is never reached (all
    rows read, it fails naming its line)."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(3)])
    path.write_text(path.read_text() + "{not json\n")
    ps = load_prompts(PromptSource(prompt_set=str(path), max_prompts=2))
    assert [p.problem for p in ps.prompts] == ["q0", "q1"]
    with pytest.raises(UserError, match="line 4: not valid JSON"):
        load_prompts(PromptSource(prompt_set=str(path)))

"""Every command README.md gives works on a fresh clone, typed as a newcomer types it.

Each test copies the repository as a clone looks (the files git tracks or would track; no runs/,
no build outputs), links the installed .venv in, and runs `make ...` there, reduced by ARGS so the
whole file stays within a few minutes on 2 cores. Each command's time is printed (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import datasets
import pytest
import yaml

from pipeline.prompts import PromptSource, chat_prompt, load_prompts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# make hands the variables of its command line to every make below it, through MAKEFLAGS: under
# `make test ARGS=...` these commands would otherwise all get pytest's ARGS.
NOT_INHERITED = {"ARGS", "CONFIG", "NUM_PROCESSES", "ACCELERATE_CONFIG", "MAKEFLAGS", "MFLAGS", "MAKELEVEL",
                 "MAKEOVERRIDES"}


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh clone's files. copy2 keeps mtimes: .venv/.installed depends on pyproject.toml, and a
    newer copy of it would make `make` reinstall."""
    if (ROOT / "pyproject.toml").stat().st_mtime > (ROOT / ".venv/.installed").stat().st_mtime:
        # `make` in the copy would then reinstall the shared .venv from the copy, which is deleted after.
        pytest.fail("pyproject.toml is newer than .venv/.installed: run `make install` first (`make test` does)")
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is listed too
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    return tmp_path


def make(clone: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    start = time.time()
    result = subprocess.run(["make", *args], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    print(f"{shlex.join(['make', *args])}: {time.time() - start:.0f} s, exit {result.returncode}", flush=True)
    if ok:
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def assert_fails_naming(result: subprocess.CompletedProcess, *words: str) -> None:
    """The command failed and one line of its output holds all `words` (what to run instead)."""
    lines = [line for line in (result.stdout + result.stderr).splitlines() if all(w in line for w in words)]
    assert result.returncode != 0 and lines, (result.stdout[-2000:], result.stderr[-4000:])


def report(path: Path) -> dict:
    return json.loads(path.read_text())["models"]


def test_stages_alone_in_readme_order(clone: Path) -> None:
    from pipeline.config import load_config
    from pipeline.stages.shrink import ShrinkConfig

    demo = clone / "runs/demo"
    # Before their inputs exist, sft and eval stop at once and name the command that makes them.
    assert_fails_naming(make(clone, "sft", ok=False), "runs/demo/traces does not exist", "make generate")
    assert not (demo / "student-sft" / "model.safetensors").exists()
    assert_fails_naming(make(clone, "eval", ok=False), "does not exist", "make sft")
    assert not (demo / "eval/report.json").exists()

    make(clone, "generate", "ARGS=--max_prompts 24 --num_samples 1")
    for path in ("config.yaml", "summary.json", "curation.json", "samples", "curated/state.json"):
        assert (demo / "traces" / path).exists(), path

    make(clone, "sft", "ARGS=--max_steps 4 --save_strategy no")
    for path in ("student-init/config.json", "student-sft/model.safetensors", "student-sft/config.yaml"):
        assert (demo / path).is_file(), path

    # ARGS used to reach the sub-make that built the traces, so they went to runs/x.
    traces = sorted(p.name for p in (demo / "traces").iterdir())
    make(clone, "sft", "CONFIG=configs/sft.yaml", "ARGS=--output_dir runs/x --max_steps 2 --save_strategy no")
    assert (clone / "runs/x/model.safetensors").is_file() and not (clone / "runs/x/curated").exists()
    assert sorted(p.name for p in (demo / "traces").iterdir()) == traces

    # configs/curate.yaml as shipped: the demo traces scored and filtered again, nothing sampled.
    make(clone, "curate")
    assert json.loads((demo / "traces/curate.run.json").read_text())["status"] == "complete"
    assert (demo / "traces/curate.config.yaml").is_file() and (demo / "traces/curated/state.json").is_file()

    make(clone, "eval", "ARGS=--max_prompts 4 --num_samples 1")
    assert set(report(demo / "eval/report.json")) == {"teacher", "untrained", "student-sft"}
    assert (demo / "eval/report.md").is_file() and (demo / "eval/accuracy.png").is_file()

    # (The rest of the family, feature/relational KD and born-again generations, trains in tests/test_distill.py.)
    # configs/shrink.yaml as shipped: the sums teacher's 4 layers, 2 kept by importance on 64 prompts.
    make(clone, "shrink")
    shrunk = json.loads((demo / "student-shrunk/shrink.json").read_text())
    assert shrunk["parameters"]["student"] > 0 and shrunk["teacher_layers"] == 4 and len(shrunk["kept_layers"]) == 2
    assert shrunk["calibration"]["prompts"] == 64 and len(shrunk["importance"]["scores"]) == 4
    assert load_config(ShrinkConfig, demo / "student-shrunk/config.yaml").output_dir == "runs/demo/student-shrunk"

    # The chain goes on: the SFT student samples, the teacher scores its tokens, then both are scored.
    make(clone, "onpolicy", "ARGS=--max_steps 2 --per_device_train_batch_size 4 --max_completion_length 24 "
         "--save_strategy no")
    summary = json.loads((demo / "student-onpolicy/train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["samples"] == 8 and summary["share_of_step"]["sampling"] > 0
    make(clone, "eval", "CONFIG=configs/eval-onpolicy.yaml", "ARGS=--max_prompts 4 --num_samples 1")
    assert set(report(demo / "eval-onpolicy/report.json")) == {"teacher", "student-sft", "student-onpolicy"}


def test_make_demo_quick_distilled_student_beats_the_untrained_one(clone: Path) -> None:
    result = make(clone, "demo", "ARGS=--quick --output_dir runs/quick")
    out = clone / "runs/quick"
    models = report(out / "eval/report.json")
    assert models["teacher"]["pass@1"] >= 0.9, models
    assert models["student-sft"]["pass@1"] >= models["untrained"]["pass@1"] + 0.2, models
    curation = json.loads((out / "traces/curation.json").read_text())
    assert 0 < curation["samples_out"] < curation["samples_in"], "the traces were verified and filtered"
    for path in ("eval/report.md", "eval/accuracy.png", "timings.json"):
        assert (out / path).is_file() and f"runs/quick/{path}" in result.stdout


@pytest.mark.parametrize("config", [None, "configs/teacher-sums.yaml"])
def test_make_teacher_trains_then_scores(clone: Path, config: str | None) -> None:
    make(clone, "teacher", *([f"CONFIG={config}"] if config else []),
         "ARGS=--max_prompts 8 --max_steps 2 --hidden_size 64 --num_layers 1 --save_strategy no --eval_max_prompts 2")
    runs = "runs/teacher-sums" if config else "runs/teacher"
    for path in ("model/model.safetensors", "model/README.md", "solutions", "eval/report.md"):
        assert (clone / runs / path).exists(), path
    scored = json.loads((clone / runs / "eval/report.json").read_text())
    assert list(scored["models"]) == ["teacher"] and scored["protocol"]["n_prompts"] == 2
    assert scored["protocol"]["models"]["teacher"] == f"{runs}/model"
    records = datasets.load_from_disk(str(clone / runs / "solutions"))
    assert len(records) == 8 * (4 if config else 1)  # the sums set has 4 worked paths per prompt
    # Each record is a prompt as the pipeline renders it, and one of its row's worked solutions, in order.
    prompt_set = "prompts/sums" if config else "prompts/arithmetic"
    prompts = load_prompts(PromptSource(prompt_set=str(clone / prompt_set), split="train", max_prompts=8)).prompts
    rows = [json.loads(line) for line in (clone / prompt_set / "train.jsonl").read_text().splitlines()[:8]]
    paths = [row["solutions"] if config else [row["solution"]] for row in rows]
    assert records["prompt"] == [chat_prompt(p) for p, solutions in zip(prompts, paths) for _ in solutions]
    assert [r[0]["content"] for r in records["completion"]] == [s for solutions in paths for s in solutions]


def test_make_bench_quick(clone: Path) -> None:
    make(clone, "bench", "ARGS=--quick")
    for script in sorted((clone / "bench").glob("bench_*.py")):  # bench/bench_x.py writes runs/bench/x.json
        assert (clone / "runs/bench" / f"{script.stem.removeprefix('bench_')}.json").is_file(), script.name


@pytest.mark.parametrize("name", ["temperature", "data", "samples", "continuation", "methods", "keyed-kd"])
def test_make_study_reduced(clone: Path, name: str) -> None:
    from pipeline.study import cells, load_study

    study = load_study(str(clone / f"configs/studies/{name}.yaml"), {"reduced": "true"})
    make(clone, *(["methods"] if name == "methods" else ["study", f"STUDY=configs/studies/{name}.yaml"]),
         "ARGS=--reduced")
    out = clone / study.output_dir
    table = json.loads((out / "study.json").read_text())
    assert len(table["rows"]) == len(cells(study)) // len(study.seeds)
    assert table["references"]["teacher"] >= 0.3, table["references"]  # 0.69 over the whole test split
    for row in table["rows"]:
        assert 0 <= row["pass@1"] <= 1 and len(row["per_seed"]) == len(study.seeds), row
        # every student trained on the number of traces its cell asks for
        wanted = int(row["traces"]) if "traces" in study.axes else study.common.get("sft.max_train_samples")
        assert wanted is None or row["trained_samples"] == wanted, row
        assert row["tokens_seen"] > 0, row
        base = {**{a: row[a] for a in table["axes"]}, **study.baseline}
        paired = base != {a: row[a] for a in table["axes"]} and any(
            all(r[a] == base[a] for a in table["axes"]) for r in table["rows"])
        assert ("vs_baseline" in row) == paired, row
        if paired:  # pipeline/study/stats.py, Holm over the study's comparisons
            diff = row["vs_baseline"]
            assert diff["ci"][0] <= diff["mean"] <= diff["ci"][1] and diff["p_bootstrap"] <= diff["p_holm"] <= 1, diff
    assert table["comparisons"] == sum("vs_baseline" in row for row in table["rows"])
    assert (out / "study.md").is_file() and (out / "study.png").stat().st_size > 10_000
    assert table["wall_seconds"] > 0 and "commit" in table  # a copy outside git: its commit is unknown (None)
    if study.tuning:  # every method tuned on its grid, on validation, before the seeds ran
        assert {m: len(v["validation_pass@1"]) for m, v in table["tuning"]["methods"].items()} == {"SFT": 2, "KD": 2}
        assert (out / "tuning/study.json").is_file() and "Tuning" in (out / "study.md").read_text()
        assert all(len(row["validation_curve"]["0"]) == 1 for row in table["rows"])  # step 2 of 2
        assert (out / "study-validation.png").is_file()
    if name == "methods":  # 2 runs at a time; the shrunk student's own size
        sizes = {row["method"]: row["parameters"] for row in table["rows"]}
        shrunk = json.loads((out / "shrunk/method-Shrunk+KD/shrink.json").read_text())["parameters"]["student"]
        assert sizes["Shrunk+KD"] == shrunk > sizes["KD_Ensemble"] == sizes["KD+Feature+Relation"] > 0, sizes
        assert len(list((out / "logs").glob("sft-*.log"))) == 3
    if name == "continuation":  # every arm starts from the seed's warm start, scored beside the teacher
        assert set(table["references"]) == {"teacher", "warm__all__seed-0"}, table["references"]
        for stage in ("sft", "onpolicy"):
            config = yaml.safe_load(next((out / "configs" / stage).glob("arm-*.yaml")).read_text())
            assert config["model"] == f"{study.output_dir}/warm/warm__all__seed-0", config
    if name == "temperature":  # a rerun reuses every finished run and only reads the table back
        rerun = make(clone, "study", f"STUDY=configs/studies/{name}.yaml", "ARGS=--reduced")
        started = re.findall(r"-m pipeline (?:generate|shrink|sft|onpolicy|eval) ", rerun.stdout)
        assert not started and rerun.stdout.count("done, reused") == len(
            list((out / "configs").glob("*/*.yaml")))
        record = json.loads((out / "run.json").read_text())  # the study's own record, beside each run's
        assert record["stage"] == "study" and record["status"] == "complete"


def test_make_install_again_does_nothing(clone: Path) -> None:
    """On an installed clone `make install` installs nothing (it re-runs only when pyproject.toml changes)."""
    result = make(clone, "install")
    assert "Nothing to be done" in result.stdout and "pip" not in result.stdout + result.stderr, result.stdout


# Run with `-p` as `make test ARGS=...` would: each collected test's markers, after conftest.py's hooks.
MARKERS = """
import json


def pytest_collection_finish(session):
    with open("collected.json", "w") as out:
        json.dump({item.nodeid: sorted({m.name for m in item.iter_markers()}) for item in session.items}, out)
"""


def test_make_test_fast_is_the_suite_without_its_slow_tests(clone: Path) -> None:
    """`make test-fast` and `make test`, collecting only: test-fast is the whole suite less every test marked
    slow (those that start an engine, a server or a process, or train), and still most of it."""
    (clone / "collected_markers.py").write_text(MARKERS)
    selected = {}
    for target in ("test-fast", "test"):
        make(clone, target, "ARGS=--collect-only -q -p collected_markers -p no:cacheprovider")
        selected[target] = json.loads((clone / "collected.json").read_text())
    fast, everything = selected["test-fast"], selected["test"]
    assert len(fast) > 200, len(fast)
    assert not [test for test, marks in fast.items() if "slow" in marks]
    assert set(fast) == {test for test, marks in everything.items() if "slow" not in marks}
    assert len(everything) > len(fast) and "tests/test_make.py::test_make_bench_quick" in everything

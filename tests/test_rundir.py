"""The run contract (pipeline/rundir.py) on a small config: records, refusals, resumes, locks,
fingerprints. The stages' own reruns are tested in their files (test_sft, test_generate, ...)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.config import UserError, load_config, setting
from pipeline.rundir import RunKeys, check_unchanged, fingerprint, open_run

ROOT = Path(__file__).resolve().parents[1]
FREE = {"save_steps"}


@dataclass
class Toy(RunKeys):
    output_dir: str | None = setting(None, "where it goes")
    learning_rate: float = setting(3e-3, "a result key")
    save_steps: int = setting(3, "a free key")


def toy(out: Path, **kw) -> Toy:
    return load_config(Toy, None, {"output_dir": str(out), **kw})


def test_a_new_run_records_its_config_and_a_finished_one_is_reused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = open_run(toy(out), "toy", {"model": "sha256:aa"}, FREE)
    assert not run.complete and not run.resumed
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running" and record["inputs"] == {"model": "sha256:aa"}
    assert load_config(Toy, out / "config.yaml").learning_rate == 3e-3  # loads as a config file
    run.finish(steps=6)
    again = open_run(toy(out), "toy", {"model": "sha256:aa"}, FREE)
    assert again.complete and json.loads((out / "run.json").read_text())["steps"] == 6
    assert not (out / ".run.lock").exists()


def test_a_changed_result_key_or_input_is_refused_in_one_line_and_nothing_is_touched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    open_run(toy(out), "toy", {"model": "sha256:aa"}, FREE).finish()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError) as err:
        open_run(toy(out, learning_rate="1e-5"), "toy", {"model": "sha256:aa"}, FREE)
    message = str(err.value)
    assert "learning_rate: 0.003 -> 1e-05" in message and "another output_dir" in message
    assert "--overwrite" in message and "\n" not in message
    with pytest.raises(UserError, match=r"model \(its files changed\): sha256:aa -> sha256:bb"):
        open_run(toy(out), "toy", {"model": "sha256:bb"}, FREE)
    with pytest.raises(UserError, match="learning_rate: 0.003 -> 1e-05"):
        check_unchanged(toy(out, learning_rate="1e-5"), "toy", FREE)  # what the study asks before any run
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_free_key_may_change_on_a_resume_and_the_record_says_so(tmp_path: Path) -> None:
    out = tmp_path / "run"
    open_run(toy(out), "toy", {}, FREE)  # never finished: a killed run, which had made something
    (out / "checkpoint-3").mkdir()
    run = open_run(toy(out, save_steps=5), "toy", {}, FREE)
    assert run.resumed and not run.complete
    record = json.loads((out / "run.json").read_text())
    assert record["resumes"][-1]["changed"] == {"save_steps": [3, 5]} and record["free"] == {"save_steps": 5}


def test_the_global_batch_is_compared_instead_of_its_factors(tmp_path: Path) -> None:
    out = tmp_path / "run"
    open_run(toy(out), "toy", {}, FREE, derived={"global_batch": 8})
    (out / "checkpoint-3").mkdir()
    open_run(toy(out), "toy", {}, FREE, derived={"global_batch": 8})
    with pytest.raises(UserError, match="global_batch: 8 -> 16"):
        open_run(toy(out), "toy", {}, FREE, derived={"global_batch": 16})


def test_a_directory_without_a_record_is_refused_and_overwrite_starts_again(tmp_path: Path) -> None:
    out = tmp_path / "old"
    out.mkdir()
    (out / "stage_config.yaml").write_text("learning_rate: 0.003\n")
    with pytest.raises(UserError, match=r"holds files but no run.json.*--overwrite on the command line"):
        open_run(toy(out), "toy", {}, FREE)
    assert (out / "stage_config.yaml").is_file()
    run = open_run(toy(out, overwrite="true"), "toy", {}, FREE)
    assert not (out / "stage_config.yaml").exists() and not run.complete


@pytest.mark.slow  # a second process holds the run
def test_a_second_run_into_one_directory_at_once_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_rundir import FREE, toy
        from pipeline.rundir import open_run
        from pathlib import Path
        open_run(toy(Path({str(out)!r})), "toy", {{}}, FREE)
        (Path({str(out)!r}) / "shards").mkdir()
        print("open", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(UserError, match=rf"being written by another run \(pid {proc.pid}\)"):
            open_run(toy(out), "toy", {}, FREE)
    finally:
        proc.kill()
        proc.wait()
    # The holder was killed: its lock is stale and the run resumes.
    assert open_run(toy(out), "toy", {}, FREE).resumed


def test_fingerprints_follow_the_files_but_not_readme_or_checkpoints(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    first = fingerprint(model)
    (model / "README.md").write_text("pass@1 0.9")  # eval may write scores here
    (model / "checkpoint-2").mkdir()
    (model / "checkpoint-2" / "x.bin").write_bytes(b"intermediate")
    (model / "run.json").write_text("{}")
    assert fingerprint(model) == first
    (model / "model.safetensors").write_bytes(b"retrained")
    assert fingerprint(model) != first
    assert fingerprint("Qwen/Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B"  # a hub id stands for itself


def test_a_run_that_stopped_before_making_anything_starts_as_asked(tmp_path: Path) -> None:
    out = tmp_path / "run"
    open_run(toy(out), "toy", {}, FREE)  # it failed on a bad input right after opening
    check_unchanged(toy(out, learning_rate="1e-5"), "toy", FREE)
    open_run(toy(out, learning_rate="1e-5"), "toy", {}, FREE)
    assert json.loads((out / "run.json").read_text())["config"]["learning_rate"] == 1e-5


def test_a_saved_config_yaml_is_what_was_asked(tmp_path: Path) -> None:
    out = tmp_path / "run"
    open_run(toy(out, learning_rate="1e-4"), "toy", {}, FREE)
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 1e-4

"""The study command: the grid it builds, how runs chain and are reused, and its statistics.
The shipped studies run for real, reduced, in tests/test_make.py."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from pipeline.config import UserError, load_config
from pipeline.study import StudyConfig, load_study
from pipeline.study.grid import Run, cells, plan
from pipeline.study.runner import check_config, execute

ROOT = Path(__file__).resolve().parents[1]
SUMS = {stage: str(ROOT / f"configs/studies/sums/{stage}.yaml") for stage in ("generate", "sft", "eval")}
TEMPERATURE = {"key": "generate.temperatures", "values": [0.5, 1.0]}
METHOD = {"values": {"SFT": {"sft.kd": "none"}, "KD": {"sft.kd": "online", "sft.kd_temperature": 2.0}}}


def study(**kw) -> StudyConfig:
    return StudyConfig(**{"stages": SUMS, "axes": {"T": TEMPERATURE, "method": METHOD}, "seeds": [0, 1],
                          "output_dir": "runs/studies/study", **kw})


def test_axes_combine_as_a_product_with_seeds_and_runs_are_named_by_what_reaches_them() -> None:
    grid = cells(study())
    assert len(grid) == 2 * 2 * 2
    assert {c.name("generate") for c in grid} == {"T-0.5", "T-1.0"}  # method and seed do not reach generate
    assert len({c.name("sft") for c in grid}) == 8
    kd = next(c for c in grid if c.labels == {"T": "1.0", "method": "KD", "seed": "1"})
    assert kd.overrides["sft"] == {"kd": "online", "kd_temperature": 2.0, "seed": 1}
    assert kd.overrides["generate"] == {"temperatures": 1.0}
    assert kd.name("sft") == "T-1.0__method-KD__seed-1" and kd.name("eval") == "all"


def test_zipped_axes_advance_together() -> None:
    prompts = {"key": "generate.max_prompts", "values": [100, 200]}
    grid = cells(study(axes={"T": TEMPERATURE, "prompts": prompts}, zip=[["T", "prompts"]], seeds=[0]))
    assert [(c.labels["T"], c.labels["prompts"]) for c in grid] == [("0.5", "100"), ("1.0", "200")]
    with pytest.raises(UserError, match="same number of values"):
        cells(study(axes={"T": TEMPERATURE, "prompts": {**prompts, "values": [1, 2, 3]}}, zip=[["T", "prompts"]]))


def test_a_key_set_by_two_axes_and_a_bad_key_are_refused() -> None:
    with pytest.raises(UserError, match="generate.temperatures is set by two axes"):
        cells(study(axes={"T": TEMPERATURE, "again": {"key": "generate.temperatures", "values": [2.0]}}))
    with pytest.raises(UserError, match="'temperature' is not stage.key"):
        cells(study(axes={"T": {"key": "temperature", "values": [1.0]}}))
    with pytest.raises(ValueError, match="stages must name base configs for sft and eval"):
        StudyConfig(stages={"sft": SUMS["sft"]})


def test_primary_comparisons_must_name_a_cell() -> None:
    assert study(primary=[{"method": "KD", "T": 1.0}]).primary == [{"method": "KD", "T": 1.0}]
    with pytest.raises(ValueError, match=r"primary: \{'method': 'KDD'\} does not name a cell.*'KD'"):
        study(primary=[{"method": "KDD"}])
    with pytest.raises(ValueError, match="does not name a cell"):
        study(primary=[{"alpha": 0.5}])


def test_runs_chain_and_share_traces(tmp_path: Path) -> None:
    cfg = study(output_dir=str(tmp_path), student_init={"hidden_size": 64})
    runs = plan(cfg, cells(cfg), tmp_path)
    by_stage = {s: [r for r in runs if r.stage == s] for s in ("generate", "sft", "eval")}
    assert [len(v) for v in by_stage.values()] == [2, 8, 1]
    assert [r.stage for r in runs] == ["generate"] * 2 + ["sft"] * 8 + ["eval"]  # the order they must run in
    for sft in by_stage["sft"]:
        temperature = sft.name.split("__")[0]
        assert sft.config["dataset"] == str(tmp_path / "traces" / temperature)
        assert sft.config["model"] == str(tmp_path / "inits" / f"seed-{sft.config['seed']}")
        assert sft.config["max_steps"] == 800  # the base config's keys stay where no axis sets them
    models = by_stage["eval"][0].config["models"]
    assert models[0] == "teacher=prompts/sums/teacher" and len(models) == 9


def test_an_axis_of_student_sizes_trains_each_size_from_its_own_inits(tmp_path: Path) -> None:
    from pipeline.study.grid import inits

    sizes = {"values": {"quarter": {"student_init": {"arch": "llama", "hidden_size": 64, "num_layers": 3}},
                        "half": {"student_init": {"arch": "llama", "hidden_size": 96, "num_layers": 4}}}}
    cfg = study(output_dir=str(tmp_path), axes={"student": sizes, "method": METHOD}, student_init={"hidden_size": 32})
    grid = cells(cfg)
    sft = {r.name: r.config for r in plan(cfg, grid, tmp_path) if r.stage == "sft"}
    assert sft["student-half__method-KD__seed-1"]["model"] == str(tmp_path / "inits/student-half/seed-1")
    assert len(sft) == 8 and not any(r.endswith("inits/seed-0") for r in (c["model"] for c in sft.values()))
    built = inits(cfg, grid, tmp_path)
    assert built[tmp_path / "inits/student-quarter/seed-0"] == {"arch": "llama", "hidden_size": 64, "num_layers": 3,
                                                                 "seed": 0}
    assert len(built) == 4 and {a["hidden_size"] for a in built.values()} == {64, 96}
    with pytest.raises(UserError, match="student_init takes tiny.build_model arguments"):
        cells(study(axes={"student": {"values": {"quarter": {"student_init": 64}}}}))


def test_a_finished_run_is_reused_and_one_whose_config_changed_is_refused(tmp_path: Path, caplog) -> None:
    from pipeline import rundir
    from pipeline.stages import sft

    path = tmp_path / "configs/sft/x.yaml"
    run = Run("sft", "x", {"output_dir": str(tmp_path / "students/x"), "seed": 0, "use_cpu": True, "bf16": False,
                           "model": "runs/demo/student-init", "dataset": "runs/demo/traces"}, path)
    check_config(run)  # writes the config the run starts with
    cfg = load_config(sft.SFTStageConfig, path)
    rundir.open_run(cfg, "sft", sft.inputs(cfg), sft.FREE_KEYS).finish()  # ... and it ran to the end
    caplog.set_level(logging.INFO, logger="pipeline")
    execute(run)  # would start `python -m pipeline sft` on a config without model or traces
    assert "done, reused" in caplog.text
    run.config["seed"] = 1
    with pytest.raises(UserError, match=r"sft run x: output_dir .*students/x was made with other settings "
                                        r"\(seed: 0 -> 1\).*--overwrite"):
        check_config(run)


@pytest.mark.parametrize("name", ["temperature", "data", "samples"])
def test_reduced_lays_its_keys_over_the_study(name: str) -> None:
    path = ROOT / f"configs/studies/{name}.yaml"
    full, reduced = load_study(str(path), {}), load_study(str(path), {"reduced": "true"})
    assert reduced.output_dir == full.output_dir + "-reduced" and reduced.stages == full.stages
    assert set(reduced.axes) == set(full.axes)
    assert {**full.common, **full.reduced_keys["common"]} == reduced.common
    assert len(cells(reduced)) < len(cells(full))
    # The command line wins over the reduced section too.
    assert load_study(str(path), {"reduced": "true", "output_dir": "elsewhere"}).output_dir == "elsewhere"


def test_an_old_reduced_section_names_its_new_key(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text((ROOT / "configs/studies/temperature.yaml").read_text().replace("reduced_keys:", "reduced:"))
    with pytest.raises(UserError, match="now `reduced_keys:`"):
        load_study(str(path), {})


def test_a_started_run_whose_config_changed_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from pipeline import rundir
    from pipeline.stages import sft

    cfg = study(output_dir=str(tmp_path), seeds=[0])
    run = next(r for r in plan(cfg, cells(cfg), tmp_path) if r.stage == "sft")
    check_config(run)  # writes the config the run will start with
    started = load_config(sft.SFTStageConfig, run.path)
    rundir.open_run(started, "sft", sft.inputs(started), sft.FREE_KEYS)  # ... and it started: a killed run
    (Path(started.output_dir) / "checkpoint-2").mkdir()  # that saved a checkpoint
    check_config(run)  # the same config again: it resumes
    run.config["max_train_samples"] = 10
    with pytest.raises(UserError, match=r"max_train_samples: None -> 10"):
        check_config(run)  # it would resume the old run's checkpoints under the new config


def test_the_methods_study_chains_shrink_and_peers_and_runs_wait_for_what_they_read(tmp_path: Path) -> None:
    from pipeline.study.runner import waits_on

    cfg = load_study(str(ROOT / "configs/studies/methods.yaml"), {"output_dir": str(tmp_path)})
    runs = plan(cfg, cells(cfg), tmp_path)
    sft = {r.name: r.config for r in runs if r.stage == "sft"}
    shrunk = str(tmp_path / "shrunk/method-Shrunk+KD")
    assert sft["method-Shrunk+KD__seed-1"]["model"] == shrunk  # cut from the teacher, not the seed's init
    assert sft["method-Mutual__seed-1"]["mutual_peer"] == str(tmp_path / "inits/seed-1001")
    needs = waits_on(runs)
    assert needs[("sft", "method-Shrunk+KD__seed-0")] == {("generate", "all"), ("shrink", "method-Shrunk+KD")}
    assert needs[("sft", "method-SFT__seed-0")] == {("generate", "all")}
    # the eval reads every student, names with "+" included ("name=path", and "a+b" ensembles)
    assert needs[("eval", "all")] == {("sft", name) for name in sft}


def test_parallel_runs_start_when_what_they_read_is_done(tmp_path: Path, monkeypatch) -> None:
    import threading
    import time

    from pipeline.study import runner

    runs = [Run("generate", "g", {"output_dir": "t"}, tmp_path / "g"),
            Run("sft", "a", {"output_dir": "a", "dataset": "t"}, tmp_path / "a"),
            Run("sft", "b", {"output_dir": "b", "dataset": "t"}, tmp_path / "b"),
            Run("eval", "e", {"output_dir": "e", "models": ["x=a", "y=b+a"]}, tmp_path / "e")]
    events, lock = [], threading.Lock()

    def fake(run: Run, log: Path, threads: int) -> None:
        with lock:
            events.append(("start", run.name))
        time.sleep(0.2)
        with lock:
            events.append(("end", run.name))

    monkeypatch.setattr(runner, "execute", fake)
    runner.execute_parallel(runs, 2, tmp_path / "logs")
    order = events
    assert order[:2] == [("start", "g"), ("end", "g")]  # the traces first
    assert {order[2], order[3]} == {("start", "a"), ("start", "b")}  # then both students at once
    assert order[-2:] == [("start", "e"), ("end", "e")]  # the eval after both


def test_a_study_on_a_bench_that_failed_its_gates_is_refused(tmp_path: Path) -> None:
    from pipeline.study import main

    gates = tmp_path / "gates.json"
    with pytest.raises(UserError, match="does not exist: run `python -m pipeline gates`"):
        main(study(output_dir=str(tmp_path / "s"), gates=str(gates)))
    gates.write_text('{"gates": {"strong": true, "choices": false, "recovers": true}}')
    with pytest.raises(UserError, match=r"the gate\(s\) choices failed"):
        main(study(output_dir=str(tmp_path / "s"), gates=str(gates)))
    assert not (tmp_path / "s").exists()  # nothing ran, nothing was written


def test_tuning_gives_every_method_the_same_grid_and_keeps_the_best_on_validation(tmp_path: Path) -> None:
    from pipeline.study import tuning

    grid = {"SFT": {"sft.learning_rate": [1e-3, 3e-3]}, "KD": {"sft.learning_rate": [1e-3, 3e-3]}}
    cfg = study(tuning={"axis": "method", "grid": grid, "seed": 5})
    tcfg = tuning.tuning_study(cfg, tmp_path)
    assert tcfg.seeds == [5] and tcfg.common["eval.split"] == "validation" and tcfg.tuning is None
    assert list(tcfg.axes["method"]["values"]) == ["SFT,learning_rate=0.001", "SFT,learning_rate=0.003",
                                                   "KD,learning_rate=0.001", "KD,learning_rate=0.003"]
    assert tcfg.axes["method"]["values"]["KD,learning_rate=0.003"] == {**METHOD["values"]["KD"],
                                                                        "sft.learning_rate": 3e-3}
    # validation pass@1 per tuning cell, two sampling temperatures each: the mean over them decides
    scores = {"SFT,learning_rate=0.001": (0.5, 0.7), "SFT,learning_rate=0.003": (0.6, 0.5),
              "KD,learning_rate=0.001": (0.2, 0.2), "KD,learning_rate=0.003": (0.3, 0.3)}
    rows = [{"method": m, "T": t, "pass@1": s[i]} for m, s in scores.items() for i, t in enumerate(("0.5", "1.0"))]
    tuned, chosen = tuning.choose(cfg, rows)
    assert tuned.axes["method"]["values"]["SFT"]["sft.learning_rate"] == 1e-3  # 0.60 beats 0.55
    assert tuned.axes["method"]["values"]["KD"] == {**METHOD["values"]["KD"], "sft.learning_rate": 3e-3}
    assert chosen["methods"]["KD"]["validation_pass@1"] == {"KD,learning_rate=0.001": 0.2,
                                                            "KD,learning_rate=0.003": 0.3}
    unequal = {**grid, "KD": {"sft.learning_rate": [1e-3, 3e-3], "sft.kd_alpha": [0.5, 0.9]}}
    with pytest.raises(UserError, match="the same tuning budget"):
        tuning.candidates(study(tuning={"axis": "method", "grid": unequal}))
    with pytest.raises(UserError, match="must be an axis of named bundles"):
        tuning.candidates(study(tuning={"axis": "T", "grid": grid}))


def test_a_study_names_the_commit_it_ran_on_and_says_when_files_differ(tmp_path: Path) -> None:
    from pipeline.study.report import source_commit

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    assert source_commit(tmp_path) is None  # not a git checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "stage.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "stage.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout
    assert head.startswith(source_commit(tmp_path)) and len(source_commit(tmp_path)) == 12
    (tmp_path / "stage.py").write_text("a = 2\n")
    assert source_commit(tmp_path) == head[:12] + "+changes"

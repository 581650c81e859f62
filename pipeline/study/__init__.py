"""Studies: a grid of pipeline runs (generate -> sft -> onpolicy -> eval per cell), read back as one table and plot.

A study config (configs/studies/*.yaml) names a base config per stage and the axes to vary:

    stages: {generate: configs/studies/sums/generate.yaml, sft: ..., eval: ...}
    axes:
      sampling_T: {key: generate.temperatures, values: [0.6, 1.0]}          # one key
      method:                                                               # named bundles of keys
        values: {SFT: {sft.kd: none}, KD: {sft.kd: online, sft.teacher: prompts/sums/teacher}}
    zip: []          # axes are combined as a product; each list here advances its axes together
    seeds: [0, 1]    # every cell is trained once per seed (seed_keys), reported as mean and spread
    baseline: {method: SFT}   # paired differences: each cell against this value, same seeds and prompts
    primary: [{method: KD}]   # declared before running; every comparison's p is Holm-adjusted (stats.py)

Each cell's stages chain: its sft trains on the traces of its generate overrides (shared between
cells that have the same ones) and the eval scores every student with the base eval config's
models (the teacher) beside them. A cell trains with the training stages (shrink, sft, onpolicy)
its axis values set keys of, in that order, each from the last one's student (none set: sft); the
first starts from the seed's init: `student_init`, then `warm_start` (sft keys run once per seed on
it, e.g. a student stopped early that every method continues), unless it is shrink, which cuts a
student from its teacher; an axis value may give its cells an init of their own
(`{student_init: {hidden_size: 96, ...}}`: a second student size). The value "{peer_init}" is
replaced by a second init per seed (built like the cell's init, seed + 1000): a mutual-learning
peer. Runs with the same config run once.
Every stage is a normal run, `python -m pipeline STAGE --config OUT/configs/...yaml`, in its own
process, under the run contract: a finished one is reused on a rerun, a killed one resumes, and a
run whose config changed since is refused before any run starts.

    OUT/traces/<cell>/  OUT/shrunk/<cell>/  OUT/students/<cell>/  OUT/onpolicy/<cell>/  OUT/warm/  OUT/eval/
    OUT/configs/        each run's config (every run's own output_dir holds its record: pipeline/rundir.py)
    OUT/study.md, study.json, study.png                   the table and the plot

    python -m pipeline study --config configs/studies/temperature.yaml [--reduced] [--key value ...]

Read in parts: this file holds the config and `main`; grid.py makes the cells and plans their runs,
runner.py checks and runs them (N at a time), report.py reads them back into the table and the plot.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import rundir
from pipeline.config import UserError, load_config, parse_yaml, require, setting
from pipeline.study import report, tuning
from pipeline.study.grid import STAGES, axis_values, cells, inits, plan
from pipeline.study.runner import check_config, execute, execute_parallel

log = logging.getLogger(__name__)


@dataclass
class StudyConfig:
    description: str = setting("", help="the study's title, on its table and plot")
    output_dir: str | None = setting(None, help="where the runs, their configs, the table and the plot go")
    stages: dict = setting({}, help="stage -> base config file: sft and eval required; generate, shrink, onpolicy "
                                    "optional")
    axes: dict = setting({}, help="name -> {key: stage.key, values: [...]} or {values: {label: {stage.key: value}}}")
    zip: list = setting([], help="groups of axis names that advance together; the other axes combine as a product")
    seeds: list[int] = setting([0], help="every cell runs once per seed, which sets seed_keys")
    seed_keys: list[str] = setting(["sft.seed"], help="stage.key entries each seed sets (add generate.seed to "
                                                      "resample traces)")
    student_init: dict | None = setting(None, help="tiny.build_model arguments: one random student init per seed "
                                                   "(replaces sft's model)")
    warm_start: dict | None = setting(None, help="{sft.key: value}: an sft run per seed from the init, where every "
                                                 "cell starts")
    common: dict = setting({}, help="stage.key: value for every cell")
    baseline: dict = setting({}, help="axis: value, the reference of paired differences")
    gates: str | None = setting(None, help="a gates.json of `python -m pipeline gates` that must show every gate "
                                           "passed before any run starts (the bench's teacher); unset: not checked")
    tuning: dict | None = setting(None, help="{axis, grid: {value: {stage.key: [...]}}, seed, keys}: the same grid "
                                             "per method, chosen on validation first (pipeline/study/tuning.py)")
    primary: list = setting([], help="the comparisons the study is run for, declared before it runs: a list of "
                                     "{axis: value} naming cells (each against the baseline); the rest are secondary")
    plot: dict = setting({}, help="{kind: heatmap, x, y} | {kind: lines, x, lines} | {kind: bars, x}")
    reduced: bool = setting(False, help="run the study's small version: reduced_keys laid over the file's keys "
                                        "(the command line still wins)")
    reduced_keys: dict = setting({}, help="the small version's keys: they replace the above (axes and common: "
                                          "updated key by key)")
    jobs: int = setting(1, help="runs at once (each waits for the runs whose outputs it reads), cores shared among "
                                "them")

    def __post_init__(self) -> None:
        if not {"sft", "eval"} <= set(self.stages) <= set(STAGES):
            raise ValueError("stages must name base configs for sft and eval (and optionally generate, shrink, "
                             f"onpolicy), got {sorted(self.stages)}")
        for stage, path in self.stages.items():
            if not Path(path).is_file():
                raise ValueError(f"stages.{stage}: config file {path} does not exist")
        for group in self.zip:
            unknown = set(group) - set(self.axes)
            if unknown:
                raise ValueError(f"zip names axes that do not exist: {sorted(unknown)} (axes: {sorted(self.axes)})")
        labels = {axis: [label for label, _ in axis_values(axis, spec)] for axis, spec in self.axes.items()}
        for spec in self.primary:
            if not isinstance(spec, dict) or not spec or any(str(v) not in labels.get(a, []) for a, v in spec.items()):
                raise ValueError(f"primary: {spec!r} does not name a cell; each entry is {{axis: value}} with values "
                                 f"of the study's axes: {labels}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        require(self, "output_dir")


def main(cfg: StudyConfig) -> dict[str, Any]:
    if cfg.gates:
        check_gates(cfg.gates)
    out = Path(cfg.output_dir)
    # The study's own record holds its lock and config (as given: the tuned points are in its
    # results); each run's output_dir keeps its own record, so a study may grow (more axis
    # values, more models) and reuse what finished.
    given = cfg
    study_run = rundir.open_run(given, "study", {}, {f.name for f in dataclasses.fields(StudyConfig)})
    commit = report.source_commit()  # the code the runs start from
    tuned = None
    if cfg.tuning:  # the tuning study first (OUT/tuning), then this one with each method's chosen point
        cfg, tuned = tuning.choose(cfg, main(tuning.tuning_study(cfg, out))["rows"])
    grid = cells(cfg)
    runs = plan(cfg, grid, out)
    log.info(f"study {out}: {len(grid)} cells ({len(cfg.seeds)} seeds), {len(runs)} runs")
    for run in runs:  # every config is checked before anything runs
        check_config(run)
    missing = {path: args for path, args in inits(cfg, grid, out).items() if not (path / "config.json").is_file()}
    if missing:  # tiny imports transformers: only when an init is to be built
        from pipeline.demo.tiny import build_model

        for path, args in missing.items():
            build_model(path, **args)
    start = time.time()
    if cfg.jobs > 1:
        execute_parallel(runs, cfg.jobs, out / "logs")
    else:
        for run in runs:
            execute(run)
    log.info(f"study ran in {time.time() - start:.0f} s")
    result = report.report(cfg, grid, runs, out, tuned, wall_seconds=study_run.elapsed(), commit=commit)
    study_run.finish(config=given)
    return result


def check_gates(path: str) -> None:
    """Refuse a study whose bench has not passed its gates (pipeline/study/gates.py)."""
    import json

    if not Path(path).is_file():
        raise UserError(f"gates: {path} does not exist: run `python -m pipeline gates` on the study's teacher first")
    failed = [name for name, ok in json.loads(Path(path).read_text())["gates"].items() if not ok]
    if failed:
        raise UserError(f"gates: {path} shows the gate(s) {', '.join(failed)} failed: a study on this bench cannot "
                        "show what the methods do; fix the teacher or the task first")


# ---------------------------------------------------------------------------- command line

def load(cls: type, path: str | None, overrides: dict[str, Any]) -> StudyConfig:
    """The study config: its file, then (with --reduced) its reduced_keys laid over it (axes and
    common updated key by key), then the command line, which wins over both."""
    if path is not None and Path(path).is_file() and isinstance((parse_yaml(Path(path).read_text()) or {}).get(
            "reduced"), dict):
        raise UserError(f"{path}: the small version's keys are now `reduced_keys:` (`reduced` is the flag that "
                        "runs it); rename the section (CHANGELOG.md)")
    cfg = load_config(cls, path, overrides)
    if not cfg.reduced:
        return cfg
    if not cfg.reduced_keys:
        raise UserError(f"{path}: --reduced needs a `reduced_keys:` section in the study config")
    layer = {key: {**getattr(cfg, key), **value} if key in ("axes", "common") else value
             for key, value in cfg.reduced_keys.items()}
    return load_config(cls, path, overrides, layer=(f"{path}: reduced_keys", layer))


def load_study(path: str | None, overrides: dict[str, Any]) -> StudyConfig:
    return load(StudyConfig, path, dict(overrides))


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

Each cell's stages chain: its sft trains on the traces of its generate overrides (shared between
cells that have the same ones) and the eval scores every student with the base eval config's
models (the teacher) beside them. A cell trains with the training stages (shrink, sft, onpolicy)
its axis values set keys of, in that order, each from the last one's student (none set: sft); the
first starts from the seed's init: `student_init`, then `warm_start` (sft keys run once per seed on
it, e.g. a student stopped early that every method continues), unless it is shrink, which cuts a
student from its teacher. The value "{peer_init}" is replaced by a second init per seed (built like
`student_init`, seed + 1000): a mutual-learning peer. Runs with the same config run once.
Every stage is a normal run, `python -m pipeline STAGE --config OUT/configs/...yaml`, in its own
process, under the run contract: a finished one is reused on a rerun, a killed one resumes, and a
run whose config changed since is refused before any run starts.

    OUT/traces/<cell>/  OUT/shrunk/<cell>/  OUT/students/<cell>/  OUT/onpolicy/<cell>/  OUT/warm/  OUT/eval/
    OUT/configs/        each run's config (every run's own output_dir holds its record: pipeline/rundir.py)
    OUT/study.md, study.json, study.png                   the table and the plot

    python -m pipeline study --config configs/studies/temperature.yaml [--reduced] [--key value ...]
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import json
import math
import os
import re
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import rundir, stages
from pipeline.config import UserError, load_config, parse_yaml, require, setting

log = logging.getLogger(__name__)

STAGES = ("generate", "shrink", "sft", "onpolicy", "eval")
TRAINING = ("shrink", "sft", "onpolicy")  # shrink makes a student from the teacher; the others train one
PEER_INIT = "{peer_init}"  # a value that stands for a second random init per seed (a mutual-learning peer)


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
    plot: dict = setting({}, help="{kind: heatmap, x, y} | {kind: lines, x, lines} | {kind: bars, x}")
    reduced: bool = setting(False, help="run the study's small version: reduced_keys laid over the file's keys "
                                        "(the command line still wins)")
    reduced_keys: dict = setting({}, help="the small version's keys: they replace the above (axes and common: "
                                          "updated key by key)")
    jobs: int = setting(1, help="runs at once (each waits for the runs whose outputs it reads), cores shared among "
                                "them")

    def __post_init__(self) -> None:
        if not {"sft", "eval"} <= set(self.stages) <= set(STAGES):
            raise ValueError(f"stages must name base configs for sft and eval (and optionally generate, shrink, onpolicy), "
                             f"got {sorted(self.stages)}")
        for stage, path in self.stages.items():
            if not Path(path).is_file():
                raise ValueError(f"stages.{stage}: config file {path} does not exist")
        for group in self.zip:
            unknown = set(group) - set(self.axes)
            if unknown:
                raise ValueError(f"zip names axes that do not exist: {sorted(unknown)} (axes: {sorted(self.axes)})")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        require(self, "output_dir")


# ---------------------------------------------------------------------------- the grid

@dataclass
class Cell:
    """One combination of axis values and one seed; `labels` maps axis (and `seed`) to value label."""

    labels: dict[str, str]
    overrides: dict[str, dict[str, Any]]  # stage -> key -> value
    stages_set: dict[str, set[str]]  # axis -> the stages its value sets keys of
    outputs: dict[str, str] = field(default_factory=dict)  # training stage -> its student's dir (set by plan)

    def name(self, stage: str) -> str:
        """The run's name: the labels of the dimensions that reach it. A student depends on its
        traces and earlier training; one eval scores the students of every cell that shares its eval keys."""
        reach = {"generate": {"generate"}, "shrink": {"shrink"}, "sft": {"generate", "shrink", "sft"},
                 "onpolicy": {"generate", "shrink", "sft", "onpolicy"}, "eval": {"eval"}}[stage]
        parts = [f"{axis}-{label}" for axis, label in self.labels.items() if self.stages_set[axis] & reach]
        return _slug("__".join(parts) or "all")

    @property
    def training(self) -> list[str]:
        """The training stages this cell runs: those its axis values set keys of (none: sft)."""
        touched = set().union(*(stages for axis, stages in self.stages_set.items() if axis != "seed"))
        return [s for s in TRAINING if s in touched] or ["sft"]

    @property
    def student(self) -> str:
        return self.name(self.training[-1])


def axis_values(name: str, spec: Any) -> list[tuple[str, dict[str, Any]]]:
    """(label, {stage.key: value}) for each value of an axis."""
    if not isinstance(spec, dict) or "values" not in spec:
        raise UserError(f"axis {name!r}: expected {{key: stage.key, values: [...]}} or {{values: {{label: "
                        f"{{stage.key: value, ...}}}}}}, got {spec!r}")
    values = spec["values"]
    if "key" in spec:
        if not isinstance(values, list) or not values:
            raise UserError(f"axis {name!r}: values must be a non-empty list for a single key")
        return [(str(v), {spec["key"]: v}) for v in values]
    if not isinstance(values, dict) or not all(isinstance(b, dict) for b in values.values()):
        raise UserError(f"axis {name!r}: without `key`, values must map each label to its keys")
    return [(str(label), dict(bundle)) for label, bundle in values.items()]


def cells(cfg: StudyConfig) -> list[Cell]:
    """Every combination: zipped groups advance together, the rest combine as a product, then seeds."""
    axes = {name: axis_values(name, spec) for name, spec in cfg.axes.items()}
    for group in cfg.zip:
        if len({len(axes[a]) for a in group}) > 1:
            raise UserError(f"zip {group}: zipped axes need the same number of values, got "
                              + ", ".join(f"{a}: {len(axes[a])}" for a in group))
    grouped = [list(g) for g in cfg.zip] + [[a] for a in axes if not any(a in g for g in cfg.zip)]
    dims = [[tuple((a, axes[a][i]) for a in group) for i in range(len(axes[group[0]]))] for group in grouped]
    dims.append([(("seed", (str(s), {k: s for k in cfg.seed_keys})),) for s in cfg.seeds])
    out = []
    for combo in itertools.product(*dims):
        labels, overrides, touched = {}, {s: {} for s in STAGES}, {}
        for axis, (label, bundle) in (pair for group in combo for pair in group):
            labels[axis] = label
            touched[axis] = set()
            for dotted, value in bundle.items():
                stage, key = stage_key(dotted, f"axis {axis!r}, value {label!r}")
                if key in overrides[stage]:
                    raise UserError(f"{dotted} is set by two axes ({axis!r} and another): give it to one")
                overrides[stage][key] = value
                touched[axis].add(stage)
        out.append(Cell(labels, overrides, touched))
    return out


def stage_key(dotted: str, where: str) -> tuple[str, str]:
    stage, _, key = dotted.partition(".")
    if stage not in STAGES or not key:
        raise UserError(f"{where}: {dotted!r} is not stage.key (stages: {', '.join(STAGES)})")
    return stage, key


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


# ---------------------------------------------------------------------------- running

def main(cfg: StudyConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    grid = cells(cfg)
    runs = plan(cfg, grid, out)
    # The study's own record holds its lock and config; each run's output_dir keeps its own
    # record, so a study may grow (more axis values, more models) and reuse what finished.
    study_run = rundir.open_run(cfg, "study", {}, {f.name for f in dataclasses.fields(StudyConfig)})
    log.info(f"study {out}: {len(grid)} cells ({len(cfg.seeds)} seeds), {len(runs)} runs")
    for run in runs:  # every config is checked before anything runs
        check_config(run)
    if cfg.student_init:
        from pipeline.demo.tiny import build_model

        peers = PEER_INIT in json.dumps([c.overrides for c in grid])
        for seed in [*cfg.seeds, *([s + PEER_OFFSET for s in cfg.seeds] if peers else [])]:
            if not (student_init(out, seed) / "config.json").is_file():
                build_model(student_init(out, seed), **cfg.student_init, seed=seed)
    start = time.time()
    if cfg.jobs > 1:
        execute_parallel(runs, cfg.jobs, out / "logs")
    else:
        for run in runs:
            execute(run)
    log.info(f"study ran in {time.time() - start:.0f} s")
    result = report(cfg, grid, runs, out)
    study_run.finish(config=cfg)
    return result


@dataclass
class Run:
    stage: str
    name: str
    config: dict[str, Any]
    path: Path  # the config file under OUT/configs/


def plan(cfg: StudyConfig, grid: list[Cell], out: Path) -> list[Run]:
    """The distinct generate, sft and eval runs of the grid, in the order they must run."""
    base = {stage: parse_yaml(Path(path).read_text()) or {} for stage, path in cfg.stages.items()}
    common = {s: {} for s in STAGES}
    for dotted, value in cfg.common.items():
        stage, key = stage_key(dotted, "common")
        common[stage][key] = value
    runs: dict[tuple[str, str], Run] = {}

    def add(stage: str, name: str, config: dict[str, Any]) -> Run:
        run = Run(stage, name, config, out / "configs" / stage / f"{name}.yaml")
        if runs.setdefault((stage, name), run).config != config:
            raise UserError(f"{stage} run {name}: two cells give it different configs")
        return run

    same: dict[str, str] = {}  # (stage, config without output_dir) -> the output_dir of the run that has it

    def output(stage: str, name: str, config: dict[str, Any], output_dir: Path) -> str:
        """Add the run, or find the run with this very config (e.g. one sft feeding two methods)."""
        key = json.dumps([stage, config], sort_keys=True, default=str)
        if key not in same:
            same[key] = str(output_dir)
            add(stage, name, {**config, "output_dir": str(output_dir)})
        return same[key]

    evals: dict[str, dict[str, Any]] = {}
    warm_models: dict[str, str] = {}  # scored beside the teacher: where every cell started
    for cell in grid:
        seed = int(cell.labels["seed"])
        traces = None
        if "generate" in cfg.stages:
            traces = out / "traces" / cell.name("generate")
            add("generate", cell.name("generate"), {**base["generate"], **common["generate"],
                                                    **cell.overrides["generate"], "output_dir": str(traces)})
        model = str(student_init(out, seed)) if cfg.student_init else None
        if cfg.warm_start:
            warm = {**base["sft"], **common["sft"], **{k: seed for k in sft_seed_keys(cfg)},
                    **{stage_key(k, "warm_start")[1]: v for k, v in cfg.warm_start.items()}}
            warm.update({"model": model} if model else {})
            warm.update({"dataset": str(traces)} if traces else {})
            name = _slug(f"warm__{cell.name('generate')}__seed-{seed}")
            model = output("sft", name, warm, out / "warm" / name)
            warm_models.setdefault(name, model)
        for stage in cell.training:
            if stage not in base:
                raise UserError(f"cell {cell.labels}: its axes set {stage} keys, but stages names no {stage} config")
            config = {**base[stage], **common[stage], **cell.overrides[stage]}
            config = {k: str(student_init(out, seed + PEER_OFFSET)) if v == PEER_INIT else v for k, v in config.items()}
            if stage == "shrink":  # a student cut from its teacher: the next stage's init
                model = output(stage, cell.name(stage), config, out / "shrunk" / cell.name(stage))
                continue
            config.update({"model": model} if model else {})
            if stage == "sft" and traces:
                config["dataset"] = str(traces)
            model = output(stage, cell.name(stage), config,
                           out / ("students" if stage == "sft" else stage) / cell.name(stage))
            cell.outputs[stage] = model
        evaluation = evals.setdefault(cell.name("eval"), {**base["eval"], **common["eval"], **cell.overrides["eval"],
                                                          "output_dir": str(out / "eval" / cell.name("eval"))})
        evaluation["models"] = list(evaluation.get("models") or []) + [f"{cell.student}={model}"]
    for name, evaluation in evals.items():
        evaluation["models"] += [f"{warm}={path}" for warm, path in warm_models.items()]
        add("eval", name, evaluation)
    return sorted(runs.values(), key=lambda r: STAGES.index(r.stage))


def sft_seed_keys(cfg: StudyConfig) -> list[str]:
    return [stage_key(k, "seed_keys")[1] for k in cfg.seed_keys if k.startswith("sft.")]


PEER_OFFSET = 1000


def student_init(out: Path, seed: int) -> Path:
    return out / "inits" / f"seed-{seed}"


def check_config(run: Run) -> None:
    """Write the run's config and load it as its stage will, so that a bad key, or a config its
    output_dir's record would refuse (pipeline/rundir.py), stops the study before the first run."""
    run.path.parent.mkdir(parents=True, exist_ok=True)
    run.path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    module, cfg = stage_config(run)
    try:
        rundir.check_unchanged(cfg, run.stage, module.FREE_KEYS)
    except UserError as err:
        raise UserError(f"{run.stage} run {run.name}: {err}") from None


def stage_config(run: Run) -> tuple[Any, Any]:
    """The stage module and the run's config, loaded as `python -m pipeline STAGE` loads it."""
    module, cls = stages.stage(run.stage)
    try:
        return module, load_config(cls, run.path)
    except UserError as err:
        raise UserError(f"{run.stage} run {run.name} ({run.path}): {err}") from None


def execute(run: Run, log_file: Path | None = None, threads: int | None = None) -> None:
    """Run one stage in its own process, unless its output_dir holds this very run finished
    (rundir.finished: same config, same inputs); its output to `log_file` and `threads` CPU
    threads when runs share the machine. A stage resumes or reuses what it can by itself."""
    module, cfg = stage_config(run)
    if rundir.finished(cfg, run.stage, module.inputs(cfg)):
        log.info(f"==> {run.stage} {run.name}: done, reused")
        return
    command = [sys.executable, "-m", "pipeline", run.stage, "--config", str(run.path)]
    log.info(f"\n==> {run.stage} {run.name}: {' '.join(command)}" + (f" > {log_file}" if log_file else ""))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("w") as sink:
            code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode
    else:
        sys.stdout.flush()
        code = subprocess.run(command, env=env).returncode
    if code:
        where = f"see {log_file}" if log_file else "its error is above"
        raise UserError(f"{run.stage} run {run.name} failed (exit status {code}; {where}): fix it and rerun the "
                        "study, finished runs are reused")


def execute_parallel(runs: list[Run], jobs: int, logs: Path) -> None:
    """`jobs` runs at a time; a run starts once every run whose output_dir its config names
    (traces, init, teacher, peer, the student it continues) has finished."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    needs = waits_on(runs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    finished: set[tuple[str, str]] = set()
    waiting, running = list(runs), {}
    with ThreadPoolExecutor(jobs) as pool:
        while waiting or running:
            for run in [r for r in waiting if needs[(r.stage, r.name)] <= finished][: jobs - len(running)]:
                waiting.remove(run)
                running[pool.submit(execute, run, logs / f"{run.stage}-{run.name}.log", threads)] = run
            if not running:
                raise UserError("study runs wait on each other in a cycle: " + ", ".join(r.name for r in waiting))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()  # a failed run stops the study (the others finish first)
                run = running.pop(future)
                finished.add((run.stage, run.name))


def waits_on(runs: list[Run]) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """(stage, name) -> the runs whose output_dir its config names."""
    outputs = {r.config["output_dir"]: (r.stage, r.name) for r in runs}
    return {(r.stage, r.name): {outputs[v] for v in _strings(r.config) if v in outputs} - {(r.stage, r.name)}
            for r in runs}


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if not isinstance(value, str):
        return []
    path = value.split("=", 1)[-1]  # eval's "name=path", and its ensembles "name=a+b"
    return [value, path, *path.split("+")]


# ---------------------------------------------------------------------------- reading it back

def report(cfg: StudyConfig, grid: list[Cell], runs: list[Run], out: Path) -> dict[str, Any]:
    """Mean pass@1 over seeds per cell, the spread across seeds, and paired differences against
    the baseline: per seed, and per prompt (averaged over seeds) for a 95% interval."""
    scores: dict[str, dict[str, float]] = {}  # student run -> prompt id -> mean correct over its samples
    references: dict[str, float] = {}  # the base eval's own models (the teacher)
    for run in (r for r in runs if r.stage == "eval"):
        eval_dir = Path(run.config["output_dir"])
        rows = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines()]
        by_model: dict[str, dict[str, list[bool]]] = {}
        for r in rows:
            by_model.setdefault(r["model"], {}).setdefault(r["prompt_id"], []).append(bool(r["correct"]))
        for model, prompts in by_model.items():
            per_prompt = {p: sum(v) / len(v) for p, v in prompts.items()}
            if model in {c.student for c in grid}:
                scores[model] = per_prompt
            else:
                references[model] = sum(per_prompt.values()) / len(per_prompt)
    axes = [a for a in grid[0].labels if a != "seed"]
    groups: dict[tuple[str, ...], list[Cell]] = {}
    for cell in grid:
        groups.setdefault(tuple(cell.labels[a] for a in axes), []).append(cell)

    def per_seed(key: tuple[str, ...]) -> dict[str, dict[str, float]]:
        return {c.labels["seed"]: scores[c.student] for c in groups[key]}

    rows = []
    for key, members in groups.items():
        seeds = per_seed(key)
        pass1 = {s: _mean(list(p.values())) for s, p in seeds.items()}
        # the data of the cell's first training stage; the tokens seen by all of them (not the warm start)
        chain = [_read_json(Path(d) / "train_summary.json") for d in members[0].outputs.values()]
        summary = chain[0]
        seen = [s.get("tokens_seen") for s in chain]
        row = {**dict(zip(axes, key)), "pass@1": _mean(list(pass1.values())), "seed_std": _std(list(pass1.values())),
               "per_seed": pass1, "trained_samples": summary.get("samples"), "trained_prompts": summary.get("prompts"),
               "trained_tokens": summary.get("completion_tokens"), "tokens_seen": None if None in seen else sum(seen),
               "parameters": parameters(list(members[0].outputs.values())[-1])}
        base_key = tuple(cfg.baseline.get(a, v) for a, v in zip(axes, key))
        if cfg.baseline and base_key != key and base_key in groups:
            row["vs_baseline"] = paired_difference(seeds, per_seed(base_key))
        rows.append(row)
    seconds = sum(_read_json(Path(r.config["output_dir"]) / "run.json").get("seconds", 0) for r in runs)
    result = {"description": cfg.description, "axes": axes, "seeds": cfg.seeds, "baseline": cfg.baseline,
              "references": references, "rows": rows, "run_seconds": round(seconds)}
    (out / "study.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "study.md").write_text(markdown(result))
    plot(result, cfg.plot, out / "study.png")
    log.info(markdown(result))
    log.info(f"table: {out / 'study.md'}, plot: {out / 'study.png'}")
    return result


def paired_difference(cell: dict[str, dict[str, float]], base: dict[str, dict[str, float]]) -> dict[str, Any]:
    """cell - baseline on the same seeds and prompts: per seed, their mean and spread, and a 95%
    interval over prompts of the per-prompt difference averaged over seeds."""
    seeds = sorted(set(cell) & set(base))
    prompts = sorted(set.intersection(*(set(cell[s]) & set(base[s]) for s in seeds)))
    per_seed = {s: _mean([cell[s][p] - base[s][p] for p in prompts]) for s in seeds}
    per_prompt = [_mean([cell[s][p] - base[s][p] for s in seeds]) for p in prompts]
    half = 1.96 * _std(per_prompt) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    mean = _mean(per_prompt)
    return {"mean": mean, "seed_std": _std(list(per_seed.values())), "per_seed": per_seed,
            "prompt_ci95": [mean - half, mean + half], "seeds_better": sum(d > 0 for d in per_seed.values()),
            "seeds": len(seeds)}


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    """Sample standard deviation (n - 1); nan for a single value."""
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def parameters(model_dir: str) -> int | None:
    """The student's parameter count, from its safetensors headers (students may differ in size)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as weights:
            total += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    return total


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def markdown(result: dict[str, Any]) -> str:
    axes, n = result["axes"], len(result["seeds"])
    lines = [f"{result['description']}".strip(), "",
             f"pass@1: mean over {n} seed(s) ± their standard deviation; traces, prompts and completion tokens "
             "the student trained on (first seed; on-policy: its own samples), and completion tokens seen over all "
             "steps; paired difference: the same seeds and prompts against the "
             "baseline, mean ± the seeds' standard deviation, [95% interval over prompts], seeds where the cell is "
             "better.", ""]
    head = [*axes, "pass@1", "per seed", "parameters", "traces (prompts)", "trained tokens", "tokens seen",
            "vs " + ", ".join(
        f"{k}={v}" for k, v in result["baseline"].items()) if result["baseline"] else ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        diff = row.get("vs_baseline")
        diff_text = (f"{diff['mean']:+.3f} ± {_fmt(diff['seed_std'])} [{diff['prompt_ci95'][0]:+.3f}, "
                     f"{diff['prompt_ci95'][1]:+.3f}], {diff['seeds_better']}/{diff['seeds']}") if diff else ""
        lines.append("| " + " | ".join([*(row[a] for a in axes), f"{row['pass@1']:.3f} ± {_fmt(row['seed_std'])}",
                                         " ".join(f"{v:.3f}" for v in row["per_seed"].values()),
                                         f"{row['parameters']:,}" if row.get("parameters") else "",
                                         f"{row['trained_samples']} ({row['trained_prompts']})",
                                         str(row["trained_tokens"]), str(row.get("tokens_seen")), diff_text]) + " |")
    refs = ", ".join(f"{m} {v:.3f}" for m, v in result["references"].items())
    lines += ["", f"Reference models (same eval): {refs or 'none'}. Run time of all runs: {result['run_seconds']} s.",
              ""]
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def plot(result: dict[str, Any], spec: dict[str, Any], path: Path) -> None:
    """heatmap (x, y), lines (x, one line per `lines` axis) or bars (x): mean pass@1, seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, kind = result["rows"], spec.get("kind", "bars")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    order = lambda axis: list(dict.fromkeys(r[axis] for r in rows))  # noqa: E731 (grid order)
    if kind == "heatmap":
        xs, ys = order(spec["x"]), order(spec["y"])
        at = {(r[spec["x"]], r[spec["y"]]): r for r in rows}
        grid = [[at[(x, y)]["pass@1"] if (x, y) in at else float("nan") for x in xs] for y in ys]  # zip: gaps
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, origin="lower", aspect="auto")
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                if (x, y) not in at:
                    continue
                r = at[(x, y)]
                ax.text(j, i, f"{r['pass@1']:.3f}\n±{_fmt(r['seed_std'])}", ha="center", va="center",
                        color="white" if r["pass@1"] < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yticks(range(len(ys)), ys)
        ax.set_ylabel(spec["y"])
        fig.colorbar(image, ax=ax, label="student pass@1")
    else:
        lines = order(spec["lines"]) if kind == "lines" else [None]
        xs = order(spec["x"])
        for line in lines:
            points = [r for r in rows if line is None or r[spec["lines"]] == line]  # zipped axes: not every x
            at = [xs.index(r[spec["x"]]) for r in points]
            means = [r["pass@1"] for r in points]
            spread = [0 if math.isnan(r["seed_std"]) else r["seed_std"] for r in points]
            if kind == "lines":
                ax.errorbar(at, means, yerr=spread, marker="o", capsize=3, label=line)
            else:
                ax.bar(at, means, yerr=spread, capsize=4, color="tab:blue")
                for x, r, top in zip(at, points, (m + s for m, s in zip(means, spread))):
                    if "vs_baseline" in r:  # the paired difference against the baseline, on its bar
                        ax.text(x, top + 0.01, f"{r['vs_baseline']['mean']:+.3f}", ha="center", fontsize=7)
        for m, (name, value) in enumerate(result["references"].items()):
            ax.axhline(value, linestyle="--", color=f"C{m + 3}", label=f"{name} {value:.3f}")
        crowded = sum(len(x) for x in xs) > 60
        ax.set_xticks(range(len(xs)), xs, rotation=30 if crowded else 0, ha="right" if crowded else "center",
                      fontsize=8 if crowded else None)
        ax.set_ylabel("student pass@1 (mean ± seed std)")
        ax.legend(fontsize=8)
    ax.set_xlabel(spec.get("x", ""))
    title = result["description"].split(" (make study")[0] or "study"
    references = ", ".join(f"{m} {v:.3f}" for m, v in result["references"].items())
    ax.set_title(textwrap.fill(title, 70) + (f"\n(reference: {references})" if kind == "heatmap" and references else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


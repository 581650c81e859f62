"""The study's grid: its cells (every combination of axis values, then seeds) and the distinct runs
they need (`plan`), in the order those must run.

A cell's runs are named by the labels of the axes that reach them (`Cell.name`), so that runs with the
same config are one run: cells that share generate overrides share their traces, and one eval scores
the students of every cell that shares its eval keys. Each seed trains from its own init
(`student_init`, when the study builds one; an axis value may give its cells their own, e.g. a
second student size: `{student_init: {hidden_size: 96, ...}}`), and "{peer_init}" stands for a
second init per seed (seed + PEER_OFFSET): a mutual-learning peer.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import UserError, parse_yaml

if TYPE_CHECKING:  # the config lives in the package's __init__, which imports this module
    from pipeline.study import StudyConfig

STAGES = ("generate", "shrink", "sft", "onpolicy", "eval")
TRAINING = ("shrink", "sft", "onpolicy")  # shrink makes a student from the teacher; the others train one
PEER_INIT = "{peer_init}"  # a value that stands for a second random init per seed (a mutual-learning peer)
PEER_OFFSET = 1000
INIT = "student_init"  # a bundle key without a stage: the cell's own random init (tiny.build_model arguments)


# ---------------------------------------------------------------------------- cells

@dataclass
class Cell:
    """One combination of axis values and one seed; `labels` maps axis (and `seed`) to value label."""

    labels: dict[str, str]
    overrides: dict[str, dict[str, Any]]  # stage -> key -> value
    stages_set: dict[str, set[str]]  # axis -> the stages its value sets keys of ("init": its student_init)
    init: tuple[str, dict[str, Any]] | None = None  # (its axis-label name, build arguments) when an axis sets one
    outputs: dict[str, str] = field(default_factory=dict)  # training stage -> its student's dir (set by plan)

    def name(self, stage: str) -> str:
        """The run's name: the labels of the dimensions that reach it. A student depends on its
        traces and earlier training; one eval scores the students of every cell that shares its eval keys."""
        reach = {"generate": {"generate"}, "shrink": {"shrink"}, "sft": {"generate", "shrink", "init", "sft"},
                 "onpolicy": {"generate", "shrink", "init", "sft", "onpolicy"}, "eval": {"eval"}}[stage]
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
        labels, overrides, touched, init = {}, {s: {} for s in STAGES}, {}, None
        for axis, (label, bundle) in (pair for group in combo for pair in group):
            labels[axis] = label
            touched[axis] = set()
            for dotted, value in bundle.items():
                if dotted == INIT:
                    if init or not isinstance(value, dict):
                        raise UserError(f"axis {axis!r}, value {label!r}: {INIT} takes tiny.build_model arguments "
                                        f"({{arch: llama, hidden_size: 96, ...}}), and one axis sets it")
                    init = (_slug(f"{axis}-{label}"), value)
                    touched[axis].add("init")
                    continue
                stage, key = stage_key(dotted, f"axis {axis!r}, value {label!r}")
                if key in overrides[stage]:
                    raise UserError(f"{dotted} is set by two axes ({axis!r} and another): give it to one")
                overrides[stage][key] = value
                touched[axis].add(stage)
        out.append(Cell(labels, overrides, touched, init))
    return out


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


def stage_key(dotted: str, where: str) -> tuple[str, str]:
    stage, _, key = dotted.partition(".")
    if stage not in STAGES or not key:
        raise UserError(f"{where}: {dotted!r} is not stage.key (stages: {', '.join(STAGES)})")
    return stage, key


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


# ---------------------------------------------------------------------------- runs

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
        model = str(student_init(out, seed, cell)) if cfg.student_init or cell.init else None
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
            config = {k: str(student_init(out, seed + PEER_OFFSET, cell)) if v == PEER_INIT else v
                      for k, v in config.items()}
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


# ---------------------------------------------------------------------------- seeds' inits

def student_init(out: Path, seed: int, cell: Cell | None = None) -> Path:
    return out / "inits" / (cell.init[0] if cell and cell.init else "") / f"seed-{seed}"


def inits(cfg: StudyConfig, grid: list[Cell], out: Path) -> dict[Path, dict[str, Any]]:
    """Each random init the grid trains from -> its tiny.build_model arguments: every seed's (the
    cell's own student_init or the study's) and its peer's (seed + PEER_OFFSET) where a value is PEER_INIT."""
    found = {}
    for cell in grid:
        args = cell.init[1] if cell.init else cfg.student_init
        if args:
            seed = int(cell.labels["seed"])
            peer = PEER_INIT in json.dumps(cell.overrides)
            for s in [seed, *([seed + PEER_OFFSET] if peer else [])]:
                found[student_init(out, s, cell)] = {**args, "seed": s}
    return found

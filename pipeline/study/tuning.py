"""A study's tuning stage: every method gets the same small grid, chosen on the validation split,
before the chosen config runs on the study's seeds.

    tuning:
      axis: method                  # the axis whose values are the methods (bundles of keys)
      grid:                         # per value, lists of values: the same number of points each
        SFT: {sft.learning_rate: [1.0e-3, 3.0e-3], sft.max_steps: [800, 1600]}
        KD:  {sft.learning_rate: [1.0e-3, 3.0e-3], sft.kd_alpha: [0.5, 0.9]}
      seed: 0                       # the tuning runs' seed
      keys: {eval.split: validation}   # what the tuning runs change (default: eval on validation)

The tuning runs are a study of their own in OUT/tuning (the axis's values multiplied by their
grid points, one seed, eval on the validation split); for each value the point with the best
mean validation pass@1 (over the other axes' cells; ties: the first) is laid over its bundle.
The grid, every point's score and the choice go into the study's results.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import UserError

if TYPE_CHECKING:
    from pipeline.study import StudyConfig


def candidates(cfg: StudyConfig) -> dict[str, tuple[str, dict[str, Any], dict[str, Any]]]:
    """tuning label -> (the axis value it tunes, its grid point, the value's bundle with the point)."""
    spec = cfg.tuning
    axis = spec.get("axis")
    values = (cfg.axes.get(axis) or {}).get("values")
    if not isinstance(values, dict) or "key" in cfg.axes[axis]:
        raise UserError(f"tuning.axis: {axis!r} must be an axis of named bundles ({{values: {{label: {{keys}}}}}}), "
                        f"the methods; the axes: {sorted(cfg.axes)}")
    grids = spec.get("grid") or {}
    if set(grids) != set(values):
        raise UserError(f"tuning.grid: give every value of axis {axis!r} a grid: {sorted(values)} "
                        f"(got {sorted(grids)})")
    sizes = {label: len(list(itertools.product(*grids[label].values()))) for label in values}
    if len(set(sizes.values())) > 1:
        raise UserError(f"tuning.grid: every method gets the same tuning budget; the grids have {sizes} points")
    out = {}
    for label, bundle in values.items():
        keys = list(grids[label])
        for combo in itertools.product(*(grids[label][k] for k in keys)):
            point = dict(zip(keys, combo))
            name = label + "".join(f",{k.split('.')[-1]}={v}" for k, v in point.items())
            out[name] = (label, point, {**bundle, **point})
    return out


def tuning_study(cfg: StudyConfig, out: Path) -> StudyConfig:
    spec, found = cfg.tuning, candidates(cfg)
    return dataclasses.replace(
        cfg, description=f"tuning of {cfg.description}", output_dir=str(out / "tuning"),
        axes={**cfg.axes, spec["axis"]: {"values": {name: bundle for name, (_, _, bundle) in found.items()}}},
        seeds=[spec.get("seed", cfg.seeds[0])], common={**cfg.common, **spec.get("keys", {"eval.split": "validation"})},
        tuning=None, baseline={}, primary=[], gates=None, plot={"kind": "bars", "x": spec["axis"]}, reduced_keys={})


def choose(cfg: StudyConfig, rows: list[dict[str, Any]]) -> tuple[StudyConfig, dict[str, Any]]:
    """The study with each method's best point laid over its bundle, and what was chosen from what."""
    axis, found = cfg.tuning["axis"], candidates(cfg)
    scores = {name: sum(r["pass@1"] for r in rows if r[axis] == name) / max(1, sum(r[axis] == name for r in rows))
              for name in found}
    chosen: dict[str, Any] = {}
    for label in cfg.axes[axis]["values"]:
        points = {name: scores[name] for name, (value, _, _) in found.items() if value == label}
        best = max(points, key=points.get)  # the first of equals: grid order
        chosen[label] = {"grid": cfg.tuning["grid"][label], "validation_pass@1": points, "chosen": found[best][1]}
    values = {label: {**bundle, **chosen[label]["chosen"]} for label, bundle in cfg.axes[axis]["values"].items()}
    tuned = dataclasses.replace(cfg, axes={**cfg.axes, axis: {**cfg.axes[axis], "values": values}})
    return tuned, {"axis": axis, "seed": cfg.tuning.get("seed", cfg.seeds[0]), "methods": chosen}

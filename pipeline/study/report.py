"""Reading a study back: per cell, mean pass@1 over seeds with their spread, what the student
trained on, its size, and paired differences against the baseline (same seeds, same prompts;
intervals and tests in stats.py, Holm-adjusted over the study's comparisons, its declared
primary ones marked), written as OUT/study.json, OUT/study.md (the table) and OUT/study.png; with validation curves
(pipeline/validation.py), OUT/study-validation.png.

It reads what the runs wrote: each eval's samples, each student's train summary
(pipeline/training.py) and each run's record (pipeline/rundir.py).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import rundir
from pipeline.study import stats
from pipeline.study.grid import Cell, Run

if TYPE_CHECKING:  # the config lives in the package's __init__, which imports this module
    from pipeline.study import StudyConfig

log = logging.getLogger(__name__)


def report(cfg: StudyConfig, grid: list[Cell], runs: list[Run], out: Path,
           tuned: dict[str, Any] | None = None, wall_seconds: float | None = None,
           commit: str | None = None) -> dict[str, Any]:
    """Mean pass@1 over seeds per cell, the spread across seeds, and paired differences against
    the baseline: per seed, with a hierarchical bootstrap interval, a sign-flip test over seeds
    and Holm-adjusted p-values over all of the study's comparisons."""
    scores: dict[str, dict[str, float]] = {}  # student run -> prompt id -> mean correct over its samples
    references: dict[str, float] = {}  # the base eval's own models (the teacher)
    for run in (r for r in runs if r.stage == "eval"):
        by_model: dict[str, dict[str, list[bool]]] = {}
        for r in eval_samples(Path(run.config["output_dir"])):
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
        chain = [train_summary(d) for d in members[0].outputs.values()]
        summary = chain[0]
        seen = [s.get("tokens_seen") for s in chain]
        row = {**dict(zip(axes, key)), "pass@1": _mean(list(pass1.values())), "seed_std": _std(list(pass1.values())),
               "per_seed": pass1, "trained_samples": summary.get("samples"), "trained_prompts": summary.get("prompts"),
               "trained_tokens": summary.get("completion_tokens"), "tokens_seen": None if None in seen else sum(seen),
               "parameters": parameters(list(members[0].outputs.values())[-1])}
        curves = {c.labels["seed"]: train_summary(list(c.outputs.values())[-1]).get("validation_curve")
                  for c in members}
        if any(curves.values()):  # the last training stage's validation curve, per seed (pipeline/validation.py)
            row["validation_curve"] = curves
        base_key = tuple(cfg.baseline.get(a, v) for a, v in zip(axes, key))
        if cfg.baseline and base_key != key and base_key in groups:
            row["vs_baseline"] = stats.compare(seeds, per_seed(base_key))
            row["primary"] = any(all(str(row[a]) == str(v) for a, v in spec.items()) for spec in cfg.primary)
        rows.append(row)
    compared = [r["vs_baseline"] for r in rows if "vs_baseline" in r]
    for diff, p in zip(compared, stats.holm([d["p_bootstrap"] for d in compared])):
        diff["p_holm"] = p
    seconds = sum(run_seconds(r.config["output_dir"]) for r in runs)
    result = {"description": cfg.description, "axes": axes, "seeds": cfg.seeds, "baseline": cfg.baseline,
              "primary": cfg.primary, "level": stats.LEVEL, "comparisons": len(compared), "references": references,
              "rows": rows, "run_seconds": round(seconds), "tuning": tuned,
              "wall_seconds": None if wall_seconds is None else round(wall_seconds), "commit": commit}
    (out / "study.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "study.md").write_text(markdown(result))
    plot(result, cfg.plot, out / "study.png")
    if any("validation_curve" in r for r in rows):
        plot_validation(result, out / "study-validation.png")
    log.info(markdown(result))
    log.info(f"table: {out / 'study.md'}, plot: {out / 'study.png'}")
    return result


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    """Sample standard deviation (n - 1); nan for a single value."""
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


# ---------------------------------------------------------------------------- what the runs wrote

def eval_samples(eval_dir: Path) -> list[dict[str, Any]]:
    """Every sample an eval run scored, all models: its `samples.jsonl`, the eval stage's documented
    output (pipeline/stages/eval.py: one row per sample with `model`, `prompt_id` and `correct`)."""
    return [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines()]


def train_summary(model_dir: str) -> dict[str, Any]:
    """What a training run's student saw (samples, prompts, completion tokens, tokens seen); {} for none."""
    from pipeline.training import read_train_summary

    return read_train_summary(model_dir)


def source_commit(root: Path = Path(__file__).resolve().parents[2]) -> str | None:
    """The commit the pipeline ran from, `+changes` when its tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changed else "")


def run_seconds(output_dir: str) -> float:
    """The seconds a run took, from its record (pipeline/rundir.py); 0 for a run without one."""
    record = rundir.files(Path(output_dir))[0]
    return json.loads(record.read_text()).get("seconds", 0) if record.is_file() else 0


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


# ---------------------------------------------------------------------------- table and plot

def markdown(result: dict[str, Any]) -> str:
    axes, n = result["axes"], len(result["seeds"])
    lines = [f"{result['description']}".strip(), "",
             f"pass@1: mean over {n} seed(s) ± their standard deviation; traces, prompts and completion tokens "
             "the student trained on (first seed; on-policy: its own samples), and completion tokens seen over all "
             "steps.", "",
             f"vs baseline: the paired difference on the same seeds and prompts; its {result['level']:.0%} "
             "interval is a hierarchical bootstrap (seeds resampled, then prompts), p its two-sided p-value, "
             f"Holm-adjusted over all {result['comparisons']} comparisons; then the sign-flip test over seeds "
             f"(exact; its smallest p at {n} seeds is {2 / 2 ** n:.3g}) and the seeds where the cell is better. "
             "**primary**: a comparison the study declared before it ran (`primary:`); the rest are secondary.", ""]
    head = [*axes, "pass@1", "per seed", "parameters", "traces (prompts)", "trained tokens", "tokens seen",
            "vs " + ", ".join(
        f"{k}={v}" for k, v in result["baseline"].items()) if result["baseline"] else ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        diff = row.get("vs_baseline")
        diff_text = (("**primary** " if row.get("primary") else "")
                     + f"{diff['mean']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}], p {diff['p_bootstrap']:.3f} "
                     f"(Holm {diff['p_holm']:.3f}); sign-flip p {diff['p_sign_flip']:.3f}, "
                     f"{diff['seeds_better']}/{diff['seeds']} better") if diff else ""
        lines.append("| " + " | ".join([*(row[a] for a in axes), f"{row['pass@1']:.3f} ± {_fmt(row['seed_std'])}",
                                         " ".join(f"{v:.3f}" for v in row["per_seed"].values()),
                                         f"{row['parameters']:,}" if row.get("parameters") else "",
                                         f"{row['trained_samples']} ({row['trained_prompts']})",
                                         str(row["trained_tokens"]), str(row.get("tokens_seen")), diff_text]) + " |")
    if result.get("tuning"):
        t = result["tuning"]
        lines += ["", f"Tuning (pipeline/study/tuning.py): each {t['axis']} value's grid, run at seed {t['seed']} and "
                  "scored on the validation split (pass@1); the chosen point ran on the seeds above.", "",
                  "| value | grid points: validation pass@1 | chosen |", "|---|---|---|"]
        for label, m in t["methods"].items():
            scores = ", ".join(f"{n.split(',', 1)[-1]} {score:.3f}" for n, score in m["validation_pass@1"].items())
            lines.append(f"| {label} | {scores} | {', '.join(f'{k}={v}' for k, v in m['chosen'].items())} |")
    refs = ", ".join(f"{m} {v:.3f}" for m, v in result["references"].items())
    wall = f"{result['wall_seconds']} s" if result.get("wall_seconds") is not None else "not recorded"
    commit = result.get("commit") or "unknown"
    lines += ["", f"Reference models (same eval): {refs or 'none'}. Run time of all runs: {result['run_seconds']} s; "
              f"the study's wall time (tuning included): {wall}. Ran on commit {commit}.", ""]
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
    shown = f"\n(reference: {references})" if kind == "heatmap" and references else ""
    ax.set_title(textwrap.fill(title, 70) + shown, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_validation(result: dict[str, Any], path: Path) -> None:
    """study-validation.png: each cell's validation pass@1 over steps, the mean over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in (r for r in result["rows"] if "validation_curve" in r):
        by_step: dict[int, list[float]] = {}
        for points in row["validation_curve"].values():
            for point in points or []:
                by_step.setdefault(point["step"], []).append(point["pass@1"])
        steps = sorted(by_step)
        ax.plot(steps, [_mean(by_step[s]) for s in steps], marker=".",
                label=", ".join(str(row[a]) for a in result["axes"]) or "all")
    ax.set_xlabel("step")
    ax.set_ylabel("validation pass@1 (greedy; mean over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(textwrap.fill("validation: " + (result["description"].split(" (make study")[0] or "study"), 70),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Train the demo teacher: a small Qwen2 learns a prompt set's worked solutions with TRL.

The demo needs a teacher that can reason about something on a CPU with no model hub. This
builds a random Qwen2 (`pipeline/tiny.py`), turns the prompt set's `solution` column into
prompt-completion records (the prompt rendered exactly as generate and eval render it), runs
the sft stage on them, and scores the result with the eval stage (`eval_config`'s protocol, the
demo's, into `eval_dir`). The shipped `prompts/arithmetic/teacher` was made this way (`make teacher`).

    python -m pipeline.teacher [--config configs/teacher.yaml] [--key value ...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_config, parse_cli
from pipeline.prompts import PromptSource, chat_prompt, load_prompts
from pipeline.sft import SFTStageConfig
from pipeline.sft import main as sft_main
from pipeline.tiny import build_model


@dataclass
class TeacherConfig(SFTStageConfig, PromptSource):
    """The sft stage's keys and the prompt set's keys, plus the architecture. `model` is where
    the random init goes, `dataset` where the prompt-completion records go."""

    output_dir: str = "runs/teacher/model"
    model: str = "runs/teacher/init"
    dataset: str = "runs/teacher/solutions"
    prompt_set: str = "prompts/arithmetic"
    split: str = "train"
    solution_column: str = "solution"  # a full completion (<think>...</think> answer), or a list of them
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 512
    init_seed: int = 0
    # Scoring, after training: the eval stage with this config's protocol (null: not scored), on
    # the teacher's own prompt set, rendered as it was trained.
    eval_config: str | None = "configs/eval.yaml"
    eval_dir: str = "runs/teacher/eval"
    eval_max_prompts: int | None = None  # unset: the whole eval split

    def __post_init__(self) -> None:
        SFTStageConfig.__post_init__(self)
        PromptSource.__post_init__(self)


def main(cfg: TeacherConfig) -> Path:
    import datasets

    scoring = eval_config(cfg) if cfg.eval_config else None  # a bad eval setup stops us before training
    if not Path(cfg.model, "config.json").is_file():
        build_model(cfg.model, "qwen2", cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, seed=cfg.init_seed)
    records = solution_records(cfg, cfg.solution_column)
    datasets.Dataset.from_list(records).save_to_disk(cfg.dataset)
    out = sft_main(cfg)
    (out / "README.md").write_text(
        f"# {cfg.prompt_set} teacher\n\nA Qwen2 (hidden {cfg.hidden_size}, {cfg.num_layers} layers, MLP "
        f"{cfg.intermediate_size}) trained from scratch by r1-distill on the worked `{cfg.solution_column}` of "
        f"`{cfg.prompt_set}` ({cfg.split} split, {len(records)} prompt-completion records): `python -m pipeline.teacher` "
        f"(`make teacher`), every key in `stage_config.yaml` beside this card.\n")
    if scoring:
        from pipeline.eval import main as eval_main

        eval_main(scoring)
    return out


def eval_config(cfg: TeacherConfig) -> Any:
    """The eval stage's config that scores the trained teacher: `eval_config`'s protocol on the
    teacher's prompt set and column mapping (its eval split, not the training split)."""
    from pipeline.eval import EvalConfig

    source = {f.name: getattr(cfg, f.name) for f in fields(PromptSource) if f.name not in ("split", "max_prompts")}
    scoring = load_config(EvalConfig, cfg.eval_config, {**source, "models": [f"teacher={cfg.output_dir}"],
                                                        "output_dir": cfg.eval_dir, "max_prompts": cfg.eval_max_prompts})
    load_prompts(scoring, require_answers=True)  # e.g. a set with no such split: say so now, not after training
    return scoring


def solution_records(src: PromptSource, column: str) -> list[dict[str, Any]]:
    """Prompt-completion records: each prompt rendered as generate and eval render it, and its
    row's worked solution as the completion (one record per solution where the row has a list)."""
    records = []
    for p in load_prompts(src).prompts:
        solutions = p.row.get(column)
        solutions = [solutions] if isinstance(solutions, str) else solutions
        if not solutions or not all(isinstance(s, str) for s in solutions):
            raise ValueError(f"{src.prompt_set} ({src.split}), prompt {p.id}: no {column!r} text or list of "
                             "texts; the teacher trains on each row's worked solutions (set solution_column)")
        records += [{"prompt": chat_prompt(p), "completion": [{"role": "assistant", "content": s}]} for s in solutions]
    return records


if __name__ == "__main__":
    try:
        config_path, overrides = parse_cli(sys.argv[1:])
        main(load_config(TeacherConfig, config_path, overrides))
    except ConfigError as err:
        sys.exit(f"error: {err}")

"""Train the demo teacher: a small Qwen2 learns a prompt set's worked solutions with TRL.

The demo needs a teacher that can reason about something on a CPU with no model hub. This
builds a random Qwen2 (`pipeline/demo/tiny.py`), turns the prompt set's `solution` column into
prompt-completion records (the prompt rendered exactly as generate and eval render it), runs
the sft stage on them, and scores the result with the eval stage (`eval_config`'s protocol, the
demo's, into `eval_dir`). The shipped `prompts/arithmetic/teacher` was made this way (`make teacher`).

    python -m pipeline teacher --config configs/teacher.yaml [--key value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.config import UserError, load_config, require, setting
from pipeline.demo.tiny import build_model
from pipeline.prompts import PromptSource, chat_prompt, load_prompts
from pipeline.stages.sft import SFTStageConfig
from pipeline.stages.sft import main as sft_main
from pipeline.traces import save_dataset


@dataclass
class TeacherConfig(SFTStageConfig, PromptSource):
    """The sft stage's keys and the prompt set's keys, plus the architecture. `model` is where
    the random init goes, `dataset` where the prompt-completion records go."""

    output_dir: str | None = setting(None, help="the trained teacher (checkpoints, final model and its card)")
    model: str | None = setting(None, help="where the random init is built first (reused when it holds one)")
    dataset: str | None = setting(None, help="where the prompt-completion records are written first")
    prompt_set: str | None = setting(None, help="the prompt set whose worked solutions the teacher learns")
    split: str = setting("train", help="split of the prompt set the teacher trains on")
    solution_column: str = setting("solution", help="each row's full completion (<think>...</think> answer), or a "
                                                    "list of them")
    hidden_size: int = setting(128, help="the Qwen2 built from scratch: hidden size (head size 64)")
    num_layers: int = setting(4, help="the Qwen2 built from scratch: decoder layers")
    intermediate_size: int = setting(512, help="the Qwen2 built from scratch: MLP size")
    init_seed: int = setting(0, help="seed of the random init")
    # Scoring, after training: on the teacher's own prompt set, rendered as it was trained.
    eval_config: str | None = setting("configs/eval.yaml", help="the eval config whose protocol scores the teacher "
                                                                "after training (null: not scored)")
    eval_dir: str = setting("runs/teacher/eval", help="where the teacher's eval goes")
    eval_max_prompts: int | None = setting(None, help="first N prompts of the eval split; unset: the whole eval split")

    def __post_init__(self) -> None:
        # Before the sft stage's checks (their messages are about a student) and TrainingArguments'
        # own, which replaces an unset output_dir with "trainer_output".
        require(self, "output_dir", "model", "dataset", "prompt_set", example="configs/teacher.yaml")
        SFTStageConfig.__post_init__(self)
        PromptSource.__post_init__(self)


def main(cfg: TeacherConfig) -> Path:
    import datasets

    scoring = eval_config(cfg) if cfg.eval_config else None  # a bad eval setup stops us before training
    if not Path(cfg.model, "config.json").is_file():
        build_model(cfg.model, "qwen2", cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, seed=cfg.init_seed)
    records = solution_records(cfg, cfg.solution_column)
    # Written only when they differ: the sft run's record fingerprints them, and a rerun must find them as they were.
    if not Path(cfg.dataset).is_dir() or datasets.load_from_disk(cfg.dataset).to_list() != records:
        save_dataset(datasets.Dataset.from_list(records), Path(cfg.dataset))
    out = sft_main(cfg)
    (out / "README.md").write_text(
        f"# {cfg.prompt_set} teacher\n\nA Qwen2 (hidden {cfg.hidden_size}, {cfg.num_layers} layers, MLP "
        f"{cfg.intermediate_size}) trained from scratch by r1-distill on the worked `{cfg.solution_column}` of "
        f"`{cfg.prompt_set}` ({cfg.split} split, {len(records)} prompt-completion records): "
        f"`python -m pipeline teacher` (`make teacher`), every key in `config.yaml` beside this card.\n")
    if scoring:
        from pipeline.stages.eval import main as eval_main

        eval_main(scoring)
    return out


def eval_config(cfg: TeacherConfig) -> Any:
    """The eval stage's config that scores the trained teacher: `eval_config`'s protocol on the
    teacher's prompt set and column mapping (its eval split, not the training split)."""
    from pipeline.stages.eval import EvalConfig

    source = {f.name: getattr(cfg, f.name) for f in fields(PromptSource) if f.name not in ("split", "max_prompts")}
    overrides = {**source, "models": [f"teacher={cfg.output_dir}"], "output_dir": cfg.eval_dir,
                 "max_prompts": cfg.eval_max_prompts}
    scoring = load_config(EvalConfig, cfg.eval_config, overrides)
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
            raise UserError(f"{src.prompt_set} ({src.split}), prompt {p.id}: no {column!r} text or list of "
                            "texts; the teacher trains on each row's worked solutions (set solution_column)")
        records += [{"prompt": chat_prompt(p), "completion": [{"role": "assistant", "content": s}]} for s in solutions]
    return records


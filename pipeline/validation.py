"""The validation curve of a training run (sft, onpolicy): every `validation_steps` the student
answers a held-out prompt split greedily (HF generate, the student as it is) and its pass@1 is logged, so a budget is
chosen from where pass@1 stops rising, not from the loss alone. Never the test split: that one
is for results.

The values go into the trainer's log history (`validation/pass@1`, kept in checkpoints, so a
resumed run's curve goes on), into train_summary.json (`validation_curve`) and validation.png.
The prompts are split over the processes and gathered (pipeline/inference/hf.py, as the eval
stage's transformers backend samples), after a step, outside the model's forward. Sharded
students (FSDP, ZeRO-3) are refused, as their weights are not whole on one process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from pipeline.config import UserError, setting
from pipeline.prompts import PromptSource, load_prompts
from pipeline.scoring import ScoringConfig, score_texts, scored_text

log = logging.getLogger(__name__)
KEY = "validation/pass@1"


@dataclass
class ValidationKeys:
    """A training stage's validation curve; validation_set unset: none."""

    validation_set: str | None = setting(None, help="a prompt set (folder, file, dataset) the student answers every "
                                                    "validation_steps, greedily: its pass@1 curve; unset: none")
    validation_split: str = setting("validation", help="its split (never the test split a study reports)")
    validation_steps: int = setting(100, help="steps between validation points (and one at the last step)")
    validation_max_prompts: int | None = setting(64, help="first N prompts of the split; unset: all")
    validation_max_tokens: int = setting(160, help="tokens per validation answer")


class ValidationCallback(TrainerCallback):
    def __init__(self, cfg: ValidationKeys, trainer: Any) -> None:
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            raise UserError("validation_set: the validation curve needs the whole student on each process; it does "
                            "not run under FSDP or DeepSpeed: unset validation_set, or train with DDP")
        if cfg.validation_split == "test":
            raise UserError("validation_split: test is the split results are reported on; choose budgets on a "
                            "validation split (prompts/keyed has one)")
        source = PromptSource(prompt_set=cfg.validation_set, split=cfg.validation_split,
                              max_prompts=cfg.validation_max_prompts)
        loaded = load_prompts(source, require_answers=True)
        self.prompts, self.scorer, self.cfg, self.trainer = loaded.prompts, loaded.scorer or "math", cfg, trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.cfg.validation_steps == 0 or state.global_step == state.max_steps:
            self.trainer.log({KEY: self.pass_at_1()})

    def pass_at_1(self) -> float:
        from pipeline.inference.hf import sample_model
        from pipeline.inference.sampling import SamplingKeys

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        model.eval()
        try:  # greedy, one answer per prompt, the eval stage's transformers backend
            rows = sample_model(SamplingKeys(num_samples=1, max_tokens=self.cfg.validation_max_tokens), model,
                                self.trainer.processing_class, self.prompts, 0.0, name="validation")
        finally:
            model.train(was_training)
        verdicts = score_texts([scored_text(r) for r in rows], [r["reference_answer"] for r in rows],
                               ScoringConfig(), self.scorer)
        return sum(v == "correct" for v, _ in verdicts) / len(verdicts)


def add_validation(trainer: Any, cfg: ValidationKeys) -> None:
    if cfg.validation_set:
        trainer.add_callback(ValidationCallback(cfg, trainer))


def curve(trainer: Any) -> list[dict[str, float]]:
    """[{step, pass@1}] from the log history (a resumed run's included)."""
    return [{"step": h["step"], "pass@1": h[KEY]} for h in trainer.state.log_history if KEY in h]


def plot_curve(points: list[dict[str, float]], path: Path) -> str | None:
    """validation.png: pass@1 over steps. Returns the file's name (None without points)."""
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p["step"] for p in points], [p["pass@1"] for p in points], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("validation pass@1 (greedy)")
    ax.set_ylim(0, 1)
    ax.set_title(f"validation: {path.parent}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name

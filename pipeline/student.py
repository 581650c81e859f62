"""Student runs on disk, shared by the training stages (sft, onpolicy): LoRA keys, resume from the
last checkpoint, and the saved student (weights, tokenizer, EOS, model card, train summary).

    output_dir/checkpoint-*/      resumable checkpoints (a rerun resumes from the last one)
    output_dir/                   final model, tokenizer, generation config (EOS), README.md card
    output_dir/train_summary.json what the student saw (samples, prompts, trained tokens, steps, ...)
    output_dir/stage_config.yaml  the resolved config
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import save_config


@dataclass
class LoraKeys:
    """LoRA (peft) for a training stage's config; lora_r: 0 is full fine-tuning."""

    lora_r: int = 0
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


def lora_config(cfg: LoraKeys) -> Any:
    if not cfg.lora_r:
        return None
    from peft import LoraConfig

    modules = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=modules[0] if modules == ["all-linear"] else modules)


def train_and_save(trainer: Any, cfg: Any, card: Callable[[], str], summary: Callable[[], dict[str, Any]]) -> Path:
    """Train (resuming from the last checkpoint in output_dir), then save the student with its card
    and summary (both built after training, when the trainer's state is final)."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(cfg.output_dir)
    save_config(cfg, out / "stage_config.yaml")
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last:
        print(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    save_student(trainer, cfg, card(), summary())
    # Launched as N processes, trackers finish and the process group is destroyed before exit: a
    # gloo group left to the interpreter's teardown can abort a process ("terminate called without
    # an active exception"). One process owns no group; one that something else in this process
    # made (an in-process vLLM engine, the tests') must outlive the run.
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.end_training()
    return out


def save_student(trainer: Any, cfg: Any, card: str, summary: dict[str, Any]) -> None:
    out = Path(cfg.output_dir)
    if trainer.is_fsdp_enabled:
        # Under SHARDED_STATE_DICT (fast checkpoints, configs/accelerate/fsdp.yaml) save_model writes
        # no weights; vLLM and transformers load full ones, gathered here (accelerate: FSDP2's full
        # state dict, the call tests/sharded_kd.py checks on CPU).
        state_dict = {k: v for k, v in trainer.accelerator.get_state_dict(trainer.model).items()
                      if not k.startswith("distill_modules.")}  # what trained beside it (pipeline/sft.py)
        if trainer.args.should_save:
            trainer._save(str(out), state_dict=state_dict)
    else:
        trainer.save_model(str(out))
    tokenizer = trainer.processing_class
    tokenizer.save_pretrained(str(out))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.save_pretrained(str(out))
    if trainer.is_world_process_zero():
        (out / "README.md").write_text(card)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.push_to_hub:
        trainer.push_to_hub()


def last_loss(trainer: Any) -> float | None:
    history = [h for h in trainer.state.log_history if "loss" in h]
    return history[-1]["loss"] if history else None


def traces_teacher(dataset: str) -> str:
    """The teacher named in a traces dir's config.yaml (the generate stage writes it)."""
    config = Path(dataset) / "config.yaml"
    if config.is_file():
        import yaml
        return str((yaml.safe_load(config.read_text()) or {}).get("model", "unknown"))
    return "unknown"

"""Student runs on disk, shared by the training stages (sft, onpolicy): LoRA keys, the run
contract of a training run, resume from the last checkpoint, and the saved student (weights,
tokenizer, EOS, model card, train summary). The card (README.md, a hub model card:
pipeline/reports.py) is ours whatever TRL, transformers or PEFT write there (`own_card`).

    output_dir/config.yaml, run.json  the resolved config and the record (pipeline/rundir.py)
    output_dir/checkpoint-*/          resumable checkpoints (an unfinished run resumes from the last one)
    output_dir/                       final model, tokenizer, generation config (EOS), README.md card
    output_dir/train_summary.json     what the student saw (`train_summary`, read by `read_train_summary`)

train_summary.json, the same base keys for every training stage (None where a stage cannot know):
samples (trained sequences), prompts (distinct prompts), completion_tokens (trained tokens in the
data; onpolicy: sampled), tokens_seen (completion tokens trained on over all epochs), steps,
final_loss (the last logged loss); a stage's extras follow (onpolicy: seconds, share_of_step,
sampled_tokens_per_s); with a validation set, validation_curve ([{step, pass@1}]) and
validation_plot (pipeline/validation.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import UserError, setting
from pipeline.rundir import Run, open_run

log = logging.getLogger(__name__)

# TrainingArguments keys that change how a run is watched, saved or fed, never what it learns: a
# resume may change them. The global batch (per-device batch x accumulation x processes) is compared
# instead of its factors (derived in open_training_run).
TRAINING_FREE_KEYS = {
    "overwrite", "per_device_train_batch_size", "gradient_accumulation_steps", "local_rank", "log_level",
    "log_level_replica", "log_on_each_node", "logging_steps", "logging_strategy", "logging_first_step",
    "logging_nan_inf_filter", "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "save_steps", "save_strategy", "save_total_limit", "save_on_each_node",
    "save_only_model", "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "ddp_timeout", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "hub_always_push", "hub_revision", "per_device_eval_batch_size", "skip_memory_metrics",
    "include_num_input_tokens_seen", "torch_empty_cache_steps", "resume_from_checkpoint", "log_completions",
    "num_completions_to_print", "log_unique_prompts", "vllm_server_timeout", "dataset_num_proc",
    "kd_chunk_size",  # memory only: chunked equals unchunked (tests/test_logits.py)
}


@dataclass
class LoraKeys:
    """LoRA (peft) for a training stage's config; lora_r: 0 is full fine-tuning."""

    lora_r: int = setting(0, help="LoRA rank (peft); 0: full fine-tuning, no adapter")
    lora_alpha: int = setting(32, help="LoRA scaling: the adapter's update is scaled by lora_alpha / lora_r")
    lora_dropout: float = setting(0.05, help="dropout on the LoRA adapter's input")
    lora_target_modules: list[str] = setting(["all-linear"], help='modules that get an adapter: names, or '
                                                                  '"all-linear" (every linear layer but the output)')


def lora_config(cfg: LoraKeys) -> Any:
    if not cfg.lora_r:
        return None
    from peft import LoraConfig

    modules = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=modules[0] if modules == ["all-linear"] else modules)


def open_training_run(cfg: Any, stage: str, inputs: dict[str, Any]) -> Run:
    """The run contract of a training run (pipeline/rundir.py), its global batch a result key."""
    if cfg.max_steps > 0 and cfg.warmup_steps >= 1 and cfg.warmup_steps >= cfg.max_steps:
        log.warning(f"{stage}: warmup_steps {cfg.warmup_steps} >= max_steps {cfg.max_steps}: the whole run is "
                    "warm-up and its learning rate never anneals; set warmup_steps below max_steps")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    return open_run(cfg, stage, inputs, TRAINING_FREE_KEYS, derived={"global_batch": global_batch})


def train_and_save(trainer: Any, cfg: Any, run: Run, card: Callable[[], str],
                   summary: Callable[[], dict[str, Any]]) -> Path:
    """Train (an unfinished run resumes from its last checkpoint), then save the student with its
    card and summary (both built after training, when the trainer's state is final)."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(cfg.output_dir)
    own_card(trainer, out, card)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last:
        log.info(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    save_student(trainer, cfg, card(), {**summary(), **validation_summary(trainer, out)})
    run.finish(steps=trainer.state.global_step)
    # Launched as N processes, trackers finish and the process group is destroyed before exit: a
    # gloo group left to the interpreter's teardown can abort a process ("terminate called without
    # an active exception"). One process owns no group; one that something else in this process
    # made (an in-process vLLM engine, the tests') must outlive the run.
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.end_training()
    return out


def validation_summary(trainer: Any, out: Path) -> dict[str, Any]:
    """The validation curve (pipeline/validation.py) and its plot, where the run had one."""
    from pipeline.validation import curve, plot_curve

    points = curve(trainer)
    if not points:
        return {}
    return {"validation_curve": points,
            "validation_plot": plot_curve(points, out / "validation.png") if trainer.is_world_process_zero() else None}


def own_card(trainer: Any, out: Path, card: Callable[[], str]) -> None:
    """Make the trainer's model card ours: TRL writes its own README.md into output_dir at each
    checkpoint, and transformers' push_to_hub writes one (after save_model, whose PEFT save_pretrained
    edits the card) just before the upload; both call create_model_card, which now writes `card()`."""
    def create_model_card(*args: Any, **kwargs: Any) -> None:
        if trainer.is_world_process_zero():
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / "README.md.tmp"
            tmp.write_text(card())
            os.replace(tmp, out / "README.md")

    trainer.create_model_card = create_model_card


def save_student(trainer: Any, cfg: Any, card: str, summary: dict[str, Any]) -> None:
    """Weights, tokenizer, generation config (EOS), then the card (ours: written last, and the one
    push_to_hub uploads) and train_summary.json; pushed where cfg.push_to_hub."""
    out = Path(cfg.output_dir)
    own_card(trainer, out, lambda: card)
    if trainer.is_fsdp_enabled:
        # Under SHARDED_STATE_DICT (fast checkpoints, configs/accelerate/fsdp.yaml) save_model writes
        # no weights; vLLM and transformers load full ones, gathered here (accelerate: FSDP2's full
        # state dict, the call tests/sharded_kd.py checks on CPU).
        state_dict = {k: v for k, v in trainer.accelerator.get_state_dict(trainer.model).items()
                      if not k.startswith("distill_modules.")}  # what trained beside it (pipeline/distill/trainer.py)
        if trainer.args.should_save:
            trainer._save(str(out), state_dict=state_dict)
    else:
        trainer.save_model(str(out))
    tokenizer = trainer.processing_class
    tokenizer.save_pretrained(str(out))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(model, "generation_config", None) is not None:
        # Keep every EOS id of the base model (Qwen2.5-Instruct stops on [151645, 151643]) and its
        # sampling defaults; add the tokenizer's EOS (the one training taught) where it is missing.
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos or None
        if tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.save_pretrained(str(out))
    trainer.create_model_card()  # after save_model: PEFT's save_pretrained writes a card of its own
    if trainer.is_world_process_zero():
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.push_to_hub:
        trainer.push_to_hub()  # save_model, then our card (create_model_card), then the upload


def train_summary(trainer: Any, samples: int | None, prompts: int | None, completion_tokens: int | None,
                  tokens_seen: int | None, **extras: Any) -> dict[str, Any]:
    """The train_summary.json of a run (the schema above): the base keys, then the stage's extras."""
    return {"samples": samples, "prompts": prompts, "completion_tokens": completion_tokens,
            "tokens_seen": tokens_seen, "steps": trainer.state.global_step, "final_loss": last_loss(trainer), **extras}


def read_train_summary(model_dir: str | Path) -> dict[str, Any]:
    """A trained student's train_summary.json; {} where there is none."""
    path = Path(model_dir) / "train_summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


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


# ---------------------------------------------------------------------------- data checks before training

def check_template_keeps_think(tokenizer: Any, sample: dict[str, Any], cfg: Any) -> None:
    """Some templates (DeepSeek-R1-Distill's, Qwen3's) strip the reasoning from assistant turns;
    training on that would teach the student to answer without thinking."""
    content = sample["completion"][0]["content"]
    reasoning = content.split("</think>")[0].split("<think>")[-1].strip()
    rendered = tokenizer.apply_chat_template(sample["prompt"] + sample["completion"], tokenize=False)
    if "</think>" in content and reasoning and reasoning[:50] not in rendered:
        raise UserError(f"the chat template of {cfg.model} drops the <think> block from assistant messages; "
                        "set chat_template: chatml to train on the reasoning")


def set_max_length(cfg: Any, tokenizer: Any, dataset: Any) -> None:
    if "input_ids" in dataset.column_names:
        lengths = [len(ids) for ids in dataset["input_ids"]]
    else:
        lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False))
                   for r in dataset.select_columns(["prompt", "completion"])]
    if cfg.padding_free and not cfg.packing:  # TRL truncates nothing there, and refuses a max_length
        return
    if cfg.max_length is None:
        cfg.max_length = max(lengths)
        log.info(f"max_length set from the data: {cfg.max_length} tokens (longest sample)")
    truncated = sum(n > cfg.max_length for n in lengths)
    if truncated:
        log.warning(f"warning: {truncated} of {len(lengths)} samples are longer than max_length={cfg.max_length} "
              "and will be truncated (their EOS is lost); raise max_length or filter them out")


def check_eos_trained(trainer: Any, tokenizer: Any) -> None:
    """Samples must end in the student's EOS and that EOS must carry loss (pad == eos
    collators can mask it out, and a student that never saw EOS never stops)."""
    sample = trainer.train_dataset[0]
    trained = [t for t in sample.get("labels", sample["input_ids"]) if t != -100]
    if tokenizer.eos_token_id not in trained[-2:]:  # ChatML puts a newline after the EOS
        raise UserError(f"the student's EOS {tokenizer.eos_token!r} is not among the trained completion tokens; "
                        "use a chat template that ends assistant turns with the EOS token")
    labels = trainer.data_collator([sample])["labels"][0].tolist()
    if tokenizer.eos_token_id not in labels:
        raise UserError(f"the collator masks the EOS {tokenizer.eos_token!r} out of the loss "
                        "(pad_token == eos_token?): set a distinct pad token")

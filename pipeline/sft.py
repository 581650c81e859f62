"""The sft stage: TRL's SFTTrainer fine-tunes a student on traces, optionally with logit KD.

    loss = (1 - kd_alpha) * CE(labels) + kd_alpha * T^2 * D(teacher_T || student_T)

on completion tokens only, D one of forward KL, reverse KL, generalized JSD (pipeline/losses.py).
The teacher is online: a frozen model beside the student, on the same devices. Checked before training: the chat template keeps the think block,
every sample ends in the student's EOS and the EOS carries loss, no sample is cut silently.

    output_dir/checkpoint-*/   resumable checkpoints (a rerun resumes from the last one)
    output_dir/                final model, tokenizer, generation config (EOS), README.md card
    output_dir/stage_config.yaml  the resolved config
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from trl import SFTConfig, SFTTrainer

from pipeline.config import save_config
from pipeline.losses import chunked_kd_loss, combine
from pipeline.tiny import CHATML_TEMPLATE


@dataclass
class SFTStageConfig(SFTConfig):
    """Every SFTConfig / TrainingArguments field, plus the keys below."""

    output_dir: str = "runs/demo/student"
    max_length: int | None = None  # unset: the longest sample (TRL's 1024 would cut long traces silently)
    report_to: str | list[str] | None = "none"
    # Data and models.
    model: str = "runs/demo/student-init"  # student: local path or hub id
    dataset: str = "runs/demo/traces"  # a traces dir (its curated/ is used), a saved dataset dir, or a hub id
    dataset_split: str = "train"  # for hub datasets
    chat_template: Literal["student", "chatml"] = "student"  # chatml: a fallback that keeps <think> blocks
    # Logit KD.
    kd: Literal["none", "online"] = "none"
    teacher: str | None = None  # online KD: teacher path or hub id (must share the student's tokenizer)
    kd_alpha: float = 0.5  # weight of the KD term; 1 - kd_alpha weighs CE
    kd_temperature: float = 2.0
    kd_divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    kd_beta: float = 0.5  # jsd only: the mixture weight (0: forward KL, 1: reverse KL)
    kd_chunk_size: int = 1024  # tokens per chunk of logits: bounds the loss's memory
    # LoRA (peft).
    lora_r: int = 0  # 0: full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kd == "online" and not self.teacher:
            raise ValueError("kd: online needs teacher: a model path or hub id")
        if not 0 <= self.kd_alpha <= 1 or not 0 <= self.kd_beta <= 1:
            raise ValueError(f"kd_alpha and kd_beta must be in [0, 1], got {self.kd_alpha} and {self.kd_beta}")
        if self.kd_temperature <= 0 or self.kd_chunk_size < 1:
            raise ValueError("kd_temperature must be > 0 and kd_chunk_size >= 1")


STAGE_FIELDS = {f.name for f in dataclasses.fields(SFTStageConfig)} - {f.name for f in dataclasses.fields(SFTConfig)}


def main(cfg: SFTStageConfig) -> Path:
    from transformers import AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    dataset = load_traces(cfg.dataset, cfg.dataset_split)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if cfg.chat_template == "chatml" or tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    check_template_keeps_think(tokenizer, dataset[0], cfg)
    set_max_length(cfg, tokenizer, dataset)

    teacher = load_teacher(cfg, tokenizer) if cfg.kd == "online" else None
    trainer_cls = KDTrainer if cfg.kd != "none" else SFTTrainer
    extra = {"teacher": teacher, "kd": cfg} if cfg.kd != "none" else {}
    trainer = trainer_cls(model=cfg.model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=lora_config(cfg), **extra)
    check_eos_trained(trainer, tokenizer)
    state = trainer.accelerator.state
    print(f"process {state.process_index} of {state.num_processes} ({state.distributed_type.value})")

    save_config(cfg, Path(cfg.output_dir) / "stage_config.yaml")
    last = get_last_checkpoint(cfg.output_dir) if Path(cfg.output_dir).is_dir() else None
    if last:
        print(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    save_student(trainer, tokenizer, cfg)
    return Path(cfg.output_dir)


# ---------------------------------------------------------------------------- data

def load_traces(source: str, split: str) -> Any:
    """The training set: a traces dir (its curated/), a saved dataset, or a hub dataset."""
    import datasets

    path = Path(source)
    if (path / "curated").is_dir():
        path = path / "curated"
    if path.is_dir():
        if _saved_empty(path):  # datasets 5.2 cannot load a dataset saved with no rows
            raise ValueError(f"dataset {path} is empty: nothing to train on (did curation drop everything? "
                             "see curation.json beside it)")
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
    elif path.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise FileNotFoundError(f"dataset {source} does not exist (expected a traces dir, a dataset saved with "
                                "save_to_disk, or a hub id like owner/name)")
    else:
        data = datasets.load_dataset(source, split=split)
    needed = ["prompt", "completion"]
    missing = [c for c in needed if c not in data.column_names]
    if missing:
        raise ValueError(f"dataset {path}: missing column(s) {', '.join(missing)}; "
                         f"columns present: {', '.join(data.column_names)}")
    if len(data) == 0:
        raise ValueError(f"dataset {path} is empty: nothing to train on (did curation drop everything? "
                         "see curation.json beside it)")
    keep = needed + ["prompt_id"] * ("prompt_id" in data.column_names)
    return data.select_columns(keep)


def _saved_empty(path: Path) -> bool:
    import json

    state = path / "state.json"
    return state.is_file() and not json.loads(state.read_text()).get("_data_files")


def check_template_keeps_think(tokenizer: Any, sample: dict[str, Any], cfg: SFTStageConfig) -> None:
    """Some templates (DeepSeek-R1-Distill's, Qwen3's) strip the reasoning from assistant turns;
    training on that would teach the student to answer without thinking."""
    content = sample["completion"][0]["content"]
    reasoning = content.split("</think>")[0].split("<think>")[-1].strip()
    rendered = tokenizer.apply_chat_template(sample["prompt"] + sample["completion"], tokenize=False)
    if "</think>" in content and reasoning and reasoning[:50] not in rendered:
        raise ValueError(f"the chat template of {cfg.model} drops the <think> block from assistant messages; "
                         "set chat_template: chatml to train on the reasoning")


def set_max_length(cfg: SFTStageConfig, tokenizer: Any, dataset: Any) -> None:
    lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False))
               for r in dataset.select_columns(["prompt", "completion"])]
    if cfg.max_length is None:
        cfg.max_length = max(lengths)
        print(f"max_length set from the data: {cfg.max_length} tokens (longest sample)")
    truncated = sum(n > cfg.max_length for n in lengths)
    if truncated:
        print(f"warning: {truncated} of {len(lengths)} samples are longer than max_length={cfg.max_length} "
              "and will be truncated (their EOS is lost); raise max_length or filter them out")


def check_eos_trained(trainer: Any, tokenizer: Any) -> None:
    """Samples must end in the student's EOS and that EOS must carry loss (pad == eos
    collators can mask it out, and a student that never saw EOS never stops)."""
    sample = trainer.train_dataset[0]
    trained = [t for t in sample.get("labels", sample["input_ids"]) if t != -100]
    if tokenizer.eos_token_id not in trained[-2:]:  # ChatML puts a newline after the EOS
        raise ValueError(f"the student's EOS {tokenizer.eos_token!r} is not among the trained completion tokens; "
                         "use a chat template that ends assistant turns with the EOS token")
    labels = trainer.data_collator([sample])["labels"][0].tolist()
    if tokenizer.eos_token_id not in labels:
        raise ValueError(f"the collator masks the EOS {tokenizer.eos_token!r} out of the loss "
                         "(pad_token == eos_token?): set a distinct pad token")


def lora_config(cfg: SFTStageConfig) -> Any:
    if not cfg.lora_r:
        return None
    from peft import LoraConfig

    modules = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=modules[0] if modules == ["all-linear"] else modules)


def load_teacher(cfg: SFTStageConfig, student_tokenizer: Any) -> Any:
    """A frozen teacher; refused when its tokenizer differs (its logits would mean other tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(f"teacher {cfg.teacher} and student {cfg.model} have different tokenizers "
                         f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); logit KD needs a shared one")
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=torch.float32 if cfg.use_cpu else "auto")
    teacher.eval().requires_grad_(False)
    return teacher


# ---------------------------------------------------------------------------- KD trainer

class KDTrainer(SFTTrainer):
    """SFTTrainer whose loss adds the teacher's soft distribution. The student forward is run
    here (asking SFTTrainer for outputs costs an extra forward in trl 1.16) and only the final
    hidden states are taken: logits are computed chunk by chunk inside the loss."""

    def __init__(self, *args: Any, teacher: Any = None, kd: SFTStageConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kd = kd
        self.teacher = teacher
        self.vocab_size = len(self.processing_class)
        if teacher is not None:
            self.teacher.to(self.accelerator.device)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        forward = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        # logits_to_keep=1: the model's own full-vocabulary logits are not needed.
        student = model(**forward, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        labels = inputs["labels"][:, 1:]
        kwargs: dict[str, Any] = {}
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(**forward, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            kwargs = dict(teacher_hidden=teacher.hidden_states[-1][:, :-1],
                          teacher_lm_head_weight=self.teacher.get_output_embeddings().weight)
        losses = chunked_kd_loss(
            student.hidden_states[-1][:, :-1], self.accelerator.unwrap_model(model).get_output_embeddings().weight,
            labels, temperature=self.kd.kd_temperature, kind=self.kd.kd_divergence, beta=self.kd.kd_beta,
            chunk_size=self.kd.kd_chunk_size, num_items_in_batch=num_items_in_batch, vocab_size=self.vocab_size,
            **kwargs)
        loss = combine(losses["ce_loss"], losses["kd_loss"], self.kd.kd_alpha)
        mode = "train" if model.training else "eval"
        for key in ("ce_loss", "kd_loss"):
            self._metrics[mode][key].append(losses[key].detach().item())
        return (loss, student) if return_outputs else loss


# ---------------------------------------------------------------------------- save

def save_student(trainer: Any, tokenizer: Any, cfg: SFTStageConfig) -> None:
    out = Path(cfg.output_dir)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.save_pretrained(str(out))
    if trainer.is_world_process_zero():
        (out / "README.md").write_text(model_card(cfg, trainer))
    if cfg.push_to_hub:
        trainer.push_to_hub()


def model_card(cfg: SFTStageConfig, trainer: Any) -> str:
    kd = ("none (sequence-level distillation: SFT on teacher traces)" if cfg.kd == "none" else
          f"{cfg.kd} logit KD: {cfg.kd_divergence}, T={cfg.kd_temperature}, alpha={cfg.kd_alpha}"
          + (f", beta={cfg.kd_beta}" if cfg.kd_divergence == "jsd" else "")
          + (f", teacher {cfg.teacher}" if cfg.teacher else ""))
    teacher = cfg.teacher or _traces_teacher(cfg.dataset)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return (f"# {Path(cfg.output_dir).name}\n\nA student distilled with r1-distill.\n\n"
            f"- student init: `{cfg.model}`\n- teacher: `{teacher}`\n- traces: `{cfg.dataset}`\n- logit KD: {kd}\n"
            f"- LoRA: {'r=' + str(cfg.lora_r) if cfg.lora_r else 'off'}\n"
            f"- steps: {trainer.state.global_step}, final logged loss: {history[-1]['loss'] if history else 'n/a'}\n"
            f"- config: `stage_config.yaml` beside this card\n")


def _traces_teacher(dataset: str) -> str:
    config = Path(dataset) / "config.yaml"
    if config.is_file():
        import yaml
        return str((yaml.safe_load(config.read_text()) or {}).get("model", "unknown"))
    return "unknown"

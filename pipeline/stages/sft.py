"""The sft stage: TRL's SFTTrainer fine-tunes a student on traces, optionally distilling more.

    loss = (1 - kd_alpha) * CE(labels) + kd_alpha * T^2 * D(teacher_T || student_T)
           [+ feature_weight * L_feat + relation_distance_weight * L_D + relation_angle_weight * L_A]

on completion tokens only, D one of forward KL, reverse KL, generalized JSD. The family's losses,
teachers, combined objective and KD trainer live in pipeline/distill/ (its __init__ says where a
new method goes).
The teacher is online (a frozen model or an ensemble of them, placed and sharded by accelerate
as the student is), offline (the top-k logprobs and the rest the generate stage stored with
`logprobs: k`, usable only by a student with the teacher's very vocabulary), a second student
trained beside this one (`kd: mutual`), or the previous generation (`generations: K`).
Checked before training: the chat template keeps the think block, every sample ends in the
student's EOS and the EOS carries loss, no sample is cut silently, offline rows are raw and from
the student's vocabulary.
Multi-process, FSDP2, ZeRO-3, packing and padding-free: see distill/objective.py and tests/test_sft.py.
Output layout and resume: pipeline/training.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trl import SFTConfig, SFTTrainer

from pipeline import distill, reports, training
from pipeline.config import UserError, require, setting
from pipeline.distill import teachers
from pipeline.distill.rows import TEACHER_COLUMNS, TEACHER_ROWS, check_offline_teacher, teacher_token_dataset
from pipeline.distill.trainer import KDTrainer
from pipeline.inference import teacher_server
from pipeline.prompts import CHATML_TEMPLATE
from pipeline.rundir import Run, RunKeys, fingerprint
from pipeline.traces import load_traces
from pipeline.training import (
    TRAINING_FREE_KEYS,
    LoraKeys,
    check_eos_trained,
    check_template_keeps_think,
    lora_config,
    open_training_run,
    set_max_length,
    train_and_save,
)
from pipeline.validation import ValidationKeys, add_validation

log = logging.getLogger(__name__)


@dataclass
class SFTStageConfig(*(m.keys for m in reversed(distill.methods().values())), SFTConfig, LoraKeys, ValidationKeys,
                     RunKeys):
    """Every SFTConfig / TrainingArguments field, each distillation method's keys (pipeline/distill/: feature
    and relational KD, ...), the LoRA keys (pipeline/training.py), and the keys below."""

    output_dir: str | None = setting(None, help="checkpoints and the final student model (with its card, "
                                                "train_summary.json and config.yaml)")
    # TRL's 1024 default would cut long traces silently.
    max_length: int | None = setting(None, help="tokens per sample, longer ones are cut (with a warning); "
                                                "unset: the longest sample's")
    report_to: str | list[str] | None = setting("none", help="TRL's experiment trackers (wandb, tensorboard, ...); "
                                                             "none: no tracker")
    # Data and models.
    model: str | None = setting(None, help="the student to train: a local path or hub id")
    dataset: str | None = setting(None, help="a traces dir (its curated/ is used), a saved dataset dir, or a hub id")
    dataset_split: str = setting("train", help="split of a hub dataset or a saved DatasetDict")
    max_train_samples: int | None = setting(None, help="train on N traces, a random subset drawn with `seed`; "
                                                       "unset: all")
    chat_template: Literal["student", "chatml"] = setting("student", help="the student's own, or chatml: a "
                                                                          "fallback that keeps <think> blocks")
    # Logit KD.
    kd: Literal["none", "online", "offline", "mutual"] = setting(
        "none", help="logit KD: online (a teacher model), offline (stored top-k logprobs), mutual (a second student)")
    teacher: str | list[str] | None = setting(None, help="online KD: path or hub id (a list: an ensemble), with the "
                                                         "student's tokenizer")
    teacher_server: str | None = setting(None, help="online KD from a vLLM server instead (URL): top-k + rest "
                                                    "(teacher_server.py)")
    teacher_server_top_k: int = setting(20, help="the server's top-k log-probs per token (start it with "
                                                 "--max-logprobs >= this)")
    kd_alpha: float = setting(0.5, help="weight of the KD term; 1 - kd_alpha weighs CE")
    kd_temperature: float = setting(2.0, help="softening temperature T of both distributions (the loss is scaled "
                                              "by T^2)")
    kd_divergence: Literal["forward_kl", "reverse_kl", "jsd"] = setting(
        "forward_kl", help="the KD divergence: forward_kl, reverse_kl or jsd (generalized JSD, kd_beta)")
    kd_beta: float = setting(0.5, help="jsd only: the mixture weight (0: forward KL, 1: reverse KL)")
    kd_chunk_size: int = setting(256, help="tokens per chunk of logits: bounds the loss's memory (see "
                                           "BENCHMARKS.md)")
    mutual_peer: str | None = setting(None, help="kd: mutual: the second student's init, trained beside this one "
                                                 "(saved in output_dir/peer)")
    generations: int = setting(1, help="born-again: K students in turn, each after the first taught by the one "
                                       "before")

    def __post_init__(self) -> None:
        # Before TrainingArguments' own, which replaces an unset output_dir with "trainer_output".
        require(self, "output_dir", example="configs/sft.yaml")
        super().__post_init__()
        if self.kd == "online" and bool(self.teacher) == bool(self.teacher_server):
            raise ValueError("kd: online needs one teacher: teacher (a model path or hub id, loaded here) or "
                             "teacher_server (the URL of a vLLM server serving it)")
        for method in distill.enabled(self).values():  # the family's own keys (pipeline/distill/)
            method.check(self)
        if (self.kd == "mutual") != bool(self.mutual_peer):
            raise ValueError("kd: mutual trains two students, this one and mutual_peer (its init: a model path), "
                             "each taught by the other (teacher is not used): set both")
        if self.generations < 1 or (self.generations > 1 and self.kd == "mutual"):
            raise ValueError(f"generations must be >= 1 (got {self.generations}), and born-again generations are "
                             "taught by a teacher, not a mutual peer")
        if self.teacher_server and self.packing:
            raise ValueError("teacher_server scores each sample on its own: it cannot be combined with packing")
        if not 0 <= self.kd_alpha <= 1 or not 0 <= self.kd_beta <= 1:
            raise ValueError(f"kd_alpha and kd_beta must be in [0, 1], got {self.kd_alpha} and {self.kd_beta}")
        if self.kd_temperature <= 0 or self.kd_chunk_size < 1:
            raise ValueError("kd_temperature must be > 0 and kd_chunk_size >= 1")
        require(self, "model", "dataset", example="configs/sft.yaml")


FREE_KEYS = TRAINING_FREE_KEYS  # what a resume may change (pipeline/training.py)


def main(cfg: SFTStageConfig) -> Path:
    """One student; with `generations: K`, K in turn (pipeline/distill/teachers.py), the last in
    output_dir, each earlier one a run of its own in output_dir/generation-k."""
    run = open_training_run(cfg, "sft", inputs(cfg))
    if run.complete:
        log.info(f"{cfg.output_dir}: trained by this config already, nothing to do")
        return Path(cfg.output_dir)
    *earlier, last = teachers.generation_plan(cfg)
    for gen in earlier:
        gen_run = open_training_run(gen, "sft", inputs(gen))
        if not gen_run.complete:
            train(gen, gen_run)
    return train(last, run)


def inputs(cfg: SFTStageConfig) -> dict[str, Any]:
    """Fingerprints of what the run reads (pipeline/rundir.py): student init, traces, teachers."""
    members = [cfg.teacher] if isinstance(cfg.teacher, str) else cfg.teacher or []
    return {"model": fingerprint(cfg.model), "dataset": fingerprint(cfg.dataset),
            "teacher": [fingerprint(m) for m in members] or None, "mutual_peer": fingerprint(cfg.mutual_peer)}


def train(cfg: SFTStageConfig, run: Run) -> Path:
    trainer = build_trainer(cfg)
    return train_and_save(trainer, cfg, run, card=lambda: reports.sft_card(cfg, trainer),
                          summary=lambda: train_summary(trainer))


def build_trainer(cfg: SFTStageConfig) -> SFTTrainer:
    """Load and check the data, tokenizer and models; return the trainer, ready to train."""
    from transformers import AutoTokenizer

    offline = [*TEACHER_COLUMNS, "teacher_vocab", "logprobs_mode"] if cfg.kd == "offline" else []
    dataset = load_traces(cfg.dataset, cfg.dataset_split, ["prompt", "completion", *offline],
                          hint=" (offline KD needs traces generated with logprobs: k by this version of the generate "
                               "stage)" if offline else "")
    if cfg.max_train_samples is not None:
        dataset = subset(dataset, cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if cfg.chat_template == "chatml" or tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    if cfg.kd == "offline":  # train on the teacher's own tokens, which its stored rows describe
        check_offline_teacher(dataset, tokenizer, cfg)
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(cfg.model).get_text_config().vocab_size  # the student's logits
        dataset = teacher_token_dataset(dataset, tokenizer, vocab_size)
    else:
        check_template_keeps_think(tokenizer, dataset[0], cfg)
    set_max_length(cfg, tokenizer, dataset)
    if cfg.kd == "offline" and cfg.packing:
        # TRL's packing keeps only input_ids and labels: pack the teacher's rows with them here.
        from trl.data_utils import pack_dataset

        dataset = pack_dataset(dataset.select_columns(["input_ids", "labels", *TEACHER_ROWS]), cfg.max_length,
                               cfg.packing_strategy)
        cfg.dataset_kwargs = {**(cfg.dataset_kwargs or {}), "skip_prepare_dataset": True}

    models, server = [], None
    if cfg.teacher_server and cfg.kd == "online":
        teacher_server.check_tokenizer(cfg.teacher_server, tokenizer, cfg.model)
        server = teacher_server.client(cfg.teacher_server)
    elif cfg.kd in ("online", "mutual"):
        paths = ([cfg.mutual_peer] if cfg.kd == "mutual" else
                 [cfg.teacher] if isinstance(cfg.teacher, str) else cfg.teacher)
        models = teachers.load(paths, tokenizer, cfg.model, teachers.dtype_for(cfg), trainable=cfg.kd == "mutual")
    trainer_cls = KDTrainer if cfg.kd != "none" else SFTTrainer
    extra = {"teachers": models, "server": server, "kd": cfg} if cfg.kd != "none" else {}
    trainer = trainer_cls(model=cfg.model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=lora_config(cfg), **extra)
    check_eos_trained(trainer, tokenizer)
    add_validation(trainer, cfg)
    state = trainer.accelerator.state
    log.info(f"process {state.process_index} of {state.num_processes} ({state.distributed_type.value})")
    return trainer


# ---------------------------------------------------------------------------- data

def subset(dataset: Any, cfg: SFTStageConfig) -> Any:
    """`max_train_samples` traces drawn with the training seed: at one seed, every method gets the
    same ones, and a smaller subset is part of a larger one."""
    if cfg.max_train_samples > len(dataset):
        raise UserError(f"max_train_samples is {cfg.max_train_samples} but dataset {cfg.dataset} has only "
                        f"{len(dataset)} traces: lower it, or generate more (max_prompts, num_samples)")
    return dataset.shuffle(seed=cfg.seed).select(range(cfg.max_train_samples))


# ---------------------------------------------------------------------------- what was trained

def train_summary(trainer: Any) -> dict[str, Any]:
    """What the student saw: samples, distinct prompts, trained (completion) tokens in the data,
    steps, and completion tokens trained on over all epochs (about: the average sample's)."""
    import pyarrow.compute as pc

    data = trainer.train_dataset
    if "labels" in data.column_names:  # counted in Arrow: a Python loop would crawl over millions of traces
        trained = pc.not_equal(pc.list_flatten(data.data.column("labels")), -100)
    else:
        trained = pc.list_flatten(data.data.column("completion_mask"))
    tokens = pc.sum(pc.cast(trained, "int64")).as_py() or 0
    args = trainer.args
    seen = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps \
        * trainer.accelerator.num_processes  # samples drawn over the epochs (packed: sequences)
    return training.train_summary(trainer, samples=len(data), completion_tokens=int(tokens),
                                  tokens_seen=round(tokens * seen / max(len(data), 1)),
                                  prompts=len(set(data["prompt_id"])) if "prompt_id" in data.column_names else None)

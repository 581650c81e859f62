"""The sft stage: TRL's SFTTrainer fine-tunes a student on traces, optionally distilling more.

    loss = (1 - kd_alpha) * CE(labels) + kd_alpha * T^2 * D(teacher_T || student_T)
           [+ feature_weight * L_feat + relation_distance_weight * L_D + relation_angle_weight * L_A]

on completion tokens only, D one of forward KL, reverse KL, generalized JSD. The family's losses
and teachers live in pipeline/distill/ (its __init__ says where a new method goes).
The teacher is online (a frozen model or an ensemble of them, placed and sharded by accelerate
as the student is), offline (the top-k logprobs and the rest the generate stage stored with
`logprobs: k`, usable only by a student with the teacher's very vocabulary), a second student
trained beside this one (`kd: mutual`), or the previous generation (`generations: K`). Checked before training: the chat
template keeps the think block, every sample ends in the student's EOS and the EOS carries
loss, no sample is cut silently, offline rows are raw and from the student's vocabulary.
Multi-process, FSDP2, ZeRO-3, packing and padding-free: see `distill_losses` and tests/test_sft.py.
Output layout and resume: pipeline/training.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from trl import SFTConfig, SFTTrainer

from pipeline.inference import teacher_server
from pipeline.config import UserError, require, setting
from pipeline.distill import features, relations, teachers
from pipeline.distill.logits import LOG_ZERO, chunked_kd_loss
from pipeline.prompts import CHATML_TEMPLATE
from pipeline.traces import load_traces, vocab_fingerprint
from pipeline.rundir import Run, RunKeys, fingerprint
from pipeline.training import (TRAINING_FREE_KEYS, LoraKeys, last_loss, lora_config, open_training_run, traces_teacher,
                              train_and_save)

log = logging.getLogger(__name__)


@dataclass
class SFTStageConfig(SFTConfig, LoraKeys, RunKeys):
    """Every SFTConfig / TrainingArguments field, the LoRA keys (pipeline/training.py), and the keys below."""

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
    # The rest of the family (pipeline/distill/); weights are the papers', stated in each file.
    feature_kd: bool = setting(False, help="hidden-state KD, projected (features.py); needs kd: online and one "
                                           "local teacher")
    feature_weight: float = setting(1.0, help="weight of the feature KD term")
    feature_layers: list[str] = setting([], help='"student:teacher" hidden-state index pairs; []: every student '
                                                 "layer, mapped evenly")
    relation_kd: bool = setting(False, help="RKD: distances and angles between a batch's samples (relations.py); "
                                            "as feature_kd, and batch >= 3")
    relation_distance_weight: float = setting(25.0, help="weight of the RKD distance term")
    relation_angle_weight: float = setting(50.0, help="weight of the RKD angle term")
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
        local = self.kd == "online" and isinstance(self.teacher, str)
        if (self.feature_kd or self.relation_kd) and not local:
            raise ValueError("feature_kd and relation_kd read a local teacher's hidden states: set kd: online and "
                             "teacher: one model path (kd_alpha: 0 leaves out the logit term)")
        if self.relation_kd and (self.packing or self.padding_free or self.per_device_train_batch_size < 3):
            raise ValueError("relation_kd compares a device batch's samples: it needs per_device_train_batch_size "
                             ">= 3 (angles are over triplets) and no packing or padding_free")
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
    return train_and_save(trainer, cfg, run, card=lambda: model_card(cfg, trainer),
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
        paths = [cfg.mutual_peer] if cfg.kd == "mutual" else [cfg.teacher] if isinstance(cfg.teacher, str) else cfg.teacher
        models = teachers.load(paths, tokenizer, cfg.model, teachers.dtype_for(cfg), trainable=cfg.kd == "mutual")
    trainer_cls = KDTrainer if cfg.kd != "none" else SFTTrainer
    extra = {"teachers": models, "server": server, "kd": cfg} if cfg.kd != "none" else {}
    trainer = trainer_cls(model=cfg.model, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=lora_config(cfg), **extra)
    check_eos_trained(trainer, tokenizer)
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


def check_offline_teacher(dataset: Any, tokenizer: Any, cfg: SFTStageConfig) -> None:
    """Stored top-k rows are usable only as raw log-probs (T = 1, no top-p) over the student's
    own vocabulary: ids from another tokenizer name other tokens, and training would go on."""
    teacher = ", ".join(dataset.unique("teacher")) if "teacher" in dataset.column_names else "the teacher"
    modes = set(dataset.unique("logprobs_mode")) - {"raw_logprobs"}
    if modes:
        raise UserError(f"dataset {cfg.dataset}: offline KD needs raw_logprobs, but the traces store {', '.join(modes)} "
                        "(already softened by the sampling temperature and cut by top-p, so the KD temperature "
                        "would apply twice and the tail is lost): generate them again with logprobs_mode: "
                        "raw_logprobs")
    student = vocab_fingerprint(tokenizer)
    stored = set(dataset.unique("teacher_vocab")) - {student}
    if stored:
        raise UserError(f"dataset {cfg.dataset}: the teacher ({teacher}) sampled with another tokenizer than the "
                        f"student {cfg.model} (vocabulary {', '.join(stored)} vs {student}), so its stored token ids "
                        "mean other tokens. Train on the text instead (kd: none, sequence-level SFT), or distil "
                        "across tokenizers with the live teacher: `make onpolicy` with lmbda: 0 and traces: these "
                        "traces (TRL's GOLD trainer, ULD loss)")


def check_template_keeps_think(tokenizer: Any, sample: dict[str, Any], cfg: SFTStageConfig) -> None:
    """Some templates (DeepSeek-R1-Distill's, Qwen3's) strip the reasoning from assistant turns;
    training on that would teach the student to answer without thinking."""
    content = sample["completion"][0]["content"]
    reasoning = content.split("</think>")[0].split("<think>")[-1].strip()
    rendered = tokenizer.apply_chat_template(sample["prompt"] + sample["completion"], tokenize=False)
    if "</think>" in content and reasoning and reasoning[:50] not in rendered:
        raise UserError(f"the chat template of {cfg.model} drops the <think> block from assistant messages; "
                        "set chat_template: chatml to train on the reasoning")


def set_max_length(cfg: SFTStageConfig, tokenizer: Any, dataset: Any) -> None:
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


# ---------------------------------------------------------------------------- KD trainer

class KDTrainer(SFTTrainer):
    """SFTTrainer whose loss adds the family's terms (see `distill_losses`). Teachers are placed by
    accelerate as the student is: moved to the device under DDP, FSDP-wrapped under FSDP, ZeRO-3
    initialised under DeepSpeed, always in evaluation mode. A served teacher (`server`) fills the
    same rows as an offline one, batch by batch. What trains beside the student (feature
    projections, a mutual peer) hangs on it as `distill_modules`: DDP syncs it, the optimizer
    steps it, checkpoints keep it apart (`distill_modules.pt`) and the final student leaves it out."""

    def __init__(self, *args: Any, teachers: list[Any] = (), server: Any = None, kd: SFTStageConfig,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kd = kd
        # Online: both logit matrices cut to the shared tokenizer (their padding may differ).
        # Offline: the stored ids are the teacher's own samples, which may fall in padding rows.
        self.vocab_size = (len(self.processing_class) if teachers
                           else self.model.config.get_text_config().vocab_size)
        trained = {}
        if kd.kd == "mutual":
            trained["peer"], teachers = teachers[0], []
        if kd.feature_kd:
            student, teacher = self.model.config.get_text_config(), teachers[0].config.get_text_config()
            pairs = features.layer_map(student.num_hidden_layers, teacher.num_hidden_layers, kd.feature_layers)
            trained["features"] = features.FeatureProjections(pairs, student.hidden_size, teacher.hidden_size)
        if trained:
            self.model.distill_modules = torch.nn.ModuleDict(trained).to(self.args.device)
        self.teachers = [self._prepare_teacher(t) for t in teachers]
        if kd.kd == "offline" or server is not None:
            self.data_collator = TeacherRowsCollator(self.data_collator, server, kd.teacher_server_top_k)

    def _prepare_teacher(self, teacher: Any) -> Any:
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed
            return prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # keeps only model inputs; the teacher's rows too
        self._signature_columns = [*self._signature_columns, *TEACHER_ROWS]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        unwrap = self.accelerator.unwrap_model
        losses = distill_losses(model, unwrap(model), self.teachers, [unwrap(t) for t in self.teachers], inputs,
                                self.kd, self.vocab_size, num_items_in_batch)
        # Each process's token sums are its share of the all-process batch (num_items_in_batch is
        # gathered over processes). DDP averages gradients over processes, so, as transformers'
        # Trainer.compute_loss does, scale by their number, or loss and gradients are 1/N of the truth.
        global_count = num_items_in_batch is not None and self.args.average_tokens_across_devices
        scale = self.accelerator.num_processes if global_count else 1
        steps = self.args.gradient_accumulation_steps if num_items_in_batch is not None else 1
        for key in BATCH_MEANS & losses.keys():  # a micro-batch's mean: made a share as the token sums are
            losses[key] = losses[key] / (steps * scale)
        weights = term_weights(self.kd)
        loss = sum(weights[key] * losses[key] for key in weights)
        # Logged: what one process with the whole batch would log. Shares add up over processes, and
        # over the accumulation steps the logged mean runs over.
        shares = torch.stack([losses[key] for key in weights]).detach()
        shares = self.accelerator.reduce(shares, "sum" if global_count else "mean")
        mode = "train" if model.training else "eval"
        for key, value in zip(weights, (shares * steps).tolist()):
            self._metrics[mode][key].append(value)
        return (loss * scale, None) if return_outputs else loss * scale

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The student alone; beside it, in a checkpoint, what trains with it (for resume), and in
        the final save a mutual peer as a student of its own (output_dir/peer)."""
        module = self.accelerator.unwrap_model(self.model)
        trained = module._modules.pop("distill_modules", None)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            if trained is not None:
                module.distill_modules = trained
        out = Path(output_dir or self.args.output_dir)
        if trained is None or not self.args.should_save:
            return
        if _internal_call:
            torch.save(trained.state_dict(), out / DISTILL_MODULES)
        elif "peer" in trained:
            peer, tokenizer = trained["peer"], self.processing_class
            peer.generation_config.eos_token_id, peer.generation_config.pad_token_id = (tokenizer.eos_token_id,
                                                                                        tokenizer.pad_token_id)
            peer.save_pretrained(str(out / "peer"))
            tokenizer.save_pretrained(str(out / "peer"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = Path(resume_from_checkpoint) / DISTILL_MODULES
        if saved.is_file():
            module = self.accelerator.unwrap_model(model or self.model)
            module.distill_modules.load_state_dict(torch.load(saved, map_location="cpu"))


DISTILL_MODULES = "distill_modules.pt"
# Terms that are a micro-batch's mean rather than a sum over its tokens.
BATCH_MEANS = {"relation_distance_loss", "relation_angle_loss"}


def term_weights(cfg: SFTStageConfig) -> dict[str, float]:
    """Each logged term's weight in the loss (the keys `distill_losses` returns, num_tokens aside)."""
    weights = {"ce_loss": 1.0 - cfg.kd_alpha, "kd_loss": cfg.kd_alpha}
    if cfg.kd == "mutual":  # the peer's own objective, the same terms towards this student
        weights |= {"peer_ce_loss": 1.0 - cfg.kd_alpha, "peer_kd_loss": cfg.kd_alpha}
    if cfg.feature_kd:
        weights["feature_loss"] = cfg.feature_weight
    if cfg.relation_kd:
        weights |= {"relation_distance_loss": cfg.relation_distance_weight,
                    "relation_angle_loss": cfg.relation_angle_weight}
    return weights


# What the model's forward takes from a batch: padded (attention_mask), or padding-free and packed
# (position_ids restart at each sequence; cu_seq_lens for varlen attention kernels).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")


def distill_losses(model: Any, module: Any, teachers: list[Any], teacher_modules: list[Any], inputs: dict[str, Any],
                   kd: SFTStageConfig, vocab_size: int, num_items_in_batch: Any = None) -> dict[str, torch.Tensor]:
    """The terms of one batch, named as `term_weights` names them. The logit terms come from final
    hidden states only (pipeline/distill/logits.py): no model computes logits, the loss does, one
    chunk at a time. `model`/`teachers` are what the trainer holds (maybe wrapped: DDP, FSDP,
    DeepSpeed), `module`/`teacher_modules` the models inside. Each forward runs through its wrapper
    (TRL's forward redirection), so the wrapper gathers sharded weights and sees the loss as its
    output (FSDP's backward hooks hang on it)."""
    from trl.models.utils import _ForwardRedirection

    through_wrapper = _ForwardRedirection()
    forward = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
    labels = inputs["labels"][:, 1:]
    mask = labels != -100  # the states that predict completion tokens
    every_layer = kd.feature_kd  # relations need only the last state (pooled per sample)
    logit_kd = {"temperature": kd.kd_temperature, "kind": kd.kd_divergence, "beta": kd.kd_beta,
                "chunk_size": kd.kd_chunk_size, "num_items_in_batch": num_items_in_batch, "vocab_size": vocab_size,
                "alpha": kd.kd_alpha}
    teacher_kwargs: dict[str, Any] = {}
    teacher_states: tuple[torch.Tensor, ...] = ()
    if "teacher_topk_ids" in inputs:
        teacher_kwargs = {k: inputs[k] for k in TEACHER_ROWS}
    elif teachers:
        hiddens, heads = [], []
        with torch.no_grad():
            for teacher, teacher_module in zip(teachers, teacher_modules):
                teacher_states = through_wrapper(teacher, teacher_module, decoder_states, teacher_module, forward,
                                                 every_layer)
                hidden = teacher_states[-1][:, :-1]
                # The loss's backward recomputes teacher logits, so a ZeRO-3 weight (released after its
                # module's forward, and never gathered again for a model without gradients) is copied.
                heads.append(through_head(teacher_module, lambda w, h: w.detach().clone() if hasattr(w, "ds_id")
                                          else w.detach(), hidden))
                hiddens.append(hidden)
        ensemble = len(hiddens) > 1  # its members' hidden states side by side (logits.py)
        teacher_kwargs = {"teacher_hidden": hiddens if ensemble else hiddens[0],
                          "teacher_lm_head_weight": heads if ensemble else heads[0]}

    def student_losses() -> dict[str, torch.Tensor]:
        states = decoder_states(module, forward, every_layer)
        hidden = states[-1][:, :-1]
        if kd.kd == "mutual":  # each of the two learns towards the other's detached distribution
            peer = module.distill_modules["peer"]
            peer_hidden = decoder_states(peer, forward)[-1][:, :-1]
            peer_head = peer.get_output_embeddings().weight
            losses = through_head(module, lambda w, h: chunked_kd_loss(
                h, w, labels, teacher_hidden=peer_hidden.detach(), teacher_lm_head_weight=peer_head.detach(),
                **logit_kd), hidden)
            towards_student = chunked_kd_loss(peer_hidden, peer_head, labels, teacher_hidden=hidden.detach(),
                                              teacher_lm_head_weight=module.get_output_embeddings().weight.detach(),
                                              **logit_kd)
            return {**losses, "peer_ce_loss": towards_student["ce_loss"], "peer_kd_loss": towards_student["kd_loss"]}
        losses = through_head(module, lambda w, h: chunked_kd_loss(h, w, labels, **teacher_kwargs, **logit_kd),
                              hidden)
        if kd.feature_kd:
            losses["feature_loss"] = features.feature_loss(
                [s[:, :-1] for s in states], [t[:, :-1] for t in teacher_states],
                module.distill_modules["features"], mask, num_items_in_batch)
        if kd.relation_kd:
            student, teacher = relations.pooled(hidden, mask), relations.pooled(teacher_states[-1][:, :-1], mask)
            losses["relation_distance_loss"] = relations.distance_loss(student, teacher)
            losses["relation_angle_loss"] = relations.angle_loss(student, teacher)
        return losses

    return through_wrapper(model, module, student_losses)


def decoder_states(module: Any, forward: dict[str, Any], every_layer: bool = False) -> tuple[torch.Tensor, ...]:
    """The decoder's output [B, L, H] (after the final norm) as a 1-tuple: no logits; or, for
    feature KD, every hidden state (0 the embeddings, the last the output)."""
    out = module.get_decoder()(**forward, use_cache=False, output_hidden_states=every_layer)
    return tuple(out.hidden_states) if every_layer else (out[0],)


def through_head(module: Any, fn: Any, hidden: torch.Tensor) -> Any:
    """fn(lm_head weight, hidden) for every way the weight may be held. Plain (one process, DDP,
    and FSDP2 as accelerate wraps it: the head's unit stays unsharded after forward): as it is.
    A DTensor (an FSDP2 head resharded after forward): gathered whole, its gradient averaged
    back over ranks as FSDP averages the rest. ZeRO-3 (outside its module's forward the weight is
    a 0-row placeholder): fn runs as the head's forward, so ZeRO-3 gathers the weight around it
    and again for its backward. (Calling an FSDP2 head a second time crashes its backward: only
    ZeRO-3 takes that road.)"""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial

    head = module.get_output_embeddings()
    weight = head.weight
    if isinstance(weight, DTensor):
        return fn(weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim), hidden)
    if not hasattr(weight, "ds_id"):
        return fn(weight, hidden)
    head.forward = lambda h: fn(head.weight, h)  # an instance attribute shadows the class's forward
    try:
        return head(hidden)
    finally:
        del head.forward


TEACHER_COLUMNS = ("topk_ids", "topk_logprobs", "topk_rest_logprob", "completion_token_ids")
# The teacher's rows on the tokenized examples, one per token, aligned with input_ids and labels:
# packing and truncation cut and join them with the tokens (row j is the distribution token j was
# sampled from; rows of tokens without loss are unused).
TEACHER_ROWS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_rest_logprob")


def teacher_token_dataset(dataset: Any, tokenizer: Any, vocab_size: int) -> Any:
    """Tokenized examples whose completion is the teacher's sampled token ids, not a
    re-tokenization of their text (which can differ: invalid UTF-8, skipped special tokens,
    non-canonical merges), with the teacher's rows aligned to the tokens. The prompt is rendered
    with the student's template, and the template's own tokens after an assistant turn (ChatML:
    EOS, newline) are appended; they get one-hot rows (the template makes them certain, and so
    does the EOS when the teacher was cut at max_tokens)."""
    probe = dataset[0]["prompt"]
    prompt_ids = _template_ids(tokenizer, probe, add_generation_prompt=True)
    with_x = _template_ids(tokenizer, probe + [{"role": "assistant", "content": "x"}])
    x_ids = tokenizer("x", add_special_tokens=False).input_ids
    tail = with_x[len(prompt_ids) + len(x_ids):]

    def tokenize(example: dict[str, Any]) -> dict[str, Any]:
        prompt = _template_ids(tokenizer, example["prompt"], add_generation_prompt=True)
        completion = list(example["completion_token_ids"])
        ending = tail[1:] if tail and completion and completion[-1] == tail[0] else tail  # EOS once
        ids = torch.as_tensor(example["topk_ids"], dtype=torch.long).reshape(len(completion), -1)
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise UserError(f"sample {example.get('prompt_id', '?')}: a teacher token id is outside the student's "
                            f"{vocab_size} output rows; the teacher's vocabulary is larger than the student's")
        k = ids.shape[1]
        certain = torch.as_tensor(ending, dtype=torch.long)
        certain_ids = (certain[:, None] + torch.arange(k)) % vocab_size  # the label first, then k - 1 others
        certain_logprobs = torch.full((len(ending), k), LOG_ZERO)
        certain_logprobs[:, 0] = 0.0
        logprobs = torch.as_tensor(example["topk_logprobs"], dtype=torch.float32).reshape(len(completion), k)
        rest = torch.as_tensor(example["topk_rest_logprob"], dtype=torch.float32)
        unused = len(prompt)
        return {"input_ids": prompt + completion + ending,
                "labels": [-100] * len(prompt) + completion + ending,
                "teacher_topk_ids": torch.cat([torch.zeros(unused, k, dtype=torch.long), ids, certain_ids]).tolist(),
                "teacher_topk_logprobs": torch.cat([torch.zeros(unused, k), logprobs.clamp_min(LOG_ZERO),
                                                    certain_logprobs]).tolist(),
                "teacher_rest_logprob": torch.cat([torch.zeros(unused), rest.clamp_min(LOG_ZERO),
                                                   torch.full((len(ending),), LOG_ZERO)]).tolist()}

    return dataset.map(tokenize, remove_columns=list(dataset.column_names), desc="teacher tokens")


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids


class TeacherRowsCollator:
    """TRL's collator, plus the teacher rows of every trained position in the batch, in the
    row-major order in which the loss visits them (padded, padding-free and packed batches).
    The rows are the examples' own (offline), or asked of a teacher server for these tokens."""

    def __init__(self, collator: Any, server: Any = None, top_k: int = 0) -> None:
        self.collator, self.server, self.top_k = collator, server, top_k

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.server is not None:
            rows = teacher_server.topk_rows(self.server, [list(e["input_ids"]) for e in examples], self.top_k)
            examples = [{**e, **r} for e, r in zip(examples, rows, strict=True)]
        batch = self.collator([{k: v for k, v in e.items() if k not in TEACHER_ROWS} for e in examples])
        labels, lengths = batch["labels"], [len(e["input_ids"]) for e in examples]
        # Each example's span of the collated labels: one row each, or one flat row (padding-free).
        spans = (labels.flatten()[: sum(lengths)].split(lengths) if labels.shape[0] < len(examples)
                 else [row[:n] for row, n in zip(labels, lengths)])
        rows: dict[str, list[torch.Tensor]] = {key: [] for key in TEACHER_ROWS}
        for example, span in zip(examples, spans):
            trained = span != -100
            trained[0] = False  # the first token of a sequence is predicted by nothing
            for key in TEACHER_ROWS:
                rows[key].append(torch.as_tensor(example[key])[: len(span)][trained])
        for key, values in rows.items():
            batch[key] = torch.cat(values)
        return batch


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
    return {"samples": len(data), "completion_tokens": int(tokens), "steps": trainer.state.global_step,
            "tokens_seen": round(tokens * seen / max(len(data), 1)),
            "prompts": len(set(data["prompt_id"])) if "prompt_id" in data.column_names else None,
            "final_loss": last_loss(trainer)}


def model_card(cfg: SFTStageConfig, trainer: Any) -> str:
    kd = "none (sequence-level distillation: SFT on teacher traces)"
    members = ([cfg.teacher] if isinstance(cfg.teacher, str) else cfg.teacher or []) if cfg.kd == "online" else []
    if cfg.kd != "none":
        divergence = cfg.kd_divergence + (f" (beta={cfg.kd_beta})" if cfg.kd_divergence == "jsd" else "")
        support = ("the full shared vocabulary" if members or cfg.kd == "mutual" else
                   f"the teacher's top-{cfg.teacher_server_top_k if cfg.teacher_server else 'k'} ids and one bucket "
                   "for the rest of the vocabulary (coarsened at T = 1, then softened: a lower bound on the "
                   "full-vocabulary divergence)")
        source = (f"the mutual peer trained beside it (init {cfg.mutual_peer}, saved in peer/)" if cfg.kd == "mutual"
                  else f"the ensemble of {', '.join(members)} (mean of their probabilities)" if len(members) > 1
                  else f"the local teacher {members[0]}" if members
                  else f"the teacher server {cfg.teacher_server}" if cfg.teacher_server
                  else "the teacher's top-k log-probs stored with the traces")
        kd = (f"{cfg.kd}: {divergence} at T={cfg.kd_temperature} over {support}, from {source}; "
              f"weight alpha={cfg.kd_alpha} beside CE")
    more = [f"weight {w} on {term}" for term, w in term_weights(cfg).items() if term not in ("ce_loss", "kd_loss")
            and not term.startswith("peer")]
    teacher = ", ".join(members) or cfg.mutual_peer or cfg.teacher_server or traces_teacher(cfg.dataset)
    return (f"# {Path(cfg.output_dir).name}\n\nA student distilled with r1-distill.\n\n"
            f"- student init: `{cfg.model}`\n- teacher: `{teacher}`\n- traces: `{cfg.dataset}`\n- logit KD: {kd}\n"
            + (f"- feature / relational KD (pipeline/distill/): {'; '.join(more)}\n" if more else "")
            + (f"- born-again: {cfg.generations} generations, each after the first taught by the one before "
               "(generation-k/ beside the last)\n" if cfg.generations > 1 else "")
            + f"- LoRA: {'r=' + str(cfg.lora_r) if cfg.lora_r else 'off'}\n"
            f"- steps: {trainer.state.global_step}, final logged loss: {last_loss(trainer)}\n"
            f"- config: `config.yaml` beside this card\n")

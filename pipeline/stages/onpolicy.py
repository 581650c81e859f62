"""The onpolicy stage: the student samples completions of the prompts, the teacher scores every
sampled token, and the student is pushed down the per-token divergence between the two (Qwen3's
second step of distillation, after SFT on traces): generate -> sft -> onpolicy -> eval.

The teacher chooses the trainer, and so the divergence (docs/onpolicy.md has the table; the model
card says which one ran): a local teacher with the student's tokenizer, TRL's DistillationTrainer
(generalized JSD(beta) over the full distributions); a served one (`teacher_server`), TRL's
ServerDistillationTrainer (top-k plus a tail bucket); a teacher with another tokenizer, TRL's GOLD
trainer (ULD loss, `gold_trainer`). With `lmbda` < 1 a share 1 - lmbda of the batches trains on
the traces' completions instead of the student's samples (GKD's mix), with either local teacher.
Per step it logs, by batch kind (`sampled/`, `traces/`): the student's entropy, the teacher's
log-probability per token of the completions and (sampled) the share clipped at
max_completion_length; onpolicy.png plots them beside the loss.

Prompts come from a prompt set exactly as in generate. Output layout and resume:
pipeline/training.py; train_summary.json adds where the steps' time went (`StepTimes`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from trl import DistillationConfig, DistillationTrainer
from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

from pipeline import reports, training
from pipeline.config import require, setting
from pipeline.distill.alignment import SkipsUnalignable, alignable_rows, skipped_unalignable
from pipeline.inference import teacher_server
from pipeline.prompts import CHATML_TEMPLATE, PromptSource, chat_prompt, load_prompts
from pipeline.rundir import RunKeys, fingerprint, prompt_set_fingerprint
from pipeline.traces import load_traces
from pipeline.training import TRAINING_FREE_KEYS, LoraKeys, lora_config, open_training_run, train_and_save
from pipeline.validation import ValidationKeys, add_validation

log = logging.getLogger(__name__)
FREE_KEYS = TRAINING_FREE_KEYS  # what a resume may change (pipeline/training.py)


@dataclass
class OnPolicyConfig(DistillationConfig, PromptSource, LoraKeys, ValidationKeys, RunKeys):
    """Every DistillationConfig / TrainingArguments field (beta, temperature, max_completion_length,
    use_vllm, ...), the prompt-set keys of generate, the LoRA keys, and the keys below."""

    output_dir: str | None = setting(None, help="checkpoints and the final student model (with its card, "
                                                "train_summary.json and config.yaml)")
    report_to: str | list[str] | None = setting("none", help="TRL's experiment trackers (wandb, tensorboard, ...); "
                                                             "none: no tracker")
    model: str | None = setting(None, help="the student to start from: a path (e.g. the sft stage's output) or "
                                           "hub id")
    teacher: str | None = setting(None, help="a local teacher: path or hub id (another tokenizer: the GOLD trainer)")
    teacher_server: str | None = setting(None, help="or the URL of a vLLM server serving the teacher (then "
                                                    "teacher: null)")
    teacher_server_top_k: int = setting(1, help="served teacher: top-k log-probs per token (TRL: 1 when beta > 0)")
    lmbda: float = setting(1.0, help="share of on-policy batches; < 1 mixes in batches of `dataset`'s completions "
                                     "(GKD's lmbda)")
    dataset: str | None = setting(None, help="off-policy completions for lmbda < 1: a traces dir or saved dataset")
    gold: dict = setting({}, help="extra GOLDConfig keys (uld_*, max_length), cross-tokenizer runs only")
    chat_template: Literal["student", "chatml"] = setting("student", help="the student's own, or chatml: a "
                                                                          "fallback that keeps <think> blocks")
    RENAMED: ClassVar[dict[str, str]] = {"traces": "dataset", "server_top_k": "teacher_server_top_k"}

    def __post_init__(self) -> None:
        # Before TrainingArguments' own, which replaces an unset output_dir with "trainer_output".
        require(self, "output_dir", example="configs/onpolicy.yaml")
        super().__post_init__()
        PromptSource.__post_init__(self)
        if bool(self.teacher) == bool(self.teacher_server):
            raise ValueError("name one teacher: teacher (a model path or hub id, loaded here) or teacher_server "
                             "(the URL of a vLLM server serving it)")
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda must be in [0, 1] (the share of on-policy batches), got {self.lmbda}")
        if self.lmbda < 1 and not self.dataset:
            raise ValueError(f"lmbda: {self.lmbda} trains partly off-policy: set dataset to a traces dir")
        if self.teacher_server and (self.lmbda < 1 or self.temperature != 1.0):
            raise ValueError("teacher_server returns the teacher's raw (T = 1) log-probs of the student's samples: "
                             "it needs lmbda: 1 and temperature: 1.0 (a local teacher supports both)")
        require(self, "model", "prompt_set", example="configs/onpolicy.yaml")


def main(cfg: OnPolicyConfig) -> Path:
    run = open_training_run(cfg, "onpolicy", inputs(cfg))
    if run.complete:
        log.info(f"{cfg.output_dir}: trained by this config already, nothing to do")
        return Path(cfg.output_dir)
    trainer = build_trainer(cfg)
    return train_and_save(trainer, cfg, run, card=lambda: reports.onpolicy_card(cfg, trainer),
                          summary=lambda: {**train_summary(trainer),
                                           "plot": plot_steps(trainer, Path(cfg.output_dir) / "onpolicy.png")})


def inputs(cfg: OnPolicyConfig) -> dict[str, Any]:
    """Fingerprints of what the run reads (pipeline/rundir.py)."""
    return {"model": fingerprint(cfg.model), "teacher": fingerprint(cfg.teacher),
            "prompt_set": prompt_set_fingerprint(cfg.prompt_set), "dataset": fingerprint(cfg.dataset)}


def build_trainer(cfg: OnPolicyConfig) -> Any:
    """The student, its tokenizer and the prompts; the trainer that fits the teacher."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model, padding_side="left")  # generate pads prompts on the left
    if cfg.chat_template == "chatml" or tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    prompts = prompt_dataset(cfg)
    common = dict(model=cfg.model, train_dataset=prompts, processing_class=tokenizer, peft_config=lora_config(cfg))
    if cfg.teacher_server:
        teacher_server.check_tokenizer(cfg.teacher_server, tokenizer, cfg.model)
        args = trainer_config(ServerDistillationConfig, cfg, teacher_model_server_url=cfg.teacher_server,
                              loss_top_k=cfg.teacher_server_top_k)
        trainer = ServerOnPolicyTrainer(args=args, **common)
    elif not same_tokenizer(cfg.teacher, tokenizer):
        trainer = gold_trainer(cfg, tokenizer, prompts, common)
    else:
        data = load_traces(cfg.dataset) if cfg.lmbda < 1 else prompts  # off-policy batches: the traces' completions
        trainer = OnPolicyTrainer(teacher_model=cfg.teacher, args=cfg, **{**common, "train_dataset": data})
    add_validation(trainer, cfg)
    state = trainer.accelerator.state
    log.info(f"{type(trainer).__name__}: process {state.process_index} of {state.num_processes} "
          f"({state.distributed_type.value}), {len(prompts)} prompts")
    return trainer


def prompt_dataset(cfg: OnPolicyConfig) -> Any:
    """Conversational prompts, as the generate stage sends them to the teacher."""
    from datasets import Dataset

    prompts = load_prompts(cfg).prompts
    return Dataset.from_list([{"prompt": chat_prompt(p), "prompt_id": p.id} for p in prompts])


def same_tokenizer(teacher: str, tokenizer: Any) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher).get_vocab() == tokenizer.get_vocab()


def trainer_config(cls: type, cfg: OnPolicyConfig, **extra: Any) -> Any:
    """`cls` (a TRL config) with every field it shares with this stage's config, plus `extra`."""
    shared = {f.name for f in dataclasses.fields(cfg) if f.init}
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.init and f.name in shared},
               **extra)


# ---------------------------------------------------------------------------- where the time goes

class StepTimes:
    """Adds to a DistillationTrainer: seconds spent sampling (the student's generate), scoring (the
    teacher's forward, or its server round trip) and in whole training steps, the tokens sampled,
    and the prompts seen. Saved in each checkpoint, so a resumed run counts from where it stopped."""

    COUNTERS = "onpolicy_counters.json"

    def _counters(self) -> dict[str, Any]:
        if not hasattr(self, "_counts"):
            self._counts = {"sampling_s": 0.0, "scoring_s": 0.0, "step_s": 0.0, "sampled_tokens": 0,
                            "completions": 0, "prompts": set()}
        return self._counts

    def _generate(self, prompts: list) -> Any:
        start = time.perf_counter()
        out = super()._generate(prompts)
        counts = self._counters()
        if getattr(self, "_kind", "sampled") == "traces":  # a batch of the traces (lmbda < 1): nothing sampled
            counts["trace_completions"] = counts.get("trace_completions", 0) + len(prompts)
            counts["trace_tokens"] = counts.get("trace_tokens", 0) + sum(len(ids) for ids in out[1])
            return out
        counts["sampling_s"] += time.perf_counter() - start
        counts["sampled_tokens"] += sum(len(ids) for ids in out[1])
        counts["completions"] += len(prompts)
        counts["prompts"].update(json.dumps(p, sort_keys=True) for p in prompts)
        return out

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = super().training_step(*args, **kwargs)
        self._counters()["step_s"] += time.perf_counter() - start
        return out

    def _scored(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self._counters()["scoring_s"] += time.perf_counter() - start
        return out

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        checkpoint = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and checkpoint.is_dir():
            counts = self._counters()
            (checkpoint / self.COUNTERS).write_text(json.dumps({**counts, "prompts": sorted(counts["prompts"])}))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = Path(resume_from_checkpoint) / self.COUNTERS
        if saved.is_file():
            counts = json.loads(saved.read_text())
            self._counts = {**counts, "prompts": set(counts["prompts"])}


class OnPolicyTrainer(StepTimes, DistillationTrainer):
    """TRL's DistillationTrainer, plus GKD's mix: per step, with probability 1 - lmbda (seeded by
    the step, so a resumed run draws the same), the batch is the traces' completions instead of
    the student's samples. Truncated samples enter the loss as they are: every sampled token,
    scored by the teacher like any other (TRL masks none)."""

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "completion"]  # kept for off-policy batches

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        draw = random.Random(f"{self.args.seed}:{self.state.global_step}").random()
        self._kind = "sampled" if draw < self.args.lmbda else "traces"
        self._traces = [x.get("completion") for x in inputs]
        return super()._generate_and_score_completions(inputs)

    def _generate_single_turn(self, prompt_ids: list, *args: Any, **kwargs: Any) -> list[list[int]]:
        if self._kind == "traces":
            eos = self.processing_class.eos_token_id
            return [self.processing_class(trace[-1]["content"], add_special_tokens=False)["input_ids"][
                :self.args.max_completion_length - 1] + [eos] for trace in self._traces]
        completions = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        ends = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        clipped = torch.tensor([float(ids[-1] not in ends) if ids else 0.0 for ids in completions],
                               device=self.accelerator.device)
        self._metrics["train"]["sampled/clipped_share"].append(self.accelerator.gather(clipped).mean().item())
        return completions

    def _get_last_hidden_state(self, unwrapped_model: Any, *args: Any, **kwargs: Any) -> Any:
        parent = super()._get_last_hidden_state
        if unwrapped_model is self.accelerator.unwrap_model(self.teacher_model):
            self._teacher_hidden = self._scored(parent, unwrapped_model, *args, **kwargs)
            return self._teacher_hidden
        return parent(unwrapped_model, *args, **kwargs)

    def _compute_loss(self, unwrapped_student: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
        out = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        with torch.no_grad():
            head = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings()
            self._teacher_logprob = teacher_logprob(self._teacher_hidden, head, inputs["completion_ids"],
                                                    inputs["completion_mask"])
        self._teacher_hidden = None
        return out

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        out = super().compute_loss(model, inputs, *args, **kwargs)
        # Gathered here, as TRL gathers its entropy: outside the DDP/FSDP-wrapped forward.
        mode = "train" if self.model.training else "eval"
        kind = self._kind if mode == "train" else "sampled"
        logprob, tokens = (self.accelerator.gather_for_metrics(t).sum() for t in self._teacher_logprob)
        self._metrics[mode][f"{kind}/teacher_logprob"].append((logprob / tokens.clamp(min=1)).item())
        self._metrics[mode][f"{kind}/entropy"].append(self._metrics[mode]["entropy"][-1])
        return out


def teacher_logprob(hidden: Any, head: Any, ids: Any, mask: Any, chunk: int = 1024) -> tuple[Any, Any]:
    """The sum over masked positions of the teacher's raw (T = 1) log-probability of each token,
    and their count; the logits a chunk of positions at a time (never the whole (B, C, V))."""
    hidden, ids, mask = hidden.flatten(0, 1), ids.flatten(), mask.flatten().bool()
    hidden, ids = hidden[mask], ids[mask]
    total = hidden.new_zeros(())
    for start in range(0, len(ids), chunk):
        logits = head(hidden[start:start + chunk]).float()
        total += (logits.gather(1, ids[start:start + chunk, None]).squeeze(1) - logits.logsumexp(1)).sum()
    return total, mask.new_tensor(len(ids), dtype=torch.long)


class ServerOnPolicyTrainer(StepTimes, ServerDistillationTrainer):
    def _get_teacher_token_logprobs_from_server(self, *args: Any, **kwargs: Any) -> Any:
        return self._scored(super()._get_teacher_token_logprobs_from_server, *args, **kwargs)


# ---------------------------------------------------------------------------- across tokenizers

def gold_trainer(cfg: OnPolicyConfig, tokenizer: Any, prompts: Any, common: dict[str, Any]) -> Any:
    """TRL's GOLD trainer with its ULD loss: each side's completion is re-tokenized by the other's
    tokenizer, tokens are grouped where their byte boundaries agree, and the loss is the L1
    distance between the two sides' sorted probability vectors per group (ULD: blind to which
    token holds which probability, so no vocabulary mapping is needed). Per batch, with
    probability `lmbda` the student samples the completions (HF generate); otherwise they are the
    `dataset`' (the teacher's own, scored live by it). The teacher sees the student's chat template."""
    from transformers import AutoConfig, AutoTokenizer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    data = load_traces(cfg.dataset) if cfg.lmbda < 1 else prompts.map(
        lambda _: {"completion": [{"role": "assistant", "content": ""}]})  # replaced by the student's samples
    args = trainer_config(GOLDConfig, cfg, use_uld_loss=True, **cfg.gold)  # lmbda, temperature, ... shared
    data, dropped = alignable_rows(data, tokenizer, AutoTokenizer.from_pretrained(cfg.teacher))
    trainer_cls = type("CrossTokenizerTrainer", (SkipsUnalignable, GOLDTrainer), {})
    trainer = trainer_cls(teacher_model=cfg.teacher, args=args, **{**common, "train_dataset": data})
    trainer._skipped = {"dataset_rows": dropped, "batch_samples": 0}
    # Ids past the tokenizer (a vocabulary padded for speed, as Qwen's) decode to nothing, and
    # GOLD's byte alignment fails on them: the student never samples them.
    padded = AutoConfig.from_pretrained(cfg.model).get_text_config().vocab_size
    if padded > len(tokenizer):
        trainer.generation_config.suppress_tokens = list(range(len(tokenizer), padded))
    return trainer


# ---------------------------------------------------------------------------- what was trained

def train_summary(trainer: Any) -> dict[str, Any]:
    """What the student trained on (its own samples), and where the steps' time went."""
    counts = dict(trainer._counters()) if isinstance(trainer, StepTimes) else {}
    counted = ("sampled_tokens", "completions", "trace_tokens", "trace_completions")
    if counts and trainer.accelerator.num_processes > 1:  # every process sampled its share (timings: this one's)
        totals = trainer.accelerator.reduce(torch.tensor([counts.get(k, 0) for k in counted],
                                                         device=trainer.accelerator.device), "sum").tolist()
        counts.update(zip(counted, (int(x) for x in totals)))
        counts["prompts"] = set()  # distinct prompts are counted per process only
    summary = training.train_summary(trainer, samples=counts.get("completions"),
                                     prompts=len(counts.get("prompts", ())) or None,
                                     completion_tokens=counts.get("sampled_tokens"),
                                     tokens_seen=counts.get("sampled_tokens", 0) + counts.get("trace_tokens", 0)
                                     if counts else None)
    if counts.get("trace_completions"):  # lmbda < 1: the batches of traces
        summary["trace_completions"], summary["trace_tokens"] = counts["trace_completions"], counts["trace_tokens"]
    if hasattr(trainer, "_skipped"):
        summary["skipped_unalignable"] = skipped_unalignable(trainer)
    if counts.get("step_s"):
        step = counts["step_s"]
        summary["seconds"] = {k: round(counts[f"{k}_s"], 2) for k in ("sampling", "scoring", "step")}
        summary["share_of_step"] = {"sampling": round(counts["sampling_s"] / step, 3),
                                    "scoring": round(counts["scoring_s"] / step, 3),
                                    "training": round(1 - (counts["sampling_s"] + counts["scoring_s"]) / step, 3)}
        summary["sampled_tokens_per_s"] = round(counts["sampled_tokens"] / max(counts["sampling_s"], 1e-9), 1)
    return summary


STEP_PANELS = {"loss": ["loss"], "student entropy (nats/token)": ["sampled/entropy", "traces/entropy"],
               "teacher log-prob (nats/token)": ["sampled/teacher_logprob", "traces/teacher_logprob"],
               "share of samples clipped": ["sampled/clipped_share"]}


def plot_steps(trainer: Any, path: Path) -> str | None:
    """The logged per-step values, one panel each (sampled and trace batches as two lines): what an
    on-policy run did to the student. Returns the file's name (None on processes other than the first)."""
    if not trainer.is_world_process_zero():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = trainer.state.log_history
    fig, axes = plt.subplots(1, len(STEP_PANELS), figsize=(4 * len(STEP_PANELS), 3.2))
    for ax, (title, keys) in zip(axes, STEP_PANELS.items()):
        for key in keys:
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points), marker=".", label=key.split("/")[0] if "/" in key else key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"onpolicy: {path.parent}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name

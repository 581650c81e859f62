"""A teacher's rows for the token-level loss when no teacher model runs beside the student:
the top-k log-probs and the rest that the generate stage stored with the traces (offline KD),
or that a teacher server returns for each batch (pipeline/inference/teacher_server.py).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import UserError
from pipeline.distill.logits import LOG_ZERO
from pipeline.inference import teacher_server
from pipeline.traces import vocab_fingerprint

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


def check_offline_teacher(dataset: Any, tokenizer: Any, cfg: Any) -> None:
    """Stored top-k rows are usable only as raw log-probs (T = 1, no top-p) over the student's
    own vocabulary: ids from another tokenizer name other tokens, and training would go on."""
    teacher = ", ".join(dataset.unique("teacher")) if "teacher" in dataset.column_names else "the teacher"
    modes = set(dataset.unique("logprobs_mode")) - {"raw_logprobs"}
    if modes:
        raise UserError(f"dataset {cfg.dataset}: offline KD needs raw_logprobs, but the traces store "
                        f"{', '.join(modes)} "
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

"""Cross-tokenizer distillation (TRL's GOLD trainer) without one sample stopping the run: TRL aligns
the two tokenizers by byte offsets and raises on a text whose offsets it cannot normalize. Such rows
leave the dataset before training (`alignable_rows`), such samples leave their batch during it
(`SkipsUnalignable`); both are counted in train_summary.json (`skipped_unalignable`).
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import UserError

log = logging.getLogger(__name__)


def aligns(tokenizer: Any, text: str) -> bool:
    """Whether TRL's cross-tokenizer byte alignment takes `text` under `tokenizer`: it raises
    ("overlapping byte offsets that could not be normalized") where normalisation changes a text's
    length under a byte-level BPE, e.g. U+FFFD sampled beside a combining mark that NFC rewrites."""
    from trl.experimental.utils import encode_with_byte_offsets

    try:
        encode_with_byte_offsets(tokenizer.backend_tokenizer, [text], add_special_tokens=False)
    except ValueError:
        return False
    return True


def alignable_rows(data: Any, student: Any, teacher: Any) -> tuple[Any, int]:
    """`data` without the rows TRL's GOLD trainer cannot align (it tokenizes them all when it starts,
    and one such row would stop the run): the student's rendering of prompt + completion and the
    teacher's of the completion must both align. Returns the kept rows and how many were dropped."""
    def ok(row: dict[str, Any]) -> bool:
        messages = list(row["prompt"]) + list(row["completion"])
        text = student.apply_chat_template(messages, tokenize=False)
        return aligns(student, text) and aligns(teacher, "".join(m["content"] for m in row["completion"]))

    keep = [i for i, row in enumerate(data.select_columns(["prompt", "completion"])) if ok(row)]
    dropped = len(data) - len(keep)
    if dropped:
        log.warning(f"cross-tokenizer distillation: skipped {dropped} of {len(data)} sample(s) whose text the two "
                    "tokenizers' byte offsets cannot align (TRL's GOLD trainer would stop on them); counted in "
                    "train_summary.json (skipped_unalignable)")
        data = data.select(keep)
    if not len(data):
        raise UserError("cross-tokenizer distillation: no sample left whose text both tokenizers can align: "
                        "check the traces' completions (U+FFFD?) or rerun the curate stage")
    return data, dropped


class SkipsUnalignable:
    """Adds to TRL's GOLD trainer: a sample of a batch whose completion the teacher's tokenizer cannot
    align (a student's sample with U+FFFD, ...) leaves the batch, counted, instead of stopping the run."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        texts = inputs.get("original_completion_text")
        if self.use_uld_loss and self.teacher_tokenizer is not None and texts is not None \
                and self.uld_loss_fn.use_extended_uld:
            keep = [i for i, text in enumerate(texts) if aligns(self.teacher_tokenizer, text)]
            if len(keep) < len(texts):
                self._skipped["batch_samples"] += len(texts) - len(keep)
                log.warning(f"cross-tokenizer distillation: skipped {len(texts) - len(keep)} sample(s) of a batch "
                            f"of {len(texts)} that the teacher's tokenizer cannot align (step "
                            f"{self.state.global_step}); counted in train_summary.json (skipped_unalignable)")
                if not keep:  # nothing to learn from: a zero loss that still reaches every parameter
                    out = model(input_ids=inputs["input_ids"][:1], attention_mask=inputs["attention_mask"][:1])
                    loss = out.logits.sum() * 0.0
                    return (loss, out) if return_outputs else loss
                inputs = rows_of(inputs, keep, len(texts))
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def rows_of(inputs: dict[str, Any], keep: list[int], size: int) -> dict[str, Any]:
    """The batch `inputs` (tensors and lists of `size` rows) restricted to the rows `keep`."""
    import torch

    index = torch.tensor(keep)
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == size:
            out[key] = [value[i] for i in keep]
        else:
            out[key] = value
    return out


def skipped_unalignable(trainer: Any) -> dict[str, int]:
    """What the trainer skipped, summed over processes (each skipped from its own batches)."""
    skipped = trainer._skipped
    if trainer.accelerator.num_processes > 1:
        import torch

        batch = trainer.accelerator.reduce(torch.tensor([skipped["batch_samples"]], device=trainer.accelerator.device),
                                           "sum")
        skipped = {**skipped, "batch_samples": int(batch.item())}
    return skipped

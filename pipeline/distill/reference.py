"""Reference versions of the KD loss that only tests and bench/ use: the same loss with the full
fp32 logits materialised (what a careful user writes with TRL), and the CE + KD combination.

The pipeline itself trains with ``pipeline.distill.logits.chunked_kd_loss``; these are what it is
checked and measured against (tests/test_logits.py, tests/test_distill.py, bench/bench_kd_memory.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distill.logits import (
    Kind,
    _normalise,
    _prepare,
    divergence,
    ensemble_logprobs,
    soften,
    student_topk_buckets,
    teacher_topk_buckets,
)


def combine(ce_loss: Tensor, kd_loss: Tensor, alpha: float) -> Tensor:
    """(1 - alpha) * CE + alpha * KD, the training objective of design.md section 6."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    return (1.0 - alpha) * ce_loss + alpha * kd_loss


def naive_kd_loss(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor,
    labels: Tensor,
    *,
    teacher_hidden: Tensor | list[Tensor] | None = None,
    teacher_lm_head_weight: Tensor | list[Tensor] | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_rest_logprob: Tensor | None = None,
    temperature: float = 1.0,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    chunk_size: int = 1024,
    num_items_in_batch: int | Tensor | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    alpha: float | None = None,
) -> dict[str, Tensor]:
    """``chunked_kd_loss`` with full fp32 logits for every position, masked afterwards.

    The reference implementation (TRL style): what a careful user writes with the model's
    logits, freeing what it can. ``chunk_size`` and ``alpha`` are accepted and ignored.
    """
    b = _prepare(student_hidden, student_lm_head_weight, labels, teacher_hidden,
                 teacher_lm_head_weight, teacher_topk_ids, teacher_topk_logprobs, temperature,
                 kind, beta, chunk_size, vocab_size, ignore_index)
    t = float(temperature)
    w = student_lm_head_weight[: b.vocab].to(b.dtype)
    if b.t_h is not None:
        with torch.no_grad():
            splits = list(b.splits or [b.t_h.shape[-1]])
            t_lp = ensemble_logprobs([soften(F.linear(h.to(b.dtype), w[: b.vocab].to(b.dtype)), t) for h, w in
                                      zip(b.t_h.split(splits, dim=-1), b.t_w.split(splits, dim=-1))])
        z = F.linear(b.h.to(b.dtype), w)
        s_lp = soften(z, t)
        ce_lp = s_lp if t == 1.0 else F.log_softmax(z, dim=-1)
        del z
        kd_sum = divergence(s_lp, t_lp, kind, beta)[b.keep].sum()
    else:
        ce_lp = F.log_softmax(F.linear(b.h.to(b.dtype), w), dim=-1)
        s_b = soften(student_topk_buckets(ce_lp[b.keep], teacher_topk_ids), t)
        t_b = soften(teacher_topk_buckets(teacher_topk_logprobs.to(b.dtype), b.vocab, teacher_rest_logprob), t)
        kd_sum = divergence(s_b, t_b, kind, beta).sum()
    safe_labels = b.labels.masked_fill(~b.keep, 0)
    ce_sum = -(ce_lp.gather(-1, safe_labels[:, None]).squeeze(1) * b.keep).sum()
    return _normalise(kd_sum, ce_sum, int(b.keep.sum()), num_items_in_batch, t)

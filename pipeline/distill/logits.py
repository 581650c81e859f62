"""Token-level distillation losses, computed from hidden states chunk by chunk.

Pure functions over tensors. With softened distributions
p_T = softmax(z_T / T) and p_S = softmax(z_S / T) per position:

- ``forward_kl`` = KL(p_T || p_S) (Hinton; mean-seeking)
- ``reverse_kl`` = KL(p_S || p_T) (MiniLLM; mode-seeking)
- ``jsd``        = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), m = beta p_T + (1 - beta) p_S,
  TRL's ``generalized_jsd_loss`` convention, endpoints included (see ``divergence``).

``chunked_kd_loss`` takes the final hidden states and lm_head weights rather than logits:
a loss that receives full logits can never use less memory than those logits (4,096 tokens x
151,936 vocab is 2.5 GB per fp32 tensor). It computes the logits of ``chunk_size`` target
tokens at a time in fp32 and takes their gradient in closed form chunk by chunk (in the
backward, recomputing them, or in the forward, see below), so peak memory is a few [chunk, V]
fp32 tensors plus the fp32 lm_head gradient, whatever the number of tokens. Measured on CPU
(bench/bench_kd_memory.py, 4,096 tokens, V = 151,936, H = 896, forward KL + CE, gradient
computed in the forward): naive 9.5 GB; chunked 3.0 GB at chunk_size 1024, 1.2 GB at 256 (of which
0.5 GB is the weight gradient).
``pipeline.distill.reference.naive_kd_loss`` is the same loss with the full logits materialised: the
reference for tests and for ``bench/bench_kd_memory.py``.

Speed: given the KD weight (``alpha``), the gradient is computed during the forward, chunk by
chunk, and the backward only scales it (Liger's fused linear cross-entropy does the same), so
each chunk costs 3 matmuls, as plain SFT's head does. Forward KL against an online teacher and
every offline teacher have closed-form chunks that touch each [chunk, V] buffer a few times
(``_forward_kl_chunk``, ``_offline_chunk``). On CUDA with half-precision weights the matmuls run
in that dtype with fp32 accumulation, softmax in fp32.

Offline teachers (top-k log-probabilities stored with the traces) use a "rest" bucket; see
``teacher_topk_buckets`` for the tail convention. An ensemble teacher (several online teachers)
is the mean of its members' softened probabilities, p = (1/n) sum_i softmax(z_i / T): averaged
distributions, not logits (``ensemble_logprobs``), computed chunk by chunk as one teacher is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")

# Log-mass of an empty bucket. Finite on purpose: -inf turns into NaN gradients through
# subtractions and logsumexp backward; exp(-1e4 / T) is still exactly 0 in fp32 for T < ~96.
LOG_ZERO = -1e4
# Top-k log-probs stored in fp32 carry ~1e-7 rounding each, so a computed tail below fp32
# resolution is noise, not information; flooring it also keeps reverse KL finite.
TAIL_FLOOR = float(torch.finfo(torch.float32).eps)
HALF = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- divergences


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per position, summed over the last axis; inputs are finite log-probs."""
    # einsum contracts without materialising the [..., V] product (and beats mul + sum on CPU).
    return torch.einsum("...v,...v->...", log_p.exp(), log_p - log_q)


def divergence(
    student_logprobs: Tensor, teacher_logprobs: Tensor, kind: Kind = "forward_kl", beta: float = 0.5
) -> Tensor:
    """Divergence between two (already temperature-softened) distributions, per position.

    Inputs are log-probabilities over the last axis (the vocabulary, or top-k buckets); the
    result has the leading shape, summed over that axis. ``kind``:

    - ``"forward_kl"``: KL(p_T || p_S) = sum p_T (log p_T - log p_S)
      = ``F.kl_div(log p_S, log p_T, log_target=True)``.
    - ``"reverse_kl"``: KL(p_S || p_T).
    - ``"jsd"``: generalized JSD with mixture m = beta p_T + (1 - beta) p_S,
      beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), log m by logaddexp (stable).
      Convention exactly as TRL's ``GKDTrainer.generalized_jsd_loss`` (trl 1.16): beta == 0
      is special-cased to forward KL and beta == 1 to reverse KL. Note that this makes the
      endpoints discontinuous: for 0 < beta < 1 the mixture formula tends to 0 at both ends
      (JSD(beta) ~ beta * KL(p_T || p_S) as beta -> 0, ~ (1 - beta) * KL(p_S || p_T) as
      beta -> 1), so small beta is a scaled-down forward KL, not forward KL itself.
      At beta = 0.5 it is the symmetric Jensen-Shannon divergence, bounded by log 2.

    Inputs must be finite (use a large negative value such as ``LOG_ZERO`` for empty
    entries): 0 * inf terms would make NaN values and gradients.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _kl(teacher_logprobs, student_logprobs)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _kl(student_logprobs, teacher_logprobs)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1] for kind='jsd'")
    log_m = torch.logaddexp(teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta))
    return beta * _kl(teacher_logprobs, log_m) + (1.0 - beta) * _kl(student_logprobs, log_m)


# ------------------------------------------------------------------- offline top-k teacher


def teacher_topk_buckets(topk_logprobs: Tensor, vocab_size: int, rest_logprob: Tensor | None = None) -> Tensor:
    """The teacher's top-k log-probs (at T = 1) plus one "rest" bucket: [..., k] -> [..., k + 1].

    rest = log of the mass outside the top-k: ``rest_logprob`` [...] when the teacher's sampler
    stored it (the generate stage computes it from vLLM's fp32 values; from stored float16
    top-k it would be rounding noise), else 1 - sum(exp(top-k)) in float64. Either is floored
    at ``TAIL_FLOOR`` (a tail below fp32 resolution is rounding noise). When k covers the whole
    vocabulary the tail is empty by definition and gets ``LOG_ZERO``, so k = V reproduces the
    full distribution.
    The result is at T = 1; ``soften`` applies the temperature.

    Temperature convention: with only k log-probs known, the softened tail
    sum_{j not in top-k} p_j^(1/T) / Z cannot be recovered (it depends on how the tail mass
    is spread). We coarsen first and soften second, identically for teacher and student:
    both distributions are reduced at T = 1 to the k ids + one rest bucket, and the
    temperature is applied to those k + 1 log-probs (the tail acts as one pseudo-token on
    both sides). At T = 1 this is exactly the divergence between the coarsened
    distributions, a lower bound on the full-vocabulary one (data-processing inequality);
    at k = V it equals the full-vocabulary loss at every T; for T > 1 and k < V it
    under-weights the tail compared with softening token by token.
    """
    lp = topk_logprobs
    if lp.shape[-1] >= vocab_size:
        rest = torch.full_like(lp[..., :1], LOG_ZERO)
    elif rest_logprob is not None:
        rest = rest_logprob.to(lp.dtype)[..., None].clamp_min(math.log(TAIL_FLOOR))
    else:
        top_mass = torch.logsumexp(lp.double(), dim=-1, keepdim=True)
        rest = (-torch.expm1(top_mass)).clamp_min(TAIL_FLOOR).log().to(lp.dtype)
    return torch.cat([lp, rest], dim=-1)


def student_topk_buckets(student_logprobs: Tensor, topk_ids: Tensor) -> Tensor:
    """The student's log-probs (at T = 1) at the teacher's top-k ids plus its rest bucket.

    The rest is a logsumexp over the other ids rather than 1 - sum(top-k): when the student
    is confident, 1 - sum cancels catastrophically in fp32. The top-k ids are filled with
    ``LOG_ZERO`` (not -inf) so the logsumexp gradient stays finite when k = V.
    """
    top = student_logprobs.gather(-1, topk_ids)
    others = student_logprobs.scatter(-1, topk_ids, LOG_ZERO)
    rest = torch.logsumexp(others, dim=-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def soften(logprobs: Tensor, temperature: float) -> Tensor:
    """log_softmax(logprobs / T): re-softens (and renormalises) a distribution given in log space."""
    return F.log_softmax(logprobs if temperature == 1.0 else logprobs / temperature, dim=-1)


# ---------------------------------------------------------------------- shared per-chunk core


def _divergence_grad_(student_logprobs: Tensor, teacher_logprobs: Tensor, kind: Kind, beta: float) -> Tensor:
    """d sum(divergence) / d student_logprobs, the log-probs taken as free coordinates.

    Closed forms, p = exp(log-probs): forward KL -p_T; reverse KL p_S (log p_S - log p_T + 1);
    JSD (1 - beta) p_S (log p_S - log m) (the +1 terms cancel against the mixture's).
    Overwrites ``teacher_logprobs`` (their memory is reused; callers are done with them).
    """
    s, t = student_logprobs, teacher_logprobs
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return t.exp_().neg_()
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return t.sub_(s).sub_(1.0).neg_().mul_(s.exp())
    log_m = torch.logaddexp(t.add_(math.log(beta)), s + math.log1p(-beta))
    return log_m.sub_(s).mul_(s.exp()).mul_(beta - 1.0)


def _divergence_sum_(student_logprobs: Tensor, teacher_logprobs: Tensor, kind: Kind, beta: float) -> Tensor:
    """``divergence(...).sum()`` computed in the inputs' memory (both are overwritten)."""

    def _dot(a: Tensor, b: Tensor) -> Tensor:
        # Row by row, then over rows: one fp32 dot over all chunk x V terms loses ~1e-4.
        return torch.einsum("...v,...v->...", a, b).sum()

    s, t = student_logprobs, teacher_logprobs
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _dot(t.exp(), t.sub_(s))
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _dot(s.exp(), s.sub_(t))
    log_b, log_1mb = math.log(beta), math.log1p(-beta)
    s_mix, t_mix = s.add_(log_1mb), t.add_(log_b)  # log((1 - beta) p_S), log(beta p_T)
    log_m = torch.logaddexp(t_mix, s_mix)
    # beta KL(p_T || m) = sum beta p_T (log p_T - log m) = sum exp(t_mix) (t_mix - log_b - log_m)
    p = t_mix.exp()
    kd = _dot(p, t_mix.sub_(log_m).sub_(log_b))
    torch.exp(s_mix, out=p)
    return kd + _dot(p, s_mix.sub_(log_m).sub_(log_1mb))


def _log_softmax_backward_(grad: Tensor, logprobs: Tensor) -> Tensor:
    """Chain ``grad`` (w.r.t. log_softmax's output) to its input, in place in ``grad``."""
    return grad.sub_(logprobs.exp().mul_(grad.sum(-1, keepdim=True)))


def _logsumexp(z: Tensor) -> Tensor:
    """logsumexp over the last axis with one [n, V] temporary (torch.logsumexp makes two)."""
    m = z.amax(dim=-1, keepdim=True)
    return (z - m).exp_().sum(dim=-1, keepdim=True).log_().add_(m)


def _matmul_dtype(x: Tensor, full: torch.dtype) -> torch.dtype:
    """The dtype the matmuls run in: a half type on CUDA (bf16 tensor cores; products accumulate
    and land in fp32, as in TRL's and Liger's kernels), else the full-precision dtype (CPU runs
    fp32: its half-precision matmuls are slow and gain nothing)."""
    return x.dtype if x.dtype in HALF and x.is_cuda else full


def _logits(h: Tensor, w: Tensor) -> Tensor:
    """h w^T in fp32 (or fp64 for fp64 inputs), without rounding the products to a half type."""
    return torch.mm(h, w.t(), out_dtype=torch.float32) if h.dtype in HALF else F.linear(h, w)


def _addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b into a full-precision acc, half products never rounded to a half type."""
    if a.dtype in HALF:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a, b)


def _student_logprobs(h: Tensor, w: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """log_softmax(z / T) of z = h w^T, built in z's own memory; plus CE at T = 1 summed, and
    the log-ratio that turns exp(log-probs at T) back into softmax(z) for CE's gradient."""
    z = _logits(h, w)
    z_label = z.gather(-1, labels[:, None])
    lse1 = _logsumexp(z)
    if temperature != 1.0:
        z.div_(temperature)
    lse_t = lse1 if temperature == 1.0 else _logsumexp(z)
    ce = (lse1 - z_label).sum()
    # softmax(z) = exp(T * lp + (T * lse_t - lse1)): keep that shift, z itself is gone.
    return z.sub_(lse_t), ce, temperature * lse_t - lse1


def _teacher_logprobs(h: Tensor, w: Tensor, temperature: float, splits: tuple[int, ...] = ()) -> Tensor:
    """log softmax(z_T / T); an ensemble (h and w concatenate its members' widths, ``splits``):
    the log of the mean of its members' softened probabilities."""
    if len(splits) > 1:
        members = [_teacher_logprobs(h_i, w_i, temperature) for h_i, w_i in
                   zip(h.split(list(splits), dim=-1), w.split(list(splits), dim=-1))]
        return ensemble_logprobs(members)
    z = _logits(h, w)
    if temperature != 1.0:
        z.div_(temperature)
    return z.sub_(_logsumexp(z))


def ensemble_logprobs(teacher_logprobs: list[Tensor]) -> Tensor:
    """An ensemble's distribution: the mean of its members' probabilities (not of their logits),
    in log space: log (1/n) sum_i p_i."""
    return torch.logsumexp(torch.stack(teacher_logprobs), dim=0) - math.log(len(teacher_logprobs))


@dataclass(frozen=True)
class _Opts:
    temperature: float
    kind: Kind
    beta: float
    vocab: int
    chunk_size: int
    dtype: torch.dtype
    # (w_kd, w_ce): the loss is known to be c * (w_kd * kd_sum + w_ce * ce_sum), so the forward
    # computes its gradient (up to c) and the backward only scales it; None: recompute in backward.
    weights: tuple[float, float] | None = None
    # An ensemble teacher: its members' hidden widths (t_h and t_w hold them side by side).
    splits: tuple[int, ...] = ()


def _forward_kl_chunk(h: Tensor, w: Tensor, labels: Tensor, t_h: Tensor, t_w: Tensor, opts: _Opts, g_kd: float,
                      g_ce: float) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk against an online teacher with forward KL (the default): (d(g_kd * kd_sum + g_ce *
    ce_sum) / d logits, kd_sum, ce_sum), in a few passes over four [chunk, V] buffers.

    With p_T = softmax(z_T / T), p_S = softmax(z_S / T), p_1 = softmax(z_S): kd_sum = sum p_T (log
    p_T - log p_S), summed from the log-ratio itself (exact near zero); its gradient is
    (p_S - p_T) / T, CE's is p_1 - onehot(label).
    """
    t = opts.temperature
    zs, zt = _logits(h, w), _logits(t_h, t_w)
    z_label = zs.gather(-1, labels[:, None])
    m_s, m_t = zs.amax(dim=-1, keepdim=True), zt.amax(dim=-1, keepdim=True)
    es = torch.sub(zs, m_s).div_(t).exp_()  # p_S * s_s
    et = torch.sub(zt, m_t).div_(t).exp_()  # p_T * s_t
    s_s, s_t = es.sum(dim=-1, keepdim=True), et.sum(dim=-1, keepdim=True)
    lse_s, lse_t = m_s / t + s_s.log(), m_t / t + s_t.log()
    log_ratio = zt.sub_(zs).div_(t).sub_(lse_t - lse_s)  # log p_T - log p_S, in z_T's memory
    kd = (torch.einsum("nv,nv->n", et, log_ratio) / s_t.squeeze(1)).sum()
    del log_ratio
    if t == 1.0:  # p_1 is p_S
        e1, s_1 = es, s_s
        g = es.mul_((g_kd + g_ce) / s_s)
    else:
        e1 = zs.sub_(m_s).exp_()
        s_1 = e1.sum(dim=-1, keepdim=True)
        g = e1.mul_(g_ce / s_1).add_(es.mul_(g_kd / t / s_s))
    ce = (m_s + s_1.log() - z_label).sum()
    g.sub_(et.mul_(g_kd / t / s_t))
    return g.scatter_add_(-1, labels[:, None], g.new_full((g.shape[0], 1), -g_ce)), kd, ce


def _offline_chunk(h: Tensor, w: Tensor, labels: Tensor, opts: _Opts, topk_ids: Tensor, topk_lp: Tensor,
                   rest_lp: Tensor | None, g_kd: float | None = None,
                   g_ce: float = 0.0) -> tuple[Tensor | None, Tensor, Tensor]:
    """One chunk against an offline teacher: (d(g_kd * kd_sum + g_ce * ce_sum) / d logits, or None
    without g_kd; kd_sum; ce_sum), in a few passes over one [chunk, V] buffer.

    The student is coarsened at T = 1 to the teacher's k ids + the rest (``student_topk_buckets``)
    from e = exp(z - max): the top-k and label logits are gathered first, the top-k entries of e
    are zeroed, and the rest is the sum of what is left (exact: no 1 - sum(top-k) cancellation).
    Gradient, with p = softmax(z), G = the bucket gradients' sum, P_rest the rest's mass: outside
    the top-k g_kd * p_j * (g_rest / P_rest - G) + g_ce * p_j; at top-k bucket i g_kd * (g_i - G p_j)
    + g_ce * p_j; minus g_ce at the label.
    """
    z = _logits(h, w)
    z_top, z_label = z.gather(-1, topk_ids), z.gather(-1, labels[:, None])
    m = z.amax(dim=-1, keepdim=True)
    e = z.sub_(m).exp_()
    total = e.sum(dim=-1, keepdim=True)
    rest_mass = e.scatter_(-1, topk_ids, 0.0).sum(dim=-1, keepdim=True)
    lse = total.log().add_(m)
    has_rest = rest_mass > 0  # k = V leaves no rest: LOG_ZERO, as on the teacher's side
    rest = torch.where(has_rest, rest_mass.log(), LOG_ZERO) - total.log()
    s_b = soften(torch.cat([z_top - lse, rest], dim=-1), opts.temperature)
    t_b = soften(teacher_topk_buckets(topk_lp.to(z.dtype), opts.vocab, rest_lp), opts.temperature)
    kd, ce = divergence(s_b, t_b, opts.kind, opts.beta).sum(), (lse - z_label).sum()
    if g_kd is None:
        return None, kd, ce
    g_b = _log_softmax_backward_(_divergence_grad_(s_b, t_b, opts.kind, opts.beta), s_b).div_(opts.temperature)
    big_g = g_b.sum(dim=-1, keepdim=True)
    inv_rest = torch.where(has_rest, rest_mass.reciprocal(), 0.0)
    g = e.mul_(g_kd * (g_b[:, -1:] * inv_rest - big_g / total) + g_ce / total)  # top-k entries are 0 here
    p_top = (z_top - lse).exp_()
    g.scatter_(-1, topk_ids, (g_ce - g_kd * big_g) * p_top).scatter_add_(-1, topk_ids, g_b[:, :-1] * g_kd)
    return g.scatter_add_(-1, labels[:, None], g.new_full((g.shape[0], 1), -g_ce)), kd, ce


def _chunk_values(h: Tensor, w: Tensor, labels: Tensor, opts: _Opts, t_h: Tensor | None,
                  t_w: Tensor | None, topk_ids: Tensor | None, topk_lp: Tensor | None,
                  rest_lp: Tensor | None) -> tuple[Tensor, Tensor]:
    """Summed divergence (without T^2) and summed CE over one chunk of kept tokens."""
    t = opts.temperature
    if t_h is not None:
        t_lp = _teacher_logprobs(t_h, t_w, t, opts.splits)
        s_lp, ce, _ = _student_logprobs(h, w, labels, t)
        return _divergence_sum_(s_lp, t_lp, opts.kind, opts.beta), ce
    _, kd, ce = _offline_chunk(h, w, labels, opts, topk_ids, topk_lp, rest_lp)
    return kd, ce


def _chunk_grad_logits(h: Tensor, w: Tensor, labels: Tensor, opts: _Opts, t_h: Tensor | None,
                       t_w: Tensor | None, topk_ids: Tensor | None, topk_lp: Tensor | None,
                       rest_lp: Tensor | None, g_kd: float, g_ce: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """(d(g_kd * kd_sum + g_ce * ce_sum) / d logits, kd_sum or None, ce_sum) for one chunk, the
    gradient in closed form; kd_sum only when the loss is fused (opts.weights: its forward is this).

    Autograd over [chunk, V] would keep ~9 such tensors alive; this keeps about 3, by
    reusing the log-probs' and teacher's memory in place.
    """
    if t_h is None:
        return _offline_chunk(h, w, labels, opts, topk_ids, topk_lp, rest_lp, g_kd, g_ce)
    if (opts.kind == "forward_kl" or (opts.kind == "jsd" and opts.beta == 0)) and len(opts.splits) < 2:
        return _forward_kl_chunk(h, w, labels, t_h, t_w, opts, g_kd, g_ce)
    t = opts.temperature
    t_lp = _teacher_logprobs(t_h, t_w, t, opts.splits)
    s_lp, ce, shift = _student_logprobs(h, w, labels, t)
    kd = divergence(s_lp, t_lp, opts.kind, opts.beta).sum() if opts.weights else None
    g = _divergence_grad_(s_lp, t_lp, opts.kind, opts.beta)
    del t_lp
    g = _log_softmax_backward_(g, s_lp).mul_(g_kd / t)
    p1 = s_lp.exp_() if t == 1.0 else s_lp.mul_(t).add_(shift).exp_()
    # CE at T = 1: softmax(z) - onehot(label).
    g.add_(p1, alpha=g_ce)
    return g.scatter_add_(-1, labels[:, None], g.new_full((g.shape[0], 1), -g_ce)), kd, ce


class _ChunkedKD(torch.autograd.Function):
    """(kd_sum, ce_sum) over kept tokens; logits exist one chunk at a time in both passes.

    The forward keeps only its inputs. The backward recomputes each chunk's logits, takes
    their gradient in closed form, and folds it into the hidden-state and weight gradients
    with two matmuls, accumulating the weight gradient in place in one fp32 buffer.
    Recomputing costs one extra matmul per chunk; in exchange nothing of size [tokens, V]
    ever exists (the idea of Liger's fused linear losses and torchtune's chunked output).

    Fused (opts.weights given, gradients wanted): the forward computes the gradient of
    w_kd * kd_sum + w_ce * ce_sum as it goes, as Liger's fused linear cross-entropy does, and
    the backward scales it, with no recomputation; if the incoming gradients are not in that
    ratio (the caller mixed the terms otherwise), the backward recomputes as above.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h: Tensor,
        w: Tensor,
        labels: Tensor,
        t_h: Tensor | None,
        t_w: Tensor | None,
        topk_ids: Tensor | None,
        topk_lp: Tensor | None,
        rest_lp: Tensor | None,
        opts: _Opts,
    ) -> Tensor:
        ctx.save_for_backward(h, w, labels, t_h, t_w, topk_ids, topk_lp, rest_lp)
        ctx.opts, ctx.fused = opts, None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if opts.weights and (need_h or need_w):
            ctx.fused = _chunked_pass(h, w, labels, t_h, t_w, topk_ids, topk_lp, rest_lp, opts, *opts.weights,
                                      need_h, need_w)
            return ctx.fused[2]
        sums = torch.zeros(2, dtype=opts.dtype, device=h.device)
        mm, t_mm = _matmul_dtype(h, opts.dtype), _matmul_dtype(h if t_h is None else t_h, opts.dtype)
        w_mm = w[: opts.vocab].to(mm)
        t_w_mm = None if t_w is None else t_w[: opts.vocab].to(t_mm)
        for s, e in _chunks(h.shape[0], opts.chunk_size):
            kd, ce = _chunk_values(h[s:e].to(mm), w_mm, labels[s:e], opts,
                                   None if t_h is None else t_h[s:e].to(t_mm), t_w_mm,
                                   None if topk_ids is None else topk_ids[s:e],
                                   None if topk_lp is None else topk_lp[s:e],
                                   None if rest_lp is None else rest_lp[s:e])
            sums[0] += kd
            sums[1] += ce
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums: Tensor):  # type: ignore[override]
        h, w, labels, t_h, t_w, topk_ids, topk_lp, rest_lp = ctx.saved_tensors
        opts: _Opts = ctx.opts
        g_kd, g_ce = grad_sums.tolist()
        if ctx.fused is not None and math.isclose(g_kd * opts.weights[1], g_ce * opts.weights[0], rel_tol=1e-6):
            grad_h, grad_w, _ = ctx.fused
            scale = (g_kd + g_ce) / sum(opts.weights)
        else:  # recompute, for the gradients that came in
            opts = dataclasses.replace(opts, weights=None)
            grad_h, grad_w, _ = _chunked_pass(h, w, labels, t_h, t_w, topk_ids, topk_lp, rest_lp, opts, g_kd, g_ce,
                                              ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            scale = 1.0
        ctx.fused = None
        if grad_h is not None and scale != 1.0:
            grad_h.mul_(scale)
        if grad_w is not None:
            grad_w = (grad_w.mul_(scale) if scale != 1.0 else grad_w).to(w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def _chunked_pass(h: Tensor, w: Tensor, labels: Tensor, t_h: Tensor | None, t_w: Tensor | None,
                  topk_ids: Tensor | None, topk_lp: Tensor | None, rest_lp: Tensor | None, opts: _Opts,
                  g_kd: float, g_ce: float, need_h: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Gradients of g_kd * kd_sum + g_ce * ce_sum w.r.t. h and w (fp32 buffer), chunk by chunk;
    plus (kd_sum, ce_sum) when fused (opts.weights set: this pass is the forward)."""
    sums = torch.zeros(2, dtype=opts.dtype, device=h.device)
    grad_h = torch.zeros_like(h) if need_h else None
    # One fp32 buffer for the weight: chunk contributions are added in place, and
    # padded rows beyond the shared vocabulary keep a zero gradient.
    grad_w = torch.zeros(w.shape, dtype=opts.dtype, device=w.device) if need_w else None
    mm, t_mm = _matmul_dtype(h, opts.dtype), _matmul_dtype(h if t_h is None else t_h, opts.dtype)
    w_mm = w[: opts.vocab].detach().to(mm)
    t_w_mm = None if t_w is None else t_w[: opts.vocab].to(t_mm)
    for s, e in _chunks(h.shape[0], opts.chunk_size):
        h_c = h[s:e].detach().to(mm)
        g_z, kd, ce = _chunk_grad_logits(h_c, w_mm, labels[s:e], opts,
                                         None if t_h is None else t_h[s:e].to(t_mm), t_w_mm,
                                         None if topk_ids is None else topk_ids[s:e],
                                         None if topk_lp is None else topk_lp[s:e],
                                         None if rest_lp is None else rest_lp[s:e], g_kd, g_ce)
        if kd is not None:
            sums[0] += kd
            sums[1] += ce
        g_z = g_z.to(mm)  # the logits' gradient enters the matmuls as their inputs do
        if need_h:
            grad_h[s:e] = g_z @ w_mm
        if need_w:
            _addmm_(grad_w[: opts.vocab], g_z.t(), h_c)
        del g_z
    return grad_h, grad_w, sums


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


# ------------------------------------------------------------------------------ public API


@dataclass
class _Batch:
    h: Tensor  # [N, H] every position
    labels: Tensor  # [N]
    keep: Tensor  # [N] bool
    t_h: Tensor | None  # [N, H_T]
    t_w: Tensor | None  # [vocab, H_T]
    splits: tuple[int, ...]  # an ensemble's member widths within H_T
    vocab: int
    dtype: torch.dtype


def _prepare(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor,
    labels: Tensor,
    teacher_hidden: Tensor | list[Tensor] | None,
    teacher_lm_head_weight: Tensor | list[Tensor] | None,
    teacher_topk_ids: Tensor | None,
    teacher_topk_logprobs: Tensor | None,
    temperature: float,
    kind: str,
    beta: float,
    chunk_size: int,
    vocab_size: int | None,
    ignore_index: int,
) -> _Batch:
    """Validates arguments (errors name the argument and the fix) and flattens positions."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    online = teacher_hidden is not None or teacher_lm_head_weight is not None
    offline = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if online == offline:
        raise ValueError("give exactly one teacher: teacher_hidden + teacher_lm_head_weight (online) "
                         "or teacher_topk_ids + teacher_topk_logprobs (offline)")
    if online and (teacher_hidden is None or teacher_lm_head_weight is None):
        raise ValueError("an online teacher needs both teacher_hidden and teacher_lm_head_weight")
    if offline and (teacher_topk_ids is None or teacher_topk_logprobs is None):
        raise ValueError("an offline teacher needs both teacher_topk_ids and teacher_topk_logprobs")
    if student_hidden.shape[:-1] != labels.shape:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} does not match labels "
                         f"{tuple(labels.shape)}: hidden states must be [*labels.shape, hidden]")
    members = isinstance(teacher_hidden, (list, tuple))
    if members and (not isinstance(teacher_lm_head_weight, (list, tuple))
                    or len(teacher_hidden) != len(teacher_lm_head_weight) or not teacher_hidden):
        raise ValueError("an ensemble teacher needs one teacher_hidden and one teacher_lm_head_weight per member")
    hiddens = list(teacher_hidden) if members else [teacher_hidden]
    heads = list(teacher_lm_head_weight) if members else [teacher_lm_head_weight]

    s_rows = student_lm_head_weight.shape[0]
    t_rows = None if not online else min(w.shape[0] for w in heads)
    if vocab_size is None and online and len({w.shape[0] for w in heads}) > 1:
        raise ValueError("the ensemble's members emit different numbers of logits: pass vocab_size "
                         "= the shared tokenizer's length to align them")
    if vocab_size is None:
        if t_rows is not None and t_rows != s_rows:
            raise ValueError(f"student emits {s_rows} logits but teacher {t_rows}: pass vocab_size "
                             "= the shared tokenizer's length to align them")
        vocab = s_rows
    else:
        vocab = vocab_size
        too_small = [f"{who} lm_head has {rows} rows" for who, rows in
                     (("student", s_rows), ("teacher", t_rows)) if rows is not None and rows < vocab]
        if too_small:
            raise ValueError(f"vocab_size={vocab} but the {' and the '.join(too_small)} "
                             f"(student {s_rows}, teacher {t_rows}): the tokenizers differ or "
                             "vocab_size is wrong")

    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index
    n_kept = int(keep.sum())
    if n_kept and int(flat_labels[keep].max()) >= vocab:
        raise ValueError(f"a label id is >= vocab_size {vocab}")
    if n_kept and int(flat_labels[keep].min()) < 0:
        raise ValueError(f"negative label ids other than ignore_index={ignore_index}")
    t_h, t_w, splits = None, None, ()
    if online:
        for hidden in hiddens:
            if hidden.shape[:-1] != labels.shape:
                raise ValueError(f"teacher_hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
        # An ensemble side by side: its members' widths, cut to the shared vocabulary first.
        t_h = torch.cat([h.detach().reshape(-1, h.shape[-1]) for h in hiddens], dim=-1)
        t_w = torch.cat([w.detach()[:vocab] for w in heads], dim=-1) if members else heads[0].detach()
        splits = tuple(h.shape[-1] for h in hiddens) if members else ()
    else:
        ids, lp = teacher_topk_ids, teacher_topk_logprobs
        if ids.dim() != 2 or ids.shape != lp.shape or ids.shape[0] != n_kept:
            raise ValueError(f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs "
                             f"{tuple(lp.shape)} must both be [kept tokens = {n_kept}, k]")
        if ids.shape[1] > vocab or (ids.numel() and int(ids.max()) >= vocab):
            raise ValueError(f"teacher_topk_ids has k={ids.shape[1]} or ids >= vocab_size {vocab}")
    # Full precision for the softmax: fp32, or fp64 when the weights already are.
    dtype = torch.promote_types(student_lm_head_weight.dtype, torch.float32)
    return _Batch(h, flat_labels, keep, t_h, t_w, splits, vocab, dtype)


def _normalise(kd_sum: Tensor, ce_sum: Tensor, n_kept: int, num_items_in_batch: int | Tensor | None,
               temperature: float) -> dict[str, Tensor]:
    # The whole accumulated batch's token count, so gradient accumulation changes nothing.
    denom = n_kept if num_items_in_batch is None else num_items_in_batch
    if isinstance(denom, Tensor):
        denom = denom.to(device=kd_sum.device, dtype=kd_sum.dtype).clamp_min(1)
    else:
        denom = max(float(denom), 1.0)
    return {
        # T^2 keeps the soft-target gradients on CE's scale (Hinton et al. 2015).
        "kd_loss": temperature**2 * kd_sum / denom,
        "ce_loss": ce_sum / denom,
        "num_tokens": torch.tensor(n_kept, device=kd_sum.device),
    }


def chunked_kd_loss(
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
    """Token-level KD + CE from final hidden states, never materialising [tokens, V] logits.

    Args:
        student_hidden: [B, L, H] or [N, H] final hidden states (after the final norm).
        student_lm_head_weight: [V_S, H]; gradients flow to it and to ``student_hidden``.
        labels: [B, L] or [N], already aligned: ``labels[t]`` is the target of position t
            (callers shift); ``ignore_index`` marks positions without loss.
        teacher_hidden, teacher_lm_head_weight: online teacher, [..., H_T] and [V_T, H_T];
            never differentiated. Lists of them (one per member, widths may differ): an
            ensemble teacher, whose distribution is the mean of its members' softened
            probabilities (``ensemble_logprobs``).
        teacher_topk_ids, teacher_topk_logprobs: offline teacher, [kept tokens, k] each, the
            teacher's top-k ids and log-probs at T = 1, rows in the order of the kept
            positions (row-major over labels). Tail handling: ``teacher_topk_buckets``.
        teacher_rest_logprob: offline teacher, [kept tokens], the log of the mass outside
            the top-k as the sampler computed it; computed from the top-k when not given.
        temperature: softens both sides of the KD term; CE stays at T = 1.
        kind, beta: see ``divergence`` (beta only for ``"jsd"``).
        chunk_size: kept tokens per chunk; peak memory is about 3 * chunk_size * V * 4 bytes
            plus the lm_head gradient (smaller chunks: less memory, smaller matmuls).
        num_items_in_batch: target tokens in the whole accumulated batch; defaults to the
            kept tokens of this call (clamped to >= 1).
        vocab_size: shared tokenizer length; both heads are cut to their first vocab_size
            rows (Qwen2.5: 152,064 vs 151,936 padded rows). Required when they differ.
        alpha: the weight the caller will give the KD term (``reference.combine(ce, kd, alpha)``, times
            any constant). Given, the gradient is computed during the forward (no recomputation
            in the backward: about 3 matmuls per chunk instead of 4); any other mixing still
            gets the right gradient, by recomputation.

    Logits are h @ W^T without a bias (Qwen2 and Llama heads have none). Half-precision
    weights are cast to fp32 once per pass (V * H * 4 bytes while it runs) and the weight
    gradient is accumulated in fp32 before being cast back.

    Returns:
        ``kd_loss`` = T^2 * sum of divergences / denominator (the divergence itself, zero when
        student equals teacher, not a soft-target cross-entropy), ``ce_loss`` = summed CE /
        denominator, and ``num_tokens`` (kept tokens in this call). ``reference.combine`` mixes them.
    """
    b = _prepare(student_hidden, student_lm_head_weight, labels, teacher_hidden,
                 teacher_lm_head_weight, teacher_topk_ids, teacher_topk_logprobs, temperature,
                 kind, beta, chunk_size, vocab_size, ignore_index)
    # Drop masked positions before any logits exist: prompt tokens cost nothing.
    idx = b.keep.nonzero().squeeze(1)
    # (Inside the Function's forward grad mode is off: whether gradients will be wanted is read here.)
    fused = alpha is not None and torch.is_grad_enabled()
    weights = (float(alpha) * temperature**2, 1.0 - float(alpha)) if fused else None
    opts = _Opts(float(temperature), kind, float(beta), b.vocab, int(chunk_size), b.dtype, weights, b.splits)
    sums = _ChunkedKD.apply(
        b.h.index_select(0, idx), student_lm_head_weight, b.labels.index_select(0, idx),
        None if b.t_h is None else b.t_h.index_select(0, idx), b.t_w,
        teacher_topk_ids, None if teacher_topk_logprobs is None else teacher_topk_logprobs.detach(),
        None if teacher_rest_logprob is None else teacher_rest_logprob.detach(), opts,
    )
    return _normalise(sums[0], sums[1], idx.numel(), num_items_in_batch, temperature)

"""KD losses tested by their mathematics: zero for identical inputs, endpoints equal F.kl_div
and TRL's generalized JSD, chunked equals naive in values and gradients, accumulation and
padding change nothing, offline top-k with k = V equals the full-vocabulary loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill.logits import (
    KINDS,
    LOG_ZERO,
    TAIL_FLOOR,
    chunked_kd_loss,
    divergence,
    soften,
    student_topk_buckets,
    teacher_topk_buckets,
)
from pipeline.distill.reference import combine, naive_kd_loss

B, L, H, HT, V = 2, 13, 16, 24, 50
KIND_BETA = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: elementwise relative error is meaningless for near-zero entries."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_batch(seed: int = 0, dtype: torch.dtype = torch.float32, b: int = B, length: int = L,
               v: int = V, t_rows: int | None = None) -> dict:
    """Student/teacher hidden states and heads with some -100 positions (prompt and padding)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return {
        "student_hidden": torch.randn(b, length, H, generator=g, dtype=dtype).requires_grad_(),
        "student_lm_head_weight": (torch.randn(v, H, generator=g, dtype=dtype) * 0.5).requires_grad_(),
        "labels": labels,
        "teacher_hidden": torch.randn(b, length, HT, generator=g, dtype=dtype),
        "teacher_lm_head_weight": torch.randn(t_rows or v, HT, generator=g, dtype=dtype) * 0.5,
    }


def loss_and_grads(fn, batch: dict, **kw) -> tuple[dict, torch.Tensor, torch.Tensor]:
    h, w = batch["student_hidden"], batch["student_lm_head_weight"]
    h.grad = w.grad = None
    out = fn(**batch, **kw)
    combine(out["ce_loss"], out["kd_loss"], 0.5).backward()
    return out, h.grad.clone(), w.grad.clone()


def teacher_logits(batch: dict) -> torch.Tensor:
    return F.linear(batch["teacher_hidden"], batch["teacher_lm_head_weight"])


def student_logits(batch: dict) -> torch.Tensor:
    return F.linear(batch["student_hidden"], batch["student_lm_head_weight"])


def logprob_pair(seed: int = 0, n: int = 7, v: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1),
            F.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1))


# ------------------------------------------------------------------------------ divergence


@pytest.mark.parametrize("kind,beta", [(k, 0.5) for k in KINDS] + [("jsd", 0.0), ("jsd", 0.1), ("jsd", 1.0)])
def test_identical_distributions_have_zero_divergence(kind: str, beta: float) -> None:
    s, _ = logprob_pair()
    assert divergence(s, s.clone(), kind, beta).abs().max() < 1e-12


def test_kl_directions_match_f_kl_div() -> None:
    s, t = logprob_pair()
    forward = F.kl_div(s, t, log_target=True, reduction="sum")
    reverse = F.kl_div(t, s, log_target=True, reduction="sum")
    assert torch.allclose(divergence(s, t, "forward_kl").sum(), forward, rtol=1e-12)
    assert torch.allclose(divergence(s, t, "reverse_kl").sum(), reverse, rtol=1e-12)
    assert not torch.allclose(forward, reverse)  # the test would be vacuous otherwise
    # TRL's convention: the endpoints of the generalized JSD are the two KLs.
    assert torch.equal(divergence(s, t, "jsd", 0.0), divergence(s, t, "forward_kl"))
    assert torch.equal(divergence(s, t, "jsd", 1.0), divergence(s, t, "reverse_kl"))


def test_jsd_interior_is_bounded_symmetric_and_scales_to_kl_near_endpoints() -> None:
    s, t = logprob_pair()
    jsd = divergence(s, t, "jsd", 0.5)
    assert (jsd >= 0).all() and (jsd <= math.log(2)).all()
    assert torch.allclose(jsd, divergence(t, s, "jsd", 0.5), rtol=1e-12)
    # The interior formula vanishes at the ends; JSD(beta) / beta -> forward KL as beta -> 0.
    eps = 1e-5
    assert torch.allclose(divergence(s, t, "jsd", eps) / eps, divergence(s, t, "forward_kl"), rtol=1e-3)
    assert torch.allclose(divergence(s, t, "jsd", 1 - eps) / eps, divergence(s, t, "reverse_kl"), rtol=1e-3)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_trl_generalized_jsd_loss(beta: float, temperature: float) -> None:
    gkd = pytest.importorskip("trl.experimental.gkd")
    batch = make_batch(dtype=torch.float64)
    out = naive_kd_loss(**batch, kind="jsd", beta=beta, temperature=temperature)
    trl = gkd.GKDTrainer.generalized_jsd_loss(student_logits(batch), teacher_logits(batch),
                                              labels=batch["labels"], beta=beta,
                                              temperature=temperature, reduction="batchmean")
    # TRL returns the bare divergence; ours carries the T^2 factor.
    assert torch.allclose(out["kd_loss"], temperature**2 * trl, rtol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta,trl_beta", [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.3, 0.3)])
def test_matches_trl_chunked_divergence_values_and_gradients(kind: str, beta: float, trl_beta: float,
                                                              temperature: float) -> None:
    # trl 1.16's DistillationTrainer has its own chunked loss (private; fp32; no T^2 factor, no CE).
    trainer = pytest.importorskip("trl.trainer.distillation_trainer")
    trl_loss = getattr(trainer, "_chunked_divergence_loss", None) or pytest.skip("not in this trl")
    batch = make_batch()
    h, w = batch["student_hidden"], batch["student_lm_head_weight"]
    ref, _, _ = trl_loss(h, batch["teacher_hidden"], w, batch["teacher_lm_head_weight"],
                         (batch["labels"] != -100).long(), trl_beta, temperature=temperature)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    out = chunked_kd_loss(**batch, kind=kind, beta=beta, temperature=temperature, chunk_size=4)["kd_loss"]
    gh, gw = torch.autograd.grad(out, (h, w))
    t2 = temperature**2
    assert rel_err(out, t2 * ref) <= 1e-5
    assert rel_err(gh, t2 * ref_gh) <= 1e-5 and rel_err(gw, t2 * ref_gw) <= 1e-5


@pytest.mark.parametrize("fn", [naive_kd_loss, chunked_kd_loss])
def test_temperature_squared_times_divergence_of_softened_distributions(fn) -> None:
    batch = make_batch(dtype=torch.float64)
    keep = batch["labels"] != -100
    for kind, beta in KIND_BETA:
        direct = {}
        for t in (1.0, 2.0):
            d = divergence(F.log_softmax(student_logits(batch) / t, -1),
                           F.log_softmax(teacher_logits(batch) / t, -1), kind, beta)[keep].mean()
            got = fn(**batch, kind=kind, beta=beta, temperature=t, chunk_size=5)["kd_loss"]
            assert torch.allclose(got, t**2 * d, rtol=1e-10), (kind, t)
            direct[t] = d
        assert not torch.allclose(direct[1.0], direct[2.0])  # softening changes the divergence


def test_ce_is_plain_cross_entropy_at_temperature_one() -> None:
    batch = make_batch(dtype=torch.float64)
    for t in (1.0, 3.0):
        out = chunked_kd_loss(**batch, temperature=t, chunk_size=4)
        ref = F.cross_entropy(student_logits(batch).flatten(0, 1), batch["labels"].flatten())
        assert torch.allclose(out["ce_loss"], ref, rtol=1e-10)
    assert int(out["num_tokens"]) == int((batch["labels"] != -100).sum())


# --------------------------------------------------------------------- chunked against naive


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])  # 19 kept tokens: 7 leaves a remainder
@pytest.mark.parametrize("kind,beta", KIND_BETA)
def test_chunked_equals_naive_in_values_and_gradients(kind: str, beta: float, chunk_size: int,
                                                      temperature: float) -> None:
    batch = make_batch()
    kw = dict(kind=kind, beta=beta, temperature=temperature, chunk_size=chunk_size)
    ref, ref_gh, ref_gw = loss_and_grads(naive_kd_loss, batch, **kw)
    out, gh, gw = loss_and_grads(chunked_kd_loss, batch, **kw)
    for key in ("kd_loss", "ce_loss"):
        assert rel_err(out[key], ref[key]) <= 1e-5, key
    assert rel_err(gh, ref_gh) <= 1e-5 and rel_err(gw, ref_gw) <= 1e-5
    assert ref["kd_loss"] > 0 and gw.abs().sum() > 0


def test_masked_positions_do_not_contribute() -> None:
    batch = make_batch()
    out, gh, gw = loss_and_grads(chunked_kd_loss, batch, kind="jsd", chunk_size=4)
    masked = batch["labels"] == -100
    with torch.no_grad():
        batch["student_hidden"][masked] = 1e3
        batch["teacher_hidden"][masked] = -1e3
    out2, gh2, gw2 = loss_and_grads(chunked_kd_loss, batch, kind="jsd", chunk_size=4)
    assert torch.equal(out["kd_loss"], out2["kd_loss"]) and torch.equal(out["ce_loss"], out2["ce_loss"])
    assert torch.equal(gw, gw2) and torch.equal(gh, gh2)
    assert gh[masked].abs().max() == 0


def test_gradient_accumulation_1x8_equals_8x1() -> None:
    batch = make_batch(b=8, seed=3)
    total = int((batch["labels"] != -100).sum())
    full, gh_full, gw_full = loss_and_grads(chunked_kd_loss, batch, kind="forward_kl",
                                            temperature=2.0, chunk_size=5, num_items_in_batch=total)
    h, w = batch["student_hidden"], batch["student_lm_head_weight"]
    h.grad = w.grad = None
    kd = ce = 0.0
    for i in range(8):  # each micro-batch has a different number of target tokens
        micro = {k: (v[i : i + 1] if k in ("student_hidden", "labels", "teacher_hidden") else v)
                 for k, v in batch.items()}
        out = chunked_kd_loss(**micro, kind="forward_kl", temperature=2.0, chunk_size=5,
                              num_items_in_batch=torch.tensor(total))
        combine(out["ce_loss"], out["kd_loss"], 0.5).backward()
        kd, ce = kd + out["kd_loss"].detach(), ce + out["ce_loss"].detach()
    assert rel_err(kd, full["kd_loss"]) <= 1e-5 and rel_err(ce, full["ce_loss"]) <= 1e-5
    assert rel_err(h.grad, gh_full) <= 1e-5 and rel_err(w.grad, gw_full) <= 1e-5


def test_shapes_dtypes_frozen_head_and_empty_batch() -> None:
    batch = make_batch()
    flat = {k: (v.reshape(-1, v.shape[-1]) if k.endswith("hidden") else v) for k, v in batch.items()}
    flat["labels"] = batch["labels"].reshape(-1)
    assert torch.equal(chunked_kd_loss(**batch)["kd_loss"], chunked_kd_loss(**flat)["kd_loss"])

    # bf16 model: logits and softmax still in fp32, gradients come back in bf16.
    bf = {k: (v.detach().bfloat16().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
          for k, v in batch.items()}
    out, gh, gw = loss_and_grads(chunked_kd_loss, bf, chunk_size=4)
    ref, ref_gh, ref_gw = loss_and_grads(naive_kd_loss, bf)
    assert out["kd_loss"].dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    assert rel_err(out["kd_loss"], ref["kd_loss"]) <= 1e-5 and rel_err(gw.float(), ref_gw.float()) <= 1e-2

    # Frozen lm_head (LoRA): no weight gradient is computed.
    w = batch["student_lm_head_weight"].detach()
    out = chunked_kd_loss(**{**batch, "student_lm_head_weight": w}, chunk_size=4)
    out["kd_loss"].backward()
    assert w.grad is None and batch["student_hidden"].grad is not None

    # No target token at all: zero loss, zero gradients, no NaN from 0 / 0.
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    out, gh, gw = loss_and_grads(chunked_kd_loss, empty)
    assert out["kd_loss"] == 0 and out["ce_loss"] == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


# ------------------------------------------------------------------------ offline top-k


def offline_topk(batch: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What generation stores: the teacher's top-k log-probs at T = 1 for every kept position."""
    keep = batch["labels"] != -100
    lp = F.log_softmax(teacher_logits(batch)[keep], -1)
    top = lp.topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", KIND_BETA)
def test_offline_topk_with_full_vocabulary_equals_online(kind: str, beta: float, temperature: float) -> None:
    batch = make_batch()
    ids, lp = offline_topk(batch, V)
    kw = dict(kind=kind, beta=beta, temperature=temperature, chunk_size=7)
    online, gh_on, gw_on = loss_and_grads(chunked_kd_loss, batch, **kw)
    student = {k: v for k, v in batch.items() if not k.startswith("teacher")}
    for fn in (chunked_kd_loss, naive_kd_loss):
        off, gh, gw = loss_and_grads(fn, student, teacher_topk_ids=ids, teacher_topk_logprobs=lp, **kw)
        assert rel_err(off["kd_loss"], online["kd_loss"]) <= 1e-5, fn.__name__
        assert rel_err(gh, gh_on) <= 1e-5 and rel_err(gw, gw_on) <= 1e-5, fn.__name__


def test_offline_small_k_has_a_rest_bucket_and_lower_bounds_the_full_loss() -> None:
    batch = make_batch(dtype=torch.float64)
    ids, lp = offline_topk(batch, 5)
    t_b = teacher_topk_buckets(lp, V)
    assert t_b.shape == (ids.shape[0], 6) and (t_b[:, -1].exp() > 0.01).all()
    assert torch.allclose(t_b.exp().sum(-1), torch.ones(ids.shape[0], dtype=t_b.dtype))
    keep = batch["labels"] != -100
    s_b = student_topk_buckets(F.log_softmax(student_logits(batch)[keep], -1), ids)
    for t in (1.0, 2.0):
        for b_ in (soften(t_b, t), soften(s_b, t)):
            assert torch.allclose(b_.exp().sum(-1), torch.ones(ids.shape[0], dtype=b_.dtype))

    student = {k: v for k, v in batch.items() if not k.startswith("teacher")}
    for kind, beta in KIND_BETA:
        off, gh, gw = loss_and_grads(chunked_kd_loss, student, teacher_topk_ids=ids,
                                     teacher_topk_logprobs=lp, kind=kind, beta=beta, chunk_size=4)
        ref, ref_gh, ref_gw = loss_and_grads(naive_kd_loss, student, teacher_topk_ids=ids,
                                             teacher_topk_logprobs=lp, kind=kind, beta=beta)
        assert torch.isfinite(off["kd_loss"]) and off["kd_loss"] > 0
        assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
        assert rel_err(off["kd_loss"], ref["kd_loss"]) <= 1e-10 and rel_err(gw, ref_gw) <= 1e-10
        # Coarsening both sides the same way can only lose information (T = 1).
        full = chunked_kd_loss(**batch, kind=kind, beta=beta)["kd_loss"]
        assert off["kd_loss"] <= full, kind


def test_offline_rest_stored_by_the_sampler_is_the_rest_bucket() -> None:
    """Top-k stored in float16 (as the traces do) cannot give a confident teacher's tail back:
    its top log-prob near 0 is rounded by ~5e-4, more than the whole tail. The rest the sampler
    computed from its fp32 values is used as it is, and the loss keeps the tail's share."""
    batch = make_batch(dtype=torch.float64)
    batch["teacher_lm_head_weight"] = batch["teacher_lm_head_weight"] * 3  # top-5 mass ~0.999
    ids, lp = offline_topk(batch, 5)
    rest = (-torch.expm1(torch.logsumexp(lp, -1))).log()
    assert rest.exp().median() < 1e-2
    stored = lp.half().double()
    assert torch.allclose(teacher_topk_buckets(stored, V, rest)[:, -1], rest.clamp_min(math.log(TAIL_FLOOR)))
    student = {k: v for k, v in batch.items() if not k.startswith("teacher")}
    kw = dict(teacher_topk_ids=ids, temperature=2.0, kind="reverse_kl")
    truth = chunked_kd_loss(**student, teacher_topk_logprobs=lp, **kw)["kd_loss"]
    for fn in (chunked_kd_loss, naive_kd_loss):
        with_rest = fn(**student, teacher_topk_logprobs=stored, teacher_rest_logprob=rest, **kw)["kd_loss"]
        without = fn(**student, teacher_topk_logprobs=stored, **kw)["kd_loss"]
        assert rel_err(with_rest, truth) < 1e-3 < rel_err(without, truth), fn.__name__


def test_topk_buckets_edge_cases() -> None:
    # Top-k mass rounding to >= 1 keeps a tiny finite tail; k = V has an exactly empty one.
    lp = torch.log(torch.tensor([[0.5, 0.5]]))
    assert torch.isfinite(teacher_topk_buckets(lp, 10)).all()
    assert teacher_topk_buckets(lp, 2)[0, -1] == LOG_ZERO
    # A very confident student keeps an accurate tail (1 - sum would round to 0 in fp32).
    z = torch.tensor([[30.0, 0.0, 0.0]])
    rest = student_topk_buckets(F.log_softmax(z, -1), torch.tensor([[0]]))[0, -1]
    assert torch.allclose(rest, torch.log(torch.tensor(2.0)) - 30.0, atol=1e-5)


# ------------------------------------------------------------------------ vocab alignment


def test_padded_teacher_and_student_rows_are_ignored() -> None:
    batch = make_batch(t_rows=V + 14)  # e.g. 152,064 teacher logits vs 151,936 student
    trimmed = {**batch, "teacher_lm_head_weight": batch["teacher_lm_head_weight"][:V]}
    ref, ref_gh, ref_gw = loss_and_grads(chunked_kd_loss, trimmed, chunk_size=4)
    out, gh, gw = loss_and_grads(chunked_kd_loss, batch, chunk_size=4, vocab_size=V)
    assert torch.equal(out["kd_loss"], ref["kd_loss"]) and torch.equal(gh, ref_gh)

    # Student padded too, both cut to the tokenizer's length; padded rows get no gradient.
    g = torch.Generator().manual_seed(9)
    padded_w = torch.cat([batch["student_lm_head_weight"].detach(), torch.randn(6, H, generator=g)])
    both = {**batch, "student_lm_head_weight": padded_w.requires_grad_()}
    out, gh, gw = loss_and_grads(chunked_kd_loss, both, chunk_size=4, vocab_size=V)
    ref_n, _, _ = loss_and_grads(naive_kd_loss, both, vocab_size=V)
    assert torch.equal(out["kd_loss"], ref["kd_loss"]) and rel_err(out["kd_loss"], ref_n["kd_loss"]) <= 1e-5
    assert torch.equal(gw[:V], ref_gw) and gw[V:].abs().max() == 0


def test_vocab_mismatches_are_refused_clearly() -> None:
    batch = make_batch(t_rows=V + 14)
    with pytest.raises(ValueError, match=f"{V}.*{V + 14}.*vocab_size"):
        chunked_kd_loss(**batch)
    with pytest.raises(ValueError, match=f"vocab_size={V + 20}.*{V} rows.*{V + 14} rows"):
        chunked_kd_loss(**batch, vocab_size=V + 20)
    with pytest.raises(ValueError, match="vocab_size"):
        naive_kd_loss(**batch, vocab_size=V + 20)
    student = {k: v for k, v in batch.items() if not k.startswith("teacher")}
    ids, lp = offline_topk(make_batch(v=V + 5), 3)
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        chunked_kd_loss(**student, teacher_topk_ids=ids + V, teacher_topk_logprobs=lp)
    with pytest.raises(ValueError, match="exactly one teacher"):
        chunked_kd_loss(**batch, vocab_size=V, teacher_topk_ids=ids, teacher_topk_logprobs=lp)


@pytest.mark.parametrize("kind,beta", KIND_BETA)
def test_fp32_chunked_matches_fp64_truth_at_a_larger_vocabulary(kind: str, beta: float) -> None:
    # Sums over chunk x V terms are where fp32 loses accuracy; 128 x 8192 shows it, V = 50 not.
    batch = make_batch(seed=5, b=4, length=32, v=8192)
    truth = naive_kd_loss(**{k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()},
                          kind=kind, beta=beta, temperature=2.0)
    out = chunked_kd_loss(**batch, kind=kind, beta=beta, temperature=2.0, chunk_size=64)
    assert rel_err(out["kd_loss"].double(), truth["kd_loss"]) <= 1e-5
    assert rel_err(out["ce_loss"].double(), truth["ce_loss"]) <= 1e-5


@pytest.mark.parametrize("teacher", ["online", "offline"])
@pytest.mark.parametrize("kind,beta", KIND_BETA)
def test_gradient_computed_in_the_forward_equals_the_recomputed_one(kind: str, beta: float, teacher: str) -> None:
    """With alpha given, the forward computes the gradient of combine(ce, kd, alpha) and the
    backward only scales it; a caller that mixes the terms otherwise still gets the right
    gradient (the backward recomputes)."""
    batch = make_batch()
    if teacher == "offline":
        ids, lp = offline_topk(batch, 7)
        batch = {**{k: v for k, v in batch.items() if not k.startswith("teacher")},
                 "teacher_topk_ids": ids, "teacher_topk_logprobs": lp}
    kw = dict(kind=kind, beta=beta, temperature=2.0, chunk_size=5)
    recomputed, gh, gw = loss_and_grads(chunked_kd_loss, batch, **kw)
    fused, fgh, fgw = loss_and_grads(chunked_kd_loss, batch, alpha=0.5, **kw)
    assert rel_err(fused["kd_loss"], recomputed["kd_loss"]) <= 1e-6
    assert rel_err(fused["ce_loss"], recomputed["ce_loss"]) <= 1e-6
    assert rel_err(fgh, gh) <= 1e-5 and rel_err(fgw, gw) <= 1e-5
    h, w = batch["student_hidden"], batch["student_lm_head_weight"]
    out = chunked_kd_loss(**batch, alpha=0.5, **kw)
    only_kd = torch.autograd.grad(3.0 * out["kd_loss"], (h, w))
    out = chunked_kd_loss(**batch, **kw)
    reference = torch.autograd.grad(3.0 * out["kd_loss"], (h, w))
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(only_kd, reference))

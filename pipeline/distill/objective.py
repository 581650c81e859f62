"""The combined objective of the sft stage's distillation family, one batch at a time:

    loss = (1 - kd_alpha) * CE + kd_alpha * T^2 * D(teacher_T || student_T)
           [+ feature_weight * L_feat + relation_distance_weight * L_D + relation_angle_weight * L_A]

`term_weights` names each term and its weight, `distill_losses` computes them from the models'
final hidden states (no model computes logits: logits.py does, a chunk at a time). The terms'
own mathematics live beside this file: logits.py, features.py, relations.py.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline import distill
from pipeline.distill import Batch
from pipeline.distill.logits import chunked_kd_loss
from pipeline.distill.rows import TEACHER_ROWS


def term_weights(cfg: Any) -> dict[str, float]:
    """Each logged term's weight in the loss (the keys `distill_losses` returns, num_tokens aside)."""
    weights = {"ce_loss": 1.0 - cfg.kd_alpha, "kd_loss": cfg.kd_alpha}
    if cfg.kd == "mutual":  # the peer's own objective, the same terms towards this student
        weights |= {"peer_ce_loss": 1.0 - cfg.kd_alpha, "peer_kd_loss": cfg.kd_alpha}
    for method in distill.enabled(cfg).values():
        weights |= method.weights(cfg)
    return weights


def batch_means(cfg: Any) -> set[str]:
    """Terms that are a micro-batch's mean rather than a sum over its tokens."""
    return set().union(*(m.batch_means for m in distill.enabled(cfg).values()))


# What the model's forward takes from a batch: padded (attention_mask), or padding-free and packed
# (position_ids restart at each sequence; cu_seq_lens for varlen attention kernels).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")


def distill_losses(model: Any, module: Any, teachers: list[Any], teacher_modules: list[Any], inputs: dict[str, Any],
                   kd: Any, vocab_size: int, num_items_in_batch: Any = None) -> dict[str, torch.Tensor]:
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
    methods = distill.enabled(kd)
    every_layer = any(m.every_layer for m in methods.values())  # else the last state only
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
        if methods:  # the rest of the family, each from its module (pipeline/distill/)
            batch = Batch(kd, tuple(s[:, :-1] for s in states), tuple(t[:, :-1] for t in teacher_states), mask,
                          num_items_in_batch, getattr(module, "distill_modules", None))
            for method in methods.values():
                losses |= method.loss(batch)
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

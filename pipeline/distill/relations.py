"""Relational distillation (RKD, Park et al., CVPR 2019): the student's batch should have the
teacher's shape. Over the per-device batch's samples, with x_i a sample's representation:

    distance:  psi_D(i, j) = |x_i - x_j| / mu,  mu = mean of |x_i - x_j| over pairs i != j
               L_D = mean over (i, j) of Huber(psi_D^S(i, j), psi_D^T(i, j))
    angle:     e_ij = (x_i - x_j) / |x_i - x_j|,  psi_A(i, j, k) = <e_ij, e_kj>
               L_A = mean over (i, j, k) of Huber(psi_A^S, psi_A^T)

Huber is smooth L1 with delta 1, mean reduction, as the official code (lenscloth/RKD,
`metric/loss.py`) has it, which averages over every ordered pair and triplet (degenerate ones
are 0 on both sides). Each side lives in its own space, so widths may differ and nothing is
projected; both losses are unchanged when a side is scaled, rotated or shifted.

- Representation: the mean of the final hidden state (after the final norm) over the positions
  that predict completion tokens: what the sample's answer is built from, and the prompt's
  shared template does not dominate it.
- Batch: per device (per_device_train_batch_size samples, >= 3 for angles); not gathered across
  processes, as the official code's batch is one GPU's.
- Weights: `relation_distance_weight` 25 and `relation_angle_weight` 50, Park et al.'s
  classification setting, where RKD is added to CE and KD as here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import setting
from pipeline.distill import Batch, Method, needs_local_teacher
from pipeline.distill.features import _full


def pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """[B, L, H] states, [B, L] mask -> [B, H] means over each sample's masked positions."""
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def _distances(x: Tensor) -> Tensor:
    """Pairwise distances divided by their off-diagonal mean (the diagonal stays 0)."""
    squared = (x[:, None] - x[None]).pow(2).sum(-1)
    n = len(x)
    d = squared.clamp_min(1e-12).sqrt() * (1 - torch.eye(n, device=x.device, dtype=x.dtype))
    return d / (d.sum() / (n * (n - 1))).clamp_min(1e-12)


def distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """L_D between [B, H_S] and [B, H_T] representations (B >= 2)."""
    with torch.no_grad():
        target = _distances(_full(teacher))
    return F.smooth_l1_loss(_distances(_full(student)), target)


def _angles(x: Tensor) -> Tensor:
    e = F.normalize(x[None] - x[:, None], p=2, dim=2)  # e[j, i] = unit vector from x_j to x_i
    return torch.bmm(e, e.transpose(1, 2)).reshape(-1)  # <e_ji, e_jk> for every j, i, k


def angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """L_A between [B, H_S] and [B, H_T] representations (B >= 3)."""
    with torch.no_grad():
        target = _angles(_full(teacher))
    return F.smooth_l1_loss(_angles(_full(student)), target)


@dataclass
class RelationKeys:
    relation_kd: bool = setting(False, help="RKD: distances and angles between a batch's samples (relations.py); "
                                            "as feature_kd, and batch >= 3")
    relation_distance_weight: float = setting(25.0, help="weight of the RKD distance term")
    relation_angle_weight: float = setting(50.0, help="weight of the RKD angle term")


def _check(cfg: RelationKeys) -> None:
    needs_local_teacher(cfg)
    if cfg.packing or cfg.padding_free or cfg.per_device_train_batch_size < 3:
        raise ValueError("relation_kd compares a device batch's samples: it needs per_device_train_batch_size "
                         ">= 3 (angles are over triplets) and no packing or padding_free")


def _loss(batch: Batch) -> dict[str, Tensor]:
    student, teacher = pooled(batch.states[-1], batch.mask), pooled(batch.teacher_states[-1], batch.mask)
    return {"relation_distance_loss": distance_loss(student, teacher),
            "relation_angle_loss": angle_loss(student, teacher)}


METHOD = Method(keys=RelationKeys, switch="relation_kd",
                weights=lambda cfg: {"relation_distance_loss": cfg.relation_distance_weight,
                                     "relation_angle_loss": cfg.relation_angle_weight},
                loss=_loss, check=_check, batch_means=frozenset({"relation_distance_loss", "relation_angle_loss"}))

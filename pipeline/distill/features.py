"""Feature distillation (FitNets, Romero et al. 2015; the normalised form of Heo et al., ICCV 2019):
the student's intermediate hidden states, projected to the teacher's width, point where the
teacher's do.

    L_feat = mean over layer pairs (s, t) and completion positions i of
             | Z_T / |Z_T|  -  P_s(Z_S) / |P_s(Z_S)| |^2 / 2   =   1 - cos(Z_T, P_s(Z_S))

- Norm: L2 per token vector, then half the squared L2 distance of the unit vectors (= 1 - cosine,
  DistillKit's `hs_cosine`, DistilBERT's cosine loss). Unit vectors because a student's and a
  teacher's residual streams differ in scale by orders of magnitude and grow with depth; the
  direction is what a projection can match.
- Positions: the states that predict completion tokens (labels != -100 after the shift), the
  positions every other loss here trains; prompt tokens are the same text for every method.
- Reduction: summed over positions and divided by the batch's completion tokens (all
  accumulation steps and processes: `num_items_in_batch`, as CE is), averaged over pairs, so
  the weight does not grow with the number of pairs.
- P_s: one bias-free linear map per pair from the student's width to the teacher's, Xavier
  initialised (DistillKit's `hsd_mapping`), trained with the student, saved in checkpoints for
  resume (`distill_modules.pt`, pipeline/distill/trainer.py) and left out of the final student.
- Layer map: hidden-state indices as transformers numbers them (0 the embeddings, L the last
  layer's output after the final norm); by default every student layer s = 1..L_S is paired with
  teacher layer round(s * L_T / L_S), so the last meets the last.
- Weight: `feature_weight` 1.0 beside CE and KD at 0.5 each: DistillKit's causal-LM example's
  ratios (CE 0.25, KL 0.25 at T = 2, hidden-state cosine 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import UserError, setting
from pipeline.distill import Batch, Method, needs_local_teacher


def layer_map(student_layers: int, teacher_layers: int, pairs: list[str] | None = None) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices: "s:t" strings as given, or the even map."""
    if not pairs:
        return [(s, round(s * teacher_layers / student_layers)) for s in range(1, student_layers + 1)]
    out = []
    for pair in pairs:
        try:
            s, t = (int(x) for x in pair.split(":"))
        except ValueError:
            raise UserError(f"feature_layers entry {pair!r} is not 'student:teacher' (two integers, e.g. '2:4')")
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise UserError(f"feature_layers entry {pair!r}: hidden-state indices run 0..{student_layers} for the "
                            f"student and 0..{teacher_layers} for the teacher (0 is the embeddings)")
        out.append((s, t))
    return out


class FeatureProjections(nn.Module):
    """P_s for each layer pair: student width -> teacher width, bias-free, Xavier initialised."""

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.pairs = pairs
        self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in pairs)
        for linear in self.maps:
            nn.init.xavier_uniform_(linear.weight)


def feature_loss(student_states: tuple[Tensor, ...], teacher_states: tuple[Tensor, ...],
                 projections: FeatureProjections, mask: Tensor, num_items: int | Tensor | None = None) -> Tensor:
    """L_feat above. States are [B, L, H] per hidden-state index; mask [B, L] marks the positions
    trained; num_items the completion tokens of the whole batch (default: mask's count)."""
    total = 0.0
    for (s, t), project in zip(projections.pairs, projections.maps):
        student = _full(project(student_states[s][mask].to(project.weight.dtype)))
        teacher = _full(teacher_states[t][mask].detach())
        total = total + (1.0 - nn.functional.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).sum()
    denom = mask.sum() if num_items is None else num_items
    if isinstance(denom, Tensor):
        denom = denom.to(total.device, total.dtype).clamp_min(1)
    else:
        denom = max(float(denom), 1.0)
    return total / denom / len(projections.pairs)


def _full(x: Tensor) -> Tensor:
    """fp32 at least: cosines of half-precision states lose the small differences trained on."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class FeatureKeys:
    feature_kd: bool = setting(False, help="hidden-state KD, projected (features.py); needs kd: online and one "
                                           "local teacher")
    feature_weight: float = setting(1.0, help="weight of the feature KD term")
    feature_layers: list[str] = setting([], help='"student:teacher" hidden-state index pairs; []: every student '
                                                 "layer, mapped evenly")


def _projections(cfg: FeatureKeys, student: object, teacher: object) -> nn.Module:
    pairs = layer_map(student.num_hidden_layers, teacher.num_hidden_layers, cfg.feature_layers)
    return FeatureProjections(pairs, student.hidden_size, teacher.hidden_size)


def _loss(batch: Batch) -> dict[str, Tensor]:
    return {"feature_loss": feature_loss(batch.states, batch.teacher_states, batch.modules["features"], batch.mask,
                                         batch.num_items_in_batch)}


METHOD = Method(keys=FeatureKeys, switch="feature_kd", weights=lambda cfg: {"feature_loss": cfg.feature_weight},
                loss=_loss, check=needs_local_teacher, every_layer=True, module=_projections)

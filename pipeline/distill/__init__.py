"""The distillation family, by the kind of knowledge a student is taught.

    logits.py     the teacher's next-token distribution (Hinton): forward / reverse KL, JSD,
                  chunked over the vocabulary; offline top-k rows; an ensemble's mean
    features.py   intermediate hidden states through a learned projection (FitNets)
    relations.py  the geometry of a batch: distances and angles between samples (RKD)
    teachers.py   where targets come from: one checkpoint, an ensemble, the previous
                  generation (born-again), a peer that trains too (mutual learning)
    objective.py  the combined loss of one batch: each term and its weight beside CE
    rows.py       a teacher's stored or served top-k rows, aligned with the student's tokens
    trainer.py    KDTrainer: TRL's SFTTrainer with the combined loss
    reference.py  the naive full-logits loss that tests and bench/ check the chunked one against

Every one is a configuration of the sft stage (pipeline/stages/sft.py, `SFTStageConfig`). Other
relatives live apart: on-policy distillation is its own stage (pipeline/stages/onpolicy.py), a
student cut from the teacher's layers is the shrink stage, sequence-level distillation is SFT on
the generate stage's traces.

A new method edits no stage file: its module here declares `METHOD = Method(...)` (its config
keys, checks, terms and weights, its loss), `methods()` finds it, the sft stage's config takes its
keys (so YAML, the command line and `--help` do) and objective.py adds its terms. Feature and
relational KD are built that way; docs/adding-a-method.md walks through it, and
tests/test_new_method.py adds a toy method the same way.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Method:
    """A term (or terms) beside CE and logit KD, declared by the module that computes it.

    keys: a dataclass of its config keys (`pipeline.config.setting` with help); one bool key,
    named by `switch`, turns it on. `weights(cfg)`: each logged term's weight. `loss(batch)`: the
    terms of one batch (a `Batch`), named as `weights` names them. `check(cfg)` raises ValueError
    on keys that cannot work. `every_layer`: needs every hidden state, not just the last.
    `batch_means`: terms that are a micro-batch's mean rather than a sum over tokens (scaled over
    accumulation and processes as the token sums are). `module(cfg, student_config,
    teacher_config)`: parameters trained beside the student (saved in checkpoints, not in the
    final student)."""

    keys: type
    switch: str
    weights: Callable[[Any], dict[str, float]]
    loss: Callable[["Batch"], dict[str, Any]]
    check: Callable[[Any], None] = lambda cfg: None
    every_layer: bool = False
    batch_means: frozenset[str] = frozenset()
    module: Callable[[Any, Any, Any], Any] | None = None


@dataclass
class Batch:
    """What a method's loss sees of one batch: the student's and the teacher's hidden states
    (every layer's, or the last as a 1-tuple, each cut to the positions that predict a next
    token), the mask of those that predict completion tokens, the token count the terms are
    normalised by, and what trains beside the student (its `module`, under the method's name)."""

    cfg: Any
    states: tuple[Any, ...]
    teacher_states: tuple[Any, ...]
    mask: Any
    num_items_in_batch: Any
    modules: Any


@functools.cache  # looked up on every training step (term weights, the loss): list and import once
def methods() -> dict[str, Method]:
    """Every module of this package (and of any folder added to its __path__ before the first call)
    that declares METHOD."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "METHOD", None), Method):
            found[info.name] = module.METHOD
    return found


def enabled(cfg: Any) -> dict[str, Method]:
    return {name: m for name, m in methods().items() if getattr(cfg, m.switch, False)}


def needs_local_teacher(cfg: Any) -> None:
    """The check of methods that read a local teacher's hidden states (their `check`, or called by it);
    the error names the switches of those that are on."""
    if not (cfg.kd == "online" and isinstance(cfg.teacher, str)):
        on = [m.switch for m in enabled(cfg).values() if _reads_teacher_states(m)]
        keys = " and ".join(on) or "this method"
        raise ValueError(f"{keys} read{'s' if len(on) < 2 else ''} a local teacher's hidden states: set kd: online "
                         "and teacher: one model path (kd_alpha: 0 leaves out the logit term)")


def _reads_teacher_states(method: Method) -> bool:
    """Its check is needs_local_teacher or calls it (relations.py's does, then checks the batch)."""
    code = getattr(method.check, "__code__", None)
    return method.check is needs_local_teacher or (code is not None and "needs_local_teacher" in code.co_names)

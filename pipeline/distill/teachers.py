"""Where the soft targets come from, apart from the losses that use them.

- single:       one frozen checkpoint (`teacher: path`).
- ensemble:     several frozen checkpoints (`teacher: [a, b, ...]`); the target is the mean of
                their softened probabilities (pipeline/distill/logits.py `ensemble_logprobs`).
- generation k: born-again networks (Furlanello et al., ICML 2018): `generations: K` trains K
                students of the same architecture in turn from the same init, each generation
                after the first learning from the one before (`generation_plan`). BAN restarts
                every generation from a fresh init and uses T = 1; here a generation restarts from
                `model` (the seed's init in a study) and keeps the stage's KD term and weight.
- peer:         deep mutual learning (Zhang et al., CVPR 2018): `kd: mutual` trains a second
                student (`mutual_peer`, its own init) beside the first; each learns CE plus KD
                towards the other's detached distribution. DML: CE + KL(p_peer || p_self) at T = 1.

Every teacher must share the student's tokenizer: logits over another vocabulary mean other
tokens (`make onpolicy` distils across tokenizers).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from pipeline.config import UserError


def load(paths: list[str], student_tokenizer: Any, student: str, dtype: Any, trainable: bool = False) -> list[Any]:
    """The checkpoints at `paths`, frozen in evaluation mode (a peer: `trainable`), each refused
    when its tokenizer differs from the student's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = []
    for path in paths:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise UserError(f"teacher {path} and student {student} have different tokenizers "
                            f"({len(tokenizer)} vs {len(student_tokenizer)} tokens); logit KD here needs a shared "
                            "one. Distil across tokenizers with `make onpolicy` (TRL's GOLD trainer, ULD loss): "
                            "lmbda: 0 trains off-policy on these traces scored by the live teacher, lmbda: 1 on-policy")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if not trainable:
            model.eval().requires_grad_(False)
        models.append(model)
    return models


def generation_dir(output_dir: str, k: int, generations: int) -> Path:
    """Generation k of K: the last one is the run's student (output_dir), the others beside it."""
    return Path(output_dir) if k == generations else Path(output_dir) / f"generation-{k}"


def generation_plan(cfg: Any) -> list[Any]:
    """The configs of generations 1..K: generation 1 as configured, generation k + 1 with the
    same keys, its own output dir and generation k as its one online teacher."""
    plan = []
    for k in range(1, cfg.generations + 1):
        gen = copy.copy(cfg)
        gen.output_dir = str(generation_dir(cfg.output_dir, k, cfg.generations))
        if k > 1:
            gen.kd, gen.teacher, gen.teacher_server = "online", plan[-1].output_dir, None
        plan.append(gen)
    return plan


def dtype_for(cfg: Any) -> Any:
    """Teachers in the student's precision: fp32 on CPU, the checkpoint's own on accelerators."""
    return torch.float32 if cfg.use_cpu else "auto"

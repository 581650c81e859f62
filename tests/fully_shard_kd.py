"""One online-KD step of the sft stage's loss (pipeline.sft.kd_losses) on 1 process, or on N
processes with student and teacher sharded by torch's FSDP2 `fully_shard`. Run by tests/test_sft.py:

    torchrun --nproc_per_node 2 tests/fully_shard_kd.py STUDENT TEACHER OUT WRAP

WRAP "accelerate": as accelerate 1.15 wraps (each decoder layer; final norm, embeddings and
lm_head as one unit kept unsharded after forward; the root), so the head is a plain tensor when
the loss reads it. WRAP "resharded": each layer, then the root with reshard_after_forward=True,
so the head is a sharded DTensor when the loss reads it.

Writes OUT/result.pt (loss, ce/kd shares summed over processes, full gradients) and OUT/model
(the stepped student, gathered as full weights the way accelerate saves FSDP2 models).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import pipeline.sft
from pipeline.losses import combine
from pipeline.sft import kd_losses

BATCH, LENGTH, PROMPT = 4, 24, 6
KD = SimpleNamespace(kd_temperature=2.0, kd_divergence="forward_kl", kd_beta=0.5, kd_chunk_size=16)


def shard(model: torch.nn.Module, wrap: str) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer, reshard_after_forward=True)
    if wrap == "accelerate":
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        tail = [model.get_decoder().norm, *([embed] if embed.weight is head.weight else []), head]
        fully_shard(tail, reshard_after_forward=False)
        fully_shard(model)
    else:
        fully_shard(model, reshard_after_forward=True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main(student_dir: str, teacher_dir: str, out: str, wrap: str = "accelerate") -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval().requires_grad_(False)
    vocab = student.config.vocab_size - 64  # the shared tokenizer's rows (both heads are padded)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :PROMPT] = -100
    num_items = int((labels[:, 1:] != -100).sum())  # the whole batch's, as the Trainer gathers it
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    inputs = {"input_ids": ids[rows], "attention_mask": mask[rows], "labels": labels[rows]}

    if world > 1:
        shard(student, wrap)
        shard(teacher, wrap)
    heads = []  # how the head's weight is held when the loss reads it
    through_head = pipeline.sft.through_head
    pipeline.sft.through_head = lambda m, *a: heads.append(type(m.get_output_embeddings().weight).__name__) or \
        through_head(m, *a)
    losses = kd_losses(student, student, teacher, teacher, inputs, KD, vocab, num_items)
    # Each process's loss is its share of the whole batch; FSDP averages gradients over processes.
    (combine(losses["ce_loss"], losses["kd_loss"], 0.5) * world).backward()
    shares = torch.stack([losses["ce_loss"], losses["kd_loss"]]).detach()
    if world > 1:
        dist.all_reduce(shares)
    grads = {name: full(p.grad).clone() for name, p in student.named_parameters()}

    with torch.no_grad():  # one SGD step, then save the full weights
        for p in student.parameters():
            p -= 0.1 * p.grad
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        state_dict = get_model_state_dict(student, options=options)
    else:
        state_dict = student.state_dict()
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"shares": shares, "grads": grads, "world": world, "heads": heads}, Path(out) / "result.pt")
        reloaded = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        reloaded.load_state_dict(state_dict)
        reloaded.save_pretrained(Path(out) / "model")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""One online-KD step of the sft stage's loss (distill/objective.py distill_losses) on 1 process, or on N
processes with student and teacher sharded. Run by tests/test_sft.py:

    torchrun --nproc_per_node 2 tests/sharded_kd.py STUDENT TEACHER OUT WRAP

WRAP "accelerate": FSDP2's `fully_shard` as accelerate 1.15 applies it (each decoder layer; final
norm, embeddings and lm_head as one unit kept unsharded after forward; the root), so the head is
a plain tensor when the loss reads it. "resharded": each layer, then the root with
reshard_after_forward=True, so the teacher's head is a sharded DTensor when the loss reads it.
"zero3": DeepSpeed ZeRO-3 engines (CPU accelerator, gloo; every parameter partitioned), so a
head outside its module's forward is a 0-element placeholder.

Writes OUT/result.pt (ce/kd shares summed over processes, full gradients) and OUT/model (the
student after one SGD step, gathered as full weights the way accelerate saves FSDP2 and ZeRO-3
models: FSDP2's full state dict, ZeRO-3's consolidated 16-bit state dict).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import pipeline.distill.objective
from pipeline.distill.objective import distill_losses
from pipeline.distill.reference import combine

BATCH, LENGTH, PROMPT = 4, 24, 6
KD = SimpleNamespace(kd_temperature=2.0, kd_divergence="forward_kl", kd_beta=0.5, kd_chunk_size=16, kd_alpha=0.5,
                     kd="online", feature_kd=False, relation_kd=False)


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


def zero3(model: torch.nn.Module, train: bool) -> torch.nn.Module:
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_gather_16bit_weights_on_model_save": True},
              **({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}} if train else {})}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters() if train else None,
                                      config=config)
    return engine


def main(student_dir: str, teacher_dir: str, out: str, wrap: str = "accelerate") -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if wrap == "zero3":
        import deepspeed

        deepspeed.init_distributed("gloo")
    elif world > 1:
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

    model, teacher_model = student, teacher  # what the trainer holds: the models, or their engines
    if wrap == "zero3":
        model, teacher_model = zero3(student, train=True), zero3(teacher, train=False)
        teacher_model.eval()  # DeepSpeedEngine.eval returns None
    elif world > 1:
        shard(student, wrap)
        shard(teacher, wrap)
    heads = []  # how the teacher's, then the student's head weight is held when the loss reads it
    through_head = pipeline.distill.objective.through_head

    def spy(module: torch.nn.Module, *args) -> object:
        weight = module.get_output_embeddings().weight
        heads.append("placeholder" if weight.numel() == 0 else type(weight).__name__)
        return through_head(module, *args)

    pipeline.distill.objective.through_head = spy
    losses = distill_losses(model, student, [teacher_model], [teacher], inputs, KD, vocab, num_items)
    # Each process's loss is its share of the whole batch; FSDP and ZeRO average gradients over processes.
    loss = combine(losses["ce_loss"], losses["kd_loss"], 0.5) * world
    shares = torch.stack([losses["ce_loss"], losses["kd_loss"]]).detach()
    if world > 1:
        dist.all_reduce(shares)
    if wrap == "zero3":
        from deepspeed.utils import safe_get_full_grad

        model.backward(loss)
        grads = {name: safe_get_full_grad(p).clone() for name, p in student.named_parameters()}
        model.step()  # SGD, lr 0.1
        state_dict = model._zero3_consolidated_16bit_state_dict()  # what accelerate.get_state_dict returns
    else:
        loss.backward()
        grads = {name: full(p.grad).clone() for name, p in student.named_parameters()}
        with torch.no_grad():  # one SGD step
            for p in student.parameters():
                p -= 0.1 * p.grad
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # What accelerate.get_state_dict returns for FSDP2 (on 1 process: the plain state dict).
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1, cpu_offload=True)
        state_dict = get_model_state_dict(student, options=options)
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

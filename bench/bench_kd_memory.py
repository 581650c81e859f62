"""Benchmark: peak memory of the chunked KD loss against the naive full-vocabulary fp32 loss,
and against the same loss built from TRL 1.16's kernels (chunked divergence + chunked log-probs).

Both variants compute the same thing from the same inputs (seeded): student and teacher final
hidden states and lm_head weights, forward-KL KD + CE at T = 1 over every token, combined
0.5 / 0.5, then backward to the student's hidden states and lm_head weight. Values and
gradients of the two are compared (relative error = max |a - b| / max |b|).

How memory is measured (CPU): each variant runs in a fresh Python process, so neither
inherits the other's allocations or allocator state. After building its inputs the worker
resets the kernel's resident-set high-water mark (writing "5" to /proc/self/clear_refs,
Linux >= 4.0), reads the current RSS as the baseline, runs forward + backward, and reads
VmHWM from /proc/self/status: the peak is VmHWM - baseline, i.e. everything the loss and
its backward made resident, the weight gradient included (inputs excluded). Where
clear_refs is not writable it falls back to ru_maxrss, which in a fresh process is the
same peak as long as building the inputs peaked lower (it allocates no temporaries).
This is reliable because PyTorch's CPU allocator does not cache, and the workers run with
MALLOC_MMAP_THRESHOLD_=131072: glibc then serves every allocation above 128 KB with mmap and
returns it to the kernel on free, so RSS follows the live tensors. (By default glibc raises
that threshold dynamically up to 32 MB, after which freed mid-sized tensors, e.g. small
chunks, stay in its heap and RSS overstates what is alive.) Pages are counted when
written, and every tensor here is written whole.
On CUDA the same script would read torch.cuda.max_memory_allocated instead; this one is CPU.

    python bench/bench_kd_memory.py [--tokens 4096] [--vocab 151936] [--hidden 896]
                                    [--chunk-size 1024 [512 ...]] [--kind forward_kl]
                                    [--temperature 1.0] [--out runs/bench/kd_memory.json] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import peak_kb, reset_peak, status_kb

from pipeline.distill.logits import chunked_kd_loss
from pipeline.distill.reference import combine, naive_kd_loss

MB = 2**20
# --quick: the smallest sizes that still take several chunks (checks the script, measures nothing).
QUICK = {"tokens": 256, "vocab": 4096, "hidden": 64, "teacher_hidden": 64, "chunk_size": [64]}


def make_inputs(args: argparse.Namespace) -> dict:
    """Seeded inputs, created in place (no temporaries that would raise the baseline peak)."""
    g = torch.Generator().manual_seed(args.seed)
    n, h, ht, v = args.tokens, args.hidden, args.teacher_hidden, args.vocab
    return {
        "student_hidden": torch.randn(n, h, generator=g).requires_grad_(),
        "student_lm_head_weight": torch.randn(v, h, generator=g).mul_(0.05).requires_grad_(),
        "labels": torch.randint(0, v, (n,), generator=g),
        "teacher_hidden": torch.randn(n, ht, generator=g),
        "teacher_lm_head_weight": torch.randn(v, ht, generator=g).mul_(0.05),
    }


def trl_kd_loss(student_hidden, student_lm_head_weight, labels, teacher_hidden, teacher_lm_head_weight, kind,
                temperature, chunk_size, alpha) -> dict:
    """The same loss from TRL 1.16's kernels alone: the DistillationTrainer's chunked divergence
    (KD; no CE term, no T^2) plus ChunkedLogProbFunction (CE as -log p(label), chunked)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}[kind]
    ones = torch.ones_like(labels)[None]
    kd, _, _ = _chunked_divergence_loss(student_hidden[None], teacher_hidden[None], student_lm_head_weight,
                                        teacher_lm_head_weight, ones, beta, temperature=temperature)
    logprobs = ChunkedLogProbFunction.apply(student_hidden, student_lm_head_weight, None, labels, 1.0, chunk_size,
                                            None, 1.0, ())[0]
    return {"kd_loss": temperature**2 * kd, "ce_loss": -logprobs.mean()}


def worker(args: argparse.Namespace) -> None:
    """One variant in this (fresh) process: measure, then save values and gradients."""
    inputs = make_inputs(args)
    fn = {"naive": naive_kd_loss, "chunked": chunked_kd_loss, "trl": trl_kd_loss}[args.worker]
    gc.collect()
    reset_ok = reset_peak()
    base_kb = status_kb("VmRSS") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = fn(**inputs, kind=args.kind, temperature=args.temperature, chunk_size=args.chunk_size, alpha=0.5)
    combine(out["ce_loss"], out["kd_loss"], 0.5).backward()
    seconds = time.perf_counter() - start
    top_kb = peak_kb(reset_ok)
    torch.save({"kd_loss": out["kd_loss"].detach(), "ce_loss": out["ce_loss"].detach(),
                "grad_hidden": inputs["student_hidden"].grad,
                "grad_lm_head": inputs["student_lm_head_weight"].grad},
               Path(args.save) / f"{args.worker}.pt")
    print(json.dumps({"variant": args.worker, "peak_mb": (top_kb - base_kb) / 1024,
                      "baseline_mb": base_kb / 1024, "seconds": seconds,
                      "method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss"}))


def run_variant(variant: str, chunk_size: int, args: argparse.Namespace, save: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--save", str(save),
           "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--teacher-hidden", str(args.teacher_hidden), "--chunk-size", str(chunk_size),
           "--kind", args.kind, "--temperature", str(args.temperature), "--seed", str(args.seed)]
    # A fixed mmap threshold makes glibc return every freed tensor to the kernel (see above).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: elementwise ratios are meaningless for near-zero entries."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tokens", type=int, default=4096, help="target tokens (all carry loss)")
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen2.5-0.5B's lm_head rows")
    parser.add_argument("--hidden", type=int, default=896, help="student hidden size (Qwen2.5-0.5B)")
    parser.add_argument("--teacher-hidden", type=int, default=896)
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[1024, 256],
                        help="one or more; the naive variant runs once")
    parser.add_argument("--kind", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/kd_memory.json")
    parser.add_argument("--quick", action="store_true", help="smallest sizes (sizes given still win)")
    parser.add_argument("--worker", choices=["naive", "chunked", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if args.worker:
        args.chunk_size = args.chunk_size[0]
        return worker(args)

    logits_mb = args.tokens * args.vocab * 4 / MB
    # The naive loss holds about five [tokens, vocab] fp32 tensors at its peak; refuse to swap.
    avail_mb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("MemAvailable")).split()[1]) / 1024
    if 6 * logits_mb > avail_mb:
        raise SystemExit(f"the naive variant needs about {6 * logits_mb:.0f} MB and {avail_mb:.0f} MB "
                         "are available: lower --tokens or --vocab")

    print(f"tokens {args.tokens}, vocab {args.vocab}, hidden {args.hidden}, {args.kind} "
          f"T={args.temperature}; one fp32 logits tensor = {logits_mb:.0f} MB, "
          f"lm_head gradient = {args.vocab * args.hidden * 4 / MB:.0f} MB")
    print(f"{'variant':<16}{'peak MB':>10}{'x logits':>10}{'seconds':>10}{'ratio':>8}{'max rel err':>13}")
    with tempfile.TemporaryDirectory(prefix="bench-kd-") as tmp:
        naive = run_variant("naive", args.chunk_size[0], args, Path(tmp))  # ignored by naive
        print(f"{'naive':<16}{naive['peak_mb']:>10.0f}{naive['peak_mb'] / logits_mb:>10.2f}"
              f"{naive['seconds']:>10.1f}", flush=True)
        ref = torch.load(Path(tmp) / "naive.pt")
        chunked, trl = [], []
        for variant in ("chunked", "trl"):
            for size in args.chunk_size:
                row = run_variant(variant, size, args, Path(tmp))
                got = torch.load(Path(tmp) / f"{variant}.pt")
                row |= {"chunk_size": size, "ratio_chunked_over_naive": row["peak_mb"] / naive["peak_mb"],
                        "relative_errors": {k: rel_err(got[k], ref[k]) for k in ref}}
                row["max_relative_error"] = max(row["relative_errors"].values())
                (chunked if variant == "chunked" else trl).append(row)
                print(f"{variant + ' ' + str(size):<16}{row['peak_mb']:>10.0f}{row['peak_mb'] / logits_mb:>10.2f}"
                      f"{row['seconds']:>10.1f}{row['ratio_chunked_over_naive']:>8.3f}"
                      f"{row['max_relative_error']:>13.1e}", flush=True)

    result = {
        "benchmark": "peak memory of KD + CE loss, forward + backward: chunked / naive fp32",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "setup": {k: getattr(args, k) for k in ("tokens", "vocab", "hidden", "teacher_hidden",
                                                 "kind", "temperature", "seed", "quick")},
        "measure": naive["method"] + " minus RSS after building inputs, fresh process per variant, "
                   "MALLOC_MMAP_THRESHOLD_=131072",
        "relative_error": "max |chunked - naive| / max |naive| over kd_loss, ce_loss and both gradients",
        "one_logits_tensor_mb": logits_mb,
        "lm_head_grad_mb": args.vocab * args.hidden * 4 / MB,
        "naive": naive,
        "chunked": chunked,
        "trl": trl,  # TRL's kernels; chunk_size applies to its CE kernel (its divergence tiles on its own)
        "goals": {"ratio <= 0.15": {r["chunk_size"]: r["ratio_chunked_over_naive"] <= 0.15 for r in chunked},
                  "max_relative_error <= 1e-5": all(r["max_relative_error"] <= 1e-5 for r in chunked)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

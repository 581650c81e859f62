"""GPU check (issue 23 item 6): the KD loss and the sft stage at real sizes on one CUDA GPU.

Four parts, in priority order, each writing one JSON line to OUT/results.jsonl (OUT: --out, else
$OUT, else runs/gpu-check); a part that fails writes its error and the others still run:

- kd_step:   one training step of the sft stage's online-KD loss (pipeline.distill.objective.distill_losses:
             chunked forward KL at T = 2 + CE, alpha 0.5) for a Qwen2.5-1.5B-shaped student and a
             Qwen2.5-7B-shaped teacher (random weights built from configs, nothing downloaded), one
             8,192-token row in bf16, AdamW: peak memory, tokens/s and MFU (FLOPs: `step_flops`), next
             to plain SFT's step (transformers' CE over full logits) on the same row.
- precision: the KD loss's bf16 matmul path (bf16 inputs, fp32 accumulation and softmax) against the
             same inputs in fp32: relative error of kd_loss, ce_loss and the gradients of the hidden
             states and the lm_head weight, beside the bf16 storage floor of those gradients.
- fsdp:      `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m pipeline sft`
             with online KD; the saved student must reload in transformers with trained, finite weights.
- zero3:     the same with configs/accelerate/zero3.yaml (DeepSpeed ZeRO-3).

    python bench/gpu/check.py [--parts kd_step,precision,fsdp,zero3] [--out DIR] [--smoke]

--smoke runs the same code at toy sizes on CPU (fp32; fsdp and zero3 then launch without their
accelerate config, which accelerate does not run on CPU): tests/test_gpu_check.py runs it. On the
GPU machine bench/gpu/run.sh (`make test-gpu`) installs the carried wheels and runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PARTS = ("kd_step", "precision", "fsdp", "zero3")
# Qwen2.5-1.5B and -7B as their config.json give them; the shared tokenizer has 151,665 tokens.
STUDENT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
TEACHER = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
TOKENIZER_LEN = 151665
SMOKE_STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True)
SMOKE_TEACHER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=576, tie_word_embeddings=False)
# H100/H200 SXM dense bf16 peak (NVIDIA's datasheet); MFU is also given against the measured matmul rate.
PEAK_BF16_FLOPS = 989.4e12
KD = SimpleNamespace(kd_temperature=2.0, kd_divergence="forward_kl", kd_beta=0.5, kd_chunk_size=256, kd_alpha=0.5,
                     kd="online", feature_kd=False, relation_kd=False)
VERSIONS = ("torch", "transformers", "accelerate", "trl", "datasets", "peft", "deepspeed", "pyarrow", "fsspec")


def versions() -> dict[str, str | None]:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_line() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, {platform.machine()}"
    return f"CPU, {os.cpu_count()} cores, {platform.machine()}"


# ----------------------------------------------------------------------------------------- kd_step


def build(shape: dict[str, int], dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """A random Qwen2 of this shape, made directly on the device (no checkpoint)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6, use_cache=False)
    with device:
        return Qwen2ForCausalLM(config).to(dtype)


def linear_params(model: torch.nn.Module) -> int:
    """Weights of the decoder layers' matmuls (attention projections and MLP), biases and norms left out."""
    return sum(p.numel() for p in model.get_decoder().layers.parameters() if p.dim() == 2)


def step_flops(student: torch.nn.Module, teacher: torch.nn.Module, tokens: int, kept: int, vocab: int) -> dict:
    """Model FLOPs of one KD step (no recomputation counted; causal attention counts half of T^2):

        student (forward + backward = 3 x forward): 6 T N_s + 6 L_s T^2 H_s + 6 K V H_s
        teacher (forward only):                     2 T N_t + 2 L_t T^2 H_t + 2 K V H_t

    T tokens in the row, K of them trained (the loss computes logits only there), V the shared
    vocabulary the loss cuts both heads to, N the decoder layers' matmul weights, L layers, H width
    (= heads x head size here; QK^T and AV are each 2 T^2 H per layer, halved for causality)."""
    s, t = student.config, teacher.config
    parts = {
        "student": 6 * tokens * linear_params(student) + 6 * s.num_hidden_layers * tokens**2 * s.hidden_size
        + 6 * kept * vocab * s.hidden_size,
        "teacher": 2 * tokens * linear_params(teacher) + 2 * t.num_hidden_layers * tokens**2 * t.hidden_size
        + 2 * kept * vocab * t.hidden_size,
    }
    return {**parts, "total": parts["student"] + parts["teacher"]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, smoke: bool) -> float | None:
    """Measured bf16 matmul FLOP/s (8192^3, mean of 10 after 3 warm-ups): what the chip gives here."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start)


def kd_step(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from pipeline.distill.objective import distill_losses
    from pipeline.distill.reference import combine

    smoke = args.smoke
    dtype = torch.float32 if smoke else torch.bfloat16
    tokens, prompt = (128, 16) if smoke else (args.tokens, 512)
    vocab = SMOKE_STUDENT["vocab_size"] - 8 if smoke else TOKENIZER_LEN
    steps, warmup = (2, 1) if smoke else (args.steps, 2)
    student = build(SMOKE_STUDENT if smoke else STUDENT, dtype, device, 0)
    teacher = build(SMOKE_TEACHER if smoke else TEACHER, dtype, device, 1).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    labels = ids.clone()
    labels[:, :prompt] = -100  # a prompt without loss, then the completion
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    kept = int((labels[:, 1:] != -100).sum())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, fused=device.type == "cuda")
    flops = step_flops(student, teacher, tokens, kept, vocab)
    sft_flops = 6 * tokens * linear_params(student) + 6 * student.config.num_hidden_layers * tokens**2 * \
        student.config.hidden_size + 6 * tokens * student.config.vocab_size * student.config.hidden_size

    def kd_loss(chunk: int) -> Callable[[], torch.Tensor]:
        kd = SimpleNamespace(**{**vars(KD), "kd_chunk_size": chunk})

        def loss() -> torch.Tensor:
            out = distill_losses(student, student, [teacher], [teacher], batch, kd, vocab)
            return combine(out["ce_loss"], out["kd_loss"], KD.kd_alpha)
        return loss

    def measure(loss_fn: Callable[[], torch.Tensor], checkpointing: bool) -> dict[str, Any]:
        if checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_disable()
        student.train()
        times = []
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - start)
        step_s = sorted(times[warmup:])[len(times[warmup:]) // 2]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return {"step_s": step_s, "times_s": times, "tokens_per_s": tokens / step_s, "peak_allocated_gib": peak,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
                "loss": float(loss)}

    rate = matmul_rate(device, smoke)
    variants = {}
    for name, fn, ckpt, f in (("kd_chunk256", kd_loss(256), False, flops["total"]),
                              ("kd_chunk1024", kd_loss(1024), False, flops["total"]),
                              ("kd_chunk256_grad_ckpt", kd_loss(256), True, flops["total"]),
                              ("sft_full_logits", lambda: student(**batch).loss, False, sft_flops)):
        try:
            v = measure(fn, ckpt)
        except torch.OutOfMemoryError as e:  # a figure too: this variant does not fit
            v = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        if "step_s" in v:
            v["flops"] = f
            v["mfu_vs_peak"] = f / v["step_s"] / PEAK_BF16_FLOPS if device.type == "cuda" else None
            v["mfu_vs_measured_matmul"] = f / v["step_s"] / rate if rate else None
        variants[name] = v
        print(f"kd_step {name}: {json.dumps(v)}", flush=True)
    return {"tokens": tokens, "trained_tokens": kept, "vocab_size": vocab, "dtype": str(dtype),
            "student": SMOKE_STUDENT if smoke else STUDENT, "teacher": SMOKE_TEACHER if smoke else TEACHER,
            "kd": vars(KD), "optimizer": "AdamW on the bf16 parameters (as sft keeps a bf16 checkpoint's)",
            "flops_per_step": flops, "flop_formula": step_flops.__doc__.split("\n\n")[1].strip(),
            "peak_bf16_flops": PEAK_BF16_FLOPS, "measured_matmul_flops": rate, "steps": steps, "warmup": warmup,
            "variants": variants, "ok": all("step_s" in v for k, v in variants.items() if k != "kd_chunk1024")}


# --------------------------------------------------------------------------------------- precision


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def precision(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Hidden states from the two models' forward (as the sft stage feeds the loss), and the same
    states scaled so the logits are peaked as a trained model's are (random weights give nearly
    uniform distributions, which hide rounding)."""
    from pipeline.distill.logits import chunked_kd_loss
    from pipeline.distill.reference import combine

    smoke = args.smoke
    low = torch.float32 if smoke else torch.bfloat16  # CPU runs fp32 matmuls anyway (logits.py)
    tokens = 128 if smoke else args.tokens
    vocab = SMOKE_STUDENT["vocab_size"] - 8 if smoke else TOKENIZER_LEN
    student = build(SMOKE_STUDENT if smoke else STUDENT, low, device, 0).eval()
    teacher = build(SMOKE_TEACHER if smoke else TEACHER, low, device, 1).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    labels = ids[0, 1:].clone()
    labels[:64 if smoke else 512] = -100
    with torch.no_grad():
        h_s = student.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]
        h_t = teacher.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]
    w_s = student.get_output_embeddings().weight.detach()
    w_t = teacher.get_output_embeddings().weight.detach()
    del student, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def logit_std(h: torch.Tensor, w: torch.Tensor) -> float:
        return float((h[:256].float() @ w[:vocab].float().t()).std())

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is true fp32
    cases = {}
    for case, target in (("model_states", None), ("peaked_logits_std4", 4.0)):
        hs, ht = h_s, h_t
        if target is not None:
            hs = (h_s.float() * (target / logit_std(h_s, w_s))).to(low)
            ht = (h_t.float() * (target / logit_std(h_t, w_t))).to(low)
        out: dict[str, Any] = {"student_logit_std": logit_std(hs, w_s), "teacher_logit_std": logit_std(ht, w_t)}
        for fused in (True, False):  # alpha given: gradient in the forward; else recomputed in the backward
            results = {}
            for name, dt in (("bf16", low), ("fp32", torch.float32)):
                h = hs.to(dt).clone().requires_grad_(True)
                w = w_s.to(dt).clone().requires_grad_(True)
                losses = chunked_kd_loss(h, w, labels, teacher_hidden=ht.to(dt), teacher_lm_head_weight=w_t.to(dt),
                                         temperature=KD.kd_temperature, chunk_size=KD.kd_chunk_size,
                                         vocab_size=vocab, alpha=KD.kd_alpha if fused else None)
                combine(losses["ce_loss"], losses["kd_loss"], KD.kd_alpha).backward()
                results[name] = {"kd": losses["kd_loss"].detach(), "ce": losses["ce_loss"].detach(),
                                 "grad_h": h.grad, "grad_w": w.grad}
            b, f = results["bf16"], results["fp32"]
            out["fused" if fused else "recomputed"] = {
                "kd_loss_fp32": float(f["kd"]), "ce_loss_fp32": float(f["ce"]),
                "kd_loss_rel_err": abs(float(b["kd"]) - float(f["kd"])) / max(abs(float(f["kd"])), 1e-30),
                "ce_loss_rel_err": abs(float(b["ce"]) - float(f["ce"])) / max(abs(float(f["ce"])), 1e-30),
                "grad_hidden_rel_err": rel(b["grad_h"], f["grad_h"]),
                "grad_lm_head_rel_err": rel(b["grad_w"], f["grad_w"]),
                # what storing the fp32 gradient in bf16 alone costs: the floor of the two above
                "grad_hidden_bf16_storage_rel_err": rel(f["grad_h"].to(low), f["grad_h"]),
                "grad_lm_head_bf16_storage_rel_err": rel(f["grad_w"].to(low), f["grad_w"]),
            }
            del results
        cases[case] = out
        print(f"precision {case}: {json.dumps(out)}", flush=True)
    worst = max(v[k] for c in cases.values() for m in ("fused", "recomputed") for v in [c[m]]
                for k in ("kd_loss_rel_err", "ce_loss_rel_err", "grad_hidden_rel_err", "grad_lm_head_rel_err"))
    return {"tokens": tokens, "vocab_size": vocab, "chunk_size": KD.kd_chunk_size, "temperature": KD.kd_temperature,
            # A measurement, not a gate: ok unless something is grossly off (NaN, or 10% and worse).
            "low_precision": str(low), "cases": cases, "worst_rel_err": worst, "ok": worst < 0.1}


# ------------------------------------------------------------------------------------- fsdp, zero3


def write_inputs(work: Path, smoke: bool) -> dict[str, Path]:
    """Student and teacher (random Qwen2, the tiny tokenizer; bf16 checkpoints on GPU, as real ones
    are) and 256 traces from prompts/arithmetic's worked solutions, saved as the generate stage's are."""
    import datasets

    from pipeline.demo.tiny import build_model

    paths = {"student": work / "student-init", "teacher": work / "teacher", "traces": work / "traces"}
    if paths["traces"].exists():
        return paths
    width = 128 if smoke else 512
    for name, hidden, seed in (("student", width, 0), ("teacher", 2 * width, 1)):
        build_model(paths[name], arch="qwen2", hidden_size=hidden, num_layers=2 if smoke else 4, seed=seed)
        if not smoke:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.bfloat16)
            model.save_pretrained(paths[name])
    rows = [json.loads(line) for line in (ROOT / "prompts/arithmetic/train.jsonl").read_text().splitlines()[:256]]
    records = [{"prompt": [{"role": "user", "content": r["question"]}],
                "completion": [{"role": "assistant", "content": r["solution"]}], "prompt_id": r["id"]} for r in rows]
    datasets.Dataset.from_list(records).save_to_disk(str(paths["traces"]))
    return paths


def sft_launch(args: argparse.Namespace, device: torch.device, wrap: str) -> dict[str, Any]:
    """`accelerate launch --config_file configs/accelerate/{wrap}.yaml --num_processes 1 -m pipeline sft`
    with online KD, then the saved student reloaded in transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    smoke = args.smoke
    inputs = write_inputs(Path(args.work), smoke)
    out = Path(args.work) / f"sft-{wrap}"
    shutil.rmtree(out, ignore_errors=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    launch += ["--cpu"] if smoke else ["--config_file", str(ROOT / f"configs/accelerate/{wrap}.yaml")]
    keys = {"model": inputs["student"], "dataset": inputs["traces"], "teacher": inputs["teacher"], "kd": "online",
            "output_dir": out, "use_cpu": str(smoke).lower(), "bf16": str(not smoke).lower(),
            "max_steps": 4 if smoke else 8, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
            "learning_rate": 1e-4, "warmup_steps": 0, "lr_scheduler_type": "constant", "logging_steps": 1,
            "save_steps": 4, "save_total_limit": 1, "kd_chunk_size": 64}
    command = launch + ["-m", "pipeline", "sft", "--config", str(ROOT / "configs/sft.yaml")]
    command += [x for k, v in keys.items() for x in (f"--{k}", str(v))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.launch_timeout)
    wall = time.perf_counter() - start
    log = done.stdout + done.stderr
    (Path(args.out) / f"sft-{wrap}.log").write_text(log[-200_000:])
    result: dict[str, Any] = {"command": " ".join(map(str, command)), "returncode": done.returncode, "wall_s": wall}
    if done.returncode != 0:
        result["tail"] = log[-3000:]
        return {**result, "ok": False}
    expected = "NO" if smoke else {"fsdp": "FSDP", "zero3": "DEEPSPEED"}[wrap]
    mode = [line for line in log.splitlines() if "process 0 of" in line]
    result["distributed"] = mode[-1].split("process 0 of", 1)[1].strip() if mode else None
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    init = AutoModelForCausalLM.from_pretrained(inputs["student"], dtype=torch.float32)
    saved = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    t_state, i_state = trained.state_dict(), init.state_dict()
    moved = {k: float((t_state[k].double() - i_state[k].double()).norm()) for k in i_state
             if i_state[k].dtype.is_floating_point}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"] if (
        out / "trainer_state.json").exists() else json.loads(
        sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())["log_history"]
    result.update({
        "distributed_expected": expected,
        "saved_files": sorted(p.name for p in out.iterdir() if p.is_file()),
        "saved_tensors": len(saved), "saved_dtypes": sorted({str(v.dtype) for v in saved.values()}),
        "reloaded_params": sum(p.numel() for p in trained.parameters()),
        "same_names_and_shapes": {k: v.shape for k, v in t_state.items()} == {k: v.shape for k, v in i_state.items()},
        "all_finite": all(torch.isfinite(v).all() for v in t_state.values() if v.dtype.is_floating_point),
        "params_moved": sum(v > 0 for v in moved.values()), "params": len(moved),
        "min_change_norm": min(moved.values(), default=None),
        "losses": [{k: h[k] for k in ("step", "loss", "ce_loss", "kd_loss") if k in h} for h in history if "loss" in h],
    })
    result["ok"] = bool(expected in (result["distributed"] or "") and result["same_names_and_shapes"]
                        and result["all_finite"] and result["params_moved"] == result["params"]
                        and result["losses"])
    return result


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs/gpu-check"),
                        help="results.jsonl and the launches' logs go here ($OUT if set)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU: the same code, no GPU needed")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens in the kd_step / precision row")
    parser.add_argument("--steps", type=int, default=6, help="kd_step: steps per variant (2 warm-up)")
    parser.add_argument("--launch-timeout", type=int, default=240, help="seconds for each accelerate launch")
    parser.add_argument("--work", default=None, help="models, traces and runs (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: the GPU check needs one (--smoke runs it at toy sizes on CPU)")
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    keep = args.work is not None
    args.work = args.work or tempfile.mkdtemp(prefix="gpu-check-")
    results = Path(args.out) / "results.jsonl"
    results.write_text("")  # this run's figures only
    common = {"device": device_line(), "smoke": args.smoke, "versions": versions()}
    failed = []
    try:
        for part in parts:
            start = time.perf_counter()
            try:
                if part == "kd_step":
                    record = kd_step(args, device)
                elif part == "precision":
                    record = precision(args, device)
                else:
                    record = sft_launch(args, device, part)
            except Exception as e:  # a figure too: the others still run
                record = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            record = {"part": part, **record, "part_wall_s": time.perf_counter() - start, **common}
            with results.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")
            print(f"== {part}: {'ok' if record['ok'] else 'FAILED'} ({record['part_wall_s']:.0f} s)", flush=True)
            if not record["ok"]:
                failed.append(part)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(f"results: {results}" + (f"; failed: {', '.join(failed)}" if failed else "; all parts ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

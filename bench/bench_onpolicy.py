"""Benchmark: on-policy distillation is bound by sampling. The onpolicy stage's student tokens
sampled per second inside the trainer against the same sampling alone (HF generate, same model,
prompts, batch and generation settings), where each step's time goes (sampling, teacher
scoring, the rest), and the stage's step time against plain TRL DistillationTrainer.

Student: the studies' (llama, hidden 64, 3 layers), random, so every completion runs to
max_completion_length in both measurements; teacher: the shipped sums teacher; prompts: sums.

    python bench/bench_onpolicy.py [--steps 8] [--batch 16] [--length 160] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import StepTimer, machine, save

from pipeline.config import load_config
from pipeline.demo.tiny import build_model
from pipeline.stages.onpolicy import OnPolicyConfig, build_trainer, prompt_dataset, train_summary

WARMUP = 2
QUICK = {"steps": WARMUP + 1, "batch": 4, "length": 16}


def step_times(trainer, after_warmup: dict | None = None) -> list[float]:
    """Each step's seconds; `after_warmup` gets the stage's counters as they stood after warm-up."""

    class Timer(StepTimer):
        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            if after_warmup is not None and state.global_step == WARMUP:
                after_warmup.update({k: v for k, v in trainer._counters().items() if k != "prompts"})

    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.times


def sampling_alone(cfg: OnPolicyConfig, batches: int) -> tuple[int, float]:
    """(completion tokens, seconds) of `batches` HF generate calls with the trainer's settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    prompts = prompt_dataset(cfg)["prompt"]
    eos = tokenizer.eos_token_id
    tokens, seconds = 0, 0.0
    for b in range(batches):
        batch = prompts[b * cfg.per_device_train_batch_size:(b + 1) * cfg.per_device_train_batch_size]
        inputs = tokenizer.apply_chat_template(batch, add_generation_prompt=True, padding=True, return_tensors="pt",
                                               return_dict=True)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=cfg.temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=cfg.max_completion_length, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos)
        if b >= WARMUP:
            seconds += time.perf_counter() - start
            for row in out[:, inputs["input_ids"].shape[1]:].tolist():
                tokens += row.index(eos) + 1 if eos in row else len(row)
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=160)
    parser.add_argument("--out", default="runs/bench/onpolicy.json")
    parser.add_argument("--quick", action="store_true", help="smallest sizes (sizes given still win)")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()

    from trl import DistillationTrainer

    work = Path(tempfile.mkdtemp(prefix="bench-onpolicy-"))
    student = build_model(work / "student", arch="llama", hidden_size=64, num_layers=3, intermediate_size=256,
                          num_heads=2)
    cfg = load_config(OnPolicyConfig, "configs/studies/sums/onpolicy.yaml", {
        "model": str(student), "output_dir": str(work / "stage"), "max_steps": args.steps, "save_strategy": "no",
        "per_device_train_batch_size": args.batch, "max_completion_length": args.length, "logging_steps": 1000,
        "max_prompts": args.batch * (args.steps + 1)})
    stage = build_trainer(cfg)
    warm: dict = {}
    stage_steps = step_times(stage, warm)
    counts = {k: v - warm[k] for k, v in stage._counters().items() if k in warm}  # the steps after warm-up
    inside = counts["sampled_tokens"] / counts["sampling_s"]
    shares = {"sampling": counts["sampling_s"] / counts["step_s"], "scoring": counts["scoring_s"] / counts["step_s"]}
    shares["training"] = 1 - shares["sampling"] - shares["scoring"]
    plain = DistillationTrainer(model=cfg.model, teacher_model=cfg.teacher, args=cfg,
                                train_dataset=prompt_dataset(cfg), processing_class=stage.processing_class)
    plain_steps = step_times(plain)
    tokens, seconds = sampling_alone(cfg, args.steps)
    alone = tokens / seconds
    result = {
        "benchmark": "on-policy: student tokens sampled per second inside the trainer / the same sampling alone; "
                     "share of a step spent sampling, scoring, training; stage step / plain TRL step",
        "machine": machine(),
        "setup": {"student": "llama h64 x3 (random)", "teacher": cfg.teacher, "batch": args.batch,
                  "max_completion_length": args.length, "steps": args.steps, "warmup_steps": WARMUP,
                  "torch_threads": torch.get_num_threads(), "quick": args.quick},
        "inside_trainer_tokens_per_s": round(inside, 1),
        "alone_tokens_per_s": round(alone, 1),
        "inside_over_alone": round(inside / alone, 3),
        "share_of_step": {k: round(v, 3) for k, v in shares.items()},
        "whole_run_summary": train_summary(stage),
        "median_step_s": {"stage": statistics.median(stage_steps[WARMUP:]),
                          "plain_trl": statistics.median(plain_steps[WARMUP:])},
    }
    result["stage_over_plain_step"] = round(result["median_step_s"]["stage"] / result["median_step_s"]["plain_trl"], 3)
    save(result, args.out)
    print(json.dumps({k: result[k] for k in ("inside_trainer_tokens_per_s", "alone_tokens_per_s", "inside_over_alone",
                                             "share_of_step", "stage_over_plain_step")}, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark: eval sampling throughput of the vLLM backend against the transformers backend.

Same model, prompts and protocol (k samples per prompt, temperature, top_p, max_tokens); output
tokens per second of sampling, engine or model loading excluded (reported apart). One process,
CPU; several repetitions, medians quoted.

    python bench/bench_eval.py [--prompts 16] [--k 4] [--max-tokens 128] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, save

from pipeline.demo.tiny import build_model
from pipeline.inference.engine import build_engine
from pipeline.inference.hf import sample_transformers
from pipeline.prompts import load_prompts
from pipeline.stages.eval import EvalConfig
from pipeline.stages.generate import GenerateConfig, generate

# --quick: the smallest run of both backends (checks the script, measures nothing).
QUICK = {"prompts": 2, "k": 1, "max_tokens": 8, "reps": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/eval.json")
    parser.add_argument("--quick", action="store_true", help="smallest sizes, one repetition (sizes given still win)")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model = str(build_model(work / "model", hidden_size=256, num_layers=4))
    cfg = EvalConfig(models=[f"m={model}"], prompt_set="prompts/arithmetic", split="test", max_prompts=args.prompts,
                     num_samples=args.k, max_tokens=args.max_tokens, dtype="float32", max_model_len=1024,
                     enforce_eager=True, output_dir="runs/demo/eval")
    prompts = load_prompts(cfg).prompts

    start = time.perf_counter()
    gen = GenerateConfig(model=model, prompt_set=cfg.prompt_set, split="test", max_prompts=args.prompts,
                         temperatures=[cfg.temperature], num_samples=args.k, top_p=cfg.top_p,
                         max_tokens=args.max_tokens,
                         dtype="float32", max_model_len=1024, enforce_eager=True, curate=False, export=[],
                         output_dir="runs/demo/traces")
    llm = build_engine(gen)
    vllm_start_s = time.perf_counter() - start

    rows = []
    for rep in range(args.reps):
        gen.output_dir = str(work / f"vllm-{rep}")
        t = time.perf_counter()
        vllm_tokens = sum(generate(gen, llm)["completion_tokens"])
        vllm_s = time.perf_counter() - t
        t = time.perf_counter()
        samples = sample_transformers(cfg, model, prompts, cfg.temperature, cfg.dtype)
        hf_tokens = sum(r["completion_tokens"] for r in samples)
        hf_s = time.perf_counter() - t
        row = {"vllm_tok_s": vllm_tokens / vllm_s, "transformers_tok_s": hf_tokens / hf_s}
        row["ratio"] = row["vllm_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
        print(f"rep {rep}: vllm {row['vllm_tok_s']:.0f} tok/s, transformers {row['transformers_tok_s']:.0f} tok/s, "
              f"ratio {row['ratio']:.1f}")
    llm.llm_engine.engine_core.shutdown()

    result = {
        "benchmark": "eval sampling tokens/s: vLLM backend / transformers backend",
        "machine": machine(),
        "setup": {"model": "random Qwen2, hidden 256, 4 layers, float32", "prompts": args.prompts, "k": args.k,
                  "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": args.max_tokens,
                  "quick": args.quick},
        "vllm_engine_start_s": vllm_start_s,
        "reps": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
    }
    save(result, args.out)
    print(f"\nmedian vLLM / transformers: {result['median_ratio']:.1f} (vLLM engine start {vllm_start_s:.0f} s, "
          f"not counted)")


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()

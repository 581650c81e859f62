"""Benchmark: the generate stage's output tokens/s against plain `vllm.LLM.generate`.

One engine serves both, on the same prompts, sampling parameters and engine settings; the
two alternate for several repetitions and the median ratio is quoted. The stage's time is its
whole `generate()` call: rendering, shards, the saved dataset and the exports included.

    python bench/bench_generate.py [--model PATH] [--prompts 32] [--max-tokens 256] [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine, save
from pipeline.generate import GenerateConfig, build_engine, generate, render
from pipeline.prompts import load_prompts
from pipeline.tiny import build_model


def plain_vllm(llm, cfg: GenerateConfig) -> tuple[int, float]:
    """What a user writes without this project, at its best: chat-rendered prompts, n samples
    per request, every temperature in one generate call (so the batch never drains between)."""
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    texts = [render(tokenizer, p) for p in load_prompts(cfg).prompts]
    params = [SamplingParams(n=cfg.num_samples, temperature=t, top_p=cfg.top_p, top_k=cfg.top_k,
                             max_tokens=cfg.max_tokens, seed=cfg.seed) for t in cfg.temperatures for _ in texts]
    start = time.perf_counter()
    outputs = llm.generate(texts * len(cfg.temperatures), params, use_tqdm=False)
    tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return tokens, time.perf_counter() - start


def stage(llm, cfg: GenerateConfig, out_dir: Path) -> tuple[int, float, float]:
    """Tokens, seconds, and the seconds spent outside sampling (saving, exports)."""
    cfg.output_dir = str(out_dir)
    start = time.perf_counter()
    ds = generate(cfg, llm)
    seconds = time.perf_counter() - start
    sampling = json.loads((out_dir / "summary.json").read_text())["generation_seconds_this_run"]
    return sum(ds["completion_tokens"]), seconds, seconds - sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", help="teacher path or hub id (default: a tiny random Qwen2 built here)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default="runs/bench/generate.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    model = args.model or str(build_model(work / "teacher"))
    cfg = GenerateConfig(model=model, prompt_set="prompts/arithmetic", split="train", max_prompts=args.prompts,
                         temperatures=[0.6, 1.0], num_samples=4, max_tokens=args.max_tokens, shard_size=64,
                         dtype="float32", max_model_len=1024, enforce_eager=True,
                         curate=False)  # sampling only: scoring has no plain-vLLM counterpart
    llm = build_engine(cfg)
    plain_vllm(llm, cfg)  # warm-up of both, so neither pays first-call costs
    stage(llm, cfg, work / "warm-up")

    rows = []
    for rep in range(args.reps):
        # Alternate which goes first, so drift on a shared machine does not favour one.
        if rep % 2:
            stage_tokens, stage_s, overhead_s = stage(llm, cfg, work / f"run-{rep}")
            plain_tokens, plain_s = plain_vllm(llm, cfg)
        else:
            plain_tokens, plain_s = plain_vllm(llm, cfg)
            stage_tokens, stage_s, overhead_s = stage(llm, cfg, work / f"run-{rep}")
        row = {"plain_tok_s": plain_tokens / plain_s, "stage_tok_s": stage_tokens / stage_s,
               "stage_seconds_outside_sampling": overhead_s}
        row["ratio"] = row["stage_tok_s"] / row["plain_tok_s"]
        rows.append(row)
        print(f"rep {rep}: plain {row['plain_tok_s']:.0f} tok/s, stage {row['stage_tok_s']:.0f} tok/s "
              f"({overhead_s:.2f} s of {stage_s:.2f} s outside sampling), ratio {row['ratio']:.3f}")

    # Teacher top-k logprobs (for offline KD): storage per completion token, and the cost in speed.
    import pyarrow.parquet as pq

    cfg.logprobs = 20
    lp_tokens, lp_s, _ = stage(llm, cfg, work / "logprobs")
    columns = pq.read_table(work / "logprobs" / "samples.parquet", columns=["topk_ids", "topk_logprobs", "token_logprobs"])
    logprobs = {"k": 20, "bytes_per_token_in_memory": columns.nbytes / lp_tokens,
                "tok_s_with_logprobs": lp_tokens / lp_s}
    print(f"top-20 logprobs: {logprobs['bytes_per_token_in_memory']:.1f} bytes per token (arrow, in memory); "
          f"{logprobs['tok_s_with_logprobs']:.0f} tok/s with capture")

    result = {
        "benchmark": "generate stage tokens/s / plain vllm.LLM.generate tokens/s",
        "machine": machine(),
        "setup": {"prompts": args.prompts, "temperatures": cfg.temperatures, "num_samples": cfg.num_samples,
                  "max_tokens": cfg.max_tokens, "shard_size": cfg.shard_size, "model": model},
        "reps": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "median_plain_tok_s": statistics.median(r["plain_tok_s"] for r in rows),
        "median_stage_tok_s": statistics.median(r["stage_tok_s"] for r in rows),
        "logprobs": logprobs,
    }
    save(result, args.out)
    print(f"\nmedian ratio (stage / plain): {result['median_ratio']:.3f}  "
          f"[plain {result['median_plain_tok_s']:.0f} tok/s, stage {result['median_stage_tok_s']:.0f} tok/s]")


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()

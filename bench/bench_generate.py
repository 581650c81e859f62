"""Benchmark: the generate stage's output tokens/s against plain `vllm.LLM.generate`.

One engine serves all, on the same prompts, sampling parameters and engine settings: plain
vLLM with the stage's requests (one per sample, each with its seed), plain vLLM unseeded (one
request of n samples per prompt), and the stage. They
take turns for several repetitions and the median ratios are quoted. The stage's time is its
whole `generate()` call: rendering, shards, the saved dataset and the exports included. The stage
with `logprobs: 20` (the teacher's top-k captured for offline KD) takes its turn too: the capture
ratio is its tokens/s over the stage's without.

    python bench/bench_generate.py [--model PATH] [--vocab-size N] [--prompts 32] [--max-tokens 256] [--reps 7]
                                   [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, save

from pipeline.demo.tiny import build_model
from pipeline.inference.engine import build_engine
from pipeline.inference.sampling import sample_seed
from pipeline.prompts import load_prompts, render
from pipeline.stages.generate import GenerateConfig, generate


def plain_vllm(llm, cfg: GenerateConfig, seeded: bool) -> tuple[int, float]:
    """What a user writes without this project: chat-rendered prompts, every temperature in one
    generate call (so the batch never drains between). Seeded: the stage's very requests, one
    per sample with its own seed (reproducible, resumable per sample). Unseeded: one request of
    n samples per prompt on vLLM's global generator (the fastest vLLM can do; not reproducible)."""
    from vllm import SamplingParams

    start = time.perf_counter()  # from the prompts on, as the stage's time is: rendering and params included
    tokenizer = llm.get_tokenizer()
    prompts = load_prompts(cfg).prompts
    texts, params = [], []
    for t in cfg.temperatures:
        for p in prompts:
            common = dict(temperature=t, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens)
            if seeded:
                texts += [render(tokenizer, p)] * cfg.num_samples
                params += [SamplingParams(**common, seed=sample_seed(cfg.seed, p.id, t, i))
                           for i in range(cfg.num_samples)]
            else:
                texts.append(render(tokenizer, p))
                params.append(SamplingParams(**common, n=cfg.num_samples))
    outputs = llm.generate(texts, params, use_tqdm=False)
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
    parser.add_argument("--vocab-size", type=int, help="the tiny teacher's logits (e.g. Qwen2.5's 151936: the "
                                                      "top-k over them costs more); default: its tokenizer's")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default="runs/bench/generate.json")
    parser.add_argument("--quick", action="store_true", help="smallest sizes, one repetition (sizes given still win)")
    if "--quick" in sys.argv[1:]:  # checks the script, measures nothing
        parser.set_defaults(prompts=4, max_tokens=16, reps=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    model = args.model or str(build_model(work / "teacher", vocab_size=args.vocab_size))
    cfg = GenerateConfig(model=model, prompt_set="prompts/arithmetic", split="train", max_prompts=args.prompts,
                         temperatures=[0.6, 1.0], num_samples=4, max_tokens=args.max_tokens, shard_size=64,
                         dtype="float32", max_model_len=1024, enforce_eager=True, output_dir="runs/demo/traces",
                         curate=False)  # sampling only: scoring has no plain-vLLM counterpart
    llm = build_engine(cfg)
    plain_vllm(llm, cfg, seeded=True)  # warm-up of each, so none pays first-call costs
    plain_vllm(llm, cfg, seeded=False)
    capture = dataclasses.replace(cfg, logprobs=20)
    stage(llm, cfg, work / "warm-up")
    stage(llm, capture, work / "warm-up-capture")

    rows = []
    for rep in range(args.reps):
        # Rotate which goes first, so drift on a shared machine does not favour one.
        runs = {"seeded": lambda: plain_vllm(llm, cfg, seeded=True),
                "unseeded": lambda: plain_vllm(llm, cfg, seeded=False),
                "stage": lambda: stage(llm, cfg, work / f"run-{rep}"),
                "capture": lambda: stage(llm, capture, work / f"capture-{rep}")}
        order = list(runs)[rep % 4:] + list(runs)[:rep % 4]
        measured = {name: runs[name]() for name in order}
        row = {f"{name}_tok_s": m[0] / m[1] for name, m in measured.items()}
        row["stage_seconds_outside_sampling"] = measured["stage"][2]
        row["ratio_seeded"] = row["stage_tok_s"] / row["seeded_tok_s"]
        row["ratio_unseeded"] = row["stage_tok_s"] / row["unseeded_tok_s"]
        row["ratio_capture"] = row["capture_tok_s"] / row["stage_tok_s"]
        rows.append(row)
        print(f"rep {rep}: plain seeded {row['seeded_tok_s']:.0f} tok/s, unseeded {row['unseeded_tok_s']:.0f}, "
              f"stage {row['stage_tok_s']:.0f} ({row['stage_seconds_outside_sampling']:.2f} s outside sampling); "
              f"stage / seeded {row['ratio_seeded']:.3f}, stage / unseeded {row['ratio_unseeded']:.3f}; "
              f"with logprobs 20 {row['capture_tok_s']:.0f} tok/s, capture ratio {row['ratio_capture']:.3f}")

    # Teacher top-k logprobs (for offline KD): storage per completion token.
    import pyarrow.parquet as pq

    table = pq.read_table(work / "capture-0" / "samples.parquet", columns=[
        "topk_ids", "topk_logprobs", "topk_rest_logprob", "token_logprobs", "completion_token_ids"])
    tokens = pq.read_table(work / "capture-0" / "samples.parquet", columns=["completion_tokens"])
    logprobs = {"k": 20, "bytes_per_token_in_memory": table.nbytes / sum(tokens["completion_tokens"].to_pylist())}
    print(f"top-20 logprobs: {logprobs['bytes_per_token_in_memory']:.1f} bytes per token (arrow, in memory)")

    result = {
        "benchmark": "generate stage tokens/s / plain vllm.LLM.generate tokens/s",
        "machine": machine(),
        "setup": {"prompts": args.prompts, "temperatures": cfg.temperatures, "num_samples": cfg.num_samples,
                  "max_tokens": cfg.max_tokens, "shard_size": cfg.shard_size, "model": model,
                  "vocab_size": args.vocab_size},
        "reps": rows,
        **{f"median_{key}": statistics.median(r[key] for r in rows)
           for key in ("ratio_seeded", "ratio_unseeded", "ratio_capture", "seeded_tok_s", "unseeded_tok_s",
                       "stage_tok_s", "capture_tok_s")},
        "logprobs": logprobs,
    }
    save(result, args.out)
    print(f"\nmedian stage / plain seeded: {result['median_ratio_seeded']:.3f}, stage / plain unseeded: "
          f"{result['median_ratio_unseeded']:.3f} [seeded {result['median_seeded_tok_s']:.0f}, unseeded "
          f"{result['median_unseeded_tok_s']:.0f}, stage {result['median_stage_tok_s']:.0f} tok/s]; capture ratio "
          f"(logprobs 20 / none): {result['median_ratio_capture']:.3f}")


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()

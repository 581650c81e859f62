"""Benchmark: the generate stage's memory does not grow with the run.

Peak resident memory of the stage above the engine's own baseline, at 10x the samples divided
by at 1x (goal: at most 1.5), with `logprobs: 20` so that records are heavy (about 130 bytes
per token); and the heap alone (anonymous memory) at 40x divided by at 10x (goal: at most 1.15),
40x by 4 times the samples per prompt (the prompt file has 5,000 rows). Each size runs in a fresh
process: build the in-process engine, warm it up, take the RSS as the baseline, reset the
kernel's high-water mark, run the whole stage (sampling, shards, assembled dataset, scoring,
curation, exports), read the high-water mark.

    python bench/bench_generate_memory.py [--prompts 200] [--scale 10] [--heap-scale 4] [--max-tokens 32] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import machine, peak_kb, reset_peak, save, status_kb

MB = 1024  # kB
PARTS = ("RssAnon", "RssFile")  # resident memory of the process's own and of mapped files (page cache)


def worker(model: str, prompts: int, samples: int, max_tokens: int, out: Path) -> dict:
    import os
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny model needs little
    from pipeline.inference.engine import build_engine
    from pipeline.stages.generate import GenerateConfig, generate

    cfg = GenerateConfig(model=model, prompt_set="prompts/arithmetic", split="train", max_prompts=prompts,
                         temperatures=[0.6, 1.0], num_samples=samples, max_tokens=max_tokens, logprobs=20,
                         dtype="float32", max_model_len=512, enforce_eager=True, output_dir=str(out / "run"),
                         score_workers=1)
    llm = build_engine(cfg)
    generate(GenerateConfig(**{**vars(cfg), "max_prompts": 4, "output_dir": str(out / "warm-up")}), llm)
    base = status_kb("VmRSS")
    base_parts = {part: status_kb(part) for part in PARTS}
    reset_ok = reset_peak()
    peaks, stop = dict(base_parts), threading.Event()

    def sample_parts() -> None:  # which kind of memory makes the peak: anonymous or file-backed (mmap)
        while not stop.wait(0.05):
            for part in PARTS:
                peaks[part] = max(peaks[part], status_kb(part))

    sampler = threading.Thread(target=sample_parts, daemon=True)
    sampler.start()
    start = time.perf_counter()
    ds = generate(cfg, llm)
    seconds = time.perf_counter() - start
    peak = peak_kb(reset_ok)
    stop.set()
    sampler.join()
    return {"prompts": prompts, "samples": len(ds), "completion_tokens": sum(ds["completion_tokens"]),
            "seconds": round(seconds, 1), "baseline_mb": base / MB, "peak_mb": peak / MB,
            "above_baseline_mb": (peak - base) / MB,
            **{f"{part}_above_baseline_mb (sampled)": (peaks[part] - base_parts[part]) / MB for part in PARTS},
            "method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--prompts", type=int, default=200,
                        help="prompts at 1x (x 2 temperatures x 2 samples: 800, past the 512-request window)")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--heap-scale", type=int, default=4, help="then samples per prompt x this (0: skip)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="smallest sizes (sizes given still win)")
    parser.add_argument("--out", default="runs/bench/generate_memory.json")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "PROMPTS", "SAMPLES"), help=argparse.SUPPRESS)
    if "--quick" in sys.argv[1:]:  # checks the script, measures nothing
        parser.set_defaults(prompts=4, scale=2, heap_scale=2, max_tokens=8)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            model, prompts, samples = args.worker
            print("RESULT " + json.dumps(worker(model, int(prompts), int(samples), args.max_tokens, Path(tmp))))
        return

    from pipeline.demo.tiny import build_model

    work = Path(tempfile.mkdtemp(prefix="bench-generate-memory-"))
    model = str(build_model(work / "teacher"))
    runs = {}
    sizes = {"1x": (args.prompts, 2), f"{args.scale}x": (args.prompts * args.scale, 2)}
    if args.heap_scale:
        sizes[f"{args.scale * args.heap_scale}x"] = (args.prompts * args.scale, 2 * args.heap_scale)
    for name, (prompts, samples) in sizes.items():
        done = subprocess.run([sys.executable, __file__, "--worker", model, str(prompts), str(samples),
                               "--max-tokens", str(args.max_tokens)], capture_output=True, text=True, check=True)
        runs[name] = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        print(f"{name}: {runs[name]}", flush=True)
    ratio = runs[f"{args.scale}x"]["above_baseline_mb"] / runs["1x"]["above_baseline_mb"]
    anon = "RssAnon_above_baseline_mb (sampled)"
    heap_ratio = (runs[f"{args.scale * args.heap_scale}x"][anon] / runs[f"{args.scale}x"][anon]
                  if args.heap_scale else None)
    save({"benchmark": f"generate stage peak RSS above the engine baseline, {args.scale}x samples / 1x",
          "machine": machine(), "setup": {"logprobs": 20, "max_tokens": args.max_tokens, "temperatures": [0.6, 1.0],
                                          "num_samples": 2, "model": "tiny random Qwen2, hidden 128, 2 layers"},
          "runs": runs, "ratio": ratio, "heap_ratio": heap_ratio}, args.out)
    print(f"\npeak above baseline, {args.scale}x / 1x: {ratio:.2f} (goal: at most 1.5)")
    if heap_ratio is not None:
        print(f"heap (anonymous) above baseline, {args.scale * args.heap_scale}x / {args.scale}x: {heap_ratio:.2f} "
              "(goal: at most 1.15)")


if __name__ == "__main__":
    main()

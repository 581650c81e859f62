"""Benchmark: SFT step time of the sft stage against plain TRL SFTTrainer, and KD against SFT.

Same student, data and SFTConfig for all; the stage's trainers come from
`pipeline.stages.sft.build_trainer`, plain TRL is `SFTTrainer(model, args, train_dataset)`. Step
times are taken by a callback between step begin and end, the first steps skipped as
warm-up; runs alternate for several repetitions and medians are quoted.

    python bench/bench_sft_step.py [--samples 64] [--steps 12] [--reps 3] [--hidden 256] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _common import StepTimer, machine, save

from pipeline.config import load_config
from pipeline.demo.teacher import solution_records
from pipeline.demo.tiny import build_model
from pipeline.prompts import PromptSource
from pipeline.stages.sft import SFTStageConfig, build_trainer

WARMUP = 2
# --quick: the smallest run that still times a step after warm-up (checks the script, measures nothing).
QUICK = {"samples": 32, "steps": WARMUP + 1, "reps": 1, "hidden": 64}


def arithmetic_traces(path: Path, samples: int) -> Path:
    """Prompt-completion traces from the arithmetic set's worked solutions (no vLLM needed)."""
    import datasets

    source = PromptSource(prompt_set="prompts/arithmetic", split="train", max_prompts=samples)
    datasets.Dataset.from_list(solution_records(source, "solution")).save_to_disk(str(path))
    return path


def median_step(trainer) -> float:
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return statistics.median(timer.times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", default="runs/bench/sft_step.json")
    parser.add_argument("--quick", action="store_true", help="smallest sizes, one repetition (sizes given still win)")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()

    from trl import SFTConfig, SFTTrainer

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    student = build_model(work / "student", hidden_size=args.hidden, num_layers=4)
    teacher = build_model(work / "teacher", hidden_size=2 * args.hidden, num_layers=4, seed=1)
    data = arithmetic_traces(work / "traces", args.samples)
    common = dict(use_cpu=True, bf16=False, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-4,
                  logging_steps=100, save_strategy="no", report_to="none", gradient_checkpointing=False, seed=0)

    def stage(kd: str) -> float:
        cfg = load_config(SFTStageConfig, None, {**common, "model": str(student), "dataset": str(data),
                                                 "output_dir": str(work / f"stage-{kd}"), "kd": kd,
                                                 "teacher": str(teacher) if kd == "online" else None})
        return median_step(build_trainer(cfg))

    def plain(max_length: int) -> float:
        import datasets
        from transformers import AutoTokenizer

        cfg = SFTConfig(output_dir=str(work / "plain"), max_length=max_length, **common)
        return median_step(SFTTrainer(model=str(student), args=cfg, train_dataset=datasets.load_from_disk(str(data)),
                                      processing_class=AutoTokenizer.from_pretrained(student)))

    probe = load_config(SFTStageConfig, None, {**common, "model": str(student), "dataset": str(data),
                                               "output_dir": str(work / "probe")})
    build_trainer(probe)  # sets max_length from the data: plain TRL gets the same
    rows = []
    for rep in range(args.reps):
        row = {"plain_sft_s": plain(probe.max_length), "stage_sft_s": stage("none"), "stage_kd_s": stage("online")}
        row["sft_ratio"] = row["stage_sft_s"] / row["plain_sft_s"]
        row["kd_over_sft"] = row["stage_kd_s"] / row["stage_sft_s"]
        rows.append(row)
        print(f"rep {rep}: plain {row['plain_sft_s'] * 1e3:.0f} ms, stage {row['stage_sft_s'] * 1e3:.0f} ms "
              f"(ratio {row['sft_ratio']:.3f}), KD {row['stage_kd_s'] * 1e3:.0f} ms (KD/SFT {row['kd_over_sft']:.2f})")

    result = {
        "benchmark": "median step time: sft stage / plain TRL SFTTrainer, and KD / SFT",
        "machine": machine(),
        "setup": {"student_hidden": args.hidden, "teacher_hidden": 2 * args.hidden, "layers": 4,
                  "batch": 8, "max_length": probe.max_length, "steps": args.steps, "warmup_steps": WARMUP,
                  "quick": args.quick},
        "reps": rows,
        "median_sft_ratio": statistics.median(r["sft_ratio"] for r in rows),
        "median_kd_over_sft": statistics.median(r["kd_over_sft"] for r in rows),
    }
    save(result, args.out)
    print(f"\nmedian SFT step ratio (stage / plain TRL): {result['median_sft_ratio']:.3f}; "
          f"KD / SFT: {result['median_kd_over_sft']:.2f}")


if __name__ == "__main__":
    main()

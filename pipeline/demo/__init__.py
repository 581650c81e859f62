"""`make demo`: the whole pipeline on a CPU in minutes, showing that distillation works.

1. generate: the shipped arithmetic teacher (prompts/arithmetic/teacher, made by `make
   teacher`) samples a trace per prompt with vLLM, capturing its top-20 logprobs per token;
   the traces are verified against the reference answers and filtered (correct only).
2. sft: two students a quarter of the teacher's size, from the same random init: one on the
   traces alone, one with offline logit KD from the captured logprobs as well (no teacher
   forward while training). They train side by side, the cores split between them (their
   logs: OUTPUT_DIR/logs/).
3. eval: teacher, untrained student and both students on the held-out test split.

Each step is `python -m pipeline STAGE` on the demo configs in configs/, as `make generate`,
`make sft` and `make eval` run them, with the paths moved under --output_dir. Stage times go to
OUTPUT_DIR/timings.json; the report and plot paths are printed at the end.

    python -m pipeline demo [--output_dir runs/demo] [--quick]
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.config import UserError, setting
from pipeline.demo.tiny import build_model

log = logging.getLogger(__name__)

TEACHER = "prompts/arithmetic/teacher"
# 0.27M parameters (the teacher: 1.09M). Llama, as vLLM's Qwen2 cannot have 2 heads of 64 in a
# width of 64; with 1 head the student sat on a loss plateau for 300-450 of its 800 steps.
STUDENT = dict(arch="llama", hidden_size=64, num_layers=3, intermediate_size=256, num_heads=2)
# --quick (the test): fewer prompts, no KD student, a small eval. The student keeps its 800 steps:
# with 500 (cosine to 0) it scored 0.29, against 0.999 with 800.
QUICK = {"generate": ["--max_prompts", "600"], "sft": [], "eval": ["--max_prompts", "40", "--num_samples", "2"]}


@dataclass
class DemoConfig:
    output_dir: str = setting("runs/demo", "where the traces, students, eval and timings.json go")
    quick: bool = setting(False, "the reduced demo a test runs: fewer prompts, no KD student, a small eval")
    RENAMED: ClassVar[dict[str, str]] = {"out": "output_dir"}


def stages(out: Path, quick: bool) -> list[list[tuple[str, str, list[str]]]]:
    """The steps in order, each a list of (name, stage, args) that run at once: the students train
    side by side (on 2 cores, a core each beats both cores for one, then the other)."""
    students = {"student-sft": [], "student-kd": ["--kd", "offline"]}
    if quick:
        students.pop("student-kd")
    generate = ("generate", "generate", ["--config", "configs/generate.yaml", "--model", TEACHER,
                                         "--output_dir", str(out / "traces")])
    train = [(name, "sft", ["--config", "configs/sft.yaml", "--model", str(out / "student-init"),
                            "--dataset", str(out / "traces"), "--output_dir", str(out / name), *extra])
             for name, extra in students.items()]
    models = [f"teacher={TEACHER}", f"untrained={out / 'student-init'}", *(f"{n}={out / n}" for n in students)]
    evaluate = ("eval", "eval", ["--config", "configs/eval.yaml", "--models", ",".join(models),
                                 "--output_dir", str(out / "eval")])
    return [[(name, stage, args + (QUICK[stage] if quick else [])) for name, stage, args in step]
            for step in ([generate], train, [evaluate])]


def run_at_once(step: list[tuple[str, str, list[str]]], logs: Path) -> dict[str, float]:
    """Run the step's stages as processes, the cores split between them; return each one's seconds.
    One stage prints to this terminal; several write logs/NAME.log and their progress is printed here."""
    cores = max(1, len(os.sched_getaffinity(0)) // len(step))
    env = {**os.environ, **({"OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)} if len(step) > 1 else {})}
    logs.mkdir(parents=True, exist_ok=True)
    running, seconds, start, shown = {}, {}, time.time(), time.time()
    for name, stage, args in step:
        log.info(f"\n==> {name}: python -m pipeline {stage} {' '.join(args)}"
                 + (f"  ({cores} core(s), log {logs / name}.log)" if len(step) > 1 else ""))
        sys.stdout.flush()
        output = (logs / f"{name}.log").open("w") if len(step) > 1 else None
        running[name] = subprocess.Popen([sys.executable, "-m", "pipeline", stage, *args], env=env,
                                         stdout=output, stderr=subprocess.STDOUT if output else None)
        if output:
            output.close()  # the child holds its own copy
    while running:
        time.sleep(0.5)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            seconds[name] = round(time.time() - start, 1)
            if proc.returncode:
                for other in running.values():
                    other.terminate()
                    other.wait()
                where = f" (its log: {logs / name}.log)" if len(step) > 1 else " (its error is above)"
                raise UserError(f"demo step {name} failed with exit status {proc.returncode}{where}: fix it and "
                                "run the demo again, finished steps are reused")
            if len(step) > 1:
                log.info(f"    {name} done in {seconds[name]:.0f} s")
        if running and len(step) > 1 and time.time() - shown > 15:
            shown = time.time()
            log.info("    " + ", ".join(f"{name} {last_progress(logs / f'{name}.log')}" for name in running))
    return seconds


def last_progress(path: Path) -> str:
    """The last `step/total` a trainer's progress bar wrote to its log."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        found = PROGRESS.findall(f.read().decode(errors="replace"))
    return f"step {found[-1]}" if found else "starting"


PROGRESS = re.compile(r"(\d+/\d+) \[")


def main(cfg: DemoConfig) -> dict[str, float]:
    out, quick = Path(cfg.output_dir), cfg.quick
    if not (out / "student-init" / "config.json").is_file():
        build_model(out / "student-init", **STUDENT)
    timings: dict[str, float] = {}
    start = time.time()
    for step in stages(out, quick):
        timings.update(run_at_once(step, out / "logs"))
    timings["total"] = round(time.time() - start, 1)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")

    log.info("\n==> demo done in " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    report = json.loads((out / "eval" / "report.json").read_text())["models"]
    teacher = report["teacher"]["pass@1"]
    for name, m in report.items():
        share = f" ({m['pass@1'] / teacher:.0%} of the teacher's)" if teacher and name.startswith("student") else ""
        log.info(f"  pass@1 {name:12} {m['pass@1']:.3f}{share}")
    paths = {"report": "eval/report.md", "plot": "eval/accuracy.png", "samples": "eval/samples.jsonl",
             "traces": "traces/curated", "curation": "traces/curation.json", "timings": "timings.json"}
    for what, path in paths.items():
        log.info(f"  {what:9} {out / path}")
    return timings


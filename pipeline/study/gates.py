"""`python -m pipeline gates`: is a teacher strong enough for a distillation study? The keyed
bench's gates (prompts/keyed), checked on a held-out split before any study runs:

- **strong**: pass@1 at T 0.6 (over k samples) and greedy, each at least `min_pass1` (0.95);
- **choices**: at T 1 the teacher samples on average at least `min_distinct` (3) distinct correct
  traces per prompt, out of `distinct_samples`: there is something to distil beyond one trace;
- **recovers**: from a correct prefix of the prompt's keyed running sum whose last total is wrong
  (one injected slip: the format of prompts/keyed/make.py), the teacher reaches the right answer
  at least `min_recovery` (half) of the time; also reported: how often its next line is a `fix`;
- **room** (given `student_report`, an eval report.json of the smaller student at its plateau):
  the student's pass@1 is between 0.3 and 0.8 of the teacher's.

Writes OUTPUT_DIR/gates.json and gates.md; a gate that fails is a UserError naming it, after both
are written.

    python -m pipeline gates --config configs/studies/keyed/gates.yaml [--max_prompts 20]
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config import UserError, require, setting
from pipeline.inference.engine import EngineConfig, build_engine, shutdown
from pipeline.prompts import PromptSource, load_prompts, render
from pipeline.scoring import ScoringConfig, score_texts

log = logging.getLogger(__name__)
LINE = re.compile(r"([a-z])=(\d)")


@dataclass
class GatesConfig(EngineConfig, PromptSource):
    model: str | None = setting(None, help="the teacher")
    output_dir: str | None = setting(None, help="where gates.json and gates.md go")
    num_samples: int = setting(4, help="samples per prompt at `temperature` (pass@1 over them)")
    temperature: float = setting(0.6, help="the eval temperature")
    distinct_samples: int = setting(8, help="samples per prompt at T 1 for the distinct-trace count")
    max_tokens: int = setting(160, help="tokens per completion")
    seed: int = setting(0, help="sampling and slip seed")
    student_report: str | None = setting(None, help="an eval report.json holding the smaller student at its plateau "
                                                    "(model `student_model`), for the room gate; unset: not checked")
    student_model: str = setting("student", help="the smaller student's model name in student_report (a study's: "
                                                 "student-quarter__seed-0, say)")
    min_pass1: float = setting(0.95, help="strong: the least pass@1, at T and greedy")
    min_distinct: float = setting(3.0, help="choices: the least mean distinct correct traces per prompt at T 1")
    min_recovery: float = setting(0.5, help="recovers: the least share of slipped prefixes that still end right")
    room: list[float] = setting([0.3, 0.8], help="room: the student's pass@1 / the teacher's must lie in this range")
    logprobs: ClassVar[int] = 0  # what the engine builder reads of a sampling config
    logprobs_mode: ClassVar[str] = "raw_logprobs"

    def __post_init__(self) -> None:
        EngineConfig.__post_init__(self)
        PromptSource.__post_init__(self)
        require(self, "model", "prompt_set", "output_dir", example="configs/studies/keyed/gates.yaml")


def student_pass1(cfg: GatesConfig) -> float:
    """The smaller student's pass@1 in student_report (an eval report.json)."""
    models = json.loads(Path(cfg.student_report).read_text())["models"]
    if cfg.student_model not in models:
        raise UserError(f"student_model: {cfg.student_report} scores no model {cfg.student_model!r}, only "
                        f"{', '.join(models)}: name the smaller student with --student_model")
    return models[cfg.student_model]["pass@1"]


def main(cfg: GatesConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    student = student_pass1(cfg) if cfg.student_report else None  # a bad report is refused before sampling
    prompts = load_prompts(cfg, require_answers=True).prompts
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    texts = [render(tokenizer, p) for p in prompts]
    slipped = [slip_prefix(p.problem, random.Random(f"{cfg.seed}:{p.id}")) for p in prompts]
    llm = build_engine(cfg)
    try:
        def sample(inputs: list[str], n: int, temperature: float) -> list[list[str]]:
            params = SamplingParams(n=n, temperature=temperature, top_p=0.95 if temperature else 1.0,
                                    max_tokens=cfg.max_tokens, seed=cfg.seed)
            return [[c.text for c in out.outputs] for out in llm.generate(inputs, params, use_tqdm=False)]

        at_t = sample(texts, cfg.num_samples, cfg.temperature)
        greedy = sample(texts, 1, 0.0)
        at_1 = sample(texts, cfg.distinct_samples, 1.0)
        continued = sample([t + prefix for t, prefix in zip(texts, slipped)], 1, 0.0)
    finally:
        shutdown(llm)

    answers = [p.answer for p in prompts]
    with_slip = [[prefix + c[0]] for prefix, c in zip(slipped, continued)]
    # One scoring pass over everything (each pass starts its own pool of processes).
    kinds = [at_t, greedy, at_1, with_slip]
    texts = [text for outs in kinds for o in outs for text in o]
    references = [a for outs in kinds for o, a in zip(outs, answers) for _ in o]
    verdicts = iter(v == "correct" for v, _ in score_texts(texts, references, ScoringConfig(), "math"))
    ok_t, ok_greedy, ok_1, ok_slip = ([[next(verdicts) for _ in o] for o in outs] for outs in kinds)
    distinct = [len({text for text, ok in zip(outs, oks) if ok}) for outs, oks in zip(at_1, ok_1)]
    teacher = mean(sum(o) / len(o) for o in ok_t)
    result: dict[str, Any] = {
        "teacher": cfg.model, "prompts": f"{cfg.prompt_set}:{cfg.split}", "n_prompts": len(prompts),
        "pass@1": teacher, "pass@1_greedy": mean(o[0] for o in ok_greedy),
        "distinct_correct_at_T1": mean(distinct), "distinct_samples": cfg.distinct_samples,
        "recovery": mean(o[0] for o in ok_slip),
        "fix_next": mean(c[0].lstrip().startswith("fix") for c in continued),
        "example_slip": slipped[0] + continued[0][0]}
    gates = {"strong": min(result["pass@1"], result["pass@1_greedy"]) >= cfg.min_pass1,
             "choices": result["distinct_correct_at_T1"] >= cfg.min_distinct,
             "recovers": result["recovery"] >= cfg.min_recovery}
    if student is not None:
        result["student_over_teacher"] = student / teacher if teacher else float("nan")
        gates["room"] = cfg.room[0] <= result["student_over_teacher"] <= cfg.room[1]
    result["gates"] = gates
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gates.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gates.md").write_text(markdown(result, cfg))
    log.info(markdown(result, cfg))
    failed = [name for name, ok in gates.items() if not ok]
    if failed:
        raise UserError(f"{out / 'gates.md'}: the teacher {cfg.model} fails the gate(s) {', '.join(failed)}: a study "
                        "on it cannot show what distillation does (docs/studies.md, the bench)")
    return result


def slip_prefix(problem: str, rng: random.Random) -> str:
    """The start of a correct keyed running sum of `problem` ("Sum a=7 b=3 ...") in a random order,
    whose last line's total is wrong by one of the slips make.py trains on."""
    values = dict(LINE.findall(problem))
    order = rng.sample(list(values), len(values))
    lines, total = [], 0
    for key in order[:rng.randint(1, len(order) - 1)]:
        total += int(values[key])
        lines.append(f"{key} {values[key]} >{total}")
    wrong = total + rng.choice([d for d in (-2, -1, 1, 2, 10, -10) if total + d >= 0])
    lines[-1] = lines[-1].rsplit(">", 1)[0] + f">{wrong}"
    return "<think>\n" + "\n".join(lines) + "\n"


def mean(xs: Any) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def markdown(result: dict[str, Any], cfg: GatesConfig) -> str:
    rows = [("strong", f"pass@1 at T {cfg.temperature} over {cfg.num_samples} samples {result['pass@1']:.3f}, "
                       f"greedy {result['pass@1_greedy']:.3f}", f">= {cfg.min_pass1}"),
            ("choices", f"{result['distinct_correct_at_T1']:.2f} distinct correct traces per prompt of "
                        f"{cfg.distinct_samples} at T 1", f">= {cfg.min_distinct}"),
            ("recovers", f"{result['recovery']:.3f} of slipped prefixes end right (greedy); the next line is a fix "
                         f"{result['fix_next']:.3f}", f">= {cfg.min_recovery}")]
    if "room" in result["gates"]:
        rows.append(("room", f"student / teacher pass@1 {result['student_over_teacher']:.3f}",
                     f"in [{cfg.room[0]}, {cfg.room[1]}]"))
    lines = [f"Gates of {result['teacher']} on {result['prompts']} ({result['n_prompts']} prompts)", "",
             "| gate | measured | goal | passed |", "|---|---|---|---|"]
    lines += [f"| {name} | {measured} | {goal} | {'yes' if result['gates'][name] else '**no**'} |"
              for name, measured, goal in rows]
    example = result["example_slip"].replace("\n", " / ")
    return "\n".join([*lines, "", f"A slipped prefix and the teacher's continuation: `{example}`", ""])


"""Trace curation: score every sample, filter, decontaminate, and report what each step removed.

Runs at the end of the generate stage, or alone on an existing traces dir:

    python -m pipeline curate --output_dir runs/demo/traces [--keep_correct_only true ...]

reads output_dir/samples, re-scores it in place (atomically) and writes
output_dir/curated (the training set) and output_dir/curation.json (the report). Run alone, it
keeps its own record beside generate's (curate.config.yaml, curate.run.json: pipeline/rundir.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from pipeline.config import UserError, config_to_dict, require, setting
from pipeline.prompts import PromptSource, load_prompts
from pipeline.traces import save_dataset
from pipeline.rundir import RunKeys, fingerprint, open_run

log = logging.getLogger(__name__)

SCORE_BATCH = 4096  # samples read and scored at a time
Verdict = Literal["correct", "wrong", "error", "timeout", "no_reference"]
ScorerName = Literal["math", "exact", "numeric", "choice", "regex"]


@dataclass
class ScoringConfig:
    """How answers are checked; shared by curation and the eval stage."""

    scorer: ScorerName | None = setting(None, help="how answers are checked: math, exact, numeric, choice, regex; "
                                                   "unset: the prompt set's (set.yaml), else math")
    answer_pattern: str | None = setting(None, help="regex scorer: group 1 of the last match is the answer")
    numeric_tolerance: float = setting(1e-6, help="numeric scorer: relative (and absolute) tolerance")
    choices: str = setting("ABCDE", help="choice scorer: the option letters")
    score_timeout: int = setting(5, help="seconds per sample (math-verify's own timeout)")
    score_workers: int = setting(2, help="scoring processes (math-verify's timeout needs a process's main thread)")

    def __post_init__(self) -> None:
        if self.scorer == "regex" and not self.answer_pattern:
            raise ValueError("scorer regex needs answer_pattern (a regex whose group 1 is the answer)")
        if self.answer_pattern:
            re.compile(self.answer_pattern)
        if self.score_workers < 1 or self.score_timeout < 1:
            raise ValueError("score_workers and score_timeout must be at least 1")


@dataclass
class CurateConfig(ScoringConfig):
    # Filters, applied in this order; each one's in/out counts go to the report.
    decontaminate_against: list[str] = setting([], help='drop prompts found in these prompt sets (eval sets), "path" '
                                                        'or "path:split" (split: test)')
    decontamination_ngram: int = setting(8, help="word n-grams that match a prompt to an eval prompt; shorter prompts "
                                                 "match only when identical")
    drop_truncated: bool = setting(True, help='drop samples cut by max_tokens (finish_reason == "length")')
    require_closed_think: bool = setting(False, help="drop samples whose think block is not closed (no think_end)")
    min_completion_tokens: int | None = setting(None, help="drop completions shorter than this many tokens; unset: "
                                                           "no minimum")
    max_completion_tokens: int | None = setting(None, help="drop completions longer than this many tokens; unset: "
                                                           "no maximum")
    keep_correct_only: bool = setting(False, help="rejection sampling: keep only samples the scorer finds correct")
    dedupe_completions: bool = setting(True, help="drop exact duplicate completions of one prompt")
    max_samples_per_prompt: int | None = setting(None, help="keep the first k per prompt (correct ones first); "
                                                            "unset: all")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decontamination_ngram < 1:
            raise ValueError("decontamination_ngram must be at least 1")


@dataclass
class CurateStageConfig(CurateConfig, RunKeys):
    output_dir: str | None = setting(None, help="a generate stage's output_dir: reads samples/, rescores it, "
                                                "writes curated/ and curation.json")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "output_dir", example="configs/curate.yaml")


FREE_KEYS = {"overwrite", "score_workers"}


def main(cfg: CurateStageConfig) -> Any:
    import datasets
    import yaml

    out = Path(cfg.output_dir)
    generated = out / "run.json"
    if not generated.is_file() or json.loads(generated.read_text()).get("status") != "complete":
        raise UserError(f"{out} holds no finished generate run (run.json): point output_dir at a generate stage's "
                        "output_dir, or finish it first with the same `make generate` command")
    run = open_run(cfg, "curate", {"traces": fingerprint(generated)}, FREE_KEYS, name="curate")
    if run.complete:
        log.info(f"{out}: curated by this config already, nothing to do")
        return datasets.load_from_disk(str(out / "samples"))
    made_by = yaml.safe_load((out / "config.yaml").read_text())
    scorer = cfg.scorer or set_scorer(made_by.get("prompt_set")) or "math"
    dataset = curate_traces(datasets.load_from_disk(str(out / "samples")), cfg, scorer, out, made_by.get("export", []))
    run.finish()
    return dataset


def set_scorer(prompt_set: str | None) -> str | None:
    spec = Path(prompt_set or "") / "set.yaml"
    if prompt_set and spec.is_file():
        import yaml
        return (yaml.safe_load(spec.read_text()) or {}).get("scorer")
    return None


def curate_traces(dataset: Any, cfg: CurateConfig, scorer: str, out: Path, export: list[str] = ()) -> Any:
    """Score `dataset`, save it as out/samples, filter it into out/curated; return the scored samples."""
    dataset = score_dataset(dataset, cfg, scorer)
    save_dataset(dataset, out / "samples", export)
    curated, report = filter_traces(dataset, cfg, contamination_index(cfg))
    report["scorer"] = scorer
    keys = {f.name for f in dataclasses.fields(CurateConfig)}  # what made curated/, wherever curation ran
    report["config"] = {k: v for k, v in config_to_dict(cfg).items() if k in keys}
    save_dataset(curated, out / "curated", export)
    (out / "curation.json").write_text(json.dumps(report, indent=2) + "\n")
    log_report(report)
    log.info(f"curated traces: {out / 'curated'}")
    return dataset


# ---------------------------------------------------------------------------- scoring

def score_dataset(dataset: Any, cfg: ScoringConfig, scorer: str) -> Any:
    """Add extracted_answer, verdict and correct columns (correct is null without a reference).
    Reads the texts batch by batch: the verdicts are small, the completions are not."""
    columns = dataset.select_columns(["completion", "think_closed", "reference_answer"])
    batches = ([(scored_text({"completion": c, "think_closed": closed}), reference)
                for c, closed, reference in zip(b["completion"], b["think_closed"], b["reference_answer"])]
               for b in columns.iter(batch_size=SCORE_BATCH))
    results = score_batches(batches, len(dataset), cfg, scorer)
    for column in ("extracted_answer", "verdict", "correct"):
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
    return (dataset.add_column("extracted_answer", [e for _, e in results])
            .add_column("verdict", [v for v, _ in results])
            .add_column("correct", [None if v == "no_reference" else v == "correct" for v, _ in results]))


def score_texts(texts: list[str], references: list[str | None], cfg: ScoringConfig,
                scorer: str) -> list[tuple[Verdict, str | None]]:
    """(verdict, extracted answer) per text."""
    return score_batches([list(zip(texts, references))], len(texts), cfg, scorer)


def score_batches(batches: Iterable[list[tuple[str, str | None]]], total: int, cfg: ScoringConfig,
                  scorer: str) -> list[tuple[Verdict, str | None]]:
    """(verdict, extracted answer) per (text, reference), scored in spawned processes: math-verify's
    timeout is a signal, which works only in a main thread, and forking a process that runs
    vLLM's threads is unsafe."""
    from tqdm.auto import tqdm

    results: list[tuple[Verdict, str | None]] = []
    with ProcessPoolExecutor(cfg.score_workers, mp_context=multiprocessing.get_context("spawn")) as pool, \
            tqdm(total=total, desc="score", unit="sample") as bar:
        for batch in batches:
            jobs = [(scorer, text, reference, _options(cfg)) for text, reference in batch]
            results += pool.map(score_one, jobs, chunksize=64)
            bar.update(len(jobs))
    return results


def scored_text(row: dict[str, Any], think_end: str = "</think>") -> str:
    """The part of a completion that holds the answer: after the think block when it closed."""
    text = row["completion"][0]["content"]
    return text.rsplit(think_end, 1)[-1] if row["think_closed"] else text


def _options(cfg: ScoringConfig) -> dict[str, Any]:
    return {"pattern": cfg.answer_pattern, "tolerance": cfg.numeric_tolerance,
            "choices": cfg.choices, "timeout": cfg.score_timeout}


def score_one(job: tuple[str, str, str | None, dict[str, Any]]) -> tuple[Verdict, str | None]:
    """(verdict, extracted answer) for one sample. Never raises: an error is a verdict."""
    scorer, text, reference, options = job
    if reference is None or not str(reference).strip():
        return "no_reference", None
    from math_verify.errors import TimeoutException
    try:
        correct, extracted = SCORERS[scorer](text, str(reference), options)
    except TimeoutException:
        return "timeout", None
    except Exception as err:  # a scorer bug or odd input must not end a long run
        return "error", f"{type(err).__name__}: {err}"[:200]
    return ("correct" if correct else "wrong"), extracted


def _math(text: str, reference: str, options: dict[str, Any]) -> tuple[bool, str | None]:
    from math_verify import parse, verify

    timeout = options["timeout"]
    # A bare reference such as \frac{1}{2} is LaTeX without delimiters: give it some.
    gold = parse(reference if "$" in reference or "\\boxed" in reference else f"${reference}$",
                 parsing_timeout=timeout, raise_on_error=True)
    pred = parse(text, parsing_timeout=timeout, raise_on_error=True)
    if not pred:
        return False, None
    # Gold first: verify is not symmetric.
    return verify(gold, pred, timeout_seconds=timeout, raise_on_error=True), str(pred[-1])


def _numeric(text: str, reference: str, options: dict[str, Any]) -> tuple[bool, str | None]:
    numbers = re.findall(r"-?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?", _boxed(text) or text)
    if not numbers:
        return False, None
    value, gold = float(numbers[-1].replace(",", "")), float(reference.replace(",", ""))
    return math.isclose(value, gold, rel_tol=options["tolerance"], abs_tol=options["tolerance"]), numbers[-1]


def _exact(text: str, reference: str, options: dict[str, Any]) -> tuple[bool, str | None]:
    answer = _boxed(text) or text
    return _normalize(answer) == _normalize(reference), answer.strip()


def _choice(text: str, reference: str, options: dict[str, Any]) -> tuple[bool, str | None]:
    letters = re.escape(options["choices"])
    boxed = _boxed(text)
    found = re.findall(rf"\b([{letters}])\b", boxed) if boxed else \
        re.findall(rf"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([{letters}])\)?\b", text, re.I) or \
        re.findall(rf"\(([{letters}])\)|\b([{letters}])\b", text)
    if not found:
        return False, None
    last = found[-1] if isinstance(found[-1], str) else next(g for g in found[-1] if g)
    return last.upper() == reference.strip().strip("()").upper(), last.upper()


def _regex(text: str, reference: str, options: dict[str, Any]) -> tuple[bool, str | None]:
    matches = list(re.finditer(options["pattern"], text))
    if not matches:
        return False, None
    answer = matches[-1].group(1) if matches[-1].groups() else matches[-1].group(0)
    return _normalize(answer) == _normalize(reference), answer


SCORERS = {"math": _math, "numeric": _numeric, "exact": _exact, "choice": _choice, "regex": _regex}


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _normalize(text: str) -> str:
    return " ".join(text.strip().rstrip(".").casefold().split())


# ---------------------------------------------------------------------------- filters

def contamination_index(cfg: CurateConfig) -> set[tuple[str, ...]]:
    """Word n-grams of every eval prompt (and the whole word sequence of short ones)."""
    index: set[tuple[str, ...]] = set()
    for entry in cfg.decontaminate_against:
        path, _, split = entry.partition(":")
        for p in load_prompts(PromptSource(prompt_set=path, split=split or "test")).prompts:
            index |= ngrams(p.problem, cfg.decontamination_ngram)
    return index


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def light_rows(dataset: Any) -> list[dict[str, Any]]:
    """What the filters read of each sample: small columns, and a digest of the completion."""
    columns = ["prompt_id", "problem", "temperature", "finish_reason", "think_closed", "completion_tokens",
               "correct", "verdict"]
    rows = []
    for batch in dataset.select_columns(columns + ["completion"]).iter(batch_size=SCORE_BATCH):
        for values in zip(*(batch[c] for c in columns), batch["completion"]):
            row = dict(zip(columns, values))
            row["completion_digest"] = hashlib.sha1(values[-1][0]["content"].encode()).digest()
            rows.append(row)
    return rows


def filter_traces(dataset: Any, cfg: CurateConfig, eval_ngrams: set[tuple[str, ...]]) -> tuple[Any, dict[str, Any]]:
    """Apply the enabled filters in order; return the kept rows and the report."""
    rows = light_rows(dataset)
    contaminated = sorted({r["prompt_id"] for r in rows if eval_ngrams & ngrams(r["problem"], cfg.decontamination_ngram)})

    def first_k(kept: list[int]) -> list[int]:
        by_prompt: dict[str, list[int]] = {}
        for i in sorted(kept, key=lambda i: not rows[i]["correct"]):  # correct ones first, then in order
            by_prompt.setdefault(rows[i]["prompt_id"], []).append(i)
        chosen = {i for group in by_prompt.values() for i in group[: cfg.max_samples_per_prompt]}
        return [i for i in kept if i in chosen]

    def dedupe(kept: list[int]) -> list[int]:
        seen, out = set(), []
        for i in kept:
            key = (rows[i]["prompt_id"], rows[i]["completion_digest"])
            if key not in seen:
                seen.add(key)
                out.append(i)
        return out

    def where(test):
        return lambda kept: [i for i in kept if test(rows[i])]

    steps = [
        ("decontaminate", bool(cfg.decontaminate_against), where(lambda r: r["prompt_id"] not in contaminated)),
        ("drop_truncated", cfg.drop_truncated, where(lambda r: r["finish_reason"] != "length")),
        ("require_closed_think", cfg.require_closed_think, where(lambda r: r["think_closed"])),
        ("min_completion_tokens", cfg.min_completion_tokens is not None,
         where(lambda r: r["completion_tokens"] >= cfg.min_completion_tokens)),
        ("max_completion_tokens", cfg.max_completion_tokens is not None,
         where(lambda r: r["completion_tokens"] <= cfg.max_completion_tokens)),
        ("keep_correct_only", cfg.keep_correct_only, where(lambda r: r["correct"] is True)),
        ("dedupe_completions", cfg.dedupe_completions, dedupe),
        ("max_samples_per_prompt", cfg.max_samples_per_prompt is not None, first_k),
    ]
    kept = list(range(len(rows)))
    report_steps = []
    for name, enabled, step in steps:
        if not enabled:
            continue
        after = step(kept)
        report_steps.append({"filter": name, "in": len(kept), "out": len(after),
                             "per_temperature": {t: {"in": _count(rows, kept, t), "out": _count(rows, after, t)}
                                                 for t in _temperatures(rows)}})
        kept = after

    verdicts: dict[str, int] = {}
    for r in rows:
        verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
    report = {
        "samples_in": len(rows),
        "samples_out": len(kept),
        "verdicts": verdicts,
        "accuracy_per_temperature": {t: _accuracy(rows, t) for t in _temperatures(rows)},
        "filters": report_steps,
        "contaminated_prompt_ids": contaminated,
    }
    return dataset.select(kept), report


def _temperatures(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({str(r["temperature"]) for r in rows}, key=float)


def _count(rows: list[dict[str, Any]], indices: list[int], temperature: str) -> int:
    return sum(str(rows[i]["temperature"]) == temperature for i in indices)


def _accuracy(rows: list[dict[str, Any]], temperature: str) -> float | None:
    scored = [r["correct"] for r in rows if str(r["temperature"]) == temperature and r["correct"] is not None]
    return sum(scored) / len(scored) if scored else None


def log_report(report: dict[str, Any]) -> None:
    temps = list(report["accuracy_per_temperature"])
    log.info(f"\ncuration: {report['samples_in']} samples in, {report['samples_out']} kept; verdicts {report['verdicts']}")
    log.info(f"{'filter':<24}{'in':>8}{'out':>8}" + "".join(f"{'T=' + t:>14}" for t in temps))
    for step in report["filters"]:
        cells = "".join(f"{step['per_temperature'][t]['in']:>7}->{step['per_temperature'][t]['out']:<6}" for t in temps)
        log.info(f"{step['filter']:<24}{step['in']:>8}{step['out']:>8}{cells}")
    if report["contaminated_prompt_ids"]:
        log.info(f"contaminated prompts dropped: {', '.join(report['contaminated_prompt_ids'][:10])}"
                 + (" ..." if len(report["contaminated_prompt_ids"]) > 10 else ""))

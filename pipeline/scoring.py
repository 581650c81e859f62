"""Scoring: each sample's answer checked against its prompt's reference, by the scorer a prompt
set names (math, exact, numeric, choice, regex); and the metrics eval reports from the verdicts.
Used by curation (pipeline/curation.py) and the eval stage."""

from __future__ import annotations

import math
import multiprocessing
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from pipeline.config import setting

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


# ---------------------------------------------------------------------------- metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], verdicts: list[str]) -> bool:
    """maj@k: the most frequent extracted answer (first seen wins ties) is a correct one. Only
    scored samples vote: an "error" or "timeout" sample's answer is its error message, and a few
    samples failing alike must not outvote a correct answer."""
    voters = [(a, v) for a, v in zip(answers, verdicts) if a is not None and v in ("correct", "wrong")]
    votes = Counter(a for a, _ in voters)
    if not votes:
        return False
    top = votes.most_common(1)[0][0]
    return next(v == "correct" for a, v in voters if a == top)


def metrics(rows: list[dict[str, Any]], k: int) -> dict[str, Any]:
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    per_prompt = [sum(r["correct"] for r in group) / len(group) for group in by_prompt.values()]
    n = len(per_prompt)
    mean = sum(per_prompt) / n if n else 0.0
    # 95% interval over prompts (the sampling unit): normal approximation of the mean.
    sd = math.sqrt(sum((p - mean) ** 2 for p in per_prompt) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n) if n else 0.0
    return {
        "prompts": n,
        "samples": len(rows),
        "pass@1": mean,
        "pass@1_ci95": [max(0.0, mean - half), min(1.0, mean + half)],
        f"pass@{k}": sum(pass_at_k(len(g), sum(r["correct"] for r in g), k) for g in by_prompt.values()) / max(n, 1),
        f"maj@{k}": sum(majority_correct([r["extracted_answer"] for r in g], [r["verdict"] for r in g])
                        for g in by_prompt.values()) / max(n, 1),
        "share_truncated": sum(r["finish_reason"] == "length" for r in rows) / max(len(rows), 1),
        "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / max(len(rows), 1),
        "verdicts": dict(Counter(r["verdict"] for r in rows)),
    }

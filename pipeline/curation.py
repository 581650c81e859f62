"""Trace curation: score every sample, filter, decontaminate, and report what each step removed.

Run inline by the generate stage, and alone by the curate stage on an existing traces dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import config_to_dict, setting
from pipeline.prompts import PromptSource, load_prompts
from pipeline.scoring import SCORE_BATCH, ScoringConfig, score_dataset
from pipeline.traces import save_dataset

log = logging.getLogger(__name__)


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
    drop_unclean_text: bool = setting(True, help="drop completions that are not clean text (U+FFFD: sampled bytes "
                                                 "that are not valid UTF-8), before the other filters; TRL's "
                                                 "cross-tokenizer alignment stops on some of them")
    max_samples_per_prompt: int | None = setting(None, help="keep the first k per prompt (correct ones first); "
                                                            "unset: all")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decontamination_ngram < 1:
            raise ValueError("decontamination_ngram must be at least 1")


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
            content = values[-1][0]["content"]
            row["completion_digest"] = hashlib.sha1(content.encode()).digest()
            row["unclean"] = unclean_reason(content)
            rows.append(row)
    return rows


# Why a completion is not clean text; such samples are dropped before the filters (drop_unclean_text,
# on by default): one bad sample must not stop a later stage (TRL's cross-tokenizer alignment raises on it).
UNCLEAN_REASONS = {
    "replacement_char": "contains U+FFFD (the teacher sampled bytes that are not valid UTF-8)",
}


def unclean_reason(text: str) -> str | None:
    """The UNCLEAN_REASONS key that applies to `text`, or None when it is clean."""
    if "\ufffd" in text:
        return "replacement_char"
    return None


def filter_traces(dataset: Any, cfg: CurateConfig, eval_ngrams: set[tuple[str, ...]]) -> tuple[Any, dict[str, Any]]:
    """Apply the enabled filters in order; return the kept rows and the report."""
    rows = light_rows(dataset)
    n = cfg.decontamination_ngram
    contaminated = sorted({r["prompt_id"] for r in rows if eval_ngrams & ngrams(r["problem"], n)})

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
    unclean: dict[str, int] = {}
    for r in rows:
        if r["unclean"]:
            unclean[r["unclean"]] = unclean.get(r["unclean"], 0) + 1
    found = sum(unclean.values())
    kept = [i for i, r in enumerate(rows) if not (cfg.drop_unclean_text and r["unclean"])]
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
        "unclean_text": {"found": found, "dropped": found if cfg.drop_unclean_text else 0,
                         "reasons": {k: {"count": n, "why": UNCLEAN_REASONS[k]} for k, n in sorted(unclean.items())},
                         "prompt_ids": sorted({r["prompt_id"] for r in rows if r["unclean"]})},
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
    log.info(f"\ncuration: {report['samples_in']} samples in, {report['samples_out']} kept; "
             f"verdicts {report['verdicts']}")
    log.info(f"{'filter':<24}{'in':>8}{'out':>8}" + "".join(f"{'T=' + t:>14}" for t in temps))
    for step in report["filters"]:
        cells = "".join(f"{step['per_temperature'][t]['in']:>7}->{step['per_temperature'][t]['out']:<6}" for t in temps)
        log.info(f"{step['filter']:<24}{step['in']:>8}{step['out']:>8}{cells}")
    unclean = report.get("unclean_text", {})
    if unclean.get("dropped"):
        reasons = ", ".join(f"{n['count']} {n['why']}" for n in unclean["reasons"].values())
        log.warning(f"dropped {unclean['dropped']} completion(s) that are not clean text before the filters: {reasons}")
    if report["contaminated_prompt_ids"]:
        log.info(f"contaminated prompts dropped: {', '.join(report['contaminated_prompt_ids'][:10])}"
                 + (" ..." if len(report["contaminated_prompt_ids"]) > 10 else ""))

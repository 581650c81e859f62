"""Curation drops completions that are not clean text, before every filter, and says how many and why."""

from __future__ import annotations

import datasets

from pipeline.curation import CurateConfig, filter_traces


def row(pid: str, content: str) -> dict:
    return {"prompt_id": pid, "problem": f"Problem {pid}", "temperature": 1.0, "finish_reason": "stop",
            "think_closed": True, "completion_tokens": 20, "completion": [{"role": "assistant", "content": content}],
            "verdict": "wrong", "correct": False}


def test_a_completion_with_u_fffd_is_dropped_and_reported_with_the_other_filters_off() -> None:
    rows = [row("a", "<think>fine</think>4"), row("a", "<think>bytes \ufffd\ufffd</think>4"),
            row("b", "naïve 東京 ok"), row("c", "\ufffd")]
    cfg = CurateConfig(drop_truncated=False, dedupe_completions=False)
    kept, report = filter_traces(datasets.Dataset.from_list(rows), cfg, set())
    assert [r["completion"][0]["content"] for r in kept] == ["<think>fine</think>4", "naïve 東京 ok"]
    assert report["samples_in"] == 4 and report["samples_out"] == 2 and report["filters"] == []
    assert report["unclean_text"]["dropped"] == 2 and report["unclean_text"]["prompt_ids"] == ["a", "c"]
    assert report["unclean_text"]["reasons"]["replacement_char"]["count"] == 2
    assert "U+FFFD" in report["unclean_text"]["reasons"]["replacement_char"]["why"]
    # Off (a random test teacher samples them everywhere): kept, still counted.
    kept, report = filter_traces(datasets.Dataset.from_list(rows), CurateConfig(
        drop_truncated=False, dedupe_completions=False, drop_unclean_text=False), set())
    assert len(kept) == 4 and report["unclean_text"]["found"] == 2 and report["unclean_text"]["dropped"] == 0


def test_clean_text_passes_untouched() -> None:
    kept, report = filter_traces(datasets.Dataset.from_list([row("a", "x"), row("b", "y")]), CurateConfig(), set())
    assert len(kept) == 2 and report["unclean_text"] == {"found": 0, "dropped": 0, "reasons": {},
                                                   "prompt_ids": []}

"""Trace curation: score every sample, filter, decontaminate, and report what each step removed.

The generate stage curates inline (pipeline/curation.py); this stage curates an existing traces dir again:

    python -m pipeline curate --output_dir runs/demo/traces [--keep_correct_only true ...]

reads output_dir/samples, re-scores it in place (atomically) and writes
output_dir/curated (the training set) and output_dir/curation.json (the report). Run alone, it
keeps its own record beside generate's (curate.config.yaml, curate.run.json: pipeline/rundir.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline.config import UserError, require, setting
from pipeline.curation import CurateConfig, curate_traces
from pipeline.reports import traces_card, write_atomic
from pipeline.rundir import RunKeys, fingerprint, open_run

log = logging.getLogger(__name__)


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
    # The dataset card names curation's counts: write it again (README.md is in no fingerprint).
    write_atomic(out / "README.md", traces_card(SimpleNamespace(**{**made_by, "output_dir": str(out)}),
                                                 dataset.features))
    run.finish()
    return dataset


def set_scorer(prompt_set: str | None) -> str | None:
    spec = Path(prompt_set or "") / "set.yaml"
    if prompt_set and spec.is_file():
        import yaml
        return (yaml.safe_load(spec.read_text()) or {}).get("scorer")
    return None

"""The generate stage: a vLLM teacher samples reasoning traces into a Hugging Face dataset.

Every (prompt id, temperature, sample index) is one seeded vLLM request; `data_parallel_size`
engine replicas split the prompts; samples go to shards as they finish, so a killed run started
again with the same command samples only what no shard holds (the sampling service:
pipeline/inference/sampling.py, whose `TracesConfig` holds this stage's keys). Then every sample is
scored, filtered and decontaminated (pipeline/curation.py).

    output_dir/config.yaml, run.json   the resolved config and the record (pipeline/rundir.py): a
                                   rerun that would sample differently is refused, a finished one reused
    output_dir/shards/*.parquet    finished work, for resume (shard-r<replica>-<n>)
    output_dir/samples/            every sample, scored (datasets.save_to_disk), TRL prompt-completion
    output_dir/curated/            the samples the curation filters kept: the training set
    output_dir/{samples,curated}.{jsonl,parquet,messages.jsonl}   exports
    output_dir/curation.json       what each filter removed, overall and per temperature
    output_dir/skipped.jsonl       prompts too long for the model's context
    output_dir/summary.json        counts, tokens, tokens/s, share truncated
    output_dir/README.md           the dataset card (hub metadata, sampling, curation, columns: docs/cards.md)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import require
from pipeline.curation import curate_traces
from pipeline.inference.sampling import TRACES_FREE_KEYS, TracesConfig, run_traces, traces_inputs
from pipeline.prompts import load_prompts
from pipeline.reports import traces_card, write_atomic

# Keys that change how fast samples come, not what is sampled: a resume may change them (after an
# out-of-memory, say). Every other key is a result key (pipeline/rundir.py); curation's too, since
# they make curated/ (to filter again, run the curate stage: it keeps its own record).
FREE_KEYS = TRACES_FREE_KEYS


@dataclass
class GenerateConfig(TracesConfig):
    """The keys of a traces run (pipeline/inference/sampling.py): the teacher, the prompts, the
    sampling, the engine, curation and the output."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "output_dir", "model", "prompt_set", example="configs/generate.yaml")


def main(cfg: GenerateConfig) -> Any:
    return generate(cfg)


def generate(cfg: GenerateConfig, llm: Any = None) -> Any:
    """Sample every missing (prompt, temperature, sample); save and return the scored dataset.

    `llm` is an engine to reuse (tests, benchmarks): then everything runs here, on it. Without
    one, `data_parallel_size` replicas are started after the prompts and the output dir have
    been checked, so bad input fails in seconds."""
    prompt_set = load_prompts(cfg)
    scorer = cfg.scorer or prompt_set.scorer or "math"

    def curate(dataset: Any) -> None:  # scored into samples/, filtered into curated/
        curate_traces(dataset, cfg, scorer, Path(cfg.output_dir), cfg.export)

    # The run's record (pipeline/rundir.py) is the traces run's: FREE_KEYS and inputs(cfg) below.
    dataset = run_traces(cfg, prompt_set.prompts, llm, keep=curate if cfg.curate else None)
    # README.md is in no fingerprint (pipeline/rundir.py): the card changes no run that reads the traces
    write_atomic(Path(cfg.output_dir) / "README.md", traces_card(cfg, dataset.features))
    return dataset


def inputs(cfg: GenerateConfig) -> dict[str, Any]:
    """Fingerprints of what the run reads (pipeline/rundir.py): the teacher, the prompts and the
    sets curation decontaminates against."""
    return traces_inputs(cfg)

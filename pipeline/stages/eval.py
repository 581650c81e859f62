"""The eval stage: score teacher, baseline and students on held-out prompts.

Each model samples k completions per prompt at one temperature (greedy at 0), every sample is
scored, and per model: mean pass@1 over the k samples with a 95% confidence interval, unbiased
pass@k, maj@k (cons@k), share truncated, mean completion tokens. Two backends:

- vllm: a traces run per model, as the generate stage's (pipeline/inference/sampling.py: seeded per
  sample, resumable), `data_parallel_size` engine replicas (local processes, or Ray actors with `ray_address`);
- transformers: HF generate, prompts split across `accelerate launch` processes and gathered
  (pipeline/inference/hf.py).

An entry `name=a+b+c` is an ensemble: its members' mean probabilities, by its own KV-cached loop under
either backend (pipeline/inference/hf.py). The metrics are pipeline/scoring.py's.

    output_dir/config.yaml, run.json  the resolved config and the record (pipeline/rundir.py); `models`
                                      may change between runs, the protocol may not
    output_dir/generations/<model>/   each model's samples, a run of its own (run.json): reused by a rerun
                                      with the same protocol and the same model files (a model retrained
                                      in place is refused until --overwrite)
    output_dir/samples.jsonl          every sample with its score, all models (recompute any metric)
    output_dir/report.json, report.md, accuracy.png

With `write_cards`, each evaluated model whose README.md is a card r1-distill wrote (a student of
sft or onpolicy) gains this eval's results (pipeline/reports.py write_eval_cards, docs/cards.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import UserError, require, setting
from pipeline.inference.engine import EngineConfig
from pipeline.inference.hf import (
    ensemble_members,
    release_processes,
    sample_ensemble,
    sample_transformers,
    shared_tokenizer,
)
from pipeline.inference.sampling import SamplingKeys, TracesConfig, run_traces
from pipeline.prompts import PromptSource, load_prompts
from pipeline.reports import plot, report_markdown, write_eval_cards
from pipeline.rundir import RunKeys, fingerprint, open_run, prompt_set_fingerprint
from pipeline.scoring import ScoringConfig, metrics, score_texts, scored_text
from pipeline.traces import save_dataset

log = logging.getLogger(__name__)
# Keys that change how fast samples come, never what they are (as generate's), and the models:
# adding one samples only it, the others' samples are reused (each model's dir has its own record).
FREE_KEYS = {"overwrite", "models", "gpu_memory_utilization", "max_num_seqs", "enforce_eager", "in_process",
             "data_parallel_size", "ray_address", "enable_prefix_caching", "enable_chunked_prefill",
             "distributed_executor_backend", "score_workers",
             "write_cards"}  # README.md is in no fingerprint: writing scores there changes no model


@dataclass
class EvalConfig(SamplingKeys, ScoringConfig, EngineConfig, PromptSource, RunKeys):
    output_dir: str | None = setting(None, help="where the report, each model's samples and the resolved config "
                                                "are written")
    split: str = setting("test", help="split of the prompt set: held-out prompts")
    # An ensemble's models ("name=a+b+c") must share one tokenizer.
    models: list[str] = setting([], help='"name=path" (a local path or hub id; a bare path is named after its last '
                                         'folder); "name=a+b+c": an ensemble')
    backend: Literal["vllm", "transformers"] = setting("vllm", help="vllm, or transformers (multi-process through "
                                                                    "accelerate)")
    num_samples: int = setting(4, help="k samples per prompt (pass@1 is their mean)")
    temperature: float = setting(0.6, help="sampling temperature (0.6: DeepSeek-R1's protocol); 0 is greedy "
                                           "(then k is 1)")
    max_tokens: int = setting(1024, help="completion budget per sample, in tokens")
    think_end: str = setting("</think>", help="the tag that closes the reasoning; the answer is scored after it")
    write_cards: bool = setting(False, help="write the results into each evaluated model's card (README.md) that "
                                            "r1-distill wrote: local dirs only, never a git-tracked card "
                                            "(docs/cards.md)")

    def __post_init__(self) -> None:
        ScoringConfig.__post_init__(self)
        EngineConfig.__post_init__(self)
        PromptSource.__post_init__(self)
        SamplingKeys.__post_init__(self)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0:
            self.num_samples = 1  # greedy samples are all the same
        names = [name for name, _ in self.model_list()]
        if len(set(names)) != len(names):
            raise ValueError(f"models have repeated names {names}: write them as name=path")
        require(self, "output_dir", "models", "prompt_set", example="configs/eval.yaml")

    def model_list(self) -> list[tuple[str, str]]:
        pairs = [m.split("=", 1) if "=" in m else ["+".join(Path(p.rstrip("/")).name for p in ensemble_members(m)), m]
                 for m in self.models]
        return [(name, path) for name, path in pairs]


def main(cfg: EvalConfig) -> dict[str, Any]:
    if cfg.backend == "vllm" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("backend vllm splits the prompts over its own engine replicas: run it as one process "
                        "with --data_parallel_size N (and --ray_address for several machines), not under "
                        "accelerate launch / NUM_PROCESSES (that is for backend transformers)")
    prompt_set = load_prompts(cfg, require_answers=True)
    for name, path in cfg.model_list():
        members = ensemble_members(path)
        for member in members:
            local = Path(member).exists() or member.startswith((".", "/")) or member.count("/") != 1
            made = any((Path(member) / f).is_file() for f in ("config.json", "adapter_config.json"))
            if local and not made:  # missing, or a training run not finished yet
                raise UserError(f"model {name}: {member} does not exist or holds no model yet (config.json): the "
                                "demo's student-sft is made by `make sft`, student-init by `make sft` or `make demo` "
                                "(or name a local model dir or a hub id owner/name)")
        if len(members) > 1:
            shared_tokenizer(members)  # refused now, not after the other models are sampled
    out = Path(cfg.output_dir)
    run = open_run(cfg, "eval", {"prompt_set": prompt_set_fingerprint(cfg.prompt_set)}, FREE_KEYS, reuse=False)
    is_main = run.is_main

    samples, skipped = [], {}
    fingerprints = {name: model_fingerprint(path) for name, path in cfg.model_list()}
    for name, path in cfg.model_list():
        rows = sample_model(cfg, name, path, fingerprints[name], prompt_set.prompts, out / "generations" / name)
        if is_main:
            samples += [{"model": name, **r} for r in rows]
            skipped[name] = _skipped_ids(out / "generations" / name / "skipped.jsonl")
    if cfg.backend == "transformers":
        release_processes()  # the last collective is done
    if not is_main:
        return {}
    # A prompt one model could not take would make the others' scores incomparable to its own.
    samples, n_prompts = common_prompts(samples, skipped)

    scorer = cfg.scorer or prompt_set.scorer or "math"
    texts = [scored_text(r, cfg.think_end) for r in samples]
    references = [r["reference_answer"] for r in samples]
    for r, (verdict, extracted) in zip(samples, score_texts(texts, references, cfg, scorer)):
        r.update(verdict=verdict, extracted_answer=extracted, correct=verdict == "correct")
    (out / "samples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))

    report = {"protocol": {**protocol(cfg, scorer, prompt_set.source, n_prompts), "model_fingerprints": fingerprints},
              "models": {name: {**metrics([r for r in samples if r["model"] == name], cfg.num_samples),
                                "skipped_too_long": skipped[name]}
                         for name, _ in cfg.model_list()}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    plot(report, out / "accuracy.png")
    if cfg.write_cards:
        write_eval_cards(report)
    run.finish(config=cfg, inputs=inputs(cfg))
    log.info(report_markdown(report))
    log.info(f"report: {out / 'report.md'}, plot: {out / 'accuracy.png'}, samples: {out / 'samples.jsonl'}")
    return report


def inputs(cfg: EvalConfig) -> dict[str, Any]:
    """Fingerprints of what the report was made from (pipeline/rundir.py). A rerun compares only the
    prompt set: models may come and go, each model's own dir compares its model's files."""
    return {"prompt_set": prompt_set_fingerprint(cfg.prompt_set),
            "models": {name: model_fingerprint(path) for name, path in cfg.model_list()}}


# ---------------------------------------------------------------------------- sampling

def sample_model(cfg: EvalConfig, name: str, path: str, model_files: str, prompts: list,
                 out: Path) -> list[dict[str, Any]]:
    """The model's k samples per prompt as records. `out` is a run of its own (pipeline/rundir.py):
    finished by this protocol from these very model files, it is reused; unfinished, resumed."""
    import datasets

    members = ensemble_members(path)
    if cfg.backend == "vllm" and len(members) == 1:
        # a traces run, curation off: seeded per sample, resumable, skips over-long prompts, and splits the
        # prompts over `data_parallel_size` replicas, which start and stop with it
        return run_traces(generate_config(cfg, path, out), prompts).to_list()
    own = dataclasses.replace(cfg, models=[f"{name}={path}"], output_dir=str(out), overwrite=False)
    run = open_run(own, "eval-samples", {"model": model_files}, FREE_KEYS - {"models"})
    if run.complete:
        log.info(f"{name}: reusing {out / 'samples'}")
        return datasets.load_from_disk(str(out / "samples")).to_list()
    # neither vLLM nor HF generate can average models: an ensemble has its own loop
    sample = sample_ensemble if len(members) > 1 else sample_transformers
    rows = sample(cfg, members if len(members) > 1 else path, prompts, cfg.temperature, cfg.dtype)
    if rows is not None:
        save_dataset(datasets.Dataset.from_list(rows), out / "samples")
    run.finish()
    return rows or []


def model_fingerprint(path: str) -> str:
    """What the model at `path` is (pipeline/rundir.py fingerprint); an ensemble a+b is the hash of
    its members' fingerprints, in order."""
    members = ensemble_members(path)
    if len(members) > 1:
        return "sha256:" + hashlib.sha256(json.dumps([fingerprint(m) for m in members]).encode()).hexdigest()
    return fingerprint(path)


def generate_config(cfg: EvalConfig, path: str, out: Path) -> TracesConfig:
    """The traces run that samples `path` under this eval's protocol and engine keys: the generate
    stage's keys, so that `out` is a generate run (its config.yaml loads as one)."""
    shared = {f.name: getattr(cfg, f.name)
              for keys in (SamplingKeys, ScoringConfig, EngineConfig, PromptSource) for f in dataclasses.fields(keys)}
    return TracesConfig(**shared, model=path, output_dir=str(out), temperatures=[cfg.temperature], curate=False,
                        export=[])


def _skipped_ids(path: Path) -> list[str]:
    """Ids of the prompts a traces run set aside as too long (vllm backend only)."""
    if not path.is_file():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def common_prompts(samples: list[dict[str, Any]], skipped: dict[str, list[str]]) -> tuple[list[dict[str, Any]], int]:
    """The samples of the prompts every model took, and how many such prompts there are: a prompt
    that any model skipped (or has no samples for) is dropped from every model's rows."""
    taken = [{r["prompt_id"] for r in samples if r["model"] == name} for name in skipped]
    common = set.intersection(*taken) - set().union(*skipped.values()) if taken else set()
    return [r for r in samples if r["prompt_id"] in common], len(common)


# ---------------------------------------------------------------------------- report

def protocol(cfg: EvalConfig, scorer: str, source: str, n_prompts: int) -> dict[str, Any]:
    return {"prompts": source, "split": cfg.split, "n_prompts": n_prompts, "k": cfg.num_samples,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "seed": cfg.seed,
            "scorer": scorer, "backend": cfg.backend, "models": dict(cfg.model_list())}

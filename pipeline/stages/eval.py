"""The eval stage: score teacher, baseline and students on held-out prompts.

Each model samples k completions per prompt at one temperature (greedy at 0), every sample is
scored, and per model: mean pass@1 over the k samples with a 95% confidence interval, unbiased
pass@k, maj@k (cons@k), share truncated, mean completion tokens. Two backends:

- vllm: the generate stage itself (seeded per sample, resumable), `data_parallel_size` engine
  replicas per model (local processes, or Ray actors with `ray_address`);
- transformers: HF generate, prompts split across `accelerate launch` processes and gathered.

An entry `name=a+b+c` is an ensemble: its members' mean probabilities, by its own KV-cached loop under either backend.

    output_dir/config.yaml, run.json  the resolved config and the record (pipeline/rundir.py); `models`
                                      may change between runs, the protocol may not
    output_dir/generations/<model>/   each model's samples, a run of its own (run.json): reused by a rerun
                                      with the same protocol and the same model files (a model retrained
                                      in place is refused until --overwrite)
    output_dir/samples.jsonl          every sample with its score, all models (recompute any metric)
    output_dir/report.json, report.md, accuracy.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import UserError, config_to_dict, require, setting
from pipeline.stages.curate import ScoringConfig, score_texts, scored_text
from pipeline.inference.engine import EngineConfig
from pipeline.stages.generate import GenerateConfig, check_sampling, generate, sample_seed, split_think
from pipeline.prompts import Prompt, PromptSource, chat_prompt, load_prompts, render
from pipeline.traces import save_dataset
from pipeline.rundir import RunKeys, fingerprint, open_run, prompt_set_fingerprint

log = logging.getLogger(__name__)
# Keys that change how fast samples come, never what they are (as generate's), and the models:
# adding one samples only it, the others' samples are reused (each model's dir has its own record).
FREE_KEYS = {"overwrite", "models", "gpu_memory_utilization", "max_num_seqs", "enforce_eager", "in_process",
             "data_parallel_size", "ray_address", "enable_prefix_caching", "enable_chunked_prefill",
             "distributed_executor_backend", "score_workers"}


@dataclass
class EvalConfig(ScoringConfig, EngineConfig, PromptSource, RunKeys):
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
    top_p: float = setting(0.95, help="nucleus sampling: the share of probability mass sampled from")
    max_tokens: int = setting(1024, help="completion budget per sample, in tokens")
    seed: int = setting(0, help="base of the per-sample seeds")
    think_start: str = setting("<think>", help="the tag that opens the reasoning in a completion")
    think_end: str = setting("</think>", help="the tag that closes the reasoning; the answer is scored after it")

    def __post_init__(self) -> None:
        ScoringConfig.__post_init__(self)
        EngineConfig.__post_init__(self)
        PromptSource.__post_init__(self)
        check_sampling(self)
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


def ensemble_members(path: str) -> list[str]:
    """The models of an ensemble entry "a+b+c"; [path] for one model (also a local path that
    exists as written, "+" and all)."""
    return [path] if "+" not in path or Path(path).exists() else path.split("+")


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
        # The last collective is done. Under N processes the gloo group goes now: left to the
        # interpreter's teardown (rank 1 exits while rank 0 scores) it can abort the process
        # ("terminate called without an active exception"), which fails the launch.
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        if state.num_processes > 1:
            state.destroy_process_group()
    if not is_main:
        return {}
    # A prompt one model could not take would make the others' scores incomparable to its own.
    samples, n_prompts = common_prompts(samples, skipped)

    scorer = cfg.scorer or prompt_set.scorer or "math"
    texts = [scored_text(r, cfg.think_end) for r in samples]
    for r, (verdict, extracted) in zip(samples, score_texts(texts, [r["reference_answer"] for r in samples], cfg, scorer)):
        r.update(verdict=verdict, extracted_answer=extracted, correct=verdict == "correct")
    (out / "samples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))

    report = {"protocol": {**protocol(cfg, scorer, prompt_set.source, n_prompts), "model_fingerprints": fingerprints},
              "models": {name: {**metrics([r for r in samples if r["model"] == name], cfg.num_samples),
                                "skipped_too_long": skipped[name]}
                         for name, _ in cfg.model_list()}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    plot(report, out / "accuracy.png")
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
    members = ensemble_members(path)
    if cfg.backend == "vllm" and len(members) == 1:
        return _sample_vllm(cfg, path, out)  # the generate stage, whose record `out` holds
    own = dataclasses.replace(cfg, models=[f"{name}={path}"], output_dir=str(out), overwrite=False)
    run = open_run(own, "eval-samples", {"model": model_files}, FREE_KEYS - {"models"})
    if run.complete:
        import datasets
        log.info(f"{name}: reusing {out / 'samples'}")
        return datasets.load_from_disk(str(out / "samples")).to_list()
    # neither vLLM nor HF generate can average models: an ensemble has its own loop
    rows = _sample_ensemble(cfg, members, prompts) if len(members) > 1 else _sample_transformers(cfg, path, prompts)
    if rows is not None:
        import datasets
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


def _sample_vllm(cfg: EvalConfig, path: str, out: Path) -> list[dict[str, Any]]:
    """The generate stage, curation off: seeded per sample, resumable, skips over-long prompts, and
    splits the prompts over `data_parallel_size` replicas (local processes or Ray actors)."""
    return generate(generate_config(cfg, path, out)).to_list()  # its replicas start and stop with it


def generate_config(cfg: EvalConfig, path: str, out: Path) -> GenerateConfig:
    """The generate stage's config that samples `path` under this eval's protocol and engine keys."""
    shared = {k: v for k, v in config_to_dict(cfg).items() if k in GenerateConfig.__dataclass_fields__}
    return GenerateConfig(**{**shared, "model": path, "output_dir": str(out), "temperatures": [cfg.temperature],
                             "curate": False, "export": []})


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
    stop_ids = _stop_ids(tokenizer, [model])
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
            rows += _completion_rows(cfg, tokenizer, prompt, output[:, ids["input_ids"].shape[1]:].tolist(), stop_ids)
    rows = gather_object(rows)
    return rows if state.is_main_process else None


def _sample_ensemble(cfg: EvalConfig, paths: list[str], prompts: list) -> list[dict[str, Any]] | None:
    """The members' mean next-token distribution (ensemble_next_token_probs), sampled token by
    token, each member with its own KV cache. As in _sample_transformers: the k samples of a prompt
    decode as one batch (num_return_sequences), seeded per prompt, prompts split across processes."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    state = PartialState(cpu=not torch.cuda.is_available())
    tokenizer = shared_tokenizer(paths)
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=_torch_dtype(cfg.dtype)).to(state.device).eval()
              for p in paths]
    stop_ids = _stop_ids(tokenizer, models)
    stop = torch.tensor(sorted(stop_ids), device=state.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    rows = []
    with state.split_between_processes(prompts) as mine, torch.no_grad():
        for prompt in tqdm(mine, desc=f"sample ensemble of {len(paths)}", disable=not state.is_main_process):
            ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
            inputs = ids.to(state.device).repeat(cfg.num_samples, 1)
            generator = torch.Generator(state.device).manual_seed(sample_seed(cfg.seed, prompt.id, cfg.temperature, 0))
            caches: list[Any] = [None] * len(models)
            ended = torch.zeros(cfg.num_samples, dtype=torch.bool, device=state.device)
            tokens = []
            for _ in range(cfg.max_tokens):
                outputs = [model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
                           for model, cache in zip(models, caches)]
                caches = [o.past_key_values for o in outputs]
                probs = ensemble_next_token_probs([o.logits[:, -1] for o in outputs], cfg.temperature, cfg.top_p,
                                                  len(tokenizer))
                token = (probs.argmax(-1) if cfg.temperature == 0
                         else torch.multinomial(probs, 1, generator=generator).squeeze(-1))
                token = token.masked_fill(ended, pad)  # an ended sequence only pads, as in HF generate
                tokens.append(token)
                ended |= torch.isin(token, stop)
                if ended.all():
                    break
                inputs = token[:, None]
            rows += _completion_rows(cfg, tokenizer, prompt, torch.stack(tokens, 1).tolist(), stop_ids)
    rows = gather_object(rows)
    return rows if state.is_main_process else None


def ensemble_next_token_probs(logits: list[Any], temperature: float, top_p: float, vocab_size: int) -> Any:
    """Next-token probabilities of an ensemble: the mean over members of softmax(logits /
    temperature), each cut to the tokenizer's `vocab_size` (checkpoints pad their vocab
    differently), then top-p. Temperature 0 (greedy: its argmax) takes the plain softmax."""
    import torch

    for member in logits:
        if member.shape[-1] < vocab_size:
            raise UserError(f"a member has {member.shape[-1]} logits for a tokenizer of {vocab_size} tokens")
    probs = torch.stack([torch.softmax(m[..., :vocab_size].float() / (temperature or 1.0), dim=-1)
                         for m in logits]).mean(0)
    if top_p < 1:  # the fewest most likely tokens that reach top_p, renormalized
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def shared_tokenizer(paths: list[str]) -> Any:
    """The one tokenizer of an ensemble's members: averaging next-token probabilities needs one vocabulary."""
    from transformers import AutoTokenizer

    tokenizers = [AutoTokenizer.from_pretrained(p) for p in paths]
    for path, tokenizer in zip(paths[1:], tokenizers[1:]):
        if tokenizer.get_vocab() != tokenizers[0].get_vocab():
            raise UserError(f"ensemble members {paths[0]} and {path} have different tokenizers ({len(tokenizers[0])} "
                            f"and {len(tokenizer)} tokens): an ensemble averages next-token probabilities, so its "
                            "members must share one vocabulary")
    return tokenizers[0]


def _stop_ids(tokenizer: Any, models: list[Any]) -> set[int]:
    """The tokenizer's EOS and each model's generation_config EOS ids (HF generate and vLLM stop at any)."""
    ids = {tokenizer.eos_token_id}
    for model in models:
        eos = model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
    return ids - {None}


def _completion_rows(cfg: EvalConfig, tokenizer: Any, prompt: Prompt, sequences: list[list[int]],
                     stop_ids: set[int]) -> list[dict[str, Any]]:
    """The records of one prompt's k sampled sequences (new token ids, cut after the first stop id)."""
    rows = []
    for index, sequence in enumerate(sequences):
        end = next((i for i, token in enumerate(sequence) if token in stop_ids), None)
        tokens = sequence if end is None else sequence[: end + 1]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        rows.append({"prompt_id": prompt.id, "prompt": chat_prompt(prompt),
                     "completion": [{"role": "assistant", "content": text}],
                     "think_closed": split_think(text, cfg.think_start, cfg.think_end)[2],
                     "reference_answer": prompt.answer, "temperature": cfg.temperature, "sample_index": index,
                     "finish_reason": "length" if end is None else "stop", "completion_tokens": len(tokens)})
    return rows


def _skipped_ids(path: Path) -> list[str]:
    """Ids of the prompts the generate stage set aside as too long (vllm backend only)."""
    if not path.is_file():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def common_prompts(samples: list[dict[str, Any]], skipped: dict[str, list[str]]) -> tuple[list[dict[str, Any]], int]:
    """The samples of the prompts every model took, and how many such prompts there are: a prompt
    that any model skipped (or has no samples for) is dropped from every model's rows."""
    taken = [{r["prompt_id"] for r in samples if r["model"] == name} for name in skipped]
    common = set.intersection(*taken) - set().union(*skipped.values()) if taken else set()
    return [r for r in samples if r["prompt_id"] in common], len(common)


def _torch_dtype(dtype: str) -> Any:
    import torch
    return "auto" if dtype == "auto" else getattr(torch, dtype)


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
    for name, m in report["models"].items():
        lines += ["", skipped_line(name, m["skipped_too_long"])] if m.get("skipped_too_long") else []
    lines += ["", "Models: " + ", ".join(f"{n} = `{path}`" + (" (ensemble: mean of the members' probabilities)"
                                                              if len(ensemble_members(path)) > 1 else "")
                                         for n, path in p["models"].items()), ""]
    return "\n".join(lines)


def skipped_line(name: str, ids: list[str], shown: int = 10) -> str:
    listed = ", ".join(ids[:shown]) + (f", and {len(ids) - shown} more (report.json)" if len(ids) > shown else "")
    return (f"Skipped as too long for `{name}`: {len(ids)} prompt{'s' if len(ids) != 1 else ''} ({listed}), "
            "left out for every model.")


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

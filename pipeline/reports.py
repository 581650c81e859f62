"""What a person (or the Hugging Face hub) reads about a run: a trained student's model card (its
README.md), the traces dataset's card, the eval report and its plot, and the eval results a card
gains (write_cards). The stages call these; nothing here trains or samples. docs/cards.md says what
each card holds.

Every card written here is a hub card (a YAML header, then Markdown) tagged CARD_TAG: eval edits
only cards carrying it, never one a person wrote or one git tracks, never a hub id.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from pipeline.distill import enabled
from pipeline.distill.objective import term_weights
from pipeline.inference.hf import ensemble_members
from pipeline.training import last_loss, traces_teacher

log = logging.getLogger(__name__)
CARD_TAG = "r1-distill"  # on every card written here: what eval's write_cards looks for

# ---------------------------------------------------------------------------- model cards

def sft_card(cfg: Any, trainer: Any) -> str:
    kd = "none (sequence-level distillation: SFT on teacher traces)"
    members = ([cfg.teacher] if isinstance(cfg.teacher, str) else cfg.teacher or []) if cfg.kd == "online" else []
    if cfg.kd != "none":
        divergence = cfg.kd_divergence + (f" (beta={cfg.kd_beta})" if cfg.kd_divergence == "jsd" else "")
        support = ("the full shared vocabulary" if members or cfg.kd == "mutual" else
                   f"the teacher's top-{cfg.teacher_server_top_k if cfg.teacher_server else 'k'} ids and one bucket "
                   "for the rest of the vocabulary (coarsened at T = 1, then softened: a lower bound on the "
                   "full-vocabulary divergence)")
        source = (f"the mutual peer trained beside it (init {cfg.mutual_peer}, saved in peer/)" if cfg.kd == "mutual"
                  else f"the ensemble of {', '.join(members)} (mean of their probabilities)" if len(members) > 1
                  else f"the local teacher {members[0]}" if members
                  else f"the teacher server {cfg.teacher_server}" if cfg.teacher_server
                  else "the teacher's top-k log-probs stored with the traces")
        kd = (f"{cfg.kd}: {divergence} at T={cfg.kd_temperature} over {support}, from {source}; "
              f"weight alpha={cfg.kd_alpha} beside CE")
    more = [f"weight {w} on {term}" for term, w in term_weights(cfg).items() if term not in ("ce_loss", "kd_loss")
            and not term.startswith("peer")]
    teacher = ", ".join(members) or cfg.mutual_peer or cfg.teacher_server or traces_teacher(cfg.dataset)
    recipe = (f"- student init: `{cfg.model}`\n- teacher: `{teacher}`\n- traces: `{cfg.dataset}`\n- logit KD: {kd}\n"
              + (f"- feature / relational KD (pipeline/distill/): {'; '.join(more)}\n" if more else "")
              + (f"- born-again: {cfg.generations} generations, each after the first taught by the one before "
                 "(generation-k/ beside the last)\n" if cfg.generations > 1 else "")
              + f"- LoRA: {'r=' + str(cfg.lora_r) if cfg.lora_r else 'off'}\n"
              f"- steps: {trainer.state.global_step}, final logged loss: {last_loss(trainer)}\n"
              f"- config: `config.yaml` beside this card\n")
    tags = (["sft"] if cfg.kd == "none" else ["logit-kd", f"kd-{cfg.kd}"]) + \
        [m.switch.replace("_", "-") for m in enabled(cfg).values()] + (["born-again"] if cfg.generations > 1 else [])
    return student_card(cfg, tags, "A student distilled with r1-distill.", recipe, [cfg.dataset])


def onpolicy_card(cfg: Any, trainer: Any) -> str:
    from trl import DistillationTrainer

    if cfg.teacher_server:
        top_k = cfg.teacher_server_top_k
        loss = (f"forward KL over the teacher's top-{top_k} ids plus a tail bucket" if cfg.beta == 0 else
                f"generalized JSD (beta={cfg.beta}) over a top-1 support (the teacher's argmax and the sampled "
                "token) plus a tail bucket")
        teacher, kind = f"served at {cfg.teacher_server} (TRL ServerDistillationTrainer)", "teacher-server"
    elif isinstance(trainer, DistillationTrainer):
        loss = (f"generalized JSD (beta={cfg.beta}; 1 = reverse KL, 0 = forward KL) between the full next-token "
                f"distributions at T={cfg.temperature}")
        teacher, kind = f"`{cfg.teacher}` (local, TRL DistillationTrainer)", "gkd"
    else:
        loss = f"GOLD/ULD across tokenizers, lmbda={cfg.lmbda} (share of on-policy batches)"
        teacher, kind = f"`{cfg.teacher}` (local, another tokenizer: TRL GOLDTrainer)", "gold"
    recipe = (f"- student init: `{cfg.model}`\n- teacher: {teacher}\n- prompts: `{cfg.prompt_set}` ({cfg.split})\n"
              f"- loss: {loss}, averaged over the sampled completion tokens\n"
              f"- sampling: T={cfg.temperature}, top_p={cfg.top_p}, max_completion_length="
              f"{cfg.max_completion_length} ({'vLLM' if cfg.use_vllm else 'HF generate'})\n"
              f"- LoRA: {'r=' + str(cfg.lora_r) if cfg.lora_r else 'off'}\n"
              f"- steps: {trainer.state.global_step}, final logged loss: {last_loss(trainer)}\n"
              f"- config: `config.yaml` beside this card; train_summary.json: tokens and timings\n")
    intro = ("A student distilled on-policy with r1-distill: it sampled completions and learned from the "
             "teacher's per-token distribution on them.")
    return student_card(cfg, ["onpolicy", kind], intro, recipe,
                        [cfg.prompt_set, cfg.dataset if cfg.lmbda < 1 else None])


def student_card(cfg: Any, tags: list[str], intro: str, recipe: str, datasets: list[str | None]) -> str:
    """A trained student's hub model card: the YAML header (base model, datasets that are hub ids,
    library, tags, the base model's license), then the training recipe. A base model that is a local
    dir is named by the hub id it descends from (its own card's base_model) where there is one; else
    by its path, but not on a card pushed to the hub (the hub wants ids there)."""
    from huggingface_hub import ModelCardData

    base = hub_base(cfg.model) or (None if getattr(cfg, "push_to_hub", False) else cfg.model)
    data = ModelCardData(base_model=base, datasets=[d for d in datasets if d and is_hub_id(d)] or None,
                         library_name="peft" if cfg.lora_r else "transformers",
                         license=base_license(cfg.model), pipeline_tag="text-generation",
                         tags=list(dict.fromkeys([CARD_TAG, "distillation", *tags, *(["lora"] if cfg.lora_r else [])])))
    body = f"# {Path(cfg.output_dir).name}\n\n{intro}\n\n## Training recipe\n\n{recipe}"
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def is_hub_id(source: str) -> bool:
    """owner/name that is no local path (the rule load_traces and eval apply)."""
    return not Path(source).exists() and not source.startswith((".", "/")) and source.count("/") == 1


def card_metadata(model: str | Path) -> dict[str, Any]:
    """The YAML header of a local model dir's README.md; {} where there is none."""
    import yaml

    readme = Path(model) / "README.md"
    if not readme.is_file():
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.read_text(), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def hub_base(model: str) -> str | None:
    """The hub id `model` is, or that a local dir descends from (the base_model in its card)."""
    if is_hub_id(model):
        return model
    base = card_metadata(model).get("base_model")
    base = base[0] if isinstance(base, list) and base else base
    return base if isinstance(base, str) and is_hub_id(base) else None


@functools.lru_cache(maxsize=None)
def base_license(model: str) -> str | None:
    """The license in the base model's own card: a local dir's README.md, else its hub id's (one small
    download; offline or missing: none)."""
    license = card_metadata(model).get("license")
    base = hub_base(model)
    if license is None and base is not None:
        from huggingface_hub import hf_hub_download

        try:
            license = card_metadata(Path(hf_hub_download(base, "README.md")).parent).get("license")
        except Exception as err:  # offline, gated, no README: the card says nothing about a license
            log.info(f"no license for {base} ({type(err).__name__}): the card names none")
    return license if isinstance(license, str) else None


# ---------------------------------------------------------------------------- the eval report

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


# ---------------------------------------------------------------------------- the traces dataset's card

SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]


def traces_card(cfg: Any, features: Any) -> str:
    """The hub dataset card of a generate stage's output_dir: the YAML header (tags, task, size, one
    hub config per saved set), then how the traces were sampled (summary.json), what curation
    removed (curation.json) and the columns (`features`: the samples' datasets.Features)."""
    import json

    from huggingface_hub import DatasetCardData

    out = Path(cfg.output_dir)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    curation = json.loads((out / "curation.json").read_text()) if (out / "curation.json").is_file() else None
    rows = curation["samples_out"] if curation else summary.get("samples", 0)
    configs = [{"config_name": name, "data_files": [{"split": "train", "path": files}], **extra}
               for name, folder, extra in (("curated", "curated", {"default": True}), ("samples", "samples", {}))
               if (out / folder).is_dir() and (curation or folder == "samples")
               for files in [f"{folder}.parquet" if (out / f"{folder}.parquet").is_file() else f"{folder}/*.arrow"]]
    data = DatasetCardData(tags=[CARD_TAG, "distillation", "reasoning", "synthetic"],
                           task_categories=["text-generation"], configs=configs or None,
                           size_categories=[next((name for bound, name in SIZES if rows < bound), "n>100M")])
    per_t = summary.get("per_temperature", {})
    lines = [f"# {out.name}", "", f"Reasoning traces sampled from `{cfg.model}` by r1-distill's generate stage"
             + (", then scored and curated: `curated` is the training set, `samples` every sample." if curation
                else " (not curated)."), "", "## Sampling", "",
             f"- teacher: `{cfg.model}`",
             f"- prompt set: `{cfg.prompt_set}` (split {cfg.split}"
             + (f", first {cfg.max_prompts}" if getattr(cfg, "max_prompts", None) else "") + f"): "
             f"{summary.get('prompts', '?')} prompts, {summary.get('prompts_skipped_too_long', 0)} skipped as too long",
             f"- temperatures: {', '.join(str(t) for t in cfg.temperatures)}; {cfg.num_samples} samples per prompt "
             "and temperature",
             f"- max_tokens {cfg.max_tokens}, top_p {cfg.top_p}, top_k {cfg.top_k}, seed {cfg.seed}",
             "- teacher logprobs: " + (f"top-{cfg.logprobs} per completion token ({cfg.logprobs_mode})"
                                       if cfg.logprobs else "none"),
             f"- samples: {summary.get('samples', '?')}, completion tokens {summary.get('completion_tokens', '?')}, "
             f"truncated {summary.get('share_truncated', 0):.1%}"]
    if per_t:
        lines += ["", "| temperature | samples | truncated | mean tokens |", "|---|---|---|---|"]
        lines += [f"| {t} | {v['samples']} | {v['truncated'] / max(v['samples'], 1):.1%} | "
                  f"{v['tokens'] / max(v['samples'], 1):.1f} |" for t, v in per_t.items()]
    if curation:
        unclean = curation.get("unclean_text", {})
        lines += ["", "## Curation", "", f"Scorer `{curation.get('scorer')}`: {curation['samples_in']} samples in, "
                  f"{curation['samples_out']} kept; verdicts {curation.get('verdicts', {})}.", "",
                  f"Dropped as not clean text, before the filters: {unclean.get('dropped', 0)}"
                  + "".join(f"; {n['count']} {n['why']}" for n in unclean.get("reasons", {}).values()) + ".", "",
                  "| filter | in | out |", "|---|---|---|"]
        lines += [f"| {f['filter']} | {f['in']} | {f['out']} |" for f in curation.get("filters", [])]
    lines += ["", "## Columns", "", "| column | type |", "|---|---|"]
    lines += [f"| {field.name} | `{field.type}` |" for field in features.arrow_schema]
    lines += ["", "Made with the config `config.yaml` beside this card (summary.json, curation.json: the counts).", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` whole, or leave it untouched when it already says `text` (a reused run rewrites nothing)."""
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- eval results on the cards

def write_eval_cards(report: dict[str, Any]) -> list[str]:
    """Eval's write_cards: each evaluated model that is a local dir holding a card this pipeline wrote
    gets this eval's results (its section between markers, replaced by a rerun on the same prompts,
    and model-index metadata). Hub ids, ensembles, cards of others and cards git tracks are left
    alone, with a log line. Returns the cards written."""
    p = report["protocol"]
    written = []
    for name, path in p["models"].items():
        readme = Path(path) / "README.md"
        why = ("an ensemble" if len(ensemble_members(path)) > 1 else "not a local dir (a hub id?)"
               if not Path(path).is_dir() else "no README.md" if not readme.is_file()
               else f"not a card r1-distill wrote (no tag {CARD_TAG})" if not is_ours(readme)
               else "README.md is tracked by git" if git_tracked(readme) else None)
        if why:
            log.info(f"write_cards: {name} ({path}) left alone: {why}")
            continue
        write_atomic(readme, with_eval(readme.read_text(), report, name))
        written.append(str(readme))
        log.info(f"write_cards: {name}: results written into {readme}")
    return written


def is_ours(readme: Path) -> bool:
    tags = card_metadata(readme.parent).get("tags") or []
    return CARD_TAG in (tags if isinstance(tags, list) else [tags])


def git_tracked(path: Path) -> bool:
    try:
        done = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False  # no git: nothing tracks it
    return done.returncode == 0


def eval_key(p: dict[str, Any]) -> str:
    """The prompt set an eval ran on, as its card section is keyed (no "--": it sits in an HTML comment)."""
    key = p["prompts"] if p["prompts"].endswith(f"({p['split']})") else f"{p['prompts']} ({p['split']})"
    return re.sub(r"-{2,}", "-", key)


def with_eval(card: str, report: dict[str, Any], name: str) -> str:
    """`card` with this eval's section for model `name` (replacing the one of an earlier eval on the
    same prompt set) and its model-index entries."""
    from huggingface_hub import EvalResult, ModelCard

    p, m = report["protocol"], report["models"][name]
    k, key = p["k"], eval_key(p)
    low, high = m["pass@1_ci95"]
    section = "\n".join([
        f"<!-- {CARD_TAG} eval: {key} -->", f"## Eval: {key}", "",
        f"| pass@1 | 95% CI | pass@{k} | maj@{k} | truncated | mean tokens |", "|---|---|---|---|---|---|",
        f"| {m['pass@1']:.3f} | [{low:.3f}, {high:.3f}] | {m[f'pass@{k}']:.3f} | {m[f'maj@{k}']:.3f} | "
        f"{m['share_truncated']:.1%} | {m['mean_completion_tokens']:.1f} |", "",
        f"Protocol: {p['n_prompts']} prompts, k = {k} samples per prompt, temperature {p['temperature']}, top_p "
        f"{p['top_p']}, max_tokens {p['max_tokens']}, seed {p['seed']}, scorer `{p['scorer']}`, backend "
        f"{p['backend']} (r1-distill eval; pass@1 is the mean over the k samples).", f"<!-- /{CARD_TAG} eval -->"])
    parsed = ModelCard(card)
    pattern = re.compile(rf"<!-- {re.escape(CARD_TAG)} eval: {re.escape(key)} -->.*?<!-- /{re.escape(CARD_TAG)} "
                         r"eval -->", re.S)
    text = parsed.text
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    data = parsed.data
    split = p["split"]
    kept = [r for r in data.eval_results or [] if not (r.dataset_type == p["prompts"] and r.dataset_split == split)]
    data.eval_results = kept + [
        EvalResult(task_type="text-generation", dataset_type=p["prompts"], dataset_name=key, dataset_split=split,
                   metric_type=metric, metric_name=f"{metric} (k={k}, T={p['temperature']})", metric_value=value)
        for metric, value in (("pass@1", round(m["pass@1"], 4)), (f"pass@{k}", round(m[f"pass@{k}"], 4)),
                              (f"maj@{k}", round(m[f"maj@{k}"], 4)))]
    data.model_name = data.model_name or Path(p["models"][name]).name
    parsed.text = text
    return str(parsed)

"""What a person reads about a run: a trained student's model card (its README.md), the eval
report and its plot. The stages call these; nothing here trains or samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.distill.objective import term_weights
from pipeline.inference.hf import ensemble_members
from pipeline.training import last_loss, traces_teacher

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
    return (f"# {Path(cfg.output_dir).name}\n\nA student distilled with r1-distill.\n\n"
            f"- student init: `{cfg.model}`\n- teacher: `{teacher}`\n- traces: `{cfg.dataset}`\n- logit KD: {kd}\n"
            + (f"- feature / relational KD (pipeline/distill/): {'; '.join(more)}\n" if more else "")
            + (f"- born-again: {cfg.generations} generations, each after the first taught by the one before "
               "(generation-k/ beside the last)\n" if cfg.generations > 1 else "")
            + f"- LoRA: {'r=' + str(cfg.lora_r) if cfg.lora_r else 'off'}\n"
            f"- steps: {trainer.state.global_step}, final logged loss: {last_loss(trainer)}\n"
            f"- config: `config.yaml` beside this card\n")


def onpolicy_card(cfg: Any, trainer: Any) -> str:
    from trl import DistillationTrainer

    if cfg.teacher_server:
        top_k = cfg.teacher_server_top_k
        loss = (f"forward KL over the teacher's top-{top_k} ids plus a tail bucket" if cfg.beta == 0 else
                f"generalized JSD (beta={cfg.beta}) over a top-1 support (the teacher's argmax and the sampled "
                "token) plus a tail bucket")
        teacher = f"served at {cfg.teacher_server} (TRL ServerDistillationTrainer)"
    elif isinstance(trainer, DistillationTrainer):
        loss = (f"generalized JSD (beta={cfg.beta}; 1 = reverse KL, 0 = forward KL) between the full next-token "
                f"distributions at T={cfg.temperature}")
        teacher = f"`{cfg.teacher}` (local, TRL DistillationTrainer)"
    else:
        loss = f"GOLD/ULD across tokenizers, lmbda={cfg.lmbda} (share of on-policy batches)"
        teacher = f"`{cfg.teacher}` (local, another tokenizer: TRL GOLDTrainer)"
    return (f"# {Path(cfg.output_dir).name}\n\nA student distilled on-policy with r1-distill: it sampled "
            "completions and learned from the teacher's per-token distribution on them.\n\n"
            f"- student init: `{cfg.model}`\n- teacher: {teacher}\n- prompts: `{cfg.prompt_set}` ({cfg.split})\n"
            f"- loss: {loss}, averaged over the sampled completion tokens\n"
            f"- sampling: T={cfg.temperature}, top_p={cfg.top_p}, max_completion_length={cfg.max_completion_length}"
            f" ({'vLLM' if cfg.use_vllm else 'HF generate'})\n"
            f"- LoRA: {'r=' + str(cfg.lora_r) if cfg.lora_r else 'off'}\n"
            f"- steps: {trainer.state.global_step}, final logged loss: {last_loss(trainer)}\n"
            f"- config: `config.yaml` beside this card; train_summary.json: tokens and timings\n")


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

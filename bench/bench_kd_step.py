"""Benchmark: KD training step time against the plain SFT step, at a real vocabulary.

A random Qwen2 student (hidden 256, 4 layers) and teacher (hidden 512, 4 layers), both with
Qwen2.5's 151,936 logits, on 1,024 tokens a batch (4 x 256, the first 32 of each a prompt
without loss). Each step is forward, backward, AdamW step, fp32 on CPU:

- sft: the student's own forward with labels (transformers' loss over full logits: what TRL's
  SFTTrainer runs);
- teacher forward: the teacher's plain forward alone (no gradients);
- offline KD: the sft stage's loss (`pipeline.distill.objective.distill_losses`, forward KL at T = 2 + CE) against
  top-20 rows precomputed from the teacher, as the generate stage stores them;
- online KD: the same loss with the live teacher.

Goals: offline KD / sft <= 1.15; online KD / (sft + teacher forward) <= 1.15. Variants
alternate step by step; medians over steps after warm-up.

Padding-free: the same rows cut to lengths spread evenly between 64 and 256 tokens (a batch of
traces of different lengths), as one padded batch and as one padding-free row (position_ids
restarting at each sequence, as TRL's padding_free and packing collate): offline KD step time
of each, on the same trained tokens (their losses are checked equal).

    python bench/bench_kd_step.py [--tokens-per-row 256] [--rows 4] [--vocab 151936] [--steps 8] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from _common import machine, save

from pipeline.distill.objective import distill_losses
from pipeline.distill.reference import combine

WARMUP = 2
PROMPT = 32
QUICK = {"tokens_per_row": 64, "rows": 2, "vocab": 4096, "steps": WARMUP + 1}


def model(hidden: int, vocab: int, seed: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tokens-per-row", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--k", type=int, default=20, help="offline top-k")
    parser.add_argument("--out", default="runs/bench/kd_step.json")
    parser.add_argument("--quick", action="store_true", help="smallest sizes (sizes given still win)")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()

    student, teacher = model(args.hidden, args.vocab, 0), model(2 * args.hidden, args.vocab, 1).eval()
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.rows, args.tokens_per_row), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    kept = labels[:, 1:] != -100
    with torch.no_grad():  # what the generate stage stores: top-k log-probs at T = 1 and the rest
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        logprobs = torch.log_softmax(teacher(**inputs).logits[:, :-1][kept], -1)
        top = logprobs.topk(args.k, dim=-1)
        rest = torch.log(-torch.expm1(torch.logsumexp(top.values, -1)))
    offline = {**batch, "teacher_topk_ids": top.indices, "teacher_topk_logprobs": top.values.half().float(),
               "teacher_rest_logprob": rest}
    kd = SimpleNamespace(kd_temperature=2.0, kd_divergence="forward_kl", kd_beta=0.5, kd_chunk_size=256, kd_alpha=0.5,
                         kd="online", feature_kd=False, relation_kd=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def step(loss_fn) -> float:
        start = time.perf_counter()
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def kd_loss(inputs: dict, with_teacher: bool) -> torch.Tensor:
        out = distill_losses(student, student, [teacher] if with_teacher else [], [teacher] if with_teacher else [],
                             inputs, kd, args.vocab)
        return combine(out["ce_loss"], out["kd_loss"], 0.5)

    def teacher_forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=batch["attention_mask"])
        return time.perf_counter() - start

    # Variable lengths: padded to the longest, or flattened into one row.
    lengths = torch.linspace(64, args.tokens_per_row, args.rows).long().tolist()
    varlen = {**batch, "attention_mask": (torch.arange(args.tokens_per_row) < torch.tensor(lengths)[:, None]).long()}
    varlen["labels"] = labels.masked_fill(varlen["attention_mask"] == 0, -100)
    var_kept = varlen["labels"][:, 1:] != -100
    rows = {"teacher_topk_ids": top.indices, "teacher_topk_logprobs": top.values.half().float(),
            "teacher_rest_logprob": rest}
    row_of = torch.full(kept.shape, -1)
    row_of[kept] = torch.arange(int(kept.sum()))  # each trained position's row in the full batch
    var_rows = {k: v[row_of[var_kept]] for k, v in rows.items()}
    padded = {**varlen, **var_rows}
    flat = {"input_ids": torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None],
            "labels": torch.cat([varlen["labels"][i, :n] for i, n in enumerate(lengths)])[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None], **var_rows}
    a, b = (distill_losses(student, student, [], [], x, kd, args.vocab) for x in (padded, flat))
    assert all(torch.allclose(a[key], b[key], rtol=1e-4) for key in ("kd_loss", "ce_loss"))

    variants = {
        "sft": lambda: step(lambda: student(**batch).loss),
        "teacher_forward": teacher_forward,
        "offline_kd": lambda: step(lambda: kd_loss(offline, False)),
        "online_kd": lambda: step(lambda: kd_loss(batch, True)),
        "offline_kd_varlen_padded": lambda: step(lambda: kd_loss(padded, False)),
        "offline_kd_varlen_padding_free": lambda: step(lambda: kd_loss(flat, False)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for n in range(args.steps):
        for name, run in variants.items():
            times[name].append(run())
        print(f"step {n}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()), flush=True)
    median = {name: statistics.median(t[WARMUP:]) for name, t in times.items()}
    ratios = {"offline_kd / sft": median["offline_kd"] / median["sft"],
              "online_kd / (sft + teacher_forward)": median["online_kd"] / (median["sft"] + median["teacher_forward"]),
              "padding-free speed-up (padded / padding-free)":
                  median["offline_kd_varlen_padded"] / median["offline_kd_varlen_padding_free"]}
    result = {
        "benchmark": "median step time: KD / SFT at a real vocabulary",
        "machine": f"{machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "setup": {"student_hidden": args.hidden, "teacher_hidden": 2 * args.hidden, "layers": 4, "vocab": args.vocab,
                  "tokens": args.rows * args.tokens_per_row, "trained_tokens": int(kept.sum()), "k": args.k,
                  "kd": vars(kd), "steps": args.steps, "warmup": WARMUP, "quick": args.quick},
        "median_s": median,
        "ratios": ratios,
        "varlen_lengths": lengths,
        "goals": {name: value <= 1.15 for name, value in list(ratios.items())[:2]},
    }
    save(result, args.out)
    print(", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in median.items()))
    print(", ".join(f"{k}: {v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()

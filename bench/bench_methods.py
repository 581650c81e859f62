"""Benchmark: step time and peak memory of each distillation method against plain SFT, through the sft stage.

Every method is a configuration of the sft stage (pipeline/stages/sft.py, pipeline/distill/), trained
here as the methods study trains it (configs/studies/methods.yaml): `build_trainer(cfg)` then
`trainer.train()`, the study's sft config (configs/studies/sums/sft.yaml), batch 16, fp32 on CPU.

- sft:          kd: none
- logit_kd:     kd: online, teacher: prompts/sums/teacher (0.5 CE + 0.5 T^2 KL, T = 2)
- feature_kd:   logit_kd + feature_kd: true (every student layer projected to a teacher layer)
- relation_kd:  logit_kd + relation_kd: true (distances and angles between the batch's samples)
- ensemble_kd:  kd: online, teacher: [the teacher, a copy of it] (a copy times as a second one does)
- mutual:       kd: mutual, mutual_peer: a second student init (seed 1000, as the study's), T = 1
- born_again:   a step of generation 2 of `generations: 2`: logit KD with a teacher of the
                student's own size (here a copy of the student init; generation 1's weights
                would time the same)

Models (pipeline/demo/tiny.py, nothing downloaded): the student is the study's init (`student_init`:
llama, hidden 64, 3 layers, MLP 256, 2 heads of 64) with `build_model`'s default tokenizer,
which is the tokenizer shipped with prompts/sums/teacher (same vocabulary and chat template:
checked below, as the stage itself checks it); the teacher is the shipped Qwen2 (hidden 128,
4 layers). Data: prompt-completion records of prompts/sums' train rows, each worked solution a
completion (4 per prompt), batch x (warm-up + timed + 1) records, so each step has its own batch.

Time: each method trains in its own process (spawned, OMP_NUM_THREADS=1), and the processes
take turns step by step: the parent lets one process run one optimizer step (its trainer's
`on_step_begin` waits for the parent's word), waits until it is parked before its next step
(the next batch collated), then lets the next one run, in a new (seeded) random order each step,
so that no method always follows the same other one. So no two steps overlap, and load from
other jobs on the machine falls on every method alike. A step is
timed from `on_step_begin` to `on_step_end`: forward, backward, grad clipping, AdamW step and
zero_grad of the real trainer (KDTrainer.compute_loss / SFTTrainer's), without data loading.
The first step (warm-up: lazy initialisation, the optimizer's state) is not counted; model
loading is before it. Every process sees the same batches in the same order (checked: shapes
and token sums per step), so the ratio of each step to SFT's step on the same batch is paired;
the table's ratio is the median of those paired ratios (the median ms is over the same steps).

Memory (CPU, two figures, each process on its own):
- peak MiB: the growth of the process's resident set over its RSS after setup (models loaded,
  trainer built), up to the end of the last timed step: the kernel's high-water mark VmHWM
  after resetting it at setup's end (`_common.reset_peak`; ru_maxrss where that fails), minus
  the RSS at that moment. It is what training adds in memory the process really holds:
  activations, teacher states, gradients, the optimizer's state (created in the first step),
  the loss's temporaries, and the allocator's overhead. Models' weights are setup (the JSON
  keeps each process's setup RSS: a second teacher or a peer shows there). glibc keeps some
  freed memory (its mmap threshold grows with use), so RSS can run above the live tensors; it
  is not lowered with MALLOC_MMAP_THRESHOLD_ here because that would slow every step (an mmap
  and page faults per tensor) and bias the times this script also takes.
- tensor peak MiB: torch's CPU memory profiler over one more step after the timed ones (not
  timed): the peak of the sum of every tensor allocation and free during the step, from its
  start. Allocator-independent, it counts the step's own transient tensors only (activations,
  teacher states, gradients, the loss's temporaries), not the persistent optimizer state, and
  it counts what is allocated, not what is written: sft's figure is dominated by TRL's fused LM
  head (trl/trainer/utils.py, the loss of plain SFT), which allocates a [min(tokens, 4096),
  32768] fp32 tile in forward and again in backward whatever the vocabulary; at this 320-token
  vocabulary all but the first 320 columns are never written, so never resident (RSS does not
  see them). The KD methods' loss is pipeline/distill/logits.py's, chunked at the vocabulary's
  size. So this column compares the KD methods with each other; the RSS column is the peak.

Feature KD at scale, by arithmetic (printed and saved; not run): a Qwen2.5-1.5B-shaped student
(hidden 1536, 28 layers, MLP 8960, 2 KV heads of 128) under a Qwen2.5-7B-shaped teacher (hidden
3584, 28 layers), everything bf16 but the projections (fp32, as FeatureProjections is built)
and the loss (fp32, features._full), all tokens completion tokens (the mask keeps all), the
default layer map (28 pairs s -> s). What feature KD keeps that logit KD does not, per token,
alive together at the end of the forward (the step's peak):
- the teacher's hidden states: `decoder_states(..., every_layer=True)` keeps the whole tuple,
  29 x 3584 x 2 B (embeddings + 28 layers; 28 beyond the final state logit KD keeps anyway);
- the projected student states, saved by the cosine's norm and division for backward:
  28 x 3584 x 4 B;
- the teacher's normalised states, fp32, saved by the cosine's product for the student's
  gradient: 28 x 3584 x 4 B;
- the fp32 copy of each student state fed to its projection, saved for the weight's gradient:
  28 x 1536 x 4 B;
- the student's own hidden-state tuple, 29 x 1536 x 2 B: transformers' decoder layers do not
  keep their bf16 input for backward (the RMSNorm saves an fp32 copy, counted in the student's
  activations), so `output_hidden_states` keeps these alive through the loss;
and, independent of tokens, the projections: 28 x 1536 x 3584 = 154.1 M parameters, fp32
weight + gradient + two Adam moments = 16 B each. The student's normal activations, for
comparison: per layer and token 20 h + 4 kv + 8 i bytes in bf16 (each of the two RMSNorms
saves its fp32 input, its normalised value and its output, the next projections' input: 8 h;
q and the attention's output: 4 h; k and v: 4 kv; the MLP's gate, up, SiLU(gate) and their
product: 8 i; flash/SDPA attention, no score matrix) plus the final norm's 6 h; logits are
chunked by the loss and left out. Both per-token models are checked at the end of a run by
counting the bytes autograd saves (saved-tensor hooks, parameters excluded): the feature loss
at small widths (2,184 B per token and pair against 8 Ht + 4 Hs = 2,176: the norms), one
transformers Qwen2 decoder layer at the 1.5B shape, 128 tokens in bf16 (103,992 B per token
against 103,424: RoPE's cos and sin).

The figures (1 MiB = 2^20 B, 1 GiB = 2^30 B):

    per token                                      bytes    MiB per 1,000 tokens
    teacher hidden states (29 x 3584, bf16)      207,872      198.2
    projected student states (28 x 3584, fp32)   401,408      382.8
    teacher normalised states (28 x 3584, fp32)  401,408      382.8
    student fp32 copies (28 x 1536)              172,032      164.1
    student hidden-state tuple (29 x 1536)        89,088       85.0
    feature KD's sum                           1,271,808    1,212.9   (44% of the student's)
    the student's own activations              2,905,088    2,770.5
    projections + Adam, any token count: 154.1 M x 16 B = 2.30 GiB

    tokens / device   teacher states + projected   all per-token terms   + projections   student activations
    4,096             2.32 GiB                     4.85 GiB              7.15 GiB        11.08 GiB
    16,384            9.30 GiB                     19.41 GiB             21.70 GiB       44.33 GiB

Reading the measured figures: at this tiny vocabulary the plain SFT step's own loss (TRL's fused
LM head) holds more memory than the pipeline's chunked KD loss: it writes one page of each
128 KiB row of its tile (about 13 MiB of SFT's RSS peak at batch 16: 162 MiB against 149 with
the tile cut to 512 columns), so a KD method's peak / SFT can be below 1. Step ratios of methods
close to SFT (born_again) moved from below to above 1 between runs on a shared machine: read
differences under about 0.3 as noise there. The ratios show what each method adds over the
same student at these sizes; they do not carry to a real vocabulary and real widths, where the
logits and the models' own sizes dominate.

    python bench/bench_methods.py [--steps 10] [--batch 16] [--methods sft,logit_kd,...]
                                  [--out runs/bench/methods.json] [--quick]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from _common import machine, peak_kb, reset_peak, save, status_kb
from transformers import TrainerCallback

WARMUP = 1
MIB = 2**20
BASE_CONFIG = "configs/studies/sums/sft.yaml"  # the studies' sft config
TEACHER = "prompts/sums/teacher"
STUDENT_INIT = {"arch": "llama", "hidden_size": 64, "num_layers": 3, "intermediate_size": 256, "num_heads": 2}
# --quick: the smallest run that still times a step after warm-up (checks the script, measures nothing).
QUICK = {"steps": 1, "batch": 4, "methods": "feature_kd,mutual"}  # the two that train modules beside the student


def methods(student: Path, peer: Path, teacher_b: Path, student_copy: Path) -> dict[str, dict[str, Any]]:
    """Each method's sft keys over the base config (the methods study's axis, configs/studies/methods.yaml)."""
    online = {"kd": "online", "teacher": TEACHER}
    return {
        "sft": {"kd": "none"},
        "logit_kd": online,
        "feature_kd": {**online, "feature_kd": True},
        "relation_kd": {**online, "relation_kd": True},
        "ensemble_kd": {"kd": "online", "teacher": [TEACHER, str(teacher_b)]},
        "mutual": {"kd": "mutual", "mutual_peer": str(peer), "kd_temperature": 1.0},
        "born_again": {"kd": "online", "teacher": str(student_copy)},
    }


def sums_traces(path: Path, records: int) -> Path:
    """Prompt-completion records from prompts/sums' train rows, their worked solutions as completions."""
    import datasets

    from pipeline.demo.teacher import solution_records
    from pipeline.prompts import PromptSource

    source = PromptSource(prompt_set="prompts/sums", split="train", max_prompts=math.ceil(records / 4))
    rows = solution_records(source, "solutions")[:records]
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------------------- one method's process

class Turns(TrainerCallback):
    """Parks the trainer before each step until the parent says go; times the step; reads the RSS
    peak before the last step and profiles that step's tensor memory."""

    def __init__(self, conn: Any, batches: list, total: int, reset_ok: bool) -> None:
        self.conn, self.batches, self.total, self.reset_ok = conn, batches, total, reset_ok
        self.profiler, self.result = None, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.conn.send(("ready",))
        self.conn.recv()
        if state.global_step == self.total - 1:  # the untimed, profiled step
            from torch.profiler import ProfilerActivity, profile

            self.result["peak_kb"] = peak_kb(self.reset_ok)
            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self.start
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.result["tensor_peak_bytes"] = tensor_peak(self.profiler)
            self.profiler = None
        self.conn.send(("done", seconds, self.batches[-1]))


def tensor_peak(prof: Any) -> int:
    """The peak of the running sum of CPU tensor allocations (+) and frees (-) the profiler saw."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and str(e.device_type()).endswith("CPU")]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def worker(conn: Any, overrides: dict[str, Any], total: int, log: str) -> None:
    """Build the method's trainer, then train `total` steps, one at a time when the parent says go."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        import gc

        import torch

        from pipeline.config import load_config
        from pipeline.stages.sft import SFTStageConfig, build_trainer

        torch.set_num_threads(1)
        cfg = load_config(SFTStageConfig, BASE_CONFIG, overrides)
        trainer = build_trainer(cfg)
        batches: list = []
        training_step = trainer.training_step

        def recorded_step(model, inputs, *args, **kwargs):
            batches.append([list(inputs["input_ids"].shape), int(inputs["input_ids"].sum())])
            return training_step(model, inputs, *args, **kwargs)

        trainer.training_step = recorded_step
        gc.collect()
        setup_kb = status_kb("VmRSS")
        turns = Turns(conn, batches, total, reset_peak())
        trainer.add_callback(turns)
        trainer.train()
        conn.send(("finished", {"setup_rss_kb": setup_kb, "max_length": cfg.max_length, **turns.result}))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        conn.send(("failed", traceback.format_exc()))
        raise


# ---------------------------------------------------------------------------- the parent

def run_in_turns(configs: dict[str, dict[str, Any]], total: int, logs: Path) -> tuple[dict, dict]:
    """Start one process per method, then give them turns, one step each, in a new random order each step."""
    ctx = multiprocessing.get_context("spawn")
    procs, conns = {}, {}
    for name, overrides in configs.items():
        parent, child = ctx.Pipe()
        procs[name] = ctx.Process(target=worker, args=(child, overrides, total, str(logs / f"{name}.log")),
                                  daemon=True)
        procs[name].start()
        conns[name] = parent

    def receive(name: str) -> tuple:
        try:
            message = conns[name].recv()
        except EOFError:
            message = ("failed", "the process ended")
        if message[0] == "failed":
            for proc in procs.values():
                proc.terminate()
            tail = "\n".join((logs / f"{name}.log").read_text().splitlines()[-30:])
            raise SystemExit(f"method {name} failed: {message[1]}\nlog {logs / f'{name}.log'}:\n{tail}")
        return message

    for name in configs:  # setup done: parked before the first step
        assert receive(name)[0] == "ready"
    times: dict[str, list[float]] = {name: [] for name in configs}
    batches: dict[str, list] = {name: [] for name in configs}
    finished = {}
    names = list(configs)
    for step in range(total):
        for name in random.Random(step).sample(names, len(names)):  # a new order each step: no fixed neighbours
            conns[name].send("go")
            _, seconds, batch = receive(name)
            if step < total - 1:  # the last step is profiled, not timed
                times[name].append(seconds)
            batches[name].append(batch)
            message = receive(name)  # parked before its next step, or done
            if message[0] == "finished":
                finished[name] = message[1]
        if step == total - 1:
            print(f"step {step}: profiled (memory), not timed", flush=True)
        else:
            print(f"step {step}{' (warm-up)' if step < WARMUP else ''}: "
                  + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names), flush=True)
    for proc in procs.values():
        proc.join(timeout=60)
    reference = batches[names[0]]
    for name in names:
        if batches[name] != reference:
            raise SystemExit(f"method {name} trained on other batches than {names[0]}: {batches[name]} vs {reference}")
    return {"times": times, "batches": reference}, finished


# ---------------------------------------------------------------------------- arithmetic

def features_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    from pipeline.distill.features import layer_map

    return layer_map(student_layers, teacher_layers)


def feature_kd_arithmetic(token_counts: tuple[int, ...] = (1000, 4096, 16384)) -> dict[str, Any]:
    """Feature KD's extra memory at a 1.5B student / 7B teacher (docstring), against the student's activations."""
    h, layers, inter, kv = 1536, 28, 8960, 2 * 128  # Qwen2.5-1.5B
    ht, teacher_layers = 3584, 28  # Qwen2.5-7B
    bf16, fp32 = 2, 4
    pairs = len(features_layer_map(layers, teacher_layers))  # one per student layer (28, s -> s)
    per_token = {  # bytes per token
        "teacher hidden states, bf16 (29 kept: embeddings + 28 layers)": (teacher_layers + 1) * ht * bf16,
        "projected student states, fp32 (28 pairs x 3584)": pairs * ht * fp32,
        "teacher normalised states, fp32, saved by the cosine (28 x 3584)": pairs * ht * fp32,
        "student states' fp32 copies, the projections' input (28 x 1536)": pairs * h * fp32,
        "student hidden-state tuple, bf16 (29 x 1536)": (layers + 1) * h * bf16,
    }
    brief = list(per_token)[:2]  # the two the task names; the others are what the code also keeps
    params = pairs * h * ht
    fixed = params * (fp32 + fp32 + 2 * fp32)  # weight, gradient, Adam's two moments
    layer = 20 * h + 4 * kv + 8 * inter
    student = layers * layer + 6 * h
    extra = sum(per_token.values())
    totals = {}
    for n in token_counts:
        totals[n] = {"extra_per_token_terms_gib": extra * n / 2**30,
                     "teacher_states_and_projected_only_gib": sum(per_token[k] for k in brief) * n / 2**30,
                     "projections_with_adam_gib": fixed / 2**30,
                     "feature_kd_total_gib": (extra * n + fixed) / 2**30,
                     "student_activations_gib": student * n / 2**30}
    return {"per_token_bytes": per_token, "per_token_extra_bytes": extra,
            "per_1000_tokens_mib": {k: v * 1000 / MIB for k, v in per_token.items()},
            "projection_params": params, "projection_with_adam_bytes": fixed,
            "student_layer_bytes_per_token": layer, "student_activation_bytes_per_token": student,
            "extra_over_student_activations": extra / student, "totals": totals}


def check_arithmetic() -> dict[str, Any]:
    """Bytes autograd saves per token, counted with saved-tensor hooks (parameters excluded): the
    feature loss at small widths against 4 Ht + 4 Ht + 4 Hs per pair, and one Qwen2 decoder layer
    at the 1.5B shape (bf16, 128 tokens) against 20 h + 4 kv + 8 i."""
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    from pipeline.distill import features

    def saved_bytes(fn, skip) -> int:
        skip = {p.untyped_storage().data_ptr() for p in skip}
        seen: dict[int, int] = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in skip:
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    torch.manual_seed(0)
    n, hs, ht, layers = 256, 96, 224, 4
    student = [torch.randn(1, n + 1, hs, dtype=torch.bfloat16, requires_grad=True) for _ in range(layers + 1)]
    teacher = [torch.randn(1, n + 1, ht, dtype=torch.bfloat16) for _ in range(layers + 1)]
    projections = features.FeatureProjections(features.layer_map(layers, layers), hs, ht)
    mask = torch.ones(1, n, dtype=torch.bool)
    feature = saved_bytes(lambda: features.feature_loss([s[:, :-1] for s in student], [t[:, :-1] for t in teacher],
                                                        projections, mask), projections.parameters())
    config = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=64)
    config._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(config, 0).to(torch.bfloat16)
    tokens = 128
    x = torch.randn(1, tokens, 1536, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    rope = Qwen2RotaryEmbedding(config)(x, positions)
    decoder = saved_bytes(lambda: layer(x, attention_mask=None, position_ids=positions, position_embeddings=rope),
                          layer.parameters())
    return {"feature_loss_bytes_per_token_pair": feature / n / layers, "feature_loss_model": 8 * ht + 4 * hs,
            "qwen2_1p5b_layer_bytes_per_token": decoder / tokens, "qwen2_1p5b_layer_model": 20 * 1536 + 4 * 256
            + 8 * 8960}


def print_arithmetic(a: dict[str, Any], check: dict[str, Any]) -> None:
    print("\nFeature KD at a Qwen2.5-1.5B-shaped student / Qwen2.5-7B-shaped teacher (arithmetic, bf16, 28 pairs):")
    print("| kept beyond logit KD | B/token | MiB per 1,000 tokens |\n|---|---:|---:|")
    for key, value in a["per_token_bytes"].items():
        print(f"| {key} | {value:,} | {value * 1000 / MIB:,.1f} |")
    print(f"| **sum** | {a['per_token_extra_bytes']:,} | {a['per_token_extra_bytes'] * 1000 / MIB:,.1f} |")
    print(f"| student's own activations (28 x (20h + 4kv + 8i) + 6h) | {a['student_activation_bytes_per_token']:,} | "
          f"{a['student_activation_bytes_per_token'] * 1000 / MIB:,.1f} |")
    print(f"projections: {a['projection_params'] / 1e6:.1f} M params, fp32 weight + grad + 2 Adam moments = "
          f"{a['projection_with_adam_bytes'] / 2**30:.2f} GiB (any token count); per-token terms are "
          f"{a['extra_over_student_activations']:.0%} of the student's activations")
    print("| tokens per device | teacher states + projected (GiB) | all per-token terms (GiB) | + projections "
          "with Adam = feature KD extra (GiB) | student activations (GiB) |\n|---:|---:|---:|---:|---:|")
    for n, t in a["totals"].items():
        print(f"| {n:,} | {t['teacher_states_and_projected_only_gib']:.2f} | {t['extra_per_token_terms_gib']:.2f} | "
              f"{t['feature_kd_total_gib']:.2f} | {t['student_activations_gib']:.2f} |")
    print(f"check (autograd's saved bytes, counted): feature loss {check['feature_loss_bytes_per_token_pair']:,.0f} "
          f"B/token/pair vs model {check['feature_loss_model']:,}; Qwen2 1.5B-shaped layer "
          f"{check['qwen2_1p5b_layer_bytes_per_token']:,.0f} B/token vs model {check['qwen2_1p5b_layer_model']:,}")


# ---------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method, after one warm-up step")
    parser.add_argument("--batch", type=int, default=16, help="per_device_train_batch_size (the studies': 16)")
    parser.add_argument("--methods", default=None, help="comma-separated subset (sft always runs: the reference)")
    parser.add_argument("--out", default="runs/bench/methods.json")
    parser.add_argument("--quick", action="store_true", help="smallest sizes, once (sizes given still win)")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if args.batch < 3:
        parser.error("--batch must be >= 3 (relation_kd's angles are over triplets)")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned processes
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoTokenizer

    from pipeline.demo.tiny import build_model, build_tokenizer
    from pipeline.study.grid import PEER_OFFSET  # a mutual peer's init seed: the seed's + PEER_OFFSET

    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    if build_tokenizer().get_vocab() != AutoTokenizer.from_pretrained(TEACHER).get_vocab():
        raise SystemExit(f"pipeline.demo.tiny's tokenizer is not {TEACHER}'s: the student could not be distilled "
                         "from it")
    student = build_model(work / "student", **STUDENT_INIT, seed=0)
    peer = build_model(work / "peer", **STUDENT_INIT, seed=0 + PEER_OFFSET)  # as the study's seed 0
    teacher_b = Path(shutil.copytree(TEACHER, work / "teacher-b"))
    student_copy = Path(shutil.copytree(student, work / "student-copy"))
    total = WARMUP + args.steps + 1  # + the profiled step
    data = sums_traces(work / "traces", args.batch * total)
    common = {"model": str(student), "dataset": str(data), "max_steps": total,
              "per_device_train_batch_size": args.batch, "save_strategy": "no", "logging_steps": 10**6,
              "disable_tqdm": True, "report_to": "none"}
    chosen = methods(student, peer, teacher_b, student_copy)
    if args.methods:
        wanted = ["sft", *(m for m in args.methods.split(",") if m != "sft")]
        unknown = set(wanted) - chosen.keys()
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(chosen)}")
        chosen = {name: chosen[name] for name in wanted}
    configs = {name: {**common, **keys, "output_dir": str(work / name)} for name, keys in chosen.items()}
    logs = work / "logs"
    logs.mkdir()
    print(f"{len(configs)} methods, {args.steps} timed steps each after {WARMUP} warm-up, batch {args.batch}; "
          f"work dir {work}", flush=True)
    start = time.perf_counter()
    measured, finished = run_in_turns(configs, total, logs)
    wall = time.perf_counter() - start

    times = measured["times"]
    sft = times["sft"][WARMUP:]
    rows = {}
    for name, keys in chosen.items():
        timed = times[name][WARMUP:]
        info = finished[name]
        rows[name] = {
            "config": keys,
            "step_ms": [t * 1e3 for t in timed],
            "median_step_ms": statistics.median(timed) * 1e3,
            "step_ratio": statistics.median(t / s for t, s in zip(timed, sft)),  # paired: same batch
            "setup_rss_mib": info["setup_rss_kb"] / 1024,
            "peak_mib": (info["peak_kb"] - info["setup_rss_kb"]) / 1024,
            "tensor_peak_mib": info["tensor_peak_bytes"] / MIB,
        }
    for row in rows.values():
        row["peak_ratio"] = row["peak_mib"] / rows["sft"]["peak_mib"]
        row["tensor_peak_ratio"] = row["tensor_peak_mib"] / rows["sft"]["tensor_peak_mib"]

    print("\n| method | step ms (median) | step / SFT | peak MiB (RSS growth) | peak / SFT | tensor peak MiB "
          "(profiler, one step) | tensor peak / SFT |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_step_ms']:.0f} | {r['step_ratio']:.2f} | {r['peak_mib']:.1f} | "
              f"{r['peak_ratio']:.2f} | {r['tensor_peak_mib']:.1f} | {r['tensor_peak_ratio']:.2f} |")
    tokens = [shape[0] * shape[1] for shape, _ in measured["batches"]]
    tile = min(tokens[-1], 4096) * 32768 * 4 / MIB
    print(f"tokens per batch (padded): {min(tokens)} to {max(tokens)}; step / SFT: median of the paired per-step "
          f"ratios over {args.steps} steps; measured in {wall:.0f} s (the machine's other load included)")
    print(f"sft's tensor peak includes TRL's fused LM head tile, {tile:.0f} MiB allocated in forward and in backward "
          "(32768 vocabulary columns; 320 are written, the rest never resident): compare the KD methods' tensor "
          "peaks with each other, peaks with SFT in the RSS column")

    arithmetic = feature_kd_arithmetic()
    check = check_arithmetic()
    print_arithmetic(arithmetic, check)

    import torch

    result = {
        "benchmark": "step time and peak memory of each distillation method / plain SFT, through the sft stage",
        "machine": f"{machine()}, torch {torch.__version__}, 1 thread per method process",
        "setup": {"student_init": STUDENT_INIT, "teacher": TEACHER, "base_config": BASE_CONFIG, "batch": args.batch,
                  "max_length": finished["sft"]["max_length"], "padded_tokens_per_batch": tokens,
                  "steps": args.steps, "warmup_steps": WARMUP, "profiled_steps": 1, "quick": args.quick,
                  "memory": "peak: VmHWM (reset after setup) - RSS after setup, over warm-up and timed steps; "
                            "tensor peak: torch profiler, one more step",
                  "wall_s": wall},
        "methods": rows,
        "feature_kd_arithmetic": {**arithmetic, "totals": {str(k): v for k, v in arithmetic["totals"].items()},
                                  "check": check},
    }
    save(result, args.out)


if __name__ == "__main__":
    main()

"""The shrink stage: a student built from the teacher by keeping some of its decoder layers.

    python -m pipeline shrink --config configs/shrink.yaml [--teacher DIR --num_layers N ...]

The teacher is a local Qwen2 or Llama causal-LM checkpoint with L decoder layers; the student
keeps `num_layers` of them (depth pruning), chosen by `method`:

- every_kth: evenly spaced layers, first and last kept (DistilBERT-style); needs no data;
- importance: the layers of highest Block Influence (ShortGPT) on calibration prompts, each
  rendered with the teacher's chat template as generate and eval render it.

Both are in pipeline/pruning.py.

Width (hidden, heads, MLP) is not pruned: pruning width needs its own importance scores per
channel and head plus a re-shaped config, and is not done here.

What is saved in output_dir, written to a temporary dir and renamed into place when complete:

- a transformers checkpoint of the teacher's class (Qwen2ForCausalLM / LlamaForCausalLM) with
  num_hidden_layers = num_layers, the kept layers renumbered 0..n-1, the embeddings, final norm
  and lm_head copied, and per-layer config lists (layer_types, ...) cut to the kept layers
  (Qwen2's max_window_layers becomes the number of kept layers below it, which keeps
  sliding-window placement what it was);
- the teacher's tokenizer files and generation_config.json, copied byte for byte;
- shrink.json: the teacher, the kept and dropped teacher layers, the importance scores (when
  measured), the calibration data used, and teacher and student parameter counts;
- config.yaml and run.json (pipeline/rundir.py): a rerun with the same config and an unchanged
  teacher finds the student made and does nothing; another config is refused unless
  `--overwrite` is given on the command line. A killed run starts again.

The student is then distilled like any other: `make sft ARGS="--model <output_dir>"` (or a
config with `model:` set to this output_dir), e.g. with `--kd online --teacher <the teacher>`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import UserError, require, setting
from pipeline.prompts import PromptSource, load_prompts, render
from pipeline.pruning import (
    block_influence,
    check_num_layers,
    check_state_dict,
    cut_layers,
    every_kth_layers,
    most_important_layers,
)
from pipeline.rundir import RunKeys, fingerprint, open_run, prompt_set_fingerprint

log = logging.getLogger(__name__)

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
REPORT_FILE = "shrink.json"
# Copied from the teacher byte for byte: the student must tokenize and stop exactly as it does.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
# Keys that do not change the student: a rerun may differ in them and still reuse the output.
FREE_KEYS = {"overwrite", "calibration_batch_size"}
# Keys only the importance method reads.
CALIBRATION_KEYS = {*(f.name for f in dataclasses.fields(PromptSource)), "calibration_prompts",
                    "calibration_max_tokens", "seed"}


@dataclass
class ShrinkConfig(PromptSource, RunKeys):
    """PromptSource keys (prompt_set, split, columns, template, max_prompts) say where the
    calibration prompts of the importance method come from."""

    teacher: str | None = setting(None, help="local checkpoint dir of a Qwen2 or Llama causal LM")
    output_dir: str | None = setting(None, help="the student checkpoint, shrink.json, config.yaml and run.json")
    num_layers: int = setting(2, help="decoder layers the student keeps (fewer than the teacher's)")
    method: Literal["every_kth", "importance"] = setting(
        "importance", help="importance: highest block influence on calibration prompts; every_kth: evenly spaced, "
                           "first and last kept")
    calibration_prompts: int = setting(64, help="drawn at random (seed) from the set (its first max_prompts, if set)")
    calibration_max_tokens: int = setting(1024, help="longer rendered prompts are cut to this many tokens")
    calibration_batch_size: int = setting(8, help="calibration prompts per forward pass")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", help="teacher load and student save "
                                                                                    "dtype")
    seed: int = setting(0, help="draws the calibration prompts")

    def __post_init__(self) -> None:
        PromptSource.__post_init__(self)
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1 (decoder layers the student keeps), got "
                             f"{self.num_layers}")
        for key in ("calibration_prompts", "calibration_max_tokens", "calibration_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        require(self, "teacher", "output_dir", *(["prompt_set"] if self.method == "importance" else []),
                example="configs/shrink.yaml")


def main(cfg: ShrinkConfig) -> Path:
    return shrink(cfg)



# ---------------------------------------------------------------------------- the stage

def shrink(cfg: ShrinkConfig) -> Path:
    """Build the student in output_dir (or find it already built); return output_dir."""
    teacher = Path(cfg.teacher)
    teacher_config = read_teacher_config(teacher)
    total = teacher_config["num_hidden_layers"]
    check_num_layers(cfg.num_layers, total)
    out = Path(cfg.output_dir)
    if out.resolve() == teacher.resolve():
        raise UserError(f"output_dir {str(out)!r} is the teacher's dir; pick another output_dir (the teacher is "
                        "never replaced)")
    prompts = calibration_prompts(cfg) if cfg.method == "importance" else None  # bad prompt sets fail early
    free = FREE_KEYS | (set() if cfg.method == "importance" else CALIBRATION_KEYS)  # every_kth reads no prompts
    run = open_run(cfg, "shrink", inputs(cfg), free)
    if run.complete:
        log.info(f"shrink: {out} was made by this config from this teacher; nothing to do")
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype)
    teacher_params = model.num_parameters()
    report: dict[str, Any] = {"teacher": str(teacher), "teacher_fingerprint": fingerprint(teacher),
                              "architecture": type(model).__name__, "method": cfg.method,
                              "teacher_layers": total}
    if prompts is not None:
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # causal: real tokens never see the padding after them
        templated = tokenizer.chat_template is not None
        texts = [render(tokenizer, p) if templated else p.text for p in prompts]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        scores, tokens = block_influence(model, tokenizer, texts, cfg.calibration_max_tokens,
                                         cfg.calibration_batch_size)
        model.to("cpu")
        keep = most_important_layers(scores, cfg.num_layers)
        report["importance"] = {"metric": "block influence: 1 - mean token cos(layer input, layer output)",
                                "scores": scores}
        report["calibration"] = {"prompt_set": cfg.prompt_set, "split": cfg.split, "prompts": len(prompts),
                                 "tokens": tokens, "format": "chat_template" if templated else "plain text",
                                 "prompt_ids": [p.id for p in prompts]}
    else:
        keep = every_kth_layers(total, cfg.num_layers)

    per_layer = cut_layers(model, keep)
    check_state_dict(model)
    report.update(kept_layers=keep, dropped_layers=[i for i in range(total) if i not in keep],
                  student_layers=len(keep), per_layer_config_fields=per_layer,
                  parameters={"teacher": teacher_params, "student": model.num_parameters(),
                              "student_share": round(model.num_parameters() / teacher_params, 4)})
    write_output(out, model, teacher, report)
    run.finish()
    log.info(f"shrink: kept teacher layers {keep} of {total}; {model.num_parameters():,} of "
          f"{teacher_params:,} parameters; student in {out}")
    return out


def inputs(cfg: ShrinkConfig) -> dict[str, Any]:
    """Fingerprints of what the run reads (pipeline/rundir.py): the teacher and its calibration prompts."""
    return {"teacher": fingerprint(cfg.teacher),
            "prompt_set": prompt_set_fingerprint(cfg.prompt_set) if cfg.method == "importance" else None}


def read_teacher_config(teacher: Path) -> dict[str, Any]:
    """The teacher's config.json, checked to be a local Qwen2/Llama checkpoint (without torch)."""
    if not teacher.is_dir():
        raise UserError(f"teacher {str(teacher)!r} is not a directory; set teacher to a local checkpoint dir "
                        "(config.json + weights), e.g. one saved by the sft stage")
    path = teacher / "config.json"
    if not path.is_file():
        raise UserError(f"teacher {str(teacher)!r} has no config.json; set teacher to a transformers "
                        "checkpoint dir (save_pretrained output)")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"teacher {str(teacher)!r} is a {model_type!r} model "
                        f"({', '.join(config.get('architectures') or ['no architectures'])}); shrink "
                        f"supports {', '.join(ARCHITECTURES)} ({', '.join(ARCHITECTURES.values())})")
    if config.get("per_layer_config"):
        raise UserError(f"teacher {str(teacher)!r} has a heterogeneous config (per_layer_config); shrink cuts only "
                        "models whose layers share one config")
    if not isinstance(config.get("num_hidden_layers"), int):
        raise UserError(f"teacher {str(teacher)!r}: config.json has no num_hidden_layers")
    return config


def calibration_prompts(cfg: ShrinkConfig) -> list[Any]:
    prompts = load_prompts(cfg).prompts
    if len(prompts) > cfg.calibration_prompts:
        chosen = set(random.Random(cfg.seed).sample(range(len(prompts)), cfg.calibration_prompts))
        prompts = [p for i, p in enumerate(prompts) if i in chosen]
    return prompts


def write_output(out: Path, model: Any, teacher: Path, report: dict[str, Any]) -> None:
    """The student, the teacher's tokenizer files and the report; the run is marked complete after."""
    model.save_pretrained(out)
    for name in COPIED_FILES:
        if (teacher / name).is_file():
            shutil.copy2(teacher / name, out / name)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

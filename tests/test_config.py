"""Config loading: every shipped YAML loads; unknown keys and bad values fail with names."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import COMMANDS
from pipeline.config import UserError, load_config, parse_cli, save_config
from pipeline.stages.generate import GenerateConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


def config_class(path: Path) -> type:
    import importlib

    stage = "study" if path.parent.name == "studies" else path.stem.split("-")[0].split("_")[0]
    module, name, _ = COMMANDS[stage]
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    import torch

    values = yaml.safe_load(path.read_text())
    # TrainingArguments refuses a GPU recipe's bf16 on a machine without one: check the rest here.
    overrides = {"use_cpu": "true", "bf16": "false"} if values.get("bf16") and not torch.cuda.is_available() else {}
    cfg = load_config(config_class(path), path, overrides)
    expected = {k: v for k, v in values.items() if k not in overrides}
    assert expected.items() <= {k: getattr(cfg, k) for k in vars(cfg)}.items()


def test_cli_overrides_are_typed(tmp_path: Path) -> None:
    path, overrides = parse_cli(["--config", "configs/generate.yaml", "--temperatures", "0.6,1.0",
                                 "--num_samples", "3", "--overwrite", "--max_model_len", "null"])
    assert path == "configs/generate.yaml"
    cfg = load_config(GenerateConfig, ROOT / path, overrides)
    assert cfg.temperatures == [0.6, 1.0] and cfg.num_samples == 3 and cfg.overwrite is True
    assert cfg.max_model_len is None


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("temperature: [0.6]\n")
    with pytest.raises(UserError, match=r"unknown config key 'temperature' in .*bad.yaml.*'temperatures'"):
        load_config(GenerateConfig, bad)


def test_prefix_of_a_key_is_not_accepted() -> None:
    with pytest.raises(UserError, match=r"unknown config key 'num' in the command line"):
        load_config(GenerateConfig, None, {"num": "3"})


@pytest.mark.parametrize("key,value,expected", [
    ("dtype", "fp8", r"'dtype'.*accepted values: auto, float32, bfloat16, float16"),
    ("num_samples", "many", r"'num_samples'.*expected an integer"),
    ("temperatures", "hot", r"'temperatures'.*expected a number"),
    ("export", "csv", r"'export'.*accepted values: jsonl, parquet, messages"),
    ("top_p", "0", r"top_p must be in \(0, 1\]"),
    ("template", "no placeholder", r"template must contain \{prompt\}"),
])
def test_bad_value_names_key_and_accepted(key: str, value: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        load_config(GenerateConfig, None, {key: value})


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(GenerateConfig, None, {"temperatures": "0.5,0.9", "max_prompts": "7",
                                             "output_dir": "runs/demo/traces", "model": "prompts/arithmetic/teacher",
                                             "prompt_set": "prompts/arithmetic"})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(GenerateConfig, tmp_path / "config.yaml") == cfg


@pytest.mark.slow  # a process: `python -m pipeline` itself (the same error in-process: tests/test_cli.py)
def test_cli_reports_unknown_key_without_starting_anything() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "generate", "--config", "configs/generate.yaml",
                             "--temprature", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown config key 'temprature' in the command line. Did you mean 'temperatures'?" in result.stderr


def test_yaml_1_1_traps_are_avoided(tmp_path: Path) -> None:
    """`no`/`off` stay strings (YAML 1.1 reads them as false) and 1e-5 is a number."""
    from pipeline.stages.sft import SFTStageConfig

    path = tmp_path / "sft.yaml"
    path.write_text("save_strategy: no\nlearning_rate: 1e-5\nuse_cpu: true\nbf16: false\n"
                    "output_dir: runs/demo/student-sft\nmodel: runs/demo/student-init\ndataset: runs/demo/traces\n")
    cfg = load_config(SFTStageConfig, path, {"lr_scheduler_type": "constant", "weight_decay": "1e-2"})
    assert cfg.save_strategy == "no" and cfg.learning_rate == 1e-5 and cfg.weight_decay == 0.01


ENGINE_CONFIGS = [p for p in SHIPPED if p.stem in ("generate", "eval")]


@pytest.mark.parametrize("path", ENGINE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
@pytest.mark.parametrize("extra", [{}, {"tensor_parallel_size": "2", "distributed_executor_backend": "ray"}],
                         ids=["as shipped", "ray executor"])
@pytest.mark.slow  # imports vLLM (seconds)
def test_engine_arguments_build_a_vllm_engine_config(path: Path, extra: dict, tmp_path_factory) -> None:
    """What each shipped config hands vllm.LLM, checked by vLLM itself without weights: a stand-in
    model dir with a long-context config takes the place of the hub teacher. Data parallelism is
    replicas of ours: vLLM's offline LLM refuses data_parallel_size > 1."""
    from vllm.engine.arg_utils import EngineArgs

    from pipeline.demo.tiny import build_model
    from pipeline.inference.engine import engine_kwargs
    from pipeline.stages.eval import EvalConfig, generate_config

    stand_in = tmp_path_factory.getbasetemp() / "long-context-stand-in"
    if not stand_in.exists():
        build_model(stand_in, max_position_embeddings=131072)
    cfg = load_config(config_class(path), path, extra)
    if isinstance(cfg, EvalConfig):  # eval samples each model through the generate stage's config
        cfg = generate_config(cfg, str(stand_in), tmp_path_factory.getbasetemp())
    kwargs = engine_kwargs(dataclasses.replace(cfg, model=str(stand_in)), gpu=True)
    assert "data_parallel_size" not in kwargs
    engine = EngineArgs(**kwargs).create_engine_config()
    assert engine.parallel_config.world_size == cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    assert engine.parallel_config.data_parallel_size == 1
    assert engine.model_config.max_model_len == (cfg.max_model_len or 131072)

"""python -m pipeline STAGE --config FILE [--key value ...]"""

from __future__ import annotations

import importlib
import sys

from pipeline.config import ConfigError, load_config, parse_cli
from pipeline.prompts import PromptSetError

# stage name -> (module, config class); modules are imported only when their stage runs.
STAGES = {"generate": ("pipeline.generate", "GenerateConfig"),
          "curate": ("pipeline.curate", "CurateStageConfig"),
          "shrink": ("pipeline.shrink", "ShrinkConfig"),
          "sft": ("pipeline.sft", "SFTStageConfig"),
          "onpolicy": ("pipeline.onpolicy", "OnPolicyConfig"),
          "eval": ("pipeline.eval", "EvalConfig")}


def run(argv: list[str]) -> None:
    if not argv or argv[0] not in STAGES:
        raise ConfigError(f"usage: python -m pipeline {{{','.join(STAGES)}}} --config FILE [--key value ...]")
    module_name, config_name = STAGES[argv[0]]
    module = importlib.import_module(module_name)
    config_path, overrides = parse_cli(argv[1:])
    module.main(load_config(getattr(module, config_name), config_path, overrides))


if __name__ == "__main__":  # the guard matters: vLLM starts its workers with spawn
    try:
        run(sys.argv[1:])
    except (ConfigError, PromptSetError, FileNotFoundError, ConnectionError) as err:  # bad input: one line, what to do
        sys.exit(f"error: {err}")

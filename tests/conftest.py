"""Shared fixtures: tiny local models (nothing is downloaded) and a small vLLM KV cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# vLLM's CPU backend sizes its KV cache from this (GiB); tests need very little.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.demo.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.demo.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_engine(tiny_qwen: Path, tmp_path_factory: pytest.TempPathFactory):
    """One in-process vLLM engine on tiny_qwen (context 512) for every test that samples."""
    from pipeline.inference.engine import build_engine, shutdown
    from pipeline.stages.generate import GenerateConfig

    engine = build_engine(GenerateConfig(model=str(tiny_qwen), max_model_len=512, dtype="float32", enforce_eager=True,
                                         output_dir=str(tmp_path_factory.mktemp("engine")),
                                         prompt_set="prompts/arithmetic"))
    yield engine
    shutdown(engine)


@pytest.fixture(scope="session")
def traces(tiny_qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Traces made by the real generate stage (vLLM) from the tiny teacher."""
    out = tmp_path_factory.mktemp("traces") / "traces"
    subprocess.run([sys.executable, "-m", "pipeline", "generate", "--config", "configs/generate.yaml",
                    "--model", str(tiny_qwen), "--output_dir", str(out), "--max_prompts", "16",
                    "--max_tokens", "48", "--logprobs", "8", "--temperatures", "0.6,1.0", "--num_samples", "2",
                    "--drop_truncated", "false",
                    "--decontaminate_against", "[]", "--keep_correct_only", "false",
                    "--drop_unclean_text", "false"],  # a random teacher's bytes are often not UTF-8
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out

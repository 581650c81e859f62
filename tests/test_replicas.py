"""Data-parallel generation: 2 engine replicas as local processes and as Ray actors, on CPU.

Each run is the real command (`python -m pipeline generate`) in a subprocess. One replica is
killed mid-run; the run reports it, and the same command run again finishes the work: every
unit exactly once, the same units a single engine makes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.config import load_config
from pipeline.inference.engine import run_replicas
from pipeline.stages.generate import GenerateConfig, generate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, model: Path, **extra) -> Path:
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "traces"), "model": str(model), "prompt_set": str(ROOT / "prompts/arithmetic"),
        "split": "test", "max_prompts": 24, "temperatures": [0.6, 1.0], "num_samples": 2, "max_tokens": 64,
        "max_model_len": 512, "dtype": "float32", "shard_size": 4, "enforce_eager": True, "curate": False,
        "export": [], "data_parallel_size": 2, **extra}))
    return path


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "generate", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(condition, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def kill_one_replica_mid_run(config: Path, is_replica) -> tuple[str, list[set[int]]]:
    """Start the run, kill one replica once two shards are stored; return the run's output and
    the CPU cores each replica was bound to."""
    shards = config.parent / "traces" / "shards"
    proc = start(config)
    try:
        wait_for(lambda: len(list(shards.glob("shard-*.parquet"))) >= 2 or proc.poll() is not None)
        replicas = [p for p in psutil.process_iter(["cmdline"]) if is_replica(p, proc.pid)]
        assert len(replicas) == 2, [p.info["cmdline"] for p in replicas]
        cores = [set(p.cpu_affinity()) for p in replicas]
        replicas[1].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "1 of 2 replicas failed" in output, output[-3000:]
    return output, cores


def finish_and_compare(config: Path, tiny_qwen: Path, tiny_engine, tmp_path: Path) -> None:
    shards_before = len(list((config.parent / "traces" / "shards").glob("shard-*.parquet")))
    rerun = subprocess.run([sys.executable, "-m", "pipeline", "generate", "--config", str(config)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    import datasets
    replicas = datasets.load_from_disk(str(config.parent / "traces" / "samples"))
    keys = [(r["prompt_id"], r["temperature"], r["sample_index"]) for r in replicas]
    assert len(keys) == len(set(keys)) == 24 * 2 * 2
    assert 0 < shards_before

    # One engine, same config: the same units, each from the same prompt tokens with the same seed. The
    # texts are not compared: batch composition changes the numerics, so a completion may differ.
    single = generate(load_config(GenerateConfig, config, {"output_dir": str(tmp_path / "single"),
                                                           "data_parallel_size": "1", "ray_address": "null"}),
                      tiny_engine)
    columns = ["prompt_id", "temperature", "sample_index", "seed", "prompt_tokens", "prompt"]

    def units(ds) -> list[tuple]:
        return sorted((*(r[c] for c in columns[:-1]), str(r["prompt"])) for r in ds.select_columns(columns))

    assert units(replicas) == units(single) and len(units(single)) == 24 * 2 * 2


def test_two_process_replicas_survive_a_killed_replica(tmp_path: Path, tiny_qwen: Path, tiny_engine) -> None:
    config = write_config(tmp_path, tiny_qwen)

    def is_replica(p: psutil.Process, driver: int) -> bool:
        cmdline = " ".join(p.info["cmdline"] or [])
        return "spawn_main" in cmdline and "resource_tracker" not in cmdline and p.ppid() == driver

    _, cores = kill_one_replica_mid_run(config, is_replica)
    assert not cores[0] & cores[1], f"the two replicas share cores: {cores}"
    finish_and_compare(config, tiny_qwen, tiny_engine, tmp_path)

    # Finished: a rerun starts no replica at all (a replica with no work: the last test here).
    again = subprocess.run([sys.executable, "-m", "pipeline", "generate", "--config", str(config)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "sampled by this config already" in again.stdout, again.stderr[-2000:]


def test_two_ray_actors_on_a_local_ray_instance(tmp_path: Path, tiny_qwen: Path, tiny_engine) -> None:
    pytest.importorskip("ray")
    config = write_config(tmp_path, tiny_qwen, ray_address="local")

    def is_replica(p: psutil.Process, driver: int) -> bool:
        return " ".join(p.info["cmdline"] or []).startswith("ray::RayReplica")

    kill_one_replica_mid_run(config, is_replica)
    finish_and_compare(config, tiny_qwen, tiny_engine, tmp_path)


def test_eval_on_two_replicas_scores_as_one_engine(tmp_path: Path, tiny_qwen: Path) -> None:
    """The eval stage's vLLM backend is a traces run per model: 2 replicas split its prompts."""
    from pipeline.stages.eval import EvalConfig, main

    def evaluate(out: str, replicas: int) -> tuple[dict, list]:
        report = main(load_config(EvalConfig, None, {
            "models": f"qwen={tiny_qwen}", "prompt_set": str(ROOT / "prompts/arithmetic"), "max_prompts": 6,
            "num_samples": 2, "max_tokens": 16, "dtype": "float32", "max_model_len": 512, "enforce_eager": True,
            "score_workers": 1, "output_dir": str(tmp_path / out), "data_parallel_size": replicas}))
        rows = [json.loads(line) for line in (tmp_path / out / "samples.jsonl").open()]
        texts = sorted((r["prompt_id"], r["sample_index"], r["completion"][0]["content"]) for r in rows)
        return report["models"], texts

    two, one = evaluate("two", 2), evaluate("one", 1)
    assert len(one[1]) == 6 * 2 and two == one
    assert sorted((tmp_path / "two/generations/qwen/shards").glob("shard-r001-*.parquet")), "replica 1 sampled"


def stand_in_job(cfg: GenerateConfig, share: list[str], llm) -> object:
    """A stand-in for the sampling service's sample_shards, without an engine: yields its share, returns
    its size."""
    for item in share:
        if item == "boom":
            raise ValueError("boom")
        yield item
    return len(share)


def test_a_replica_with_no_work_or_a_failing_one_does_not_hang_the_others() -> None:
    cfg = GenerateConfig(data_parallel_size=2, output_dir="runs/demo/traces", model="prompts/arithmetic/teacher",
                         prompt_set="prompts/arithmetic")
    got: list = []
    assert run_replicas(cfg, stand_in_job, [["a", "b"], []], lambda r, item: got.append((r, item))) == [2, 0]
    assert got == [(0, "a"), (0, "b")]
    got.clear()
    with pytest.raises(RuntimeError, match=r"1 of 2 replicas failed(.|\n)*replica 0:(.|\n)*ValueError: boom"):
        run_replicas(cfg, stand_in_job, [["a", "boom"], ["c", "d"]], lambda r, item: got.append((r, item)))
    assert sorted(got) == [(0, "a"), (1, "c"), (1, "d")]

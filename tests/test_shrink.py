"""The shrink stage: a student made of some of the teacher's layers, computing what the teacher
computes without the others, loadable by transformers and vLLM; importance finds an idle layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import UserError, load_config
from pipeline.pruning import block_influence, every_kth_layers, most_important_layers
from pipeline.stages.shrink import ShrinkConfig, shrink

ROOT = Path(__file__).resolve().parents[1]
SUMS = {"prompt_set": str(ROOT / "prompts/sums"), "split": "train"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five-layer random teachers, one per architecture."""
    from pipeline.demo.tiny import build_model

    return {arch: build_model(tmp_path_factory.mktemp(f"teacher-{arch}"), arch=arch, num_layers=5, seed=1)
            for arch in ("qwen2", "llama")}


@pytest.fixture(scope="module")
def students(teachers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every other layer of each teacher (0, 2, 4 of 5), written by the stage."""
    base = tmp_path_factory.mktemp("students")
    return {arch: shrink(ShrinkConfig(teacher=str(path), output_dir=str(base / arch), num_layers=3,
                                      method="every_kth", **SUMS))
            for arch, path in teachers.items()}


def test_every_kth_spacing() -> None:
    assert every_kth_layers(24, 8) == [0, 3, 7, 10, 13, 16, 20, 23]
    assert every_kth_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert every_kth_layers(5, 3) == [0, 2, 4]
    assert every_kth_layers(4, 2) == [0, 3]
    assert every_kth_layers(4, 3) == [0, 2, 3]
    assert every_kth_layers(4, 1) == [0]
    for total in range(2, 40):
        for keep in range(2, total):
            kept = every_kth_layers(total, keep)
            assert kept[0] == 0 and kept[-1] == total - 1 and kept == sorted(set(kept)) and len(kept) == keep
    assert most_important_layers([0.5, 0.1, 0.9, 0.1, 0.7], 3) == [0, 2, 4]
    with pytest.raises(UserError, match=r"num_layers 4: the teacher has 4 decoder layers; set num_layers between 1 "
                                          r"and 3"):
        every_kth_layers(4, 4)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_student_is_the_teacher_without_the_dropped_layers(arch: str, teachers: dict, students: dict) -> None:
    """Student logits equal the teacher's with layers 1 and 3 replaced by the identity (hooks)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = students[arch]
    report = json.loads((out / "shrink.json").read_text())
    assert report["kept_layers"] == [0, 2, 4] and report["dropped_layers"] == [1, 3]
    assert report["parameters"]["student"] < report["parameters"]["teacher"]

    student, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(student).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert len(getattr(student.config, "layer_types", None) or [0] * 3) == 3  # qwen2 has them, llama not
    assert student.num_parameters() == report["parameters"]["student"]
    teacher = AutoModelForCausalLM.from_pretrained(teachers[arch]).eval()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (teachers[arch] / name).read_bytes(), name
    assert AutoTokenizer.from_pretrained(out)("What is 1 + 2?").input_ids == \
        AutoTokenizer.from_pretrained(teachers[arch])("What is 1 + 2?").input_ids

    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = teacher(input_ids=ids).logits
        hooks = [teacher.model.layers[i].register_forward_hook(lambda module, args, output: args[0])
                 for i in (1, 3)]
        skipped = teacher(input_ids=ids).logits
        for hook in hooks:
            hook.remove()
        got = student.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, skipped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # the dropped layers did something: the check can fail


def test_importance_drops_an_idle_layer_first(tmp_path: Path) -> None:
    """Layer 2 with zero o_proj and down_proj is the identity (BI 0): it goes first. The hooked BI
    equals one computed from output_hidden_states, prompt by prompt (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.demo.tiny import build_model
    from pipeline.prompts import load_prompts, render

    teacher_dir = build_model(tmp_path / "teacher", num_layers=4, seed=2)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    model.save_pretrained(teacher_dir)

    out = shrink(ShrinkConfig(teacher=str(teacher_dir), output_dir=str(tmp_path / "student"), num_layers=3,
                              method="importance", calibration_prompts=6, calibration_batch_size=4, **SUMS))
    report = json.loads((out / "shrink.json").read_text())
    scores = report["importance"]["scores"]
    assert report["kept_layers"] == [0, 1, 3] and report["dropped_layers"] == [2], scores
    assert abs(scores[2]) < 1e-6 and min(scores[i] for i in (0, 1, 3)) > 1e-3, scores
    assert report["calibration"]["prompts"] == 6 and report["calibration"]["format"] == "chat_template"

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    calibration = load_config(ShrinkConfig, None, {**SUMS, "teacher": "prompts/sums/teacher",
                                                   "output_dir": "runs/demo/student-shrunk"})
    prompts = [p for p in load_prompts(calibration).prompts
               if p.id in report["calibration"]["prompt_ids"]]
    texts = [render(tokenizer, p) for p in prompts]
    cos_sums, tokens = torch.zeros(4, dtype=torch.float64), 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
            tokens += ids.shape[1]
            for layer in range(3):  # the last entry of hidden_states is after the final norm
                cos_sums[layer] += torch.nn.functional.cosine_similarity(states[layer], states[layer + 1], dim=-1).sum()
    assert tokens == report["calibration"]["tokens"]
    expected = (1 - cos_sums / tokens).tolist()
    assert scores[:3] == pytest.approx(expected[:3], abs=1e-5)
    hooked, _ = block_influence(model, tokenizer, texts, max_tokens=1024, batch_size=len(texts))
    assert hooked == pytest.approx(scores, abs=1e-5)  # padding in a batch changes nothing


@pytest.mark.slow
def test_vllm_samples_the_student_as_transformers_does(students: dict, tmp_path: Path) -> None:
    """vLLM loads the shrunk checkpoint; its greedy tokens are the student's argmax in transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    from pipeline.inference.engine import build_engine, shutdown
    from pipeline.stages.generate import GenerateConfig

    out = students["qwen2"]
    engine = build_engine(GenerateConfig(model=str(out), max_model_len=256, dtype="float32", enforce_eager=True,
                                         output_dir=str(tmp_path / "engine"), prompt_set="prompts/arithmetic"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in ("What is 3 + 4?", "Hi")]
    try:
        outputs = engine.generate(texts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    finally:
        shutdown(engine)
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    for text, output in zip(texts, outputs):
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        sampled = list(output.outputs[0].token_ids)
        assert len(sampled) == 8
        with torch.no_grad():
            logits = student(input_ids=torch.tensor([prompt_ids + sampled])).logits[0, len(prompt_ids) - 1:-1]
        chosen = logits.gather(1, torch.tensor(sampled)[:, None])[:, 0]
        assert (chosen >= logits.max(dim=1).values - 1e-3).all(), (sampled, logits.argmax(dim=1).tolist())


def test_rerun_reuses_and_another_config_is_refused(teachers: dict, students: dict) -> None:
    out = students["llama"]
    cfg = ShrinkConfig(teacher=str(teachers["llama"]), output_dir=str(out), num_layers=3, method="every_kth", **SUMS)
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert shrink(cfg) == out and (out / "model.safetensors").stat().st_mtime_ns == weights
    with pytest.raises(UserError, match=r"was made with other settings \(num_layers: 3 -> 2\).*--overwrite"):
        shrink(ShrinkConfig(**{**vars(cfg), "num_layers": 2}))
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    shrink(ShrinkConfig(**{**vars(cfg), "num_layers": 2, "overwrite": True}))
    assert json.loads((out / "shrink.json").read_text())["kept_layers"] == [0, 4]
    (out / "run.json").unlink()  # as a directory made before runs were recorded
    with pytest.raises(UserError, match="holds files but no run.json"):
        shrink(cfg)


def test_bad_inputs_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"num_layers must be at least 1.*got 0"):
        load_config(ShrinkConfig, None, {"num_layers": "0"})
    with pytest.raises(UserError, match=r"'method'.*accepted values: every_kth, importance"):
        load_config(ShrinkConfig, None, {"method": "random"})
    with pytest.raises(UserError, match=r"teacher '.*nowhere' is not a directory"):
        shrink(ShrinkConfig(teacher=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "out"),
                            prompt_set="prompts/sums"))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2/config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                          "num_hidden_layers": 12}))
    with pytest.raises(UserError, match=r"is a 'gpt2' model \(GPT2LMHeadModel\); shrink supports qwen2, llama"):
        shrink(ShrinkConfig(teacher=str(tmp_path / "gpt2"), output_dir=str(tmp_path / "out"),
                            prompt_set="prompts/sums"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match=r"is the teacher's dir"):
        shrink(ShrinkConfig(teacher=str(ROOT / "prompts/sums/teacher"), output_dir=str(ROOT / "prompts/sums/teacher"),
                            prompt_set="prompts/sums"))


def test_cli_refuses_a_num_layers_the_teacher_cannot_give_in_one_line(tmp_path: Path, capsys) -> None:
    """`python -m pipeline shrink` on the shipped config with a num_layers the sums teacher cannot give:
    one line naming the key, nothing written (the shipped config runs as `make shrink` in
    tests/test_make.py)."""
    from pipeline import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["shrink", "--config", str(ROOT / "configs/shrink.yaml"), "--teacher",
                  str(ROOT / "prompts/sums/teacher"), "--output_dir", str(tmp_path / "bad"), "--num_layers", "4"])
    assert exit_.value.code != 0 and not (tmp_path / "bad").exists()
    assert capsys.readouterr().err.strip() == ("error: num_layers 4: the teacher has 4 decoder layers; set num_layers "
                                               "between 1 and 3")

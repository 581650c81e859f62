"""The distillation family (pipeline/distill/): the mathematics of each loss, then each method as a
configuration of the sft stage with real TRL training on tiny local models."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill import features, relations
from pipeline.distill.logits import chunked_kd_loss
from pipeline.distill.reference import naive_kd_loss


@pytest.fixture(autouse=True)
def float64(request: pytest.FixtureRequest):
    """The mathematics in float64 (gradients against naive versions, to 1e-10); training as it runs."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------------------- features

def naive_feature_loss(student_states, teacher_states, projections, mask) -> torch.Tensor:
    """Token by token: half the squared distance of the unit vectors, summed, / tokens, / pairs."""
    total = 0.0
    for (s, t), project in zip(projections.pairs, projections.maps):
        for b, i in mask.nonzero().tolist():
            z_s, z_t = project(student_states[s][b, i]), teacher_states[t][b, i]
            total = total + 0.5 * (z_t / z_t.norm() - z_s / z_s.norm()).pow(2).sum()
    return total / mask.sum() / len(projections.pairs)


def feature_case(seed: int = 0):
    torch.manual_seed(seed)
    student = tuple(torch.randn(2, 5, 6, requires_grad=True) for _ in range(4))  # 3 layers + embeddings
    teacher = tuple(torch.randn(2, 5, 8) for _ in range(5))
    projections = features.FeatureProjections(features.layer_map(3, 4), 6, 8).double()
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    return student, teacher, projections, mask


def test_layer_map_pairs_layers_evenly_or_as_written() -> None:
    assert features.layer_map(3, 4) == [(1, 1), (2, 3), (3, 4)]
    assert features.layer_map(2, 2) == [(1, 1), (2, 2)]
    assert features.layer_map(3, 4, ["0:0", "3:4"]) == [(0, 0), (3, 4)]
    with pytest.raises(ValueError, match="'3:9'.*0..4 for the teacher"):
        features.layer_map(3, 4, ["3:9"])
    with pytest.raises(ValueError, match="'a:b' is not 'student:teacher'"):
        features.layer_map(3, 4, ["a:b"])


def test_feature_loss_is_zero_when_projected_states_point_as_the_teacher_and_matches_naive_gradients() -> None:
    student, teacher, projections, mask = feature_case()
    fast = features.feature_loss(student, teacher, projections, mask)
    naive = naive_feature_loss(student, teacher, projections, mask)
    assert float(fast) == pytest.approx(float(naive), rel=1e-10) and float(fast) > 0
    params = [*student[1:], *projections.parameters()]
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(naive, params)):
        assert torch.allclose(a, b, atol=1e-12)
    # The teacher's states are the projected student's, scaled per token: zero (directions only).
    with torch.no_grad():
        same = tuple(torch.zeros(2, 5, 8) for _ in range(5))
        for (s, t), project in zip(projections.pairs, projections.maps):
            same[t].copy_(project(student[s]) * torch.rand(2, 5, 1).add(0.5))
    assert float(features.feature_loss(student, same, projections, mask)) == pytest.approx(0.0, abs=1e-12)


def test_feature_loss_ignores_scale_and_divides_by_the_whole_batchs_tokens() -> None:
    student, teacher, projections, mask = feature_case(1)
    base = features.feature_loss(student, teacher, projections, mask)
    scaled = features.feature_loss(tuple(3.0 * s for s in student), tuple(0.1 * t for t in teacher), projections, mask)
    assert float(scaled) == pytest.approx(float(base), rel=1e-10)
    # 2 accumulation steps: each call's share over the 2 steps' tokens adds up to the mean
    halves = [features.feature_loss(student, teacher, projections, mask & part, num_items=int(mask.sum()))
              for part in (torch.arange(5) < 3, torch.arange(5) >= 3)]
    assert float(sum(halves)) == pytest.approx(float(base), rel=1e-10)


# ------------------------------------------------------------------------------ relations

def naive_distance_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum((s[i] - s[j]).norm() for i, j in pairs) / len(pairs)
    mu_t = sum((t[i] - t[j]).norm() for i, j in pairs) / len(pairs)
    terms = [F.smooth_l1_loss((s[i] - s[j]).norm() / mu_s, (t[i] - t[j]).norm() / mu_t) for i, j in pairs]
    return sum(terms) / (n * n)  # the diagonal's n zero terms count in the mean, as in the official code


def naive_angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    n, total = len(s), 0.0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                if i == j or k == j:
                    continue  # a zero vector: 0 on both sides
                a_s = F.cosine_similarity(s[i] - s[j], s[k] - s[j], dim=0)
                a_t = F.cosine_similarity(t[i] - t[j], t[k] - t[j], dim=0)
                total = total + F.smooth_l1_loss(a_s, a_t)
    return total / n**3


@pytest.mark.parametrize("loss,naive", [(relations.distance_loss, naive_distance_loss),
                                        (relations.angle_loss, naive_angle_loss)])
def test_relational_losses_match_naive_loops_and_are_zero_for_the_teachers_own_geometry(loss, naive) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 6, requires_grad=True), torch.randn(5, 9)
    fast, slow = loss(s, t), naive(s, t)
    assert float(fast) == pytest.approx(float(slow), rel=1e-9) and float(fast) > 0
    assert torch.allclose(torch.autograd.grad(fast, s)[0], torch.autograd.grad(slow, s)[0], atol=1e-10)
    # The teacher's geometry in another width, scaled, rotated and shifted: nothing to learn.
    rotation = torch.linalg.qr(torch.randn(9, 9))[0]
    same = (2.5 * t @ rotation + 1.0)[:, :9]
    assert float(loss(same, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(7.0 * s, t)) == pytest.approx(float(fast), rel=1e-9)


def test_pooling_averages_each_samples_trained_positions() -> None:
    hidden = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[True, True, False], [False, False, True]])
    assert relations.pooled(hidden, mask).tolist() == [[1.0, 2.0], [10.0, 11.0]]


# ------------------------------------------------------------------------------- ensemble

def test_an_ensemble_teacher_is_the_mean_of_its_members_probabilities() -> None:
    torch.manual_seed(0)
    n, v = 7, 11
    h, w = torch.randn(n, 4, requires_grad=True), torch.randn(v, 4)
    labels = torch.randint(0, v, (n,))
    members = [(torch.randn(n, 3), torch.randn(v, 3)), (torch.randn(n, 5), torch.randn(v + 2, 5))]  # padded head
    t = 2.0
    p = sum(F.softmax(hm @ wm[:v].T / t, -1) for hm, wm in members) / 2
    by_hand = F.kl_div(F.log_softmax(h @ w.T / t, -1), p, reduction="sum") * t**2 / n
    kwargs = dict(teacher_hidden=[m[0] for m in members], teacher_lm_head_weight=[m[1] for m in members],
                  temperature=t, vocab_size=v, chunk_size=3)
    chunked, naive = chunked_kd_loss(h, w, labels, **kwargs), naive_kd_loss(h, w, labels, **kwargs)
    assert float(chunked["kd_loss"]) == pytest.approx(float(by_hand), rel=1e-10)
    assert float(naive["kd_loss"]) == pytest.approx(float(by_hand), rel=1e-10)
    assert torch.allclose(torch.autograd.grad(chunked["kd_loss"], h)[0], torch.autograd.grad(by_hand, h)[0])
    # Two copies of one teacher are that teacher; members equal to the student teach nothing.
    twice = chunked_kd_loss(h, w, labels, teacher_hidden=[h, h], teacher_lm_head_weight=[w, w])
    assert float(twice["kd_loss"]) == pytest.approx(0.0, abs=1e-12)
    single = chunked_kd_loss(h, w, labels, teacher_hidden=members[0][0], teacher_lm_head_weight=members[0][1])
    pair = chunked_kd_loss(h, w, labels, teacher_hidden=[members[0][0]] * 2, teacher_lm_head_weight=[members[0][1]] * 2)
    assert float(pair["kd_loss"]) == pytest.approx(float(single["kd_loss"]), rel=1e-10)


# ------------------------------------------------------------------- the sft stage, for real

def logged(out: Path, key: str) -> list[float]:
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    return [h[key] for h in state["log_history"] if key in h]


@pytest.mark.slow
def test_feature_and_relational_kd_train_beside_the_logit_term_and_resume(tmp_path: Path, tiny_qwen: Path,
                                                                          tiny_llama: Path, traces: Path, caplog,
                                                                          monkeypatch) -> None:
    from safetensors.torch import load_file
    from test_sft import killed_after_the_first_checkpoint, sft_config

    from pipeline.stages.sft import main

    cfg = dict(kd="online", teacher=str(tiny_llama), feature_kd=True, relation_kd=True, per_device_train_batch_size=4)
    killed_after_the_first_checkpoint(sft_config(tmp_path, tiny_qwen, traces, max_steps=4, **cfg), monkeypatch)
    caplog.set_level(logging.INFO, logger="pipeline")
    out = main(sft_config(tmp_path, tiny_qwen, traces, max_steps=4, **cfg))
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    terms = {k: logged(out, k) for k in ("loss", "ce_loss", "kd_loss", "feature_loss", "relation_distance_loss",
                                          "relation_angle_loss")}
    assert all(len(v) == 4 and all(x > 0 for x in v) for v in terms.values()), terms
    weighted = [0.5 * c + 0.5 * k + f + 25 * d + 50 * a for c, k, f, d, a in
                zip(*(terms[k] for k in ("ce_loss", "kd_loss", "feature_loss", "relation_distance_loss",
                                         "relation_angle_loss")))]
    assert terms["loss"] == pytest.approx(weighted, rel=1e-3)
    # The projections are in the checkpoints (resume), not in the student.
    projections = torch.load(out / "checkpoint-4" / "distill_modules.pt")
    assert set(projections) == {f"features.maps.{i}.weight" for i in range(2)}  # 2 student layers
    assert not any("distill_modules" in key for key in load_file(out / "model.safetensors"))
    assert not (out / "distill_modules.pt").exists()
    assert "feature" in (out / "README.md").read_text()


@pytest.mark.slow
def test_an_ensemble_of_two_copies_teaches_what_one_does(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path,
                                                         traces: Path) -> None:
    from test_sft import sft_config

    from pipeline.stages.sft import main

    one = main(sft_config(tmp_path / "one", tiny_qwen, traces, max_steps=2, kd="online", teacher=str(tiny_llama)))
    two = main(sft_config(tmp_path / "two", tiny_qwen, traces, max_steps=2, kd="online",
                          teacher=[str(tiny_llama), str(tiny_llama)]))
    assert logged(two, "kd_loss") == pytest.approx(logged(one, "kd_loss"), rel=1e-5)
    assert "ensemble" in (two / "README.md").read_text()


@pytest.mark.slow
def test_mutual_learning_trains_and_saves_both_students(tmp_path: Path, tiny_qwen: Path, tiny_llama: Path,
                                                        traces: Path) -> None:
    from safetensors.torch import load_file
    from test_sft import sft_config

    from pipeline.stages.sft import main

    out = main(sft_config(tmp_path, tiny_qwen, traces, max_steps=2, kd="mutual", mutual_peer=str(tiny_llama)))
    for key in ("ce_loss", "kd_loss", "peer_ce_loss", "peer_kd_loss"):
        assert len(logged(out, key)) == 2 and all(x > 0 for x in logged(out, key)), key
    for trained, init in ((out, tiny_qwen), (out / "peer", tiny_llama)):
        after, before = load_file(trained / "model.safetensors"), load_file(init / "model.safetensors")
        assert set(after) == set(before), trained  # a plain checkpoint of its own architecture
        assert any(not torch.equal(after[k], before[k]) for k in before), f"{trained} did not train"
    assert (out / "peer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_born_again_generations_each_learn_from_the_one_before(tmp_path: Path, tiny_qwen: Path, traces: Path,
                                                               caplog) -> None:
    import yaml
    from test_sft import sft_config

    from pipeline.stages.sft import main

    cfg = sft_config(tmp_path, tiny_qwen, traces, max_steps=2, generations=2)
    out = main(cfg)
    first = out / "generation-1"
    assert (first / "model.safetensors").is_file() and logged(first, "loss") and not logged(first, "kd_loss")
    assert len(logged(out, "kd_loss")) == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["generations"] == 2  # the run as it was asked for
    assert json.loads((first / "run.json").read_text())["status"] == "complete"
    caplog.set_level(logging.INFO, logger="pipeline")
    main(sft_config(tmp_path, tiny_qwen, traces, max_steps=2, generations=2))  # a rerun trains nothing again
    assert "trained by this config already" in caplog.text


@pytest.mark.parametrize("overrides,message", [
    ({"feature_kd": True}, "^SFTStageConfig: feature_kd reads a local teacher"),
    ({"relation_kd": True, "teacher": "t"}, "^SFTStageConfig: relation_kd reads a local teacher"),
    ({"feature_kd": True, "relation_kd": True}, "^SFTStageConfig: feature_kd and relation_kd read a local teacher"),
    ({"kd": "online", "teacher": ["a", "b"], "relation_kd": True}, "one model path"),
    ({"kd": "online", "teacher": "t", "relation_kd": True, "per_device_train_batch_size": 2}, ">= 3"),
    ({"kd": "mutual"}, "mutual_peer"),
    ({"generations": 0}, "generations must be >= 1"),
])
def test_method_keys_that_cannot_work_are_refused(tmp_path: Path, overrides: dict, message: str) -> None:
    from pipeline.config import load_config
    from pipeline.stages.sft import SFTStageConfig

    with pytest.raises(ValueError, match=message):
        load_config(SFTStageConfig, None, {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False,
                                           "model": "runs/demo/student-init", "dataset": "runs/demo/traces",
                                           **overrides})

"""The study's statistics (pipeline/study/stats.py): exact values on small inputs, and the coverage
of the hierarchical bootstrap on synthetic studies with a known difference, at 3 and 5 seeds.

Synthetic study: d[seed, prompt] = delta + u[seed] + v[prompt] + w[seed, prompt], where u is the
training noise of a seed (sd `seed_sd`), v a prompt's difference shared by every seed (sd 0.3) and
w the eval's sampling noise (sd 0.2), over 200 prompts: roughly the scale of the sums studies
(seed-level spread of a difference 0.03 to 0.09, per-prompt differences of a few samples).
`python tests/test_study_stats.py` prints the table docs/studies.md quotes (1,000 studies each).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.study import stats

DELTA = 0.05


def synthetic(rng: np.random.Generator, seeds: int, seed_sd: float, delta: float = DELTA, prompts: int = 200,
              prompt_sd: float = 0.3) -> np.ndarray:
    return (delta + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, prompt_sd, prompts)
            + rng.normal(0, 0.2, (seeds, prompts)))


def coverage(seeds: int, seed_sd: float, studies: int, delta: float = DELTA, prompt_sd: float = 0.3
             ) -> dict[str, float]:
    """Over `studies` synthetic studies: how often the 95% interval holds delta, how often each test
    rejects at 0.05 (bootstrap) and at its smallest p (sign flip)."""
    rng = np.random.default_rng(seeds * 100 + int(seed_sd * 1000))
    held = boot_rejects = flip_rejects = 0
    for i in range(studies):
        d = synthetic(rng, seeds, seed_sd, delta, prompt_sd=prompt_sd)
        boot = stats.hierarchical_bootstrap(d, draws=1000, seed=i)
        held += boot["ci"][0] <= delta <= boot["ci"][1]
        boot_rejects += boot["p"] < 0.05
        flip_rejects += stats.sign_flip_test(list(d.mean(axis=1))) <= 2 / 2 ** seeds + 1e-9
    return {"coverage": held / studies, "bootstrap_rejects": boot_rejects / studies,
            "sign_flip_rejects": flip_rejects / studies}


def test_compare_pairs_seeds_and_prompts_and_reports_both_tests() -> None:
    cell = {"0": {"a": 1.0, "b": 0.5, "c": 0.25}, "1": {"a": 0.75, "b": 0.5, "c": 1.0}}
    base = {"0": {"a": 0.5, "b": 0.5, "c": 0.0, "d": 1.0}, "1": {"a": 1.0, "b": 0.25, "c": 0.5}}  # d: not shared
    diff = stats.compare(cell, base)
    per_seed = {"0": (0.5 + 0 + 0.25) / 3, "1": (-0.25 + 0.25 + 0.5) / 3}
    assert diff["per_seed"] == pytest.approx(per_seed)
    assert diff["mean"] == pytest.approx(sum(per_seed.values()) / 2)
    assert (diff["seeds_better"], diff["seeds"], diff["prompts"]) == (2, 2, 3)
    assert diff["ci"][0] <= diff["mean"] <= diff["ci"][1]
    assert diff["p_sign_flip"] == 0.5  # 2 seeds, both positive: 2 of the 4 sign patterns are as far out
    assert diff == stats.compare(cell, base)  # seeded: a report is the same on a rerun


def test_sign_flip_is_exact_over_the_sign_patterns() -> None:
    assert stats.sign_flip_test([0.1, 0.2, 0.05]) == 0.25  # all 3 positive: the smallest p, 2/8
    # 5 seeds, one against (sum 0.20): as seen; the -0.05 flipped (0.30); it and the 0.05 (0.20);
    # it and the 0.02 (0.26); and the mirror images of these four: 8 of the 32 patterns
    assert stats.sign_flip_test([0.1, -0.05, 0.02, 0.08, 0.05]) == 8 / 32


def test_holm_steps_down_and_stays_monotone() -> None:
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.holm([0.2, 0.6]) == pytest.approx([0.4, 0.6])
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]


def test_prompts_are_drawn_once_for_all_seeds() -> None:
    """A prompt's difference is shared by the seeds (the same eval prompts): with no seed noise the
    interval's width is that of one seed's prompts, not 1/sqrt(seeds) of it."""
    rng = np.random.default_rng(0)
    one = stats.hierarchical_bootstrap(synthetic(rng, 1, 0.0)[:, :], draws=2000)
    shared = np.repeat(synthetic(rng, 1, 0.0), 4, axis=0)  # four seeds that scored exactly alike
    four = stats.hierarchical_bootstrap(shared, draws=2000)
    width = lambda b: b["ci"][1] - b["ci"][0]  # noqa: E731
    assert width(four) == pytest.approx(width(one), rel=0.15)


@pytest.mark.slow
def test_the_bootstrap_covers_with_no_seed_noise_and_under_covers_at_3_seeds_when_seeds_dominate() -> None:
    studies = 300  # a coverage of 0.95 is measured within about +-0.025 (one standard error)
    for seeds in (3, 5):
        quiet = coverage(seeds, seed_sd=0.0, studies=studies)
        assert quiet["coverage"] >= 0.90, (seeds, quiet)
    noisy3, noisy5 = coverage(3, 0.08, studies), coverage(5, 0.08, studies)
    assert noisy3["coverage"] < 0.90, noisy3  # the spread of 3 seeds understates the seed noise
    assert noisy5["coverage"] > noisy3["coverage"], (noisy3, noisy5)
    # The sign-flip test asks whether retraining would flip the sign on these prompts: with no
    # difference on them (no prompt-level difference either) it rejects at its smallest p as often as
    # that p says (2/8 at 3 seeds, 2/32 at 5), as an exact test does; a binomial 3-sd margin.
    for seeds in (3, 5):
        level = 2 / 2 ** seeds
        null = coverage(seeds, 0.08, studies, delta=0.0, prompt_sd=0.0)
        assert abs(null["sign_flip_rejects"] - level) <= 3 * (level * (1 - level) / studies) ** 0.5, (seeds, null)


if __name__ == "__main__":
    print("| seeds | seed sd | coverage of the 95% interval | bootstrap: rejects at 0.05, no difference | "
          "sign flip: rejects at its smallest p, no difference on the prompts drawn | the same, no difference "
          "in the population of prompts |")
    print("|---|---|---|---|---|---|")
    for seeds in (3, 5):
        for seed_sd in (0.0, 0.03, 0.08):
            cover, null = coverage(seeds, seed_sd, 1000), coverage(seeds, seed_sd, 1000, delta=0.0)
            here = coverage(seeds, seed_sd, 1000, delta=0.0, prompt_sd=0.0)
            print(f"| {seeds} | {seed_sd} | {cover['coverage']:.3f} | {null['bootstrap_rejects']:.3f} | "
                  f"{here['sign_flip_rejects']:.3f} (p = {2 / 2 ** seeds:.4g}) | {null['sign_flip_rejects']:.3f} |")

"""experiments/moe_lpr.py: the review is sized by the replay share, and the seed statistics are paired."""
from __future__ import annotations

import pytest

from fuxi.experiments.moe_lpr import SEQ_LEN, aggregate, paired, review_mix, review_steps, seed_summary


@pytest.mark.parametrize("share, batch", [(0.01, 16), (0.01, 4), (0.1, 16), (0.27, 16), (1e-6, 16)])
def test_review_steps_give_the_replay_share(share, batch):
    stage1_tokens, fraction = 150 * 16 * SEQ_LEN, 1 / 3
    steps = review_steps(share, stage1_tokens, batch, fraction)
    per_step = batch * SEQ_LEN * fraction  # original-language tokens per review step
    assert steps >= 1 and steps * per_step >= share * stage1_tokens
    assert steps == 1 or (steps - 1) * per_step < share * stage1_tokens  # the fewest steps that reach it


@pytest.mark.parametrize("n_original, n_expansion", [(5, 3), (1, 1), (7, 2), (3, 11)])
def test_review_mix_is_one_part_original_to_two_parts_expansion(n_original, n_expansion):
    """The original languages' share of the sampling weights is exactly 1/3 whatever the language counts, so
    the review's length is the one the 1:2 mix implies (and the same as before it was derived)."""
    original = [f"o{i}" for i in range(n_original)]
    expansion = [f"x{i}" for i in range(n_expansion)]
    weights, fraction = review_mix(original, expansion)
    assert set(weights) == set(original) | set(expansion)
    assert sum(weights[lang] for lang in expansion) == pytest.approx(2 * sum(weights[lang] for lang in original))
    assert fraction == 1 / 3
    assert review_steps(0.1, 150 * 16 * SEQ_LEN, 16, fraction) == review_steps(0.1, 150 * 16 * SEQ_LEN, 16, 1 / 3)


def test_forgetting_is_against_the_seeds_dense_model_and_differences_are_paired():
    def evals(dense, review, control):
        return {name: {"loss": {"en": value, "ru": 9.0 - value}}
                for name, value in (("dense", dense), ("c", review), ("d", control))}

    seeds = [seed_summary(evals(*values), ["en"], ["ru"]) for values in ((4.0, 4.5, 4.7), (5.0, 5.2, 5.6))]
    assert seeds[1]["c"]["original_forgetting"] == pytest.approx(0.2)
    assert seeds[0]["d"]["expansion_gain"] == pytest.approx(0.7)  # dense 5.0 -> 4.3 on ru
    diff = paired(seeds, "c", "d", "original_loss")
    assert diff["values"] == pytest.approx([-0.2, -0.4]) and diff["mean"] == pytest.approx(-0.3)
    assert diff["std"] == pytest.approx(0.1)
    agg = aggregate(seeds)
    assert agg["c"]["original_loss"]["values"] == [4.5, 5.2] and agg["c"]["original_loss"]["mean"] == 4.85

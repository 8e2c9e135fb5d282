"""Language mixing: temperature shares, the UniMax cap (against the paper's algorithm), integer rounding."""
from __future__ import annotations

import math
import random

import pytest

from fuxi.common.errors import ConfigError, DataError
from fuxi.data_pipeline.mixing import plan_mixture, round_allocation, target_shares, water_fill


def unimax_reference(sizes: dict[str, float], budget: float, max_epochs: float) -> dict[str, float]:
    """UniMax, Chung et al. 2023, Algorithm 1: visit languages from smallest to largest; each gets the
    uniform share of what is left, but at most max_epochs times its size."""
    alloc = {}
    remaining = budget
    order = sorted(sizes, key=lambda lang: sizes[lang])
    for i, lang in enumerate(order):
        share = remaining / (len(order) - i)
        alloc[lang] = min(share, max_epochs * sizes[lang])
        remaining -= alloc[lang]
    return alloc


def test_temperature_shares_formula():
    tokens = {"en": 9_000, "de": 900, "hi": 100}
    shares = target_shares(tokens, "temperature", alpha=0.3)
    p = {k: v / 10_000 for k, v in tokens.items()}
    norm = sum(v ** 0.3 for v in p.values())
    assert shares == pytest.approx({k: v ** 0.3 / norm for k, v in p.items()})
    assert target_shares(tokens, "temperature", alpha=1.0) == pytest.approx(p)
    assert target_shares(tokens, "temperature", alpha=0.0) == pytest.approx({k: 1 / 3 for k in tokens})
    assert target_shares(tokens, "natural") == pytest.approx(p)
    assert target_shares(tokens, "weights", weights={"en": 2, "de": 1, "hi": 1}) == \
        pytest.approx({"en": 0.5, "de": 0.25, "hi": 0.25})
    with pytest.raises(ConfigError, match="^weights: no weight for language"):
        target_shares(tokens, "weights", weights={"en": 1})


@pytest.mark.parametrize("seed", range(20))
def test_uniform_water_fill_is_unimax(seed):
    rng = random.Random(seed)
    sizes = {f"l{i}": float(rng.choice([1, 10, 100, 1000]) * rng.uniform(0.5, 2)) for i in range(rng.randint(2, 9))}
    budget = rng.uniform(0.2, 3) * sum(sizes.values())
    epochs = rng.choice([0.5, 1, 2, 4])
    shares = {k: 1 / len(sizes) for k in sizes}
    got = water_fill(shares, budget, {k: epochs * v for k, v in sizes.items()})
    assert got == pytest.approx(unimax_reference(sizes, budget, epochs))


def test_cap_redistributes_proportionally():
    shares = {"a": 0.5, "b": 0.3, "c": 0.2}
    got = water_fill(shares, 100, {"a": 10, "b": 1000, "c": 1000})
    assert got == pytest.approx({"a": 10, "b": 90 * 0.6, "c": 90 * 0.4})
    assert water_fill(shares, 100, None) == pytest.approx({"a": 50, "b": 30, "c": 20})
    assert sum(water_fill(shares, 1e9, {"a": 1, "b": 2, "c": 3}).values()) == pytest.approx(6)  # all capped


def test_round_allocation_keeps_sum_and_caps():
    rng = random.Random(1)
    for _ in range(50):
        alloc = {f"l{i}": rng.uniform(0, 50) for i in range(rng.randint(1, 8))}
        caps = {k: math.ceil(v) for k, v in alloc.items()}
        counts = round_allocation(alloc, caps)
        assert sum(counts.values()) == round(sum(alloc.values()))
        assert all(abs(counts[k] - alloc[k]) < 1 and counts[k] <= caps[k] for k in alloc)


def test_plan_mixture():
    available = {"en": 1000, "de": 100, "hi": 10}
    natural = plan_mixture(available, block_len=65, mixing="natural")
    assert natural.counts == available and natural.epochs == pytest.approx({k: 1.0 for k in available})
    temp = plan_mixture(available, 65, "temperature", alpha=0.3, max_epochs=4)
    assert temp.counts["hi"] == 40  # wants ~ 0.14 * 1110 = 156 samples, capped at 4 epochs
    assert temp.epoch_samples == 1110 and all(temp.epochs[k] <= 4 for k in available)
    assert temp.counts["en"] < 1000 < temp.counts["en"] + temp.counts["de"]  # English is down-sampled
    assert "realised share" in temp.table({"en": 0.5})
    with pytest.raises(DataError, match="no training samples for \\['xx'\\]"):
        plan_mixture({"en": 10, "xx": 0}, 65, "natural")

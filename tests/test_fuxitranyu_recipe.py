"""The FuxiTranyu-8B run configs against the report (docs/methods.md §1.7-1.8): the lr cut and the batch switch at
about 241B tokens, about 606B in all, and the published language mix (en 28.8% of all tokens)."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from fuxi.data_pipeline.mixing import target_shares
from fuxi.pretrain.config import load_train_config
from fuxi.pretrain.schedule import global_batch_at, lr_at, sequences_before

RECIPE = "configs/train/fuxitranyu-8b.yaml"
PUBLISHED_MIX = "configs/train/fuxitranyu-8b-published-mix.yaml"
# The report's Table 3: share of each programming language in the collected code, in percent.
TABLE_3 = {"java": 17.94, "javascript": 13.08, "python": 11.77, "php": 11.02, "c": 9.90, "cpp": 9.72,
           "csharp": 8.97, "typescript": 5.42, "go": 4.86, "sql": 2.06, "rust": 1.70, "ruby": 1.48,
           "scala": 0.95, "lua": 0.56, "assembly": 0.30, "visual_basic": 0.28}


@pytest.mark.parametrize("path", [RECIPE, PUBLISHED_MIX])
def test_lr_cut_and_batch_switch_at_241b_tokens_and_606b_in_all(path):
    cfg = load_train_config(path)
    schedule, seq_len = cfg.schedule, cfg.data.seq_len
    assert seq_len == 4096 and schedule.global_batch * seq_len == 2 * 1024 ** 2  # "2M"
    (switch,) = schedule.batch_ramp
    assert switch.global_batch * seq_len == 4 * 1024 ** 2  # "4M"
    cut = schedule.peak_cut.step
    assert switch.step == cut
    assert cut * 512 * 4096 == pytest.approx(241e9, rel=0.005)  # "approximately 241 billion tokens"
    assert sequences_before(cut, schedule) * seq_len == pytest.approx(241e9, rel=0.005)
    assert sequences_before(schedule.total_steps, schedule) * seq_len == pytest.approx(606e9, rel=0.005)
    peak = cfg.optimizer.lr
    assert peak == 3e-4 and lr_at(cut - 1, peak, schedule) > 1e-4 and lr_at(cut, peak, schedule) <= 1e-4
    assert lr_at(schedule.total_steps, peak, schedule) == pytest.approx(1e-5)  # 10% of the cut peak
    assert global_batch_at(cut - 1, schedule) == 512 and global_batch_at(cut, schedule) == 1024


def test_published_mix_gives_the_published_shares():
    cfg = load_train_config(PUBLISHED_MIX)
    weights = cfg.data.weights
    assert cfg.data.mixing == "weights" and cfg.data.max_epochs_per_language is None
    assert len(weights) == 43 + 16  # the report's 43 natural and 16 programming languages
    shares = target_shares({lang: 1 for lang in weights}, "weights", weights=weights)  # what the loader samples
    for lang, published in {"en": 0.288, "zh": 0.104, "de": 0.081, "fr": 0.073}.items():
        assert shares[lang] == pytest.approx(published, abs=1e-5), lang
    code = {lang[5:]: share for lang, share in shares.items() if lang.startswith("code_")}
    assert set(code) == set(TABLE_3)
    assert sum(code.values()) == pytest.approx(0.09, abs=1e-5)
    for lang, percent in TABLE_3.items():
        assert code[lang] / sum(code.values()) == pytest.approx(percent / sum(TABLE_3.values()), abs=1e-4), lang
    others = [share for lang, share in shares.items()
              if not lang.startswith("code_") and lang not in ("en", "zh", "de", "fr")]
    assert len(others) == 39 and sum(others) + sum(code.values()) == pytest.approx(0.454, abs=1e-5)


def test_published_mix_is_the_recipe_with_another_data_mix():
    recipe, mix = asdict(load_train_config(RECIPE)), asdict(load_train_config(PUBLISHED_MIX))
    for section in recipe:
        if section not in ("data", "source"):  # source: the file each was read from
            assert recipe[section] == mix[section], section
    assert {k for k in recipe["data"] if recipe["data"][k] != mix["data"][k]} == \
        {"mixing", "weights", "max_epochs_per_language"}

"""experiments/ghostrnn_pretrain_compare.py: the five variant configs differ only in the GhostGRU switches."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import read_yaml
from fuxi.experiments.ghostrnn_pretrain_compare import VARIANTS, token_budget, variant_configs

CONFIG = "configs/train/ghostrnn-compare.yaml"


def test_five_variants_share_everything_but_the_ghost_switches(tmp_path):
    configs = variant_configs(CONFIG, ["schedule.total_steps=40"], list(VARIANTS), tmp_path)
    assert list(configs) == ["gru", "a-s2", "b-s2", "a-s3", "b-s3"]
    raw = read_yaml(CONFIG)
    budgets = {slug: token_budget(cfg) for slug, cfg in configs.items()}
    assert set(budgets.values()) == {40 * raw["schedule"]["global_batch"] * raw["data"]["seq_len"]}

    def shared(cfg) -> dict:
        d = asdict(cfg)
        del d["model"]["ghostrnn"], d["run"]["output_dir"], d["run"]["name"]
        return d

    reference = shared(configs["gru"])
    for slug, cfg in configs.items():
        assert shared(cfg) == reference, slug
        assert asdict(cfg.model.ghostrnn) == read_yaml(VARIANTS[slug][1])["ghostrnn"], slug
        assert cfg.run.output_dir == str(tmp_path / slug)
    assert [configs[s].model.ghostrnn.ratio for s in configs] == [1, 2, 2, 3, 3]
    assert [configs[s].model.ghostrnn.feed_ghost_back for s in configs] == [True, True, False, True, False]


def test_token_budget_follows_the_batch_ramp(tmp_path):
    overrides = ["schedule.total_steps=10", "schedule.warmup_steps=2", "schedule.global_batch=16",
                 "schedule.batch_ramp=[{step: 4, global_batch: 32}]"]
    cfg = variant_configs(CONFIG, overrides, ["gru"], tmp_path)["gru"]
    assert token_budget(cfg) == (4 * 16 + 6 * 32) * cfg.data.seq_len


def test_unknown_variant_is_named(tmp_path):
    with pytest.raises(ConfigError, match="c-s2"):
        variant_configs(CONFIG, [], ["gru", "c-s2"], tmp_path)

"""LR schedule (cosine, warmup, 10% floor, the FuxiTranyu peak cut) and the batch-size ramp."""
import math

import pytest

from fuxi.common.errors import ConfigError
from fuxi.pretrain.config import BatchStage, PeakCut, ScheduleConfig
from fuxi.pretrain.schedule import check_batch_divisibility, global_batch_at, lr_at, sequences_before


def test_cosine_from_3e4_to_3e5_with_warmup():
    cfg = ScheduleConfig(total_steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, 3e-4, cfg) == pytest.approx(3e-6)
    assert lr_at(99, 3e-4, cfg) == pytest.approx(3e-4)
    assert lr_at(100, 3e-4, cfg) == pytest.approx(3e-4)
    assert lr_at(550, 3e-4, cfg) == pytest.approx(3e-5 + (3e-4 - 3e-5) * 0.5)  # half way: cos = 0
    assert lr_at(1000, 3e-4, cfg) == pytest.approx(3e-5)
    assert lr_at(5000, 3e-4, cfg) == pytest.approx(3e-5)
    values = [lr_at(s, 3e-4, cfg) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_peak_cut_rescale_gives_1e4_peak_and_1e5_floor():
    cfg = ScheduleConfig(total_steps=1000, warmup_steps=100, peak_cut=PeakCut(step=400, peak_lr=1e-4))
    assert lr_at(399, 3e-4, cfg) > 1e-4
    progress = (400 - 100) / 900
    assert lr_at(400, 3e-4, cfg) == pytest.approx(1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lr_at(1000, 3e-4, cfg) == pytest.approx(1e-5)


def test_peak_cut_restart_rewarms_to_the_new_peak():
    cfg = ScheduleConfig(total_steps=1000, warmup_steps=10, peak_cut=PeakCut(step=500, peak_lr=1e-4, mode="restart"))
    assert lr_at(500, 3e-4, cfg) == pytest.approx(1e-5)  # first warmup step of 10
    assert lr_at(509, 3e-4, cfg) == pytest.approx(1e-4)
    assert lr_at(1000, 3e-4, cfg) == pytest.approx(1e-5)


def test_batch_ramp_2m_to_4m_tokens():
    # 4096-token sequences: 512 sequences = 2M tokens, 1024 = 4M tokens.
    cfg = ScheduleConfig(global_batch=512, batch_ramp=[BatchStage(step=1000, global_batch=1024)])
    assert global_batch_at(999, cfg) * 4096 == 2_097_152
    assert global_batch_at(1000, cfg) * 4096 == 4_194_304
    check_batch_divisibility(cfg, micro_batch=2, world_size=32)
    with pytest.raises(ConfigError, match="512 is not a multiple of micro_batch x world size = 3 x 32"):
        check_batch_divisibility(cfg, micro_batch=3, world_size=32)


def test_sequences_before_equals_the_step_by_step_sum():
    cfg = ScheduleConfig(total_steps=50, global_batch=8, batch_ramp=[BatchStage(step=7, global_batch=16),
                                                                      BatchStage(step=30, global_batch=40)])
    for step in (0, 1, 7, 8, 29, 30, 31, 50, 60):
        assert sequences_before(step, cfg) == sum(global_batch_at(s, cfg) for s in range(step)), step
    assert sequences_before(10, ScheduleConfig(global_batch=4)) == 40

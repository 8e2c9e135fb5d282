"""Learning rate and batch size as pure functions of the optimizer step, so a resumed run needs no state.

lr: linear warmup to the peak, cosine down to min_lr_ratio * peak, flat after total_steps. A `peak_cut`
lowers the peak from a step on, either rescaling the running cosine or restarting warmup + cosine.
"""
from __future__ import annotations

import math

from fuxi.pretrain.config import ScheduleConfig


def cosine_lr(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * min_ratio
    if step >= total:
        return floor
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    cut = cfg.peak_cut
    if cut is None or step < cut.step:
        return cosine_lr(step, peak_lr, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio)
    if cut.mode == "rescale":
        return cosine_lr(step, cut.peak_lr, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio)
    remaining = max(1, cfg.total_steps - cut.step)
    warmup = min(cfg.warmup_steps, remaining)
    return cosine_lr(step - cut.step, cut.peak_lr, warmup, remaining, cfg.min_lr_ratio)


def global_batch_at(step: int, cfg: ScheduleConfig) -> int:
    batch = cfg.global_batch
    for stage in cfg.batch_ramp:
        if step >= stage.step:
            batch = stage.global_batch
    return batch


def sequences_before(step: int, cfg: ScheduleConfig) -> int:
    """Sequences the schedule feeds in steps 0 .. step-1 (the batch ramp included), in closed form per stage;
    times seq_len, the tokens seen when `step` starts (`sequences_before(total_steps, cfg)` is the run's)."""
    bounds = [0] + [s.step for s in cfg.batch_ramp] + [step]
    batches = [cfg.global_batch] + [s.global_batch for s in cfg.batch_ramp]
    return sum(batch * max(0, min(end, step) - begin)
               for batch, begin, end in zip(batches, bounds[:-1], bounds[1:]))


def check_batch_divisibility(cfg: ScheduleConfig, micro_batch: int, world_size: int, source: str = "") -> None:
    """Every global batch of the ramp must be a whole number of micro-batches on every rank. The error names
    the entry at fault (`schedule.global_batch` or `schedule.batch_ramp[i].global_batch`) and `source`."""
    from fuxi.common.errors import ConfigError

    unit = micro_batch * world_size
    entries = [("schedule.global_batch", cfg.global_batch)]
    entries += [(f"schedule.batch_ramp[{i}].global_batch", s.global_batch) for i, s in enumerate(cfg.batch_ramp)]
    for key, batch in entries:
        if batch % unit:
            raise ConfigError(key, f"{batch} is not a multiple of micro_batch x world size = {micro_batch} x "
                                   f"{world_size}", source or None)

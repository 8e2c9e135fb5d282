"""Training stages: what trains and what the loss is. The trainer loop is the same for all of them.

pretrain         every parameter, next-token loss (+ optional z-loss)
moe_lpr_stage1   see pretrain/moe_stages.py (routers + new experts, + balance loss)
moe_lpr_stage2   see pretrain/moe_stages.py (routers only, + LPR loss)
prealign_init    see pretrain/prealign_stage.py
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fuxi.pretrain.config import TrainConfig


@dataclass
class StepLoss:
    loss: torch.Tensor                 # what is backpropagated
    lm_loss: torch.Tensor              # next-token loss alone, for logging
    token_losses: torch.Tensor         # [batch, seq] for per-language metrics
    extras: dict = field(default_factory=dict)  # other scalars to log (aux losses, router stats)


class PretrainStage:
    name = "pretrain"

    def __init__(self, cfg: TrainConfig, languages: list[str]):
        self.cfg, self.languages = cfg, languages

    def configure(self, model: torch.nn.Module) -> None:
        """Choose the trainable parameters (all of them here)."""

    def compute_loss(self, engine, batch: dict) -> StepLoss:
        out = engine(batch["input_ids"], labels=batch["labels"], doc_ids=batch.get("doc_ids"),
                     z_loss=self.cfg.optimizer.z_loss)
        return StepLoss(out.loss, out.loss.detach(), out.token_losses)

    def log_metrics(self) -> dict:
        """Stage-specific metrics for the current logging window, merged into the "train" record. Collective:
        every rank calls it at each log step."""
        return {}

    def end_of_run(self, engine, val_batches: dict, out_dir, ctx) -> dict:
        """Collective, after the final validation: stage-specific end-of-run metrics (logged as a "stage"
        record); rank 0 may write files into out_dir."""
        return {}


_STAGES = {"pretrain": PretrainStage}


def register_stage(name: str, cls) -> None:
    _STAGES[name] = cls


def build_stage(cfg: TrainConfig, languages: list[str]):
    if cfg.stage not in _STAGES:
        raise ValueError(f"stage: {cfg.stage!r} is not available; known: {sorted(_STAGES)}")
    return _STAGES[cfg.stage](cfg, languages)


# Stages defined in their own modules register themselves on import (after the names above exist).
from fuxi.pretrain import moe_stages  # noqa: E402,F401
from fuxi.pretrain import prealign_stage  # noqa: E402,F401

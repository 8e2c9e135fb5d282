"""Training stages: what a run trains on, which parameters train and what the loss is. The training loop is the
same for every stage, and the trainer, the run config and the preflight checks know no stage by name: each
stage is one class (the interface is `base.Stage`) that declares its name, its config section, its checks, the
paths it reads, its data, its trainable parameters and its loss.

The built-in stages, each imported only when a run names it (`stage:` in the run config):

    pretrain         next-token loss (+ optional z-loss), every parameter      pretrain.py
    moe_lpr_stage1   routers + new experts; LM + balance loss                   moe_lpr.py
    moe_lpr_stage2   routers only; LM + LPR loss on original-language tokens    moe_lpr.py
    prealign_init    dictionary entries instead of text; LM + alignment loss    prealign/

A stage defined elsewhere (a test, a fork) becomes available with `register_stage(MyStage)`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fuxi.common.errors import ConfigError

if TYPE_CHECKING:
    from fuxi.pretrain.config import TrainConfig
    from fuxi.pretrain.stages.base import Stage

# `stage:` name -> "module:class"
BUILT_IN = {
    "pretrain": "fuxi.pretrain.stages.pretrain:PretrainStage",
    "moe_lpr_stage1": "fuxi.pretrain.stages.moe_lpr:MoELPRStage1",
    "moe_lpr_stage2": "fuxi.pretrain.stages.moe_lpr:MoELPRStage2",
    "prealign_init": "fuxi.pretrain.stages.prealign.stage:PreAlignInitStage",
}
_registered: dict[str, type[Stage]] = {}


def register_stage(stage: type[Stage]) -> type[Stage]:
    """Make `stage` available as `stage: <stage.name>` (also usable as a class decorator). Registering the same
    class again changes nothing; another class under a taken name is refused."""
    taken = stage.name in BUILT_IN or (stage.name in _registered and _registered[stage.name] is not stage)
    if taken:
        raise ValueError(f"a stage named {stage.name!r} exists already")
    _registered[stage.name] = stage
    return stage


def known_stages() -> list[str]:
    return sorted({*BUILT_IN, *_registered})


def stage_named(name: str) -> type[Stage]:
    """The stage class a run config's `stage:` names; a ConfigError naming `stage` and the known stages."""
    if isinstance(name, str) and name in _registered:
        return _registered[name]
    if not isinstance(name, str) or name not in BUILT_IN:
        raise ConfigError("stage", f"{name!r} is not one of {known_stages()}")
    module, cls = BUILT_IN[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_stage(cfg: TrainConfig, languages: list[str]) -> Stage:
    """The run's stage; `languages` is the training data's language table (ids -> names)."""
    return stage_named(cfg.stage)(cfg, languages)

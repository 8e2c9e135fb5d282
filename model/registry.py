"""`model.type` -> the class that builds it. Every model class takes a ModelConfig and returns CausalLMOutput."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from fuxi.common.errors import ConfigError
from fuxi.model.config import ModelConfig

_BUILDERS: dict[str, Callable[[], type[nn.Module]]] = {}


def register_model(name: str, loader: Callable[[], type[nn.Module]]) -> None:
    """`loader` returns the class lazily so the config module never imports every model file."""
    _BUILDERS[name] = loader


def model_class(name: str) -> type[nn.Module]:
    if name not in _BUILDERS:
        raise ConfigError("type", f"unknown model type {name!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[name]()


def validate_model_type(config: ModelConfig) -> None:
    cls = model_class(config.type)
    check = getattr(cls, "validate_config", None)
    if callable(check):
        check(config)


def build_model(config: ModelConfig, device=None) -> nn.Module:
    """Build on `device` ("meta" for counting parameters of the full-size model without memory)."""
    cls = model_class(config.type)
    if device is None:
        return cls(config)
    import torch

    with torch.device(device):
        return cls(config)


def _fuxitranyu():
    from fuxi.model.fuxitranyu import FuxiTranyuForCausalLM

    return FuxiTranyuForCausalLM


register_model("fuxitranyu", _fuxitranyu)


def _fuxitranyu_moe():
    from fuxi.model.fuxitranyu_moe import FuxiTranyuMoEForCausalLM

    return FuxiTranyuMoEForCausalLM


register_model("fuxitranyu_moe", _fuxitranyu_moe)


def _ghostrnn_lm():
    from fuxi.model.ghostrnn import GhostRNNForCausalLM

    return GhostRNNForCausalLM


register_model("ghostrnn_lm", _ghostrnn_lm)

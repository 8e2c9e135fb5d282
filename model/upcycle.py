"""Dense FuxiTranyu -> FuxiTranyu-MoE (MoE-LPR upcycling), and the two training stages' parameter freezing.

Upcycling copies every dense tensor; in each chosen layer the FFN becomes expert 0 *and* is copied into experts
1..N-1, and a new router is drawn Xavier-normal (docs/methods.md §2.2). With K >= 2 the result computes exactly the
dense function. `upcycle_tensors` streams a checkpoint tensor by tensor (the 8B upcycled to 6 experts never
sits in memory); `upcycle_model` does the same for a model in memory, with expert 0 sharing the dense storage.

Stage 1 trains the routers and experts 1..N-1; stage 2 only the routers (docs/methods.md §2.3, §2.4).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from fuxi.common.errors import ConfigError
from fuxi.model.config import ModelConfig, MoEConfig
from fuxi.model.registry import build_model

_MLP_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.((?:gate_proj|up_proj|down_proj)\.(?:weight|bias))$")
_EXPERT_TENSOR = re.compile(r"\.mlp\.experts\.(\d+)\.")


def upcycle_config(dense: ModelConfig, moe: MoEConfig) -> ModelConfig:
    """The MoE model config for a dense FuxiTranyu config; validated (layer indices, mutual exclusions)."""
    if dense.type != "fuxitranyu":
        raise ConfigError("type", f"upcycling needs a dense 'fuxitranyu' model, got {dense.type!r}")
    config = dataclasses.replace(dense, type="fuxitranyu_moe", moe=dataclasses.replace(moe))
    config.validate()
    return config


def router_init(layer: int, num_experts: int, hidden_size: int, seed: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Xavier-normal [N, h] router weight, drawn in fp32 from its own generator: the same seed gives the same
    routers whichever path (checkpoint stream or in-memory model) upcycles."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    weight = torch.empty(num_experts, hidden_size)
    nn.init.xavier_normal_(weight, generator=generator)
    return weight.to(dtype)


def upcycle_tensors(dense_tensors: Iterable[tuple[str, torch.Tensor]], config: ModelConfig,
                    seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a dense checkpoint -> those of the upcycled MoE (`config` from upcycle_config).

    Each chosen layer's `mlp.X` is yielded once per expert as `mlp.experts.{j}.X` (expert 0 the tensor itself,
    the others copies), and its router right after its `mlp.up_proj.weight`, in that tensor's dtype.
    """
    moe = config.moe
    moe_layers = set(moe.moe_layers(config.num_layers))
    for name, tensor in dense_tensors:
        match = _MLP_TENSOR.match(name)
        if match is None or int(match.group(1)) not in moe_layers:
            yield name, tensor
            continue
        layer, suffix = int(match.group(1)), match.group(2)
        prefix = f"model.layers.{layer}.mlp"
        for j in range(moe.num_experts):
            yield f"{prefix}.experts.{j}.{suffix}", tensor if j == 0 else tensor.clone()
        if suffix == "up_proj.weight":
            yield f"{prefix}.router.weight", router_init(layer, moe.num_experts, config.hidden_size, seed,
                                                         tensor.dtype)


def upcycle_model(dense: nn.Module, moe: MoEConfig, seed: int = 0) -> nn.Module:
    """A FuxiTranyu-MoE computing the dense model's function. It shares storage with `dense`: the trunk and
    expert 0 *are* the dense tensors (frozen in both stages), experts 1..N-1 are copies."""
    config = upcycle_config(dense.config, moe)
    moe_model = build_model(config, device="meta")
    expected = moe_model.state_dict()
    device = dense.lm_head.weight.device
    state = {}
    for name, tensor in upcycle_tensors(dense.state_dict().items(), config, seed):
        state[name] = tensor.to(device) if is_router(name) else tensor
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"upcycle: dense state dict does not fit the MoE model; missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    moe_model.load_state_dict(state, strict=True, assign=True)
    return moe_model.train(dense.training)


# ---- stage freezing ---------------------------------------------------------------------------------------

def is_router(name: str) -> bool:
    return ".mlp.router." in name


def is_new_expert(name: str) -> bool:
    """Experts 1..N-1 (expert 0 is the original FFN and never trains)."""
    match = _EXPERT_TENSOR.search(name)
    return match is not None and int(match.group(1)) >= 1


def _set_trainable(model: nn.Module, trainable) -> list[str]:
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))
        if param.requires_grad:
            names.append(name)
    if not names:
        raise ValueError("no trainable parameters: is this an upcycled MoE model (type fuxitranyu_moe)?")
    return names


def stage1_trainable(model: nn.Module) -> list[str]:
    """Post-pretraining: only routers and experts 1..N-1 train; returns the trainable parameter names."""
    return _set_trainable(model, lambda name: is_router(name) or is_new_expert(name))


def stage2_trainable(model: nn.Module) -> list[str]:
    """Review with LPR: only the routers train; returns their names."""
    return _set_trainable(model, is_router)


def stage1_trainable_count(config: ModelConfig) -> int:
    """N*h*L_moe (routers) + (N-1)*|FFN|*L_moe with |FFN| = 2*h*F + F + h (biased up/down projections)."""
    moe, h, f = config.moe, config.hidden_size, config.ffn_hidden_size
    layers = len(moe.moe_layers(config.num_layers))
    ffn = 2 * h * f + f + h
    return moe.num_experts * h * layers + (moe.num_experts - 1) * ffn * layers

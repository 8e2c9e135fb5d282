"""transformers 5's fused expert layout, read back into per-expert tensors.

transformers >= 5 holds the experts of Mixtral and Qwen2-MoE as two 3-D tensors per layer,
`mlp.experts.gate_up_proj` [E, 2F, h] (each expert's gate rows, then its up rows) and `mlp.experts.down_proj`
[E, h, F], and Mixtral's router as `mlp.gate`. `save_pretrained` writes the released per-expert layout back by
default, but `save_pretrained(..., save_original_format=False)` keeps the fused one. `convert from-hf` reads both:
a fused tensor becomes the per-expert `mlp.experts.{j}.gate_proj/up_proj/down_proj.weight` it was merged from.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from fuxi.checkpoints.sharded_safetensors import CheckpointError

_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _parts(name: str, shape: tuple) -> list[tuple[str, tuple, int, slice]] | None:
    """(per-expert name, its shape, expert index, row slice) of a fused tensor; None for any other tensor."""
    match = _FUSED.match(name)
    if match is None:
        return None
    if len(shape) != 3:
        raise CheckpointError(f"tensor {name}: a fused expert tensor is 3-D [experts, out, in], found {tuple(shape)}")
    prefix, kind = match.groups()
    experts, rows, cols = shape
    if kind == "down_proj":
        return [(f"{prefix}.{j}.down_proj.weight", (rows, cols), j, slice(None)) for j in range(experts)]
    if rows % 2:
        raise CheckpointError(f"tensor {name}: gate_up_proj has {rows} rows, not gate and up halves")
    half = rows // 2
    return [part for j in range(experts) for part in (
        (f"{prefix}.{j}.gate_proj.weight", (half, cols), j, slice(0, half)),
        (f"{prefix}.{j}.up_proj.weight", (half, cols), j, slice(half, rows)))]


def split_fused_shapes(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Tensor name -> shape with every fused expert tensor replaced by its per-expert tensors."""
    out = {}
    for name, shape in shapes.items():
        parts = _parts(name, shape)
        out.update({name: tuple(shape)} if parts is None else {part: part_shape for part, part_shape, _, _ in parts})
    return out


def split_fused_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs with every fused expert tensor split into its per-expert tensors (copies)."""
    for name, tensor in tensors:
        parts = _parts(name, tuple(tensor.shape))
        if parts is None:
            yield name, tensor
            continue
        for part, _, expert, rows in parts:
            yield part, tensor[expert, rows].contiguous()

"""Our plain model checkpoint: `config.yaml` (the ModelConfig under `model:`) beside safetensors shards.

The tensor names are the model's own state-dict names. Loading never unpickles anything.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from fuxi.checkpoints.sharded_safetensors import CheckpointError, ShardedSafetensorsWriter, iter_tensors, tensor_shapes
from fuxi.common.errors import ConfigError
from fuxi.common.staging import staged_folder
from fuxi.common.typed_config import from_dict, to_dict
from fuxi.model import ModelConfig, build_model

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"  # the tokenizer the model was trained with, beside the weights
DEFAULT_SHARD_BYTES = 5 * 1024**3


def own_tokenizer(ckpt_dir: str | Path) -> Path | None:
    """The `tokenizer/` folder a checkpoint carries, if any."""
    path = Path(ckpt_dir) / TOKENIZER_DIR
    return path if path.is_dir() else None


def is_model_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """From a checkpoint directory's config.yaml, or from a YAML file holding the same `model:` mapping."""
    path = Path(ckpt_dir)
    if path.is_dir() or not path.suffix == ".yaml":
        path = path / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a model checkpoint (no {CONFIG_FILE})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: missing the `model:` mapping")
    try:
        return from_dict(ModelConfig, data["model"], source=str(path))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def write_config(out_dir: Path, config: ModelConfig, extra: dict | None = None) -> None:
    text = yaml.safe_dump({"model": to_dict(config), **(extra or {})}, sort_keys=False)
    (out_dir / CONFIG_FILE).write_text(text, encoding="utf-8")


def replaced_folder(target: str | Path):
    """Write into a staging folder beside `target`, switched in (atomically where the filesystem allows) only
    when the block succeeds: a crash or error mid-write never damages an existing checkpoint or export. The
    same mechanism as the data stages' outputs (common/staging.py); a checkpoint folder is ours whole."""
    return staged_folder(target, owned=("*",))


def save_model_checkpoint(state_dict_items, config: ModelConfig, out_dir: str | Path,
                          max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra: dict | None = None,
                          tokenizer_dir: str | Path | None = None) -> Path:
    """Write (name, tensor) pairs (a dict's items() or a lazy iterator) and the config, atomically; with
    `tokenizer_dir`, its files go to `tokenizer/` inside the same switch, so the checkpoint is never without it."""
    out_dir = Path(out_dir)
    with replaced_folder(out_dir) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for name, tensor in state_dict_items:
            writer.add(name, tensor)
        writer.finish()
        write_config(tmp, config, extra)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
    return out_dir


def save_model(model: torch.nn.Module, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               extra: dict | None = None) -> Path:
    return save_model_checkpoint(model.state_dict().items(), model.config, out_dir, max_shard_bytes, extra)


def check_tensor_names(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
                       for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {misshaped[:20]}")
        raise CheckpointError(f"{source}: tensors do not match the model; " + "; ".join(parts))


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _cast(tensors, device: str | torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {name: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
            for name, t in tensors}


def model_from_tensors(config: ModelConfig, tensors, source: str, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the model `config` describes and fill it with (name, tensor) pairs, which must match it exactly.
    Floating-point tensors are cast to `dtype` when given."""
    model = build_model(config, device="meta")
    state = _cast(tensors, device, dtype)
    check_tensor_names(_shapes(model.state_dict()), _shapes(state), source)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the model from the checkpoint's config and load its tensors (safetensors only). Names and shapes
    are checked from the headers, before any tensor is read."""
    model = build_model(read_model_config(ckpt_dir), device="meta")
    check_tensor_names(_shapes(model.state_dict()), tensor_shapes(ckpt_dir), str(ckpt_dir))
    model.load_state_dict(_cast(iter_tensors(ckpt_dir), device, dtype), strict=True, assign=True)
    return model

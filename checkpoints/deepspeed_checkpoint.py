"""Consolidate a DeepSpeed training checkpoint (ZeRO stage 0-3, any world size) into our plain checkpoint.

ZeRO 1-3 keep the fp32 master weights partitioned across ranks; DeepSpeed's own `zero_to_fp32` gathers them.
Its loads are forced to `torch.load(weights_only=True)` with an allow-list of the few DeepSpeed data classes
the files contain, so consolidating a checkpoint never unpickles arbitrary code.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from checkpoints.model_checkpoint import read_model_config, save_model_checkpoint
from checkpoints.sharded_safetensors import CheckpointError

MODEL_CONFIG_FILE = "model_config.yaml"


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    globals_ = [LossScaler, DynamicLossScaler, ZeroStageEnum]
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        globals_.append(fragment_address)
    except ImportError:  # older DeepSpeed
        pass
    return globals_


@contextlib.contextmanager
def weights_only_torch_load():
    """Within the block, every torch.load is weights_only=True (DeepSpeed's loader asks for False)."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def resolve_tag_dir(path: str | Path) -> Path:
    """Accept the checkpoints root (follows `latest`) or a tag directory."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not path.is_dir() or not any(path.glob("*model_states.pt")):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (no *model_states.pt)")
    if not (path / MODEL_CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: no {MODEL_CONFIG_FILE} beside the DeepSpeed files")
    return path


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    try:
        resolve_tag_dir(path)
        return True
    except CheckpointError:
        return False


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    with weights_only_torch_load():
        if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            # zero_to_fp32 restores frozen parameters (requires_grad=False, e.g. MoE-LPR's expert 0) only for
            # ZeRO 2/3; ZeRO-1 keeps them, unpartitioned, in the model states alone.
            for states in sorted(tag_dir.glob("mp_rank_*_model_states.pt"))[:1]:
                module = torch.load(states, map_location="cpu")["module"]
                state.update({k: v for k, v in module.items() if k not in state and v.numel() > 0})
            return state
        states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if len(states) != 1:
            raise CheckpointError(f"{tag_dir}: expected one mp_rank_*_model_states.pt, found {len(states)}")
        return dict(torch.load(states[0], map_location="cpu")["module"])


def consolidate_deepspeed_checkpoint(path: str | Path, out_dir: str | Path,
                                     max_shard_bytes: int = 5 * 1024**3) -> Path:
    tag_dir = resolve_tag_dir(path)
    config = read_model_config(tag_dir / MODEL_CONFIG_FILE)
    state = consolidated_state_dict(tag_dir)
    out = save_model_checkpoint(((k, v.float() if v.is_floating_point() else v) for k, v in state.items()),
                                config, out_dir, max_shard_bytes)
    if (tag_dir / "tokenizer").is_dir():  # the trainer stores the tokenizer beside the weights
        shutil.copytree(tag_dir / "tokenizer", out / "tokenizer")
    return out


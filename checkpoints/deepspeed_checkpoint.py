"""Reading DeepSpeed training checkpoints without running code from them, and consolidating one (ZeRO stage
0-3, any world size) into our plain checkpoint.

DeepSpeed reads its `*_model_states.pt` / `*_optim_states.pt` with `torch.load(weights_only=False)`, which
unpickles anything: a crafted file runs its payload. Every read here is `torch.load(weights_only=True)` with
an allow-list of the few DeepSpeed data classes the files contain (`load_weights_only`); a file holding anything
else is refused with a CheckpointError naming it. The trainer hands DeepSpeed a checkpoint engine that reads
this way (`WeightsOnlyCheckpointReader`); consolidation runs DeepSpeed's own `zero_to_fp32` (which gathers the
ZeRO partitions of the fp32 master weights) with its torch.load calls forced to the same.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch

from fuxi.checkpoints.model_checkpoint import own_tokenizer, read_model_config, save_model_checkpoint
from fuxi.checkpoints.sharded_safetensors import CheckpointError

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


_torch_load = torch.load  # the real one, even while weights_only_torch_load() replaces the module attribute


def load_weights_only(path, **kwargs):
    """torch.load(path, weights_only=True) allowing DeepSpeed's data classes; a file that needs anything else
    (a class, a function: what a pickle payload uses) is refused, naming the file, before any of it runs."""
    kwargs["weights_only"] = True
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return _torch_load(path, **kwargs)
    except pickle.UnpicklingError as err:
        reason = next((line.strip().removeprefix("WeightsUnpickler error: ").split(". ")[0]
                       for line in str(err).splitlines() if "WeightsUnpickler error" in line), "not loadable")
        raise CheckpointError(f"{path}: refused to load: {reason}; a training checkpoint holds only tensors "
                              f"and DeepSpeed's data classes, so this file was altered or is not one") from None


class WeightsOnlyCheckpointReader:
    """DeepSpeed's checkpoint engine with its `load` replaced by `load_weights_only`; saving and the rest are
    the wrapped engine's. Install with `engine.checkpoint_engine = WeightsOnlyCheckpointReader(engine.
    checkpoint_engine)`: every file DeepSpeed's load_checkpoint reads (model states, ZeRO optimizer partitions)
    goes through it."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path, map_location=None):
        return load_weights_only(path, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextlib.contextmanager
def weights_only_torch_load():
    """Within the block, every torch.load is `load_weights_only` (zero_to_fp32 asks for weights_only=False)."""

    def safe_load(f, *args, **kwargs):
        if args:
            kwargs["map_location"] = args[0]
        return load_weights_only(f, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = _torch_load


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
                module = load_weights_only(states, map_location="cpu")["module"]
                state.update({k: v for k, v in module.items() if k not in state and v.numel() > 0})
            return state
        states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if len(states) != 1:
            raise CheckpointError(f"{tag_dir}: expected one mp_rank_*_model_states.pt, found {len(states)}")
        return dict(load_weights_only(states[0], map_location="cpu")["module"])


def consolidate_deepspeed_checkpoint(path: str | Path, out_dir: str | Path,
                                     max_shard_bytes: int = 5 * 1024**3) -> Path:
    tag_dir = resolve_tag_dir(path)
    config = read_model_config(tag_dir / MODEL_CONFIG_FILE)
    state = consolidated_state_dict(tag_dir)
    if config.tie_word_embeddings:  # DeepSpeed lists a shared matrix under both names; ours holds it once
        state.pop("lm_head.weight", None)
    # The trainer stores the tokenizer beside the weights; it goes into the same atomic switch.
    return save_model_checkpoint(((k, v.float() if v.is_floating_point() else v) for k, v in state.items()),
                                 config, out_dir, max_shard_bytes, tokenizer_dir=own_tokenizer(tag_dir))


"""`fuxi upcycle`: a dense checkpoint on disk -> an MoE-LPR checkpoint on disk, tensor by tensor."""
from __future__ import annotations

from pathlib import Path

from fuxi.checkpoints.model_checkpoint import (check_tensor_names, own_tokenizer, read_model_config,
                                         save_model_checkpoint)
from fuxi.checkpoints.sharded_safetensors import iter_tensors, tensor_shapes
from fuxi.model import build_model
from fuxi.model.config import MoEConfig
from fuxi.model.upcycle import upcycle_config, upcycle_tensors


def upcycle_checkpoint(dense_dir: str | Path, out_dir: str | Path, moe: MoEConfig, seed: int = 0,
                       max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Expert 0 of every MoE layer is the dense FFN, experts 1..N-1 copies of it, routers Xavier-normal. The
    dense checkpoint's tokenizer comes along: the MoE model reads the same ids."""
    dense = read_model_config(dense_dir)
    expected = {k: tuple(v.shape) for k, v in build_model(dense, device="meta").state_dict().items()}
    check_tensor_names(expected, tensor_shapes(dense_dir), str(dense_dir))
    config = upcycle_config(dense, moe)
    return save_model_checkpoint(upcycle_tensors(iter_tensors(dense_dir), config, seed=seed), config, out_dir,
                                 max_shard_bytes=max_shard_bytes, tokenizer_dir=own_tokenizer(dense_dir))

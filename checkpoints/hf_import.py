"""Import a Hugging Face FuxiTranyu directory (the released 8B and its intermediate checkpoints) into ours.

Tensor names go through one mapping table, so GPT-2/NeoX-style MLP names are accepted too; GPT-2's Conv1D
stores [in, out] weights, which are transposed. The embedding may have 250,680 or 250,752 (padded) rows.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from checkpoints.model_checkpoint import check_tensor_names, save_model_checkpoint
from checkpoints.sharded_safetensors import CheckpointError, iter_tensors, tensor_shapes
from model import ModelConfig, build_model

# Suffix of an HF MLP tensor name -> our name. Conv1D-style names store the weight transposed.
MLP_NAME_VARIANTS: dict[str, tuple[str, bool]] = {
    "mlp.up_proj": ("mlp.up_proj", False),
    "mlp.down_proj": ("mlp.down_proj", False),
    "mlp.fc1": ("mlp.up_proj", False),
    "mlp.fc2": ("mlp.down_proj", False),
    "mlp.fc_in": ("mlp.up_proj", False),
    "mlp.fc_out": ("mlp.down_proj", False),
    "mlp.dense_h_to_4h": ("mlp.up_proj", False),
    "mlp.dense_4h_to_h": ("mlp.down_proj", False),
    "mlp.c_fc": ("mlp.up_proj", True),
    "mlp.c_proj": ("mlp.down_proj", True),
}
_MLP_KEY = re.compile(r"^(model\.layers\.\d+\.)(mlp\.[A-Za-z0-9_]+)\.(weight|bias)$")


def map_hf_name(name: str) -> tuple[str, bool]:
    """HF tensor name -> (our name, needs transpose). Names outside the MLP are already ours."""
    match = _MLP_KEY.match(name)
    if match and match.group(2) in MLP_NAME_VARIANTS:
        ours, transposed = MLP_NAME_VARIANTS[match.group(2)]
        return f"{match.group(1)}{ours}.{match.group(3)}", transposed and match.group(3) == "weight"
    return name, False


def model_config_from_hf(hf_dir: Path, embedding_rows: int) -> ModelConfig:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json")
    cfg = json.loads(path.read_text())
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}")
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    if kv_heads != cfg["num_attention_heads"]:
        raise CheckpointError(f"{path}: num_key_value_heads {kv_heads} != num_attention_heads "
                              f"{cfg['num_attention_heads']}; FuxiTranyu is full multi-head attention")
    act = cfg.get("hidden_act", "gelu_fast")
    if act not in ("gelu_fast", "gelu_pytorch_tanh", "gelu_new"):
        raise CheckpointError(f"{path}: hidden_act {act!r} is not the tanh-approximation GELU")
    vocab = cfg.get("fuxi_vocab_size", cfg["vocab_size"])
    pad_multiple = 1
    if embedding_rows != vocab:
        # The report's layout: 250,680 real tokens padded with dummies to a multiple of 128.
        if embedding_rows > vocab and embedding_rows % 128 == 0 and embedding_rows - vocab < 128:
            pad_multiple = 128
        else:
            raise CheckpointError(f"{path}: vocab_size {vocab} does not fit the {embedding_rows}-row embedding")
    config = ModelConfig(
        type="fuxitranyu", vocab_size=vocab, pad_vocab_multiple=pad_multiple, hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"], max_seq_len=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=float(cfg.get("rope_theta", 10000.0)),
        init_std=float(cfg.get("initializer_range", 0.01)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        bos_token_id=cfg.get("bos_token_id", 0) or 0, eos_token_id=cfg.get("eos_token_id", 0) or 0)
    return with_moe_from_hf(config, cfg, path) if cfg.get("model_type") == "fuxitranyu_moe" else config


def with_moe_from_hf(config: ModelConfig, cfg: dict, path: Path) -> ModelConfig:
    """FuxiTranyu-MoE: our MoEConfig from `fuxi_moe` when present (exact round trip), else from the routing
    fields; either way it must agree with the routing fields the shipped modeling file reads."""
    import dataclasses

    from model.config import MoEConfig
    from model.typed_config import ConfigError, from_dict

    missing = [k for k in ("num_experts", "num_experts_per_tok") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}")
    hf_layers = sorted(cfg.get("moe_layers") or range(config.num_layers))
    try:
        if "fuxi_moe" in cfg:
            moe = from_dict(MoEConfig, cfg["fuxi_moe"], source=f"{path} (fuxi_moe)")
        else:
            top_k, renormalized = cfg["num_experts_per_tok"], cfg.get("norm_topk_prob", True)
            if not renormalized and top_k != 1:
                raise CheckpointError(f"{path}: norm_topk_prob false with num_experts_per_tok {top_k} is not "
                                      "supported (only top-1 may skip renormalisation)")
            moe = MoEConfig(num_experts=cfg["num_experts"], top_k=top_k, top1_code_compat=not renormalized,
                            balance_loss_coef=float(cfg.get("router_aux_loss_coef", 0.01)),
                            layers=None if hf_layers == list(range(config.num_layers)) else hf_layers)
            moe.validate()
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    found = {"num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
             "moe_layers": moe.moe_layers(config.num_layers)}
    wanted = {"num_experts": cfg["num_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"],
              "moe_layers": hf_layers}
    if found != wanted:
        raise CheckpointError(f"{path}: fuxi_moe {found} contradicts the routing fields {wanted}")
    return dataclasses.replace(config, type="fuxitranyu_moe", moe=moe)


def import_from_hf(hf_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Check every tensor name and shape against the model the config describes, then convert shard by shard."""
    hf_dir = Path(hf_dir)
    shapes = tensor_shapes(hf_dir)
    if "model.embed_tokens.weight" not in shapes:
        raise CheckpointError(f"{hf_dir}: no model.embed_tokens.weight; not a FuxiTranyu/Llama-layout checkpoint")
    config = model_config_from_hf(hf_dir, shapes["model.embed_tokens.weight"][0])
    config.validate()
    expected = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}
    mapped = {}
    for name, shape in shapes.items():
        ours, transposed = map_hf_name(name)
        if ours in mapped:
            raise CheckpointError(f"{hf_dir}: two tensors map to {ours!r} (one of them is {name!r})")
        mapped[ours] = tuple(reversed(shape)) if transposed else shape
    check_tensor_names(expected, mapped, str(hf_dir))

    def converted():
        for name, tensor in iter_tensors(hf_dir):
            ours, transposed = map_hf_name(name)
            yield ours, (tensor.t().contiguous() if transposed else tensor)

    return save_model_checkpoint(converted(), config, out_dir, max_shard_bytes)


def load_hf_reference(hf_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The exported directory loaded by transformers itself, offline, with the shipped remote code."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=dtype,
                                                local_files_only=True)

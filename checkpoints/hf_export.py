"""Export our checkpoint to the layout TJUNLP/FuxiTranyu-8B publishes on the Hugging Face Hub.

config.json (model_type `fuxitranyu`, auto_map to the shipped configuration/modeling files), safetensors
shards with an index, generation_config.json and, when given, the tokenizer files. Works tensor by tensor.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from checkpoints.model_checkpoint import read_model_config, replaced_folder
from checkpoints.sharded_safetensors import CheckpointError, ShardedSafetensorsWriter, iter_tensors
from model import ModelConfig

HF_FILES = Path(__file__).parent / "hf_files"
REMOTE_CODE = {"fuxitranyu": ("configuration_fuxitranyu.py", "modeling_fuxitranyu.py"),
               "fuxitranyu_moe": ("configuration_fuxitranyu.py", "modeling_fuxitranyu.py",
                                  "configuration_fuxitranyu_moe.py", "modeling_fuxitranyu_moe.py")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config_dict(config: ModelConfig, dtype: str) -> dict:
    """The published config.json fields (methods.md 1.2), plus `fuxi_vocab_size` for an exact round trip."""
    if config.type not in REMOTE_CODE:
        raise CheckpointError(f"model type {config.type!r} has no Hugging Face export")
    fields = {
        "architectures": ["FuxiTranyuForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_fuxitranyu.FuxiTranyuConfig",
            "AutoModelForCausalLM": "modeling_fuxitranyu.FuxiTranyuForCausalLM",
        },
        "model_type": "fuxitranyu",
        "vocab_size": config.padded_vocab_size,
        "fuxi_vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "hidden_act": "gelu_fast",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "attention_bias": True,
        "mlp_bias": True,
        "attention_dropout": config.attention_dropout,
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    return fields if config.type == "fuxitranyu" else {**fields, **moe_hf_fields(config)}


def moe_hf_fields(config: ModelConfig) -> dict:
    """FuxiTranyu-MoE: the routing fields the shipped modeling file reads, plus `fuxi_moe` (our MoEConfig,
    training switches included) so that `convert from-hf` restores it exactly."""
    from model.typed_config import to_dict

    moe = config.moe
    return {
        "architectures": ["FuxiTranyuMoeForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_fuxitranyu_moe.FuxiTranyuMoeConfig",
            "AutoModelForCausalLM": "modeling_fuxitranyu_moe.FuxiTranyuMoeForCausalLM",
        },
        "model_type": "fuxitranyu_moe",
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": not moe.top1_code_compat,
        "moe_layers": moe.moe_layers(config.num_layers),
        # The shipped file's balance loss is the code form (K times the paper's): scale alpha to match.
        "router_aux_loss_coef": moe.balance_loss_coef / (moe.top_k if moe.balance_loss_form == "paper" else 1),
        "fuxi_moe": to_dict(moe),
    }


def copy_tokenizer(tokenizer_dir: str | Path, out_dir: Path) -> list[str]:
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"tokenizer directory not found: {tokenizer_dir}")
    copied = []
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in (
                "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    if not copied:
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files found")
    return copied


def export_to_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
                 max_shard_bytes: int = 5 * 1024**3, tokenizer_dir: str | Path | None = None) -> Path:
    """Convert our checkpoint at `ckpt_dir` into a Hugging Face directory at `out_dir` (atomically)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype: {dtype!r} is not one of {list(DTYPES)}")
    config = read_model_config(ckpt_dir)
    hf_config = hf_config_dict(config, dtype)
    with replaced_folder(out_dir) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for name, tensor in iter_tensors(ckpt_dir):
            writer.add(name, tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor)
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                      "pad_token_id": config.eos_token_id, "do_sample": False}
        if config.padded_vocab_size > config.vocab_size:  # the dummy rows padding the vocab are never emitted
            generation["suppress_tokens"] = list(range(config.vocab_size, config.padded_vocab_size))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for filename in REMOTE_CODE[config.type]:
            shutil.copy2(HF_FILES / filename, tmp / filename)
        if tokenizer_dir is None and (Path(ckpt_dir) / "tokenizer").is_dir():
            tokenizer_dir = Path(ckpt_dir) / "tokenizer"  # a checkpoint may carry the tokenizer it was trained with
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
    return Path(out_dir)

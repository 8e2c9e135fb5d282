"""An upcycled Llama/Mistral-family MoE-LPR model as transformers' native `MixtralForCausalLM` (no remote code).

Mixtral is the bias-free Llama decoder (GQA, RMSNorm, any transformers RoPE type, tied or untied embeddings)
with every FFN a top-K mixture of SwiGLU experts. Its router (`MixtralTopKRouter`) is ours: a bias-free
Linear(h, N), softmax in fp32, top-K on the probabilities, the K weights renormalised to sum to 1 (model/moe.py
`route`). So the export is a renaming, per MoE layer:

    mlp.router.weight              -> block_sparse_moe.gate.weight
    mlp.experts.{j}.gate_proj      -> block_sparse_moe.experts.{j}.w1
    mlp.experts.{j}.up_proj        -> block_sparse_moe.experts.{j}.w3
    mlp.experts.{j}.down_proj      -> block_sparse_moe.experts.{j}.w2

the layout of the released Mixtral checkpoints, which transformers 4.x loads as it is and transformers 5 fuses
into `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` on load (its conversion mapping). Expert 0, the frozen
original FFN, is expert 0; freezing, the LPR loss and `original_languages` only matter in training and are kept
in `fuxi_moe` for the record. What Mixtral cannot compute is refused, naming the field: biases (Qwen2's q/k/v,
Llama's `attention_bias`/`mlp_bias`), dense layers between MoE layers (`moe.layers`), and the released code's
unrenormalised top-1 (`moe.top1_code_compat`).
"""
from __future__ import annotations

import re

from fuxi.checkpoints.sharded_safetensors import CheckpointError
from fuxi.common.typed_config import to_dict
from fuxi.model import ModelConfig

MIXTRAL_FAMILIES = ("llama", "mistral")
_MOE_TENSOR = re.compile(r"^(model\.layers\.\d+)\.mlp\.(router|experts\.(\d+)\.(gate_proj|up_proj|down_proj))\.weight$")
_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def check_mixtral(config: ModelConfig) -> None:
    """Refuse, in one line naming the field, an MoE-LPR model that MixtralForCausalLM would compute differently."""
    where = f"an MoE-LPR model of family {config.family!r}"
    if config.family not in MIXTRAL_FAMILIES:
        reason = ("its q/k/v biases have no place in MixtralForCausalLM, and Qwen2MoeForCausalLM adds a shared "
                  "expert" if config.family == "qwen2" else "no native transformers class holds it")
        raise CheckpointError(f"family {config.family!r}: {where} has no Hugging Face export ({reason})")
    if config.mlp != "swiglu":
        raise CheckpointError(f"mlp {config.mlp!r}: Mixtral's experts are SwiGLU; {where} cannot export natively")
    if config.attention_bias != "none":
        raise CheckpointError(f"attention_bias {config.attention_bias!r}: Mixtral's attention has no bias; "
                              f"{where} cannot export natively")
    if config.mlp_bias:
        raise CheckpointError(f"mlp_bias true: Mixtral's experts have no bias; {where} cannot export natively")
    moe = config.moe
    if moe.moe_layers(config.num_layers) != list(range(config.num_layers)):
        raise CheckpointError(f"moe.layers {moe.layers}: Mixtral has an MoE feed-forward in every layer; only a "
                              f"model upcycled in all {config.num_layers} layers exports natively")
    if moe.top1_code_compat:
        raise CheckpointError("moe.top1_code_compat true: Mixtral renormalises the top-K weights (a top-1 weight "
                              "is 1, not p_max); this model computes a different function")


def mixtral_config_dict(config: ModelConfig, fields: dict, rope: dict) -> dict:
    """config.json of MixtralForCausalLM: the shared fields, GQA, the RoPE (scaling included) and the routing."""
    moe = config.moe
    out = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **fields,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "sliding_window": None,
        # transformers >= 5 reads rope_parameters, 4.x rope_theta and rope_scaling: all are written.
        "rope_parameters": rope,
        "rope_scaling": None if config.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        # Training only: Mixtral's balance loss is the code form (K times the paper's), pooled over all layers.
        "router_aux_loss_coef": moe.balance_loss_coef / (moe.top_k if moe.balance_loss_form == "paper" else 1),
        "fuxi_moe": to_dict(moe),  # our MoEConfig, training switches included, for the record
    }
    del out["attention_bias"], out["mlp_bias"]
    return out


def mixtral_tensor_name(name: str) -> str:
    """Our tensor name -> the released Mixtral layout's (trunk tensors keep their Llama names)."""
    match = _MOE_TENSOR.match(name)
    if match is None:
        if ".mlp." in name:
            raise CheckpointError(f"tensor {name}: not a router or SwiGLU expert weight, Mixtral has no place for it")
        return name
    layer, part, expert, proj = match.groups()
    if part == "router":
        return f"{layer}.block_sparse_moe.gate.weight"
    return f"{layer}.block_sparse_moe.experts.{expert}.{_EXPERT_NAMES[proj]}.weight"

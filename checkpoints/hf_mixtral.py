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
into `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` on load (its conversion mapping; its save_pretrained
writes the released layout back unless told `save_original_format=False`). Expert 0, the frozen original FFN, is
expert 0; freezing, the LPR loss and `original_languages` only matter in training and are kept in `fuxi_moe` for
the record. What Mixtral cannot compute is refused, naming the field: biases (Llama's `attention_bias` and
`mlp_bias`; a Qwen2 base exports as Qwen2MoeForCausalLM, hf_qwen2_moe.py), dense layers between MoE layers
(`moe.layers`), and the released code's unrenormalised top-1 (`moe.top1_code_compat`).

`convert from-hf` reads a `MixtralForCausalLM` directory back (ours or any other, in the released layout or
transformers 5's fused one, hf_fused_experts.py) as an MoE-LPR model of every layer, expert 0 the one LPR keeps
for the original languages; `fuxi_moe` and `fuxi_family`, when present, restore our settings exactly.
"""
from __future__ import annotations

import re

from fuxi.checkpoints.sharded_safetensors import CheckpointError
from fuxi.common.typed_config import to_dict
from fuxi.model import ModelConfig
from fuxi.model.config import MoEConfig

MIXTRAL_FAMILIES = ("llama", "mistral")
_MOE_TENSOR = re.compile(r"^(model\.layers\.\d+)\.mlp\.(router|experts\.(\d+)\.(gate_proj|up_proj|down_proj))\.weight$")
_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_MIXTRAL_TENSOR = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.(gate|experts\.(\d+)\.(w1|w2|w3))\.weight$")
_OUR_EXPERT_NAMES = {mixtral: ours for ours, mixtral in _EXPERT_NAMES.items()}


def check_mixtral(config: ModelConfig) -> None:
    """Refuse, in one line naming the field, an MoE-LPR model that MixtralForCausalLM would compute differently."""
    where = f"an MoE-LPR model of family {config.family!r}"
    if config.family not in MIXTRAL_FAMILIES:  # qwen2 exports as Qwen2MoeForCausalLM (hf_qwen2_moe.py)
        raise CheckpointError(f"family {config.family!r}: {where} is not a Mixtral (one of {list(MIXTRAL_FAMILIES)})")
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


def mixtral_config_dict(config: ModelConfig, fields: dict) -> dict:
    """config.json of MixtralForCausalLM: the shared and Llama-style fields (GQA, the RoPE) and the routing."""
    moe = config.moe
    out = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **fields,
        "sliding_window": None,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        # Training only: Mixtral's balance loss is the code form (K times the paper's), pooled over all layers.
        "router_aux_loss_coef": moe.balance_loss_coef / (moe.top_k if moe.balance_loss_form == "paper" else 1),
        "fuxi_family": config.family,  # llama or mistral: the dense class the trunk came from, for the record
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


def our_tensor_name(name: str) -> str | None:
    """A released-layout Mixtral tensor name -> ours; None for a name outside the MoE blocks."""
    match = _MIXTRAL_TENSOR.match(name)
    if match is None:
        return None
    layer, part, expert, proj = match.groups()
    if part == "gate":
        return f"{layer}.mlp.router.weight"
    return f"{layer}.mlp.experts.{expert}.{_OUR_EXPERT_NAMES[proj]}.weight"


def mixtral_family(cfg: dict) -> str:
    """The trunk's family: `fuxi_family` of our export, else mistral (Mixtral is Mistral's MoE)."""
    family = cfg.get("fuxi_family", "mistral")
    if family not in MIXTRAL_FAMILIES:
        raise CheckpointError(f"fuxi_family {family!r}: a Mixtral trunk is one of {list(MIXTRAL_FAMILIES)}")
    return family


def moe_from_mixtral(cfg: dict, path) -> MoEConfig:
    """Our MoEConfig from a Mixtral config.json: `fuxi_moe` when present (exact round trip), else the routing
    fields; refusing what our router does not compute."""
    from fuxi.common.errors import ConfigError
    from fuxi.common.typed_config import from_dict

    missing = [k for k in ("num_local_experts", "num_experts_per_tok") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}")
    if float(cfg.get("router_jitter_noise") or 0.0) != 0.0:
        raise CheckpointError(f"{path}: router_jitter_noise {cfg['router_jitter_noise']}: the router's training-time "
                              "jitter is not represented (set it to 0.0 to train without it)")
    try:
        if "fuxi_moe" in cfg:
            moe = from_dict(MoEConfig, cfg["fuxi_moe"], source=f"{path} (fuxi_moe)")
        else:  # Mixtral's balance loss is the code form, pooled over the layers
            moe = MoEConfig(num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                            balance_loss_coef=float(cfg.get("router_aux_loss_coef", 0.01)))
        moe.validate()
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    found = (moe.num_experts, moe.top_k, moe.layers, moe.top1_code_compat)
    wanted = (cfg["num_local_experts"], cfg["num_experts_per_tok"], None, False)
    if found != wanted:
        raise CheckpointError(f"{path}: fuxi_moe (num_experts, top_k, layers, top1_code_compat) {found} contradicts "
                              f"Mixtral's {wanted} (every layer MoE, top-K renormalised)")
    return moe

"""An upcycled Qwen2-family MoE-LPR model as transformers' native `Qwen2MoeForCausalLM` (no remote code).

Qwen2-MoE is the Qwen2 decoder (q/k/v biases, no o_proj bias, GQA, RMSNorm, tied or untied embeddings, any
transformers RoPE type) whose FFNs are `Qwen2MoeSparseMoeBlock`s: bias-free SwiGLU experts of width
`moe_intermediate_size` behind a bias-free router `gate` (softmax in fp32, top-K on the probabilities, the K
weights renormalised when `norm_topk_prob`), plus a shared expert scaled by sigmoid(shared_expert_gate(x)). The
routed part is ours (model/moe.py `route`); MoE-LPR has no shared expert, and one of width 0
(`shared_expert_intermediate_size: 0`, which transformers 4.57 and 5.x both build) outputs exactly 0: its down
projection sums over no inputs. Layers left dense are `mlp_only_layers` (their MLP keeps Qwen2's names); the
released code's unrenormalised top-1 is `norm_topk_prob: false` with K = 1. So every Qwen2-base MoE-LPR model
exports exactly, and the export is a renaming plus the empty shared expert, per MoE layer:

    mlp.router.weight                       -> mlp.gate.weight
    mlp.experts.{j}.gate_proj/up_proj/down_proj   (the same names)
    (none)                                  -> mlp.shared_expert.{gate,up}_proj.weight [0, h],
                                               mlp.shared_expert.down_proj.weight [h, 0],
                                               mlp.shared_expert_gate.weight [1, h] of zeros

`convert from-hf` reads a `Qwen2MoeForCausalLM` directory back when its shared expert has width 0 (ours, or any
other without one); a real shared expert is refused, naming the field.
"""
from __future__ import annotations

import re

import torch

from fuxi.checkpoints.sharded_safetensors import CheckpointError
from fuxi.common.typed_config import to_dict
from fuxi.model import ModelConfig
from fuxi.model.config import MoEConfig

_ROUTER = re.compile(r"^(model\.layers\.\d+)\.mlp\.router\.weight$")
_SHARED = re.compile(r"^model\.layers\.\d+\.mlp\.shared_expert(\.(gate_proj|up_proj|down_proj)|_gate)\.weight$")


def check_qwen2_moe(config: ModelConfig) -> None:
    """Refuse, naming the field, a Qwen2-family MoE-LPR model that Qwen2MoeForCausalLM would compute differently
    (the family's own validation already fixes these; a hand-edited config.yaml may not)."""
    where = "an MoE-LPR model of family 'qwen2'"
    if config.mlp != "swiglu":
        raise CheckpointError(f"mlp {config.mlp!r}: Qwen2-MoE's experts are SwiGLU; {where} cannot export natively")
    if config.attention_bias != "qkv":
        raise CheckpointError(f"attention_bias {config.attention_bias!r}: Qwen2-MoE's attention has q/k/v biases "
                              f"only; {where} cannot export natively")
    if config.mlp_bias:
        raise CheckpointError(f"mlp_bias true: Qwen2-MoE's experts have no bias; {where} cannot export natively")


def qwen2_moe_config_dict(config: ModelConfig, fields: dict) -> dict:
    """config.json of Qwen2MoeForCausalLM: the shared fields, GQA, the RoPE, the routing, no shared expert."""
    moe = config.moe
    moe_layers = moe.moe_layers(config.num_layers)
    out = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **fields,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_layers,
        "qkv_bias": True,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": config.ffn_hidden_size,  # the experts are copies of the dense FFN
        "shared_expert_intermediate_size": 0,  # no shared expert: its output is exactly 0
        "norm_topk_prob": not moe.top1_code_compat,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(config.num_layers) if i not in moe_layers],
        "output_router_logits": False,
        # Training only: Qwen2-MoE's balance loss is Mixtral's code form (K times the paper's), pooled over layers.
        "router_aux_loss_coef": moe.balance_loss_coef / (moe.top_k if moe.balance_loss_form == "paper" else 1),
        "fuxi_moe": to_dict(moe),  # our MoEConfig, training switches included, for the record
    }
    del out["attention_bias"], out["mlp_bias"]
    return out


def qwen2_moe_tensors(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Our tensor -> the Qwen2-MoE tensors it becomes: a router is renamed and brings its layer's empty shared
    expert; every other name (experts, dense MLPs, the trunk) is already Qwen2-MoE's."""
    match = _ROUTER.match(name)
    if match is None:
        return [(name, tensor)]
    layer, hidden = match.group(1), tensor.shape[1]
    shared = f"{layer}.mlp.shared_expert"
    return [(f"{layer}.mlp.gate.weight", tensor),
            (f"{shared}.gate_proj.weight", tensor.new_zeros(0, hidden)),
            (f"{shared}.up_proj.weight", tensor.new_zeros(0, hidden)),
            (f"{shared}.down_proj.weight", tensor.new_zeros(hidden, 0)),
            (f"{shared}_gate.weight", tensor.new_zeros(1, hidden))]


def empty_shared_expert(shapes: dict[str, tuple], path) -> set[str]:
    """The names of the width-0 shared expert's tensors, which `convert from-hf` leaves out (they add exactly 0);
    a shared-expert matrix with elements means a shared expert that config.json did not declare: refused."""
    names = {name for name in shapes if _SHARED.match(name)}
    for name in sorted(names):
        if "shared_expert_gate" not in name and all(shapes[name]):
            raise CheckpointError(f"{path}: tensor {name} {tuple(shapes[name])}: a shared expert with weights; "
                                  "MoE-LPR has no shared expert (shared_expert_intermediate_size must be 0)")
    return names


def qwen2_moe_layers(cfg: dict, num_layers: int) -> list[int]:
    """The layers transformers builds as Qwen2MoeSparseMoeBlock (the others are a dense Qwen2MoeMLP)."""
    dense = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step", 1))
    if step < 1:
        raise CheckpointError(f"decoder_sparse_step {step}: must be >= 1")
    return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


def moe_from_qwen2_moe(cfg: dict, path) -> tuple[MoEConfig, int]:
    """Our MoEConfig and the expert width from a Qwen2-MoE config.json: `fuxi_moe` when present (exact round
    trip), else the routing fields; refusing what our MoE does not compute."""
    from fuxi.common.errors import ConfigError
    from fuxi.common.typed_config import from_dict

    missing = [k for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                           "shared_expert_intermediate_size") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}")
    if cfg["shared_expert_intermediate_size"] != 0:
        raise CheckpointError(f"{path}: shared_expert_intermediate_size {cfg['shared_expert_intermediate_size']}: a "
                              "shared expert is not represented (MoE-LPR's experts are all routed)")
    if cfg.get("qkv_bias", True) is not True:
        raise CheckpointError(f"{path}: qkv_bias {cfg['qkv_bias']!r}: the qwen2 family has q/k/v biases")
    num_layers = cfg["num_hidden_layers"]
    layers = qwen2_moe_layers(cfg, num_layers)
    if cfg["num_experts"] < 1 or not layers:
        raise CheckpointError(f"{path}: num_experts {cfg['num_experts']}, mlp_only_layers "
                              f"{cfg.get('mlp_only_layers')}: no MoE layer; import it as a dense qwen2 model")
    width = cfg["moe_intermediate_size"]
    if len(layers) < num_layers and width != cfg["intermediate_size"]:
        raise CheckpointError(f"{path}: moe_intermediate_size {width} != intermediate_size "
                              f"{cfg['intermediate_size']}: upcycled experts are as wide as the dense layers' FFN")
    top_k, renormalized = cfg["num_experts_per_tok"], bool(cfg.get("norm_topk_prob", False))
    try:
        if "fuxi_moe" in cfg:
            moe = from_dict(MoEConfig, cfg["fuxi_moe"], source=f"{path} (fuxi_moe)")
        else:
            if not renormalized and top_k != 1:
                raise CheckpointError(f"{path}: norm_topk_prob false with num_experts_per_tok {top_k}: unrenormalised "
                                      "top-K weights are represented only for K = 1")
            moe = MoEConfig(num_experts=cfg["num_experts"], top_k=top_k, top1_code_compat=not renormalized,
                            balance_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
                            layers=None if len(layers) == num_layers else layers)
        moe.validate()
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    found = (moe.num_experts, moe.top_k, moe.moe_layers(num_layers), moe.top1_code_compat)
    wanted = (cfg["num_experts"], top_k, layers, not renormalized)
    if found != wanted:
        raise CheckpointError(f"{path}: fuxi_moe (num_experts, top_k, layers, top1_code_compat) {found} contradicts "
                              f"Qwen2-MoE's {wanted}")
    return moe, width

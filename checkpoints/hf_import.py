"""Import a Hugging Face directory into our checkpoint: our native (`arcee`) export, the TJUNLP layout
(`fuxitranyu`, the released 8B and its intermediate checkpoints; `fuxitranyu_moe`), a Llama-convention
directory holding the FuxiTranyu architecture, or a Llama-family model as transformers saves it
(`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`: family llama/qwen2/mistral, model/config.py),
or an MoE-LPR model as `MixtralForCausalLM` (checkpoints/hf_mixtral.py) or `Qwen2MoeForCausalLM` without a shared
expert (checkpoints/hf_qwen2_moe.py), their experts per expert or in transformers 5's fused layout
(checkpoints/hf_fused_experts.py).
Anything else is refused with the config field that rules it out. The tokenizer files, when present, go to the
checkpoint's `tokenizer/` folder, so `convert to-hf` writes them back.

Tensor names go through one mapping table, so GPT-2/NeoX-style MLP names are accepted too. Whether an MLP
matrix is stored as [out, in] (nn.Linear) or [in, out] (GPT-2's Conv1D) is read from its shape: the FFN width
differs from the hidden width, so the shape says which layout it is, whatever the name. The embedding may have
250,680 or 250,752 (padded) rows.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from fuxi.checkpoints.hf_fused_experts import split_fused_shapes, split_fused_tensors
from fuxi.checkpoints.hf_mixtral import mixtral_family, moe_from_mixtral, our_tensor_name
from fuxi.checkpoints.hf_qwen2_moe import empty_shared_expert, moe_from_qwen2_moe
from fuxi.checkpoints.model_checkpoint import check_tensor_names, save_model_checkpoint
from fuxi.checkpoints.sharded_safetensors import CheckpointError, iter_tensors, tensor_shapes
from fuxi.common.errors import ConfigError
from fuxi.model import ModelConfig, build_model

# Suffix of an HF MLP tensor name -> (our name, stored transposed when the shape cannot tell: only when the
# FFN is as wide as the hidden size, where the naming convention decides).
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
# The router of Qwen2-MoE, and of Mixtral in transformers 5's fused layout.
_MOE_GATE = re.compile(r"^(model\.layers\.\d+)\.mlp\.gate\.weight$")
# model_type values that can hold the FuxiTranyu architecture.
MODEL_TYPES = ("arcee", "fuxitranyu", "fuxitranyu_moe", "llama")
# model_type values of the Llama family (gated SwiGLU MLP); `llama` without gate_proj tensors is FuxiTranyu.
LLAMA_FAMILY = ("llama", "qwen2", "mistral")
TANH_GELU = ("gelu_fast", "gelu_pytorch_tanh", "gelu_new")
# The tokenizer files `convert from-hf` keeps beside the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")


def map_hf_name(name: str) -> tuple[str, bool]:
    """HF tensor name -> (our name, transposed by its naming convention). Names outside the MLP are ours."""
    mixtral = our_tensor_name(name)
    if mixtral is not None:
        return mixtral, False
    gate = _MOE_GATE.match(name)
    if gate is not None:
        return f"{gate.group(1)}.mlp.router.weight", False
    match = _MLP_KEY.match(name)
    if match and match.group(2) in MLP_NAME_VARIANTS:
        ours, transposed = MLP_NAME_VARIANTS[match.group(2)]
        return f"{match.group(1)}{ours}.{match.group(3)}", transposed and match.group(3) == "weight"
    return name, False


def stored_transposed(ours: str, shape: tuple, expected: dict, by_name: bool) -> bool:
    """An MLP matrix is transposed when its shape is the reverse of ours; a square one follows its name."""
    want = expected.get(ours)
    if ".mlp." not in ours or want is None or len(shape) != 2 or len(want) != 2:
        return False
    if want[0] == want[1]:
        return by_name
    return tuple(shape) == tuple(reversed(want))


def _rope_theta(cfg: dict, path: Path) -> float:
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling"):
        raise CheckpointError(f"{path}: rope_scaling {cfg['rope_scaling']!r}: FuxiTranyu uses plain RoPE")
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{path}: rope_parameters.rope_type {rope['rope_type']!r}: FuxiTranyu uses plain RoPE")
    if float(cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))) != 1.0:
        raise CheckpointError(f"{path}: partial_rotary_factor: FuxiTranyu rotates the whole head")
    return float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))


def check_architecture_fields(cfg: dict, path: Path) -> None:
    """Refuse, naming the field, a config whose architecture is not FuxiTranyu's."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not one of {list(MODEL_TYPES)} "
                              "(the architectures that can hold FuxiTranyu)")
    act = cfg.get("hidden_act", "gelu_fast")
    if act not in TANH_GELU:
        raise CheckpointError(f"{path}: hidden_act {act!r} is not the tanh-approximation GELU {list(TANH_GELU)}")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field) is False:
            raise CheckpointError(f"{path}: {field} false: FuxiTranyu's projections have biases")
    if cfg.get("tie_word_embeddings") is True:
        raise CheckpointError(f"{path}: tie_word_embeddings true: FuxiTranyu's embeddings are untied")
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if kv_heads != cfg["num_attention_heads"]:
        raise CheckpointError(f"{path}: num_key_value_heads {kv_heads} != num_attention_heads "
                              f"{cfg['num_attention_heads']}; FuxiTranyu is full multi-head attention")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise CheckpointError(f"{path}: head_dim {head_dim} x {cfg['num_attention_heads']} heads != hidden_size "
                              f"{cfg['hidden_size']}")


def _rope_scaling(cfg: dict, path: Path):
    """HF rope_scaling (transformers 4.x) or rope_parameters (5.x) -> (theta, our RopeScalingConfig or None)."""
    from fuxi.model.config import RopeScalingConfig

    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise CheckpointError(f"{path}: partial_rotary_factor: only RoPE over the whole head is represented")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "dynamic", "llama3"):
        raise CheckpointError(f"{path}: rope_scaling.rope_type {kind!r} is not one of ['default', 'linear', "
                              "'dynamic', 'llama3']")
    fields = {"rope_type": kind, "factor": float(rope.get("factor", 1.0))}
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rope:
                raise CheckpointError(f"{path}: rope_scaling.{key} missing for rope_type llama3")
            fields[key] = rope[key]
    if kind == "dynamic" and rope.get("original_max_position_embeddings") not in (
            None, cfg.get("max_position_embeddings")):
        raise CheckpointError(f"{path}: rope_scaling.original_max_position_embeddings differs from "
                              "max_position_embeddings; dynamic NTK here scales from max_position_embeddings")
    return theta, RopeScalingConfig(**fields)


def _check_full_attention(cfg: dict, path: Path) -> None:
    """Sliding-window attention is not represented: refuse it where it changes the result, i.e. where the
    window is shorter than the model's positions and some layer uses it."""
    window, positions = cfg.get("sliding_window"), cfg.get("max_position_embeddings", 4096)
    if window is None or window >= positions:
        return
    layer_types = cfg.get("layer_types")
    if cfg.get("model_type") == "qwen2":
        used = ("sliding_attention" in layer_types) if layer_types else bool(cfg.get("use_sliding_window"))
    else:
        used = layer_types is None or "sliding_attention" in layer_types
    if used:
        raise CheckpointError(f"{path}: sliding_window {window} is shorter than max_position_embeddings "
                              f"{positions}: sliding-window attention is not represented (set "
                              f"max_position_embeddings to at most {window} to use the model within its window)")


def llama_family_fields(cfg: dict, path: Path) -> dict:
    """The architecture switches of a Llama/Qwen2/Mistral config.json, refusing what they cannot represent."""
    family = cfg["model_type"]
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {cfg['hidden_act']!r}: the {family} family here is the gated "
                              "SwiGLU MLP ('silu')")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise CheckpointError(f"{path}: head_dim {head_dim} x {heads} heads != hidden_size {cfg['hidden_size']}")
    _check_full_attention(cfg, path)
    if family == "llama":
        attention_bias, mlp_bias = ("all" if cfg.get("attention_bias") else "none"), bool(cfg.get("mlp_bias"))
    else:  # Qwen2 always has q/k/v biases, Mistral none; neither has MLP biases or an attention_bias switch
        attention_bias, mlp_bias = ("qkv" if family == "qwen2" else "none"), False
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise CheckpointError(f"{path}: {key} true: {family} has no such biases")
    theta, scaling = _rope_scaling(cfg, path)
    kv_heads = cfg.get("num_key_value_heads") or heads
    return {"family": family, "mlp": "swiglu", "attention_bias": attention_bias, "mlp_bias": mlp_bias,
            "num_kv_heads": None if kv_heads == heads else kv_heads, "rope_theta": theta, "rope_scaling": scaling,
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False))}


def is_llama_family(cfg: dict, shapes: dict) -> bool:
    """A Llama-family model: qwen2/mistral always; llama when its MLP is gated (a llama-named directory without
    gate_proj tensors holds FuxiTranyu's non-gated MLP)."""
    if cfg.get("model_type") == "llama":
        return any(name.endswith("mlp.gate_proj.weight") for name in shapes)
    return cfg.get("model_type") in LLAMA_FAMILY


def model_config_from_hf(hf_dir: Path, embedding_rows: int, shapes: dict | None = None) -> ModelConfig:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not JSON ({err})") from None
    required = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}")
    moe = None
    if cfg["model_type"] == "mixtral":  # the trunk is Mistral's (Llama's without biases)
        architecture = {**llama_family_fields({**cfg, "model_type": "mistral"}, path), "family": mixtral_family(cfg)}
        moe = moe_from_mixtral(cfg, path)
    elif cfg["model_type"] == "qwen2_moe":  # the trunk is Qwen2's; the FFN width is the experts'
        moe, width = moe_from_qwen2_moe(cfg, path)
        cfg = {**cfg, "intermediate_size": width}
        architecture = llama_family_fields({**cfg, "model_type": "qwen2"}, path)
    elif is_llama_family(cfg, shapes or {}):
        architecture = llama_family_fields(cfg, path)
    else:
        check_architecture_fields(cfg, path)
        architecture = {"rope_theta": _rope_theta(cfg, path)}
    vocab = cfg.get("fuxi_vocab_size", cfg["vocab_size"])
    pad_multiple = 1
    if embedding_rows != vocab:
        # The report's layout: 250,680 real tokens padded with dummies to a multiple of 128.
        if embedding_rows > vocab and embedding_rows % 128 == 0 and embedding_rows - vocab < 128:
            pad_multiple = 128
        else:
            raise CheckpointError(f"{path}: vocab_size {vocab} does not fit the {embedding_rows}-row embedding")
    eos = cfg.get("eos_token_id", 0)
    eos = eos[0] if isinstance(eos, list) else eos
    config = ModelConfig(
        type="fuxitranyu", vocab_size=vocab, pad_vocab_multiple=pad_multiple, hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"], max_seq_len=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), init_std=float(cfg.get("initializer_range", 0.01)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        bos_token_id=cfg.get("bos_token_id", 0) or 0, eos_token_id=eos or 0, **architecture)
    if moe is not None:
        return dataclasses.replace(config, type="fuxitranyu_moe", moe=moe)
    return with_moe_from_hf(config, cfg, path) if cfg.get("model_type") == "fuxitranyu_moe" else config


def with_moe_from_hf(config: ModelConfig, cfg: dict, path: Path) -> ModelConfig:
    """FuxiTranyu-MoE: our MoEConfig from `fuxi_moe` when present (exact round trip), else from the routing
    fields; either way it must agree with the routing fields the shipped modeling file reads."""
    from fuxi.common.typed_config import from_dict
    from fuxi.model.config import MoEConfig

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


def read_hf_checkpoint(hf_dir: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """Check every tensor name and shape against the model the config describes; return that config and a lazy
    iterator of (our name, tensor) read shard by shard. No code from the directory is run."""
    hf_dir = Path(hf_dir)
    shapes = split_fused_shapes(tensor_shapes(hf_dir))
    if "model.embed_tokens.weight" not in shapes:
        raise CheckpointError(f"{hf_dir}: no model.embed_tokens.weight; not a FuxiTranyu/Llama-layout checkpoint")
    config = model_config_from_hf(hf_dir, shapes["model.embed_tokens.weight"][0], shapes)
    try:
        config.validate()
    except ConfigError as err:
        raise CheckpointError(f"{hf_dir / 'config.json'}: {err}") from None
    # Qwen2-MoE's width-0 shared expert adds exactly 0: left out (our remote MoE layout is FuxiTranyu's only).
    left_out = empty_shared_expert(shapes, hf_dir) if config.type == "fuxitranyu_moe" and config.family == "qwen2" \
        else set()
    for name in left_out:
        del shapes[name]
    tied_copy = config.tie_word_embeddings and "lm_head.weight" in shapes
    if tied_copy:  # some tied checkpoints also store the shared matrix as lm_head.weight: it is the embedding
        del shapes["lm_head.weight"]
    expected = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}
    mapped, transpose = {}, set()
    for name, shape in shapes.items():
        ours, by_name = map_hf_name(name)
        if ours in mapped:
            raise CheckpointError(f"{hf_dir}: two tensors map to {ours!r} (one of them is {name!r})")
        if stored_transposed(ours, shape, expected, by_name):
            transpose.add(name)
        mapped[ours] = tuple(reversed(shape)) if name in transpose else shape
    check_tensor_names(expected, mapped, str(hf_dir))

    def converted():
        for name, tensor in split_fused_tensors(iter_tensors(hf_dir)):
            if (tied_copy and name == "lm_head.weight") or name in left_out:
                continue
            ours, _ = map_hf_name(name)
            yield ours, (tensor.t().contiguous() if name in transpose else tensor)

    return config, converted()


def import_from_hf(hf_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Convert an HF directory into our checkpoint at `out_dir`, shard by shard (atomically)."""
    config, tensors = read_hf_checkpoint(hf_dir)
    hf_dir = Path(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        return save_model_checkpoint(tensors, config, out_dir, max_shard_bytes)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, Path(tokenizer_dir) / name)
        return save_model_checkpoint(tensors, config, out_dir, max_shard_bytes, tokenizer_dir=tokenizer_dir)


def load_hf_reference(hf_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The exported directory loaded by transformers itself, offline; remote code only where the export ships
    it (the TJUNLP and MoE layouts), so a native export proves it needs none."""
    from transformers import AutoModelForCausalLM

    remote = "auto_map" in json.loads((Path(hf_dir) / "config.json").read_text())
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=remote, dtype=dtype,
                                                local_files_only=True)

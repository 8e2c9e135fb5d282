"""Export our checkpoint as a Hugging Face model directory.

Layouts (`layout=`, `fuxi convert to-hf --format`):
- `native` (default for dense FuxiTranyu): transformers' own `ArceeForCausalLM` computes FuxiTranyu exactly
  (Llama layout, non-gated biased MLP with tanh-GELU, biased q/k/v/o, untied embeddings), so the export has no
  Python files and loads with plain `AutoModelForCausalLM.from_pretrained(dir)`; transformers maintains the
  class across releases, and downstream tools (lm-eval, vLLM's transformers backend, PEFT, quantisers) know it.
- `tjunlp`: the layout of the released TJUNLP FuxiTranyu checkpoints (`model_type: fuxitranyu`, remote code
  shipped beside the weights, `trust_remote_code=True`).
- MoE-LPR models of the FuxiTranyu family have no native class (biased, non-gated experts): always remote
  code (`fuxitranyu_moe`).
- MoE-LPR models of a bias-free Llama/Mistral base are native `MixtralForCausalLM` (`mixtral`,
  checkpoints/hf_mixtral.py: the router and experts renamed); of a Qwen2 base (q/k/v bias) native
  `Qwen2MoeForCausalLM` (`qwen2_moe`, checkpoints/hf_qwen2_moe.py: the router renamed, a width-0 shared expert).
- The Llama family (`family: llama | qwen2 | mistral`, model/config.py) is always native: `LlamaForCausalLM`,
  `Qwen2ForCausalLM` or `MistralForCausalLM`, the class `convert from-hf` read it from.
The tensor names are the same in every layout but the native MoE ones (ours are the Llama convention). Works
tensor by tensor.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, get_args

import torch

from fuxi.checkpoints.hf_mixtral import check_mixtral, mixtral_config_dict, mixtral_tensor_name
from fuxi.checkpoints.hf_qwen2_moe import check_qwen2_moe, qwen2_moe_config_dict, qwen2_moe_tensors
from fuxi.checkpoints.model_checkpoint import own_tokenizer, read_model_config, replaced_folder
from fuxi.checkpoints.sharded_safetensors import CheckpointError, ShardedSafetensorsWriter, iter_tensors
from fuxi.model import ModelConfig

HF_FILES = Path(__file__).parent / "hf_files"
Layout = Literal["native", "tjunlp"]  # `--format` of a dense export; an MoE-LPR export is always "moe"
LAYOUTS: tuple[str, ...] = get_args(Layout)
ExportDType = Literal["float32", "bfloat16", "float16"]
EXPORT_DTYPES: tuple[str, ...] = get_args(ExportDType)
REMOTE_CODE = {"tjunlp": ("configuration_fuxitranyu.py", "modeling_fuxitranyu.py"),
               "moe": ("configuration_fuxitranyu.py", "modeling_fuxitranyu.py",
                       "configuration_fuxitranyu_moe.py", "modeling_fuxitranyu_moe.py")}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


FAMILY_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
NATIVE_MOE_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def resolve_layout(config: ModelConfig, layout: Layout | None) -> str:
    """`native` or `tjunlp` for a dense model (native by default); `moe` for a FuxiTranyu MoE-LPR model,
    `mixtral` for a Llama/Mistral one, `qwen2_moe` for a Qwen2 one."""
    if config.family != "fuxitranyu" and config.type == "fuxitranyu_moe":
        native = "qwen2_moe" if config.family == "qwen2" else "mixtral"
        (check_qwen2_moe if native == "qwen2_moe" else check_mixtral)(config)
        if layout not in (None, "native", native):
            raise CheckpointError(f"--format {layout}: an MoE-LPR model of family {config.family!r} exports as "
                                  f"the native {NATIVE_MOE_CLASSES[native]}; omit --format")
        return native
    if config.family != "fuxitranyu":
        if config.type != "fuxitranyu":
            raise CheckpointError(f"model type {config.type!r} of family {config.family!r} has no Hugging Face "
                                  "export")
        if layout not in (None, "native"):
            raise CheckpointError(f"--format {layout}: a {config.family} model exports as its native "
                                  f"{FAMILY_CLASSES[config.family]}; omit --format")
        return "native"
    if config.type == "fuxitranyu_moe":
        if layout == "native":
            raise CheckpointError("--format native: MoE-LPR has no native transformers class (its experts are "
                                  "non-gated); its export is remote code: omit --format")
        return "moe"
    if config.type != "fuxitranyu":
        raise CheckpointError(f"model type {config.type!r} has no Hugging Face export")
    layout = layout or "native"
    if layout not in LAYOUTS:
        raise CheckpointError(f"--format: {layout!r} is not one of {list(LAYOUTS)}")
    return layout


def common_config_fields(config: ModelConfig, dtype: ExportDType) -> dict:
    """The fields every layout shares (docs/methods.md §1.2), plus `fuxi_vocab_size` for an exact round trip."""
    return {
        "vocab_size": config.padded_vocab_size,
        "fuxi_vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
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
        "pad_token_id": config.eos_token_id,
        "use_cache": True,
        "dtype": dtype,
    }


def rope_parameters(config: ModelConfig) -> dict:
    """transformers' `rope_parameters`: theta plus the scaling (linear, dynamic and llama3 are all transformers'
    own rope types, which every Llama-style class, Mixtral included, computes)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope.update(rope_type=s.rope_type, factor=s.factor)
        if s.rope_type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    return rope


def llama_style_fields(config: ModelConfig) -> dict:
    """The fields every Llama-style config of transformers has (Llama, Qwen2, Mistral and their MoE classes):
    GQA, SwiGLU, tied embeddings and the RoPE, which transformers >= 5 reads from rope_parameters and 4.x from
    rope_theta and rope_scaling: all are written."""
    rope = rope_parameters(config)
    return {"num_key_value_heads": config.kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
            "tie_word_embeddings": config.tie_word_embeddings, "rope_parameters": rope,
            "rope_scaling": None if config.rope_scaling is None else
            {k: v for k, v in rope.items() if k != "rope_theta"}}


def llama_family_config(config: ModelConfig, fields: dict) -> dict:
    """config.json of LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM (transformers' own fields)."""
    out = {
        "architectures": [FAMILY_CLASSES[config.family]],
        "model_type": config.family,
        **fields,
        **llama_style_fields(config),
    }
    del out["attention_bias"], out["mlp_bias"]
    if config.family == "llama":
        out.update(attention_bias=config.attention_bias == "all", mlp_bias=config.mlp_bias)
    else:  # full attention: no sliding window in any layer
        out.update(sliding_window=None)
    if config.family == "qwen2":
        out.update(use_sliding_window=False, max_window_layers=config.num_layers)
    return out


def hf_config_dict(config: ModelConfig, dtype: ExportDType, layout: Layout | None = None) -> dict:
    layout = resolve_layout(config, layout)
    fields = common_config_fields(config, dtype)
    if layout == "mixtral":
        return mixtral_config_dict(config, {**fields, **llama_style_fields(config)})
    if layout == "qwen2_moe":
        return qwen2_moe_config_dict(config, {**fields, **llama_style_fields(config)})
    if config.family != "fuxitranyu":
        return llama_family_config(config, fields)
    if layout == "native":
        return {
            "architectures": ["ArceeForCausalLM"],
            "model_type": "arcee",
            **fields,
            "hidden_act": "gelu_pytorch_tanh",  # = gelu_fast, the tanh approximation
            "head_dim": config.hidden_size // config.num_heads,
            # transformers >= 5 reads rope_parameters, 4.x reads rope_theta: both are written.
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        }
    tjunlp = {
        "architectures": ["FuxiTranyuForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_fuxitranyu.FuxiTranyuConfig",
            "AutoModelForCausalLM": "modeling_fuxitranyu.FuxiTranyuForCausalLM",
        },
        "model_type": "fuxitranyu",
        **fields,
        "hidden_act": "gelu_fast",
    }
    return tjunlp if layout == "tjunlp" else {**tjunlp, **moe_hf_fields(config)}


def moe_hf_fields(config: ModelConfig) -> dict:
    """FuxiTranyu-MoE: the routing fields the shipped modeling file reads, plus `fuxi_moe` (our MoEConfig,
    training switches included) so that `convert from-hf` restores it exactly."""
    from fuxi.common.typed_config import to_dict

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


def generation_config_dict(config: ModelConfig) -> dict:
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.eos_token_id, "do_sample": False}
    if config.padded_vocab_size > config.vocab_size:  # the dummy rows padding the vocab are never emitted
        generation["suppress_tokens"] = list(range(config.vocab_size, config.padded_vocab_size))
    return generation


def _token_id(tokenizer_json: dict, token: str, path: Path) -> int:
    for added in tokenizer_json.get("added_tokens", []):
        if added.get("content") == token:
            return added["id"]
    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return vocab[token]
    raise CheckpointError(f"{path}: special token {token!r} is not in the vocabulary")


def export_tokenizer(tokenizer_dir: str | Path, out_dir: Path, config: ModelConfig) -> list[str]:
    """Copy the tokenizer and write the small config files so that they agree with the model: the EOS token is
    also the pad token (as generation_config.json says), `model_max_length` is the model's positions, and the
    special tokens' ids are the ids config.json names. The class is the plain fast tokenizer, which reads
    tokenizer.json as it is: no remote code, no prompt."""
    tokenizer_dir = Path(tokenizer_dir)
    source = tokenizer_dir / "tokenizer.json"
    if not source.is_file():
        raise CheckpointError(f"tokenizer directory {tokenizer_dir}: no tokenizer.json")
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
            copied.append(name)
    config_path = tokenizer_dir / "tokenizer_config.json"
    try:
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        tokenizer_json = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{tokenizer_dir}: unreadable tokenizer file ({err})") from None
    eos = tokenizer_config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        raise CheckpointError(f"{config_path}: no eos_token")
    bos = tokenizer_config.get("bos_token", eos)
    bos = bos.get("content") if isinstance(bos, dict) else bos
    for field, token, wanted in (("eos_token", eos, config.eos_token_id), ("bos_token", bos, config.bos_token_id)):
        found = _token_id(tokenizer_json, token, source)
        if found != wanted:
            raise CheckpointError(f"{config_path}: {field} {token!r} has id {found} in tokenizer.json but the "
                                  f"model's {field}_id is {wanted}")
    special = {"bos_token": bos, "eos_token": eos, "pad_token": eos}
    if "unk_token" in tokenizer_config:
        special["unk_token"] = tokenizer_config["unk_token"]
    tokenizer_config.update(special, tokenizer_class="PreTrainedTokenizerFast",
                            model_max_length=config.max_seq_len, padding_side="left")
    tokenizer_config.pop("auto_map", None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    return [*copied, "tokenizer_config.json", "special_tokens_map.json"]


def hf_tensors(layout: str, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The tensors one of ours becomes in the layout (renamed in Mixtral; in Qwen2-MoE a router also brings its
    layer's empty shared expert; the same tensor under the same name elsewhere)."""
    if layout == "mixtral":
        return [(mixtral_tensor_name(name), tensor)]
    if layout == "qwen2_moe":
        return qwen2_moe_tensors(name, tensor)
    return [(name, tensor)]


def export_to_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: ExportDType = "float32",
                 max_shard_bytes: int = 5 * 1024**3, tokenizer_dir: str | Path | None = None,
                 layout: Layout | None = None) -> Path:
    """Convert our checkpoint at `ckpt_dir` into a Hugging Face directory at `out_dir` (atomically)."""
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"dtype: {dtype!r} is not one of {list(EXPORT_DTYPES)}")
    config = read_model_config(ckpt_dir)
    layout = resolve_layout(config, layout)
    hf_config = hf_config_dict(config, dtype, layout)
    if tokenizer_dir is None:
        tokenizer_dir = own_tokenizer(ckpt_dir)  # a checkpoint may carry the tokenizer it was trained with
    with replaced_folder(out_dir) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for ours, tensor in iter_tensors(ckpt_dir):
            for name, value in hf_tensors(layout, ours, tensor):
                writer.add(name, value.to(getattr(torch, dtype)) if value.is_floating_point() else value)
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config_dict(config), indent=2) + "\n")
        for filename in REMOTE_CODE.get(layout, ()):
            shutil.copyfile(HF_FILES / filename, tmp / filename)
        if tokenizer_dir is not None:
            export_tokenizer(tokenizer_dir, tmp, config)
    return Path(out_dir)

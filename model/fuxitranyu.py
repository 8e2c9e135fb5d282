"""FuxiTranyu: a decoder-only transformer with the published architecture (arXiv 2408.06273), and the Llama family.

Pre-RMSNorm blocks with biased multi-head attention (full rotary RoPE, rotate-half) and a non-gated, biased
4h MLP with tanh-GELU (`gelu_fast`); untied embeddings; a final RMSNorm; lm_head without bias. Module names
follow the Llama convention, so our state dict *is* the Hugging Face state dict.

The config's architecture switches turn the same trunk into Llama 3 / Qwen2 / Mistral: the gated SwiGLU MLP
(`mlp: swiglu`), grouped-query attention (`num_kv_heads`), which projections carry biases, tied embeddings
and RoPE scaling (model/rope.py). The defaults are FuxiTranyu's.

The trunk (`FuxiTranyuModel`) is written once: FuxiTranyu-MoE (model/fuxitranyu_moe.py) is this model with other
feed-forwards in its blocks (`feed_forward`), and its MoE-only parts on top.

Kernels (RMSNorm, bias-GELU, SwiGLU, RoPE, the fused linear cross-entropy) come through the `kernels` seam,
picked by `config.kernels`; nothing here knows about parallelism.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fuxi import kernels
from fuxi.common.errors import ConfigError
from fuxi.model.attention import causal_attention
from fuxi.model.config import ModelConfig
from fuxi.model.lm_head import GenerationMixin, LMHead
from fuxi.model.outputs import CausalLMOutput
from fuxi.model.rope import cos_sin, inv_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, impl: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.impl = eps, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, impl=self.impl)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) in one fused kernel: the residual add before a pre-norm."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps, impl=self.impl)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions, computed on the fly in fp32 (cheap next to attention), with the
    config's RoPE scaling."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim, self.theta, self.scaling = config.head_dim, config.rope_theta, config.rope_scaling
        self.max_seq_len = config.max_seq_len

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dynamic = self.scaling is not None and self.scaling.rope_type == "dynamic"
        seq_len = int(positions.max()) + 1 if dynamic else 0  # only dynamic NTK depends on the length
        inv_freq = inv_frequencies(self.head_dim, self.theta, self.scaling, self.max_seq_len, seq_len,
                                   positions.device)
        return cos_sin(positions, inv_freq, dtype)


class Attention(nn.Module):
    """q/k/v/o projections; with num_kv_heads < num_heads, k and v have fewer heads (grouped-query attention)
    and each serves num_heads / num_kv_heads query heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, kv_width = config.hidden_size, config.kv_heads * config.head_dim
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        qkv_bias = config.attention_bias in ("all", "qkv")
        self.q_proj = nn.Linear(h, h, bias=qkv_bias)
        self.k_proj = nn.Linear(h, kv_width, bias=qkv_bias)
        self.v_proj = nn.Linear(h, kv_width, bias=qkv_bias)
        self.o_proj = nn.Linear(h, h, bias=config.attention_bias == "all")
        self.dropout = config.attention_dropout
        self.impl, self.backend = config.kernels, config.attention

    def forward(self, x, cos, sin, doc_ids=None, kv_cache=None):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
        q, k = kernels.apply_rope(q, k, cos, sin, impl=self.impl, inplace=True)  # q, k are fresh projections
        if kv_cache is not None:  # (k, v) of earlier positions, [batch, past, heads, head_dim]
            if kv_cache[0] is not None:
                k, v = torch.cat([kv_cache[0], k], dim=1), torch.cat([kv_cache[1], v], dim=1)
            kv_cache = (k, v)
        dropout = self.dropout if self.training else 0.0
        out = causal_attention(q, k, v, doc_ids=doc_ids, dropout_p=dropout, backend=self.backend)
        return self.o_proj(out.reshape(batch, seq, -1)), kv_cache


class UpProjection(nn.Linear):
    """Linear(h, ffn) + bias + gelu_fast, the bias add fused into the GELU kernel. Its parameters are only used
    inside its own forward, so sharding wrappers (ZeRO-3, FSDP) that gather per module see them."""

    def __init__(self, in_features: int, out_features: int, impl: str, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.bias_gelu(F.linear(x, self.weight), self.bias, impl=self.impl)


class MLP(nn.Module):
    """up (biased) -> gelu_fast -> down (biased): the non-gated 4h MLP (`mlp: gelu`, FuxiTranyu)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up_proj = UpProjection(config.hidden_size, config.ffn_hidden_size, config.kernels, config.mlp_bias)
        self.down_proj = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(x))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the SwiGLU MLP of Llama, Qwen2 and Mistral (`mlp: swiglu`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, ffn, bias = config.hidden_size, config.ffn_hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, ffn, bias=bias)
        self.up_proj = nn.Linear(h, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, h, bias=bias)
        self.kernels = config.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(gate) * up in one fused kernel (kernels/swiglu.py; its torch reference off CUDA)
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x), impl=self.kernels))


def dense_mlp(config: ModelConfig) -> nn.Module:
    """The dense feed-forward the config names."""
    return GatedMLP(config) if config.mlp == "swiglu" else MLP(config)


class Block(nn.Module):
    """Pre-norm attention, then the feed-forward `mlp`: the dense MLP, or in FuxiTranyu-MoE an MoE layer
    (model/moe.py), which returns (output, routing). -> (x, kv_cache, routing), routing None after a dense MLP."""

    def __init__(self, config: ModelConfig, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        self.mlp = mlp

    def forward(self, x, cos, sin, doc_ids=None, kv_cache=None):
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), cos, sin, doc_ids, kv_cache)
        h, x = self.post_attention_layernorm.add_and_norm(attn_out, x)  # x += attn_out; h = norm(x)
        mlp_out, routing = self.mlp(h), None
        if isinstance(mlp_out, tuple):  # an MoE layer: (output, RouterOutput)
            mlp_out, routing = mlp_out
        return x + mlp_out, kv_cache, routing


@dataclass
class TrunkOutput:
    hidden: torch.Tensor  # [batch, seq, h], after the final norm
    kv_cache: list | None  # the grown cache, when one was passed in
    # With output_hidden_states: the embedding output and every block output (before the final norm), L + 1
    # tensors, for per-layer analyses (PreAlign).
    hidden_states: tuple | None = None
    routing: list = field(default_factory=list)  # the RouterOutput of every MoE layer, in layer order


class FuxiTranyuModel(nn.Module):
    """The decoder trunk: embeddings, blocks, final norm. `mlps` holds every block's feed-forward, in order."""

    def __init__(self, config: ModelConfig, mlps: list[nn.Module]):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, mlp) for mlp in mlps)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids, positions=None, doc_ids=None, kv_cache=None,
                output_hidden_states=False) -> TrunkOutput:
        x = self.embed_tokens(input_ids)
        if positions is None:
            past = 0 if kv_cache is None or kv_cache[0][0] is None else kv_cache[0][0].shape[1]
            positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary(positions, x.dtype)
        if not self.config.document_masking:
            doc_ids = None
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        new_cache = [] if kv_cache is not None else None
        hidden_states = [x] if output_hidden_states else None
        routing = []
        for i, layer in enumerate(self.layers):
            layer_cache = kv_cache[i] if kv_cache is not None else None
            if recompute:
                x, layer_cache, layer_routing = checkpoint(layer, x, cos, sin, doc_ids, layer_cache,
                                                           use_reentrant=False)
            else:
                x, layer_cache, layer_routing = layer(x, cos, sin, doc_ids, layer_cache)
            if new_cache is not None:
                new_cache.append(layer_cache)
            if hidden_states is not None:
                hidden_states.append(x)
            if layer_routing is not None:
                routing.append(layer_routing)
        return TrunkOutput(self.norm(x), new_cache, tuple(hidden_states) if hidden_states else None, routing)


def _drop_tied_lm_head(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "lm_head.weight", None)


def _fill_tied_lm_head(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
    embedding = state_dict.get(prefix + "model.embed_tokens.weight")
    if embedding is not None:
        state_dict[prefix + "lm_head.weight"] = embedding


class FuxiTranyuForCausalLM(GenerationMixin, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = FuxiTranyuModel(config, [self.feed_forward(i) for i in range(config.num_layers)])
        self.lm_head = LMHead(config.hidden_size, config.padded_vocab_size, config.kernels)
        if config.tie_word_embeddings:
            self.tie_embeddings()
            # The state dict holds the shared matrix once, as model.embed_tokens.weight (as HF saves it).
            self._register_state_dict_hook(_drop_tied_lm_head)
            self.register_load_state_dict_pre_hook(_fill_tied_lm_head)
            self.register_load_state_dict_post_hook(lambda module, _: module.tie_embeddings())
        self.reset_parameters()

    def feed_forward(self, layer: int) -> nn.Module:
        """The feed-forward of block `layer`: the dense MLP in every block (FuxiTranyu-MoE swaps in MoE layers)."""
        return dense_mlp(self.config)

    def tie_embeddings(self) -> None:
        """lm_head and the embedding share one Parameter (again after a load that assigned new tensors)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def validate_config(cls, config: ModelConfig) -> None:
        if config.hidden_size % config.num_heads:
            raise ConfigError("num_heads", f"{config.num_heads} does not divide hidden_size {config.hidden_size}")
        if config.head_dim % 2:
            raise ConfigError("num_heads", f"head_dim {config.head_dim} must be even for rotary embeddings")
        if config.rope_scaling is not None and config.rope_scaling.rope_type == "dynamic" and config.head_dim < 4:
            raise ConfigError("rope_scaling", f"dynamic NTK needs head_dim >= 4, got {config.head_dim}")

    def reset_parameters(self) -> None:
        """normal(0, init_std) for weights and embeddings, zero biases, unit norms; o_proj and down_proj get
        init_std / sqrt(2 * num_layers) when scaled_residual_init is on (GPT-2 / Megatron)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers) if self.config.scaled_residual_init else std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                kv_cache: list | None = None, return_logits: bool | None = None,
                z_loss: float = 0.0, output_hidden_states: bool = False) -> CausalLMOutput:
        """labels are already shifted (labels[t] is the token after input_ids[t]); -100 is ignored.

        With labels the loss goes through the fused linear cross-entropy and logits are not built unless
        `return_logits` is set; without labels the logits are returned. `output_hidden_states` adds the
        embedding output and every block output (out.hidden_states, L + 1 tensors).
        """
        trunk = self.model(input_ids, positions, doc_ids, kv_cache, output_hidden_states)
        return self.lm_head.output(trunk.hidden, labels, z_loss, return_logits, self.new_output(trunk))

    def new_output(self, trunk: TrunkOutput) -> CausalLMOutput:
        """The output forward fills with the loss and logits (FuxiTranyu-MoE's also carries the routing)."""
        return CausalLMOutput(kv_cache=trunk.kv_cache, hidden_states=trunk.hidden_states)

    # ---- accounting used by `fuxi info`, the trainer's MFU and the tests -------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Shared (tied) matrices count once; a tied embedding is also the lm_head, so it is never excluded."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_word_embeddings:
            return total - self.model.embed_tokens.weight.numel()
        return total

    def num_active_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters a token passes through: all of them in the dense model (not in FuxiTranyu-MoE)."""
        return self.num_parameters(exclude_embeddings)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N (N the active parameters without the input embedding) + 12 * L * h * s
        for attention."""
        c = self.config
        return (6.0 * self.num_active_parameters(exclude_embeddings=True)
                + 12.0 * c.num_layers * c.hidden_size * seq_len)

    # ---- sampling: GenerationMixin.generate, from this cache --------------------------------------------

    def empty_kv_cache(self) -> list:
        """One (keys, values) slot per layer; forward fills them and returns the grown cache."""
        return [(None, None) for _ in range(self.config.num_layers)]

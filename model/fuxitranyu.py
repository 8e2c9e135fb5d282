"""FuxiTranyu: a decoder-only transformer with the published architecture (arXiv 2408.06273).

Pre-RMSNorm blocks with biased multi-head attention (full rotary RoPE, rotate-half) and a non-gated, biased
4h MLP with tanh-GELU (`gelu_fast`); untied embeddings; a final RMSNorm; lm_head without bias. Module names
follow the Llama convention, so our state dict *is* the Hugging Face state dict.

The trunk (`FuxiTranyuModel`) is written once: FuxiTranyu-MoE (model/fuxitranyu_moe.py) is this model with other
feed-forwards in its blocks (`feed_forward`), and its MoE-only parts on top.

Kernels (RMSNorm, bias-GELU, RoPE, the fused linear cross-entropy) come through the `kernels` seam, picked by
`config.kernels`; nothing here knows about parallelism.
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
    """cos/sin tables for absolute positions, computed on the fly in fp32 (cheap next to attention)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.rope_cos_sin(positions, self.head_dim, self.theta, dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(h, h, bias=True)
        self.k_proj = nn.Linear(h, h, bias=True)
        self.v_proj = nn.Linear(h, h, bias=True)
        self.o_proj = nn.Linear(h, h, bias=True)
        self.dropout = config.attention_dropout
        self.impl, self.backend = config.kernels, config.attention

    def forward(self, x, cos, sin, doc_ids=None, kv_cache=None):
        batch, seq, _ = x.shape
        shape = (batch, seq, self.num_heads, self.head_dim)
        q, k = self.q_proj(x).view(shape), self.k_proj(x).view(shape)
        v = self.v_proj(x).view(shape)
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

    def __init__(self, in_features: int, out_features: int, impl: str):
        super().__init__(in_features, out_features, bias=True)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.bias_gelu(F.linear(x, self.weight), self.bias, impl=self.impl)


class MLP(nn.Module):
    """up (biased) -> gelu_fast -> down (biased): the non-gated 4h MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up_proj = UpProjection(config.hidden_size, config.ffn_hidden_size, config.kernels)
        self.down_proj = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(x))


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
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

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


class FuxiTranyuForCausalLM(GenerationMixin, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = FuxiTranyuModel(config, [self.feed_forward(i) for i in range(config.num_layers)])
        self.lm_head = LMHead(config.hidden_size, config.padded_vocab_size, config.kernels)
        self.reset_parameters()

    def feed_forward(self, layer: int) -> nn.Module:
        """The feed-forward of block `layer`: the dense MLP in every block (FuxiTranyu-MoE swaps in MoE layers)."""
        return MLP(self.config)

    @classmethod
    def validate_config(cls, config: ModelConfig) -> None:
        if config.hidden_size % config.num_heads:
            raise ConfigError("num_heads", f"{config.num_heads} does not divide hidden_size {config.hidden_size}")
        if config.head_dim % 2:
            raise ConfigError("num_heads", f"head_dim {config.head_dim} must be even for rotary embeddings")

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
        total = sum(p.numel() for p in self.parameters())
        return total - self.model.embed_tokens.weight.numel() if exclude_embeddings else total

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

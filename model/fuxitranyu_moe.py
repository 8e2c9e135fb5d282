"""FuxiTranyu-MoE: the dense FuxiTranyu with its FFNs upcycled into MoE-LPR layers (arXiv 2408.11396).

Every block is the dense block (same attention, norms and names); in the layers listed by `config.moe.layers`
(default all) the `mlp` is a `MoEFeedForward`, so tensor names are the dense ones plus
`model.layers.{i}.mlp.router.weight` and `model.layers.{i}.mlp.experts.{j}.{up,down}_proj.{weight,bias}`.

forward returns the next-token loss plus `aux_losses = {"balance", "lpr"}`, unweighted (the trainer multiplies
by `moe.balance_loss_coef` / `moe.lpr_loss_coef`), and the routing of every MoE layer for logging.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fuxi.common.errors import ConfigError
from fuxi.model.config import ModelConfig
from fuxi.model.fuxitranyu import Block, FuxiTranyuForCausalLM, RMSNorm, RotaryEmbedding
from fuxi.model.lm_head import LMHead
from fuxi.model.moe import MoEFeedForward, RouterOutput, balance_loss, lpr_loss
from fuxi.model.outputs import CausalLMOutput


@dataclass
class MoECausalLMOutput(CausalLMOutput):
    # Per MoE layer (in layer order): logits, fp32 probabilities, chosen experts and weights of the flattened
    # [B*T] tokens. Graph-connected; detach before keeping them beyond the step.
    routing: list[RouterOutput] | None = None

    def router_probs(self) -> torch.Tensor:
        """[L_moe, T, N] detached router probabilities (G in the paper)."""
        return torch.stack([r.probs.detach() for r in self.routing])

    def router_expert_ids(self) -> torch.Tensor:
        """[L_moe, T, K] chosen experts."""
        return torch.stack([r.expert_ids for r in self.routing])


class MoEBlock(Block):
    """The dense block with an MoE feed-forward; the router reads the post-attention-norm hidden state."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.mlp = MoEFeedForward(config)

    def forward(self, x, cos, sin, doc_ids=None, kv_cache=None):
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), cos, sin, doc_ids, kv_cache)
        h, x = self.post_attention_layernorm.add_and_norm(attn_out, x)  # x += attn_out; h = norm(x)
        mlp_out, routing = self.mlp(h)
        return x + mlp_out, kv_cache, routing


class FuxiTranyuMoEModel(nn.Module):
    """The trunk: embeddings, dense and MoE blocks, final norm. Returns (hidden, kv_cache, routing per MoE layer)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        moe_layers = set(config.moe.moe_layers(config.num_layers))
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoEBlock(config) if i in moe_layers else Block(config)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids, positions=None, doc_ids=None, kv_cache=None):
        x = self.embed_tokens(input_ids)
        if positions is None:
            past = 0 if kv_cache is None or kv_cache[0][0] is None else kv_cache[0][0].shape[1]
            positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary(positions, x.dtype)
        if not self.config.document_masking:
            doc_ids = None
        new_cache = [] if kv_cache is not None else None
        routing: list[RouterOutput] = []
        for i, layer in enumerate(self.layers):
            layer_cache = kv_cache[i] if kv_cache is not None else None
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                outputs = checkpoint(layer, x, cos, sin, doc_ids, layer_cache, use_reentrant=False)
            else:
                outputs = layer(x, cos, sin, doc_ids, layer_cache)
            x, layer_cache = outputs[0], outputs[1]
            if isinstance(layer, MoEBlock):
                routing.append(RouterOutput(*outputs[2]))
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.norm(x), new_cache, routing


class FuxiTranyuMoEForCausalLM(FuxiTranyuForCausalLM):
    """Shares the dense model's init, accounting and `generate`; adds routing, aux losses and MoE counts."""

    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)
        self.config = config
        self.model = FuxiTranyuMoEModel(config)
        self.lm_head = LMHead(config.hidden_size, config.padded_vocab_size, config.kernels)
        self.reset_parameters()

    @classmethod
    def validate_config(cls, config: ModelConfig) -> None:
        super().validate_config(config)
        if config.moe is None:
            raise ConfigError("moe", "required when type is 'fuxitranyu_moe' (num_experts, top_k, ...)")
        bad = [i for i in config.moe.layers or [] if i >= config.num_layers]
        if bad:
            raise ConfigError("moe.layers", f"{bad} out of range for num_layers {config.num_layers}")

    def reset_parameters(self) -> None:
        """The dense init for every Linear (experts included), then Xavier-normal routers (docs/methods.md §2.2)."""
        super().reset_parameters()
        for layer in self.moe_blocks():
            nn.init.xavier_normal_(layer.mlp.router.weight)

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer for layer in self.model.layers if isinstance(layer, MoEBlock)]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                kv_cache: list | None = None, return_logits: bool | None = None, z_loss: float = 0.0,
                original_mask: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> MoECausalLMOutput:
        """As the dense forward, plus: `original_mask` [B, T] bool marks original-language tokens (LPR);
        `loss_mask` [B, T] bool marks real tokens (padding is excluded from both aux losses; default all).
        """
        moe = self.config.moe
        for name, mask in (("original_mask", original_mask), ("loss_mask", loss_mask)):
            if mask is not None and mask.shape != input_ids.shape:
                raise ValueError(f"{name}: shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
        hidden, kv_cache, routing = self.model(input_ids, positions, doc_ids, kv_cache)
        out = self.lm_head.output(hidden, labels, z_loss, return_logits,
                                  MoECausalLMOutput(kv_cache=kv_cache, routing=routing))
        lpr_mask = original_mask
        if original_mask is not None and loss_mask is not None:
            lpr_mask = original_mask.bool() & loss_mask.bool()
        out.aux_losses = {
            "balance": balance_loss(routing, moe.num_experts, moe.top_k, loss_mask, moe.balance_loss_form),
            "lpr": lpr_loss(routing, lpr_mask, moe.lpr_loss_form),
        }
        return out

    # ---- accounting -------------------------------------------------------------------------------------

    def expert_parameters(self) -> int:
        """|FFN|: parameters of one expert (= one dense FFN)."""
        return sum(p.numel() for p in self.moe_blocks()[0].mlp.experts[0].parameters())

    def num_active_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters a token passes through: all but the N-K experts it skips in each MoE layer, i.e.
        dense + N*h*L_moe (routers) + (K-1)*|FFN|*L_moe."""
        moe = self.config.moe
        skipped = (moe.num_experts - moe.top_k) * self.expert_parameters() * len(self.moe_blocks())
        return self.num_parameters(exclude_embeddings) - skipped

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token on the *active* parameters: 6 N_active + 12 L h s (attention)."""
        c = self.config
        return 6.0 * self.num_active_parameters(exclude_embeddings=True) + 12.0 * c.num_layers * c.hidden_size * seq_len

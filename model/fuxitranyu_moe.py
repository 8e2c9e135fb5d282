"""FuxiTranyu-MoE: the dense FuxiTranyu with its FFNs upcycled into MoE-LPR layers (arXiv 2408.11396).

The trunk is the dense one (model/fuxitranyu.py: same attention, norms, loss, cache and names); only the
feed-forward changes: in the layers listed by `config.moe.layers` (default all) a block's `mlp` is a
`MoEFeedForward` (model/moe.py), so tensor names are the dense ones plus `model.layers.{i}.mlp.router.weight`
and `model.layers.{i}.mlp.experts.{j}.{up,down}_proj.{weight,bias}`.

forward returns the next-token loss plus `aux_losses = {"balance", "lpr"}`, unweighted (the trainer multiplies
by `moe.balance_loss_coef` / `moe.lpr_loss_coef`), and the routing of every MoE layer for logging.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fuxi.common.errors import ConfigError
from fuxi.model.config import ModelConfig
from fuxi.model.fuxitranyu import FuxiTranyuForCausalLM, TrunkOutput
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


class FuxiTranyuMoEForCausalLM(FuxiTranyuForCausalLM):
    """The dense model with MoE feed-forwards; adds the aux losses, the routing in its output, Xavier routers and
    the MoE parameter counts. Init, loss, cache and `generate` are the dense model's."""

    def feed_forward(self, layer: int) -> nn.Module:
        if layer in self.config.moe.moe_layers(self.config.num_layers):
            return MoEFeedForward(self.config)
        return super().feed_forward(layer)  # the dense MLP the config names (GELU or SwiGLU)

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
        for moe in self.moe_mlps():
            nn.init.xavier_normal_(moe.router.weight)

    def moe_mlps(self) -> list[MoEFeedForward]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoEFeedForward)]

    def new_output(self, trunk: TrunkOutput) -> MoECausalLMOutput:
        return MoECausalLMOutput(kv_cache=trunk.kv_cache, hidden_states=trunk.hidden_states, routing=trunk.routing)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                kv_cache: list | None = None, return_logits: bool | None = None, z_loss: float = 0.0,
                output_hidden_states: bool = False, original_mask: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> MoECausalLMOutput:
        """As the dense forward, plus: `original_mask` [B, T] bool marks original-language tokens (LPR);
        `loss_mask` [B, T] bool marks real tokens (padding is excluded from both aux losses; default all).
        """
        for name, mask in (("original_mask", original_mask), ("loss_mask", loss_mask)):
            if mask is not None and mask.shape != input_ids.shape:
                raise ValueError(f"{name}: shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
        out = super().forward(input_ids, labels, doc_ids, positions, kv_cache, return_logits, z_loss,
                              output_hidden_states)
        moe = self.config.moe
        lpr_mask = original_mask
        if original_mask is not None and loss_mask is not None:
            lpr_mask = original_mask.bool() & loss_mask.bool()
        out.aux_losses = {
            "balance": balance_loss(out.routing, moe.num_experts, moe.top_k, loss_mask, moe.balance_loss_form),
            "lpr": lpr_loss(out.routing, lpr_mask, moe.lpr_loss_form),
        }
        return out

    # ---- accounting -------------------------------------------------------------------------------------

    def expert_parameters(self) -> int:
        """|FFN|: parameters of one expert (= one dense FFN)."""
        return sum(p.numel() for p in self.moe_mlps()[0].experts[0].parameters())

    def num_active_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters a token passes through: all but the N-K experts it skips in each MoE layer, i.e.
        dense + N*h*L_moe (routers) + (K-1)*|FFN|*L_moe. flops_per_token counts these."""
        moe = self.config.moe
        skipped = (moe.num_experts - moe.top_k) * self.expert_parameters() * len(self.moe_mlps())
        return self.num_parameters(exclude_embeddings) - skipped

# Shipped with every Hugging Face export of an upcycled fuxi-pretrain model (loaded with trust_remote_code=True).
"""FuxiTranyu-MoE for transformers: FuxiTranyu (modeling_fuxitranyu.py) whose FFNs are MoE-LPR layers.

Each MoE layer has a bias-free router Linear(h, N) and N experts with the dense FFN's layout
(`mlp.router.weight`, `mlp.experts.{j}.{up,down}_proj`). Routing: softmax in fp32, top-K, the K weights
renormalised to sum to 1 (`norm_topk_prob`). Experts run in a loop over experts with index_add, the plain
HF-Mixtral form; fuxi-pretrain's own implementation sorts tokens by expert instead, and the two agree.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

try:
    from .configuration_fuxitranyu_moe import FuxiTranyuMoeConfig
    from .modeling_fuxitranyu import (FuxiTranyuAttention, FuxiTranyuForCausalLM, FuxiTranyuMLP, FuxiTranyuModel,
                                      FuxiTranyuPreTrainedModel, FuxiTranyuRMSNorm, cache_argument, output_cache,
                                      output_with_cache)
except ImportError:  # loaded as plain modules
    from configuration_fuxitranyu_moe import FuxiTranyuMoeConfig
    from modeling_fuxitranyu import (FuxiTranyuAttention, FuxiTranyuForCausalLM, FuxiTranyuMLP, FuxiTranyuModel,
                                     FuxiTranyuPreTrainedModel, FuxiTranyuRMSNorm, cache_argument, output_cache,
                                     output_with_cache)


class FuxiTranyuMoeSparseBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(FuxiTranyuMLP(config) for _ in range(config.num_experts))

    def forward(self, hidden_states):
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        router_logits = self.router(x)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == e)
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx]).float() * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out.to(hidden_states.dtype).view(batch, seq, hidden), router_logits


class FuxiTranyuMoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = FuxiTranyuRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = FuxiTranyuAttention(config, layer_idx)
        self.post_attention_layernorm = FuxiTranyuRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        moe_layers = config.moe_layers if config.moe_layers is not None else range(config.num_hidden_layers)
        self.is_moe = layer_idx in set(moe_layers)
        self.mlp = FuxiTranyuMoeSparseBlock(config) if self.is_moe else FuxiTranyuMLP(config)

    def forward(self, hidden_states, cos, sin, attention_mask, past_key_values=None):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin,
                                                       attention_mask, past_key_values)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        router_logits = None
        if self.is_moe:
            mlp_out, router_logits = mlp_out
        return hidden_states + mlp_out, router_logits


class FuxiTranyuMoePreTrainedModel(FuxiTranyuPreTrainedModel):
    config_class = FuxiTranyuMoeConfig
    _no_split_modules = ["FuxiTranyuMoeDecoderLayer"]


def load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None):
    """Per MoE layer N * sum_e (sum_k frac_{k,e}) * P_e over non-padding tokens, averaged over layers (the
    released MoE-LPR form; K at uniform routing)."""
    losses = []
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        _, selected = torch.topk(probs, top_k, dim=-1)
        chosen = F.one_hot(selected, num_experts).sum(1).float()
        if attention_mask is None:
            frac, prob = chosen.mean(0), probs.mean(0)
        else:
            mask = attention_mask.reshape(-1, 1).float()
            count = mask.sum().clamp(min=1.0)
            frac, prob = (chosen * mask).sum(0) / count, (probs * mask).sum(0) / count
        losses.append(num_experts * (frac * prob).sum())
    return torch.stack(losses).mean()


class FuxiTranyuMoeModel(FuxiTranyuMoePreTrainedModel, FuxiTranyuModel):
    decoder_layer = FuxiTranyuMoeDecoderLayer

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_router_logits=None, **kwargs):
        past_key_values = cache_argument(past_key_values, kwargs)
        hidden_states, cos, sin, mask, cache = self.layer_inputs(input_ids, attention_mask, position_ids,
                                                                 past_key_values, inputs_embeds, use_cache)
        all_router_logits = []
        for layer in self.layers:
            hidden_states, router_logits = layer(hidden_states, cos, sin, mask, cache)
            if router_logits is not None:
                all_router_logits.append(router_logits)
        return output_with_cache(MoeModelOutputWithPast, cache, last_hidden_state=self.norm(hidden_states),
                                 router_logits=tuple(all_router_logits) if output_router_logits else None)


class FuxiTranyuMoeForCausalLM(FuxiTranyuMoePreTrainedModel, FuxiTranyuForCausalLM):
    model_class = FuxiTranyuMoeModel

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_router_logits: Optional[bool] = None,
                logits_to_keep=0, **kwargs):
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        past_key_values = cache_argument(past_key_values, kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_router_logits=output_router_logits)
        logits, loss = self.logits_and_loss(outputs.last_hidden_state, labels, logits_to_keep)
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts,
                                           self.config.num_experts_per_tok, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return output_with_cache(MoeCausalLMOutputWithPast, output_cache(outputs), loss=loss, aux_loss=aux_loss,
                                 logits=logits, router_logits=outputs.router_logits)

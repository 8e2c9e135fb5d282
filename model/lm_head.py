"""The output side every language model here shares: the untied lm_head with the fused loss, and sampling."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fuxi import kernels
from fuxi.model.outputs import CausalLMOutput


class LMHead(nn.Linear):
    """The output projection (no bias). Given labels it returns per-token losses through the fused linear
    cross-entropy, which never materialises the [tokens, vocab] logits; otherwise logits. Its weight is only
    used inside its own forward, so sharding wrappers that gather per module (ZeRO-3, FSDP) see it."""

    def __init__(self, hidden_size: int, vocab_rows: int, impl: str):
        super().__init__(hidden_size, vocab_rows, bias=False)
        self.impl = impl

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, z_loss: float = 0.0):
        if labels is None:
            return F.linear(hidden, self.weight)
        losses = kernels.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight,
                                              labels.reshape(-1), z_loss=z_loss, impl=self.impl)
        return losses.view(labels.shape)

    def output(self, hidden: torch.Tensor, labels: torch.Tensor | None, z_loss: float = 0.0,
               return_logits: bool | None = None, out: CausalLMOutput | None = None) -> CausalLMOutput:
        """Fill `out` with per-token losses and their mean over non-ignored labels, and/or the logits."""
        out = out if out is not None else CausalLMOutput()
        if labels is not None:
            out.token_losses = self(hidden, labels, z_loss)
            out.loss = out.token_losses.sum() / (labels != kernels.IGNORE_INDEX).sum().clamp(min=1)
        if labels is None or return_logits:
            out.logits = self(hidden)
        return out


class GenerationMixin:
    """`generate` for the language models here. Their forward takes the cache of earlier positions as `kv_cache`
    (keys and values for attention, the recurrent state for an RNN) and returns the logits and the grown cache."""

    def empty_kv_cache(self):
        """The cache of no positions (None: forward starts its own)."""
        return None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation. Ids past `config.vocab_size` (vocabulary padding) are
        never emitted; rows that reached eos keep emitting eos."""
        was_training = self.training
        self.eval()
        tokens, step_input, cache = input_ids, input_ids, self.empty_kv_cache()
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            out = self(step_input, kv_cache=cache)
            logits, cache = out.logits[:, -1, :self.config.vocab_size].float(), out.kv_cache
            if temperature <= 0:
                next_token = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
        self.train(was_training)
        return tokens

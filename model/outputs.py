"""What every language model of model/ returns, so the trainer treats them alike."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CausalLMOutput:
    # Mean next-token loss over positions whose label is not ignore_index (None without labels).
    loss: torch.Tensor | None = None
    # fp32 per-position losses [batch, seq], 0 where the label is ignored: per-language loss and bits-per-byte.
    token_losses: torch.Tensor | None = None
    # [batch, seq, vocab]; only computed when asked for (the fused loss never builds them).
    logits: torch.Tensor | None = None
    # Auxiliary losses by name (MoE balance/LPR, ...), already averaged over layers, not yet weighted.
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per-layer key/value cache for generation.
    kv_cache: list | None = None
    # With output_hidden_states: the embedding output and every block output (L + 1 tensors [batch, seq, h]).
    hidden_states: tuple | None = None

"""RoPE inverse frequencies with the scalings transformers defines (modeling_rope_utils: default, linear,
dynamic NTK, llama3), written out so the model needs no transformers; tests compare with transformers' own.

Tables are built per forward from the positions (cheap next to attention). Dynamic NTK is stateless here: its
length is max(max_seq_len, largest position + 1) of the call, which is what transformers' cached update gives
for a prompt and its continuation (it only differs when one module is reused for a shorter long sequence).
"""
from __future__ import annotations

import math

import torch

from fuxi.model.config import RopeScalingConfig


def default_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    """Wavelengths above original/low_freq_factor are divided by factor, those below original/high_freq_factor
    kept, the band between blended linearly in original/wavelength."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                                                                   - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None, max_seq_len: int,
                    seq_len: int, device=None) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies for a call whose largest position is seq_len - 1."""
    if scaling is None:
        return default_inv_freq(head_dim, theta, device)
    if scaling.rope_type == "linear":
        return default_inv_freq(head_dim, theta, device) / scaling.factor
    if scaling.rope_type == "llama3":
        return llama3_inv_freq(default_inv_freq(head_dim, theta, device), scaling)
    length = max(seq_len, max_seq_len)  # dynamic NTK: the base grows past max_seq_len
    base = theta * ((scaling.factor * length / max_seq_len) - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
    return default_inv_freq(head_dim, base, device)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [*positions.shape, head_dim] (rotate-half layout), computed in fp32, cast to `dtype`."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)

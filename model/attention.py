"""Causal self-attention kernels: flash-attn when installed on CUDA, else torch SDPA.

Both paths take q as [batch, seq, heads, head_dim], k and v as [batch, seq, kv_heads, head_dim] (kv_heads
divides heads: grouped-query attention, each k/v head serving heads / kv_heads consecutive query heads, as
Llama's repeat_kv does) and optional per-token document ids, which confine attention to the token's own
document inside a packed sequence.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

try:  # optional dependency: `pip install fuxi-pretrain[flash]`
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None

AttentionBackend = Literal["auto", "sdpa", "flash"]  # the `attention` of the model config


def flash_available(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean mask (True = may attend): causal and within the same document."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def _decode_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """Causal mask aligned to the bottom right: query i sits at absolute position k_len - q_len + i."""
    rows = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= rows


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, seq, kv_heads, dim] -> [batch, seq, kv_heads * groups, dim], each head repeated `groups` times."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=2)


def sdpa_attention(q, k, v, doc_ids=None, dropout_p: float = 0.0) -> torch.Tensor:
    q_len, k_len = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    mask = None
    if doc_ids is not None:
        if q_len != k_len:
            raise ValueError("document masking is only defined for full sequences, not cached decoding")
        mask = document_causal_mask(doc_ids)
    elif q_len != k_len and q_len != 1:
        mask = _decode_mask(q_len, k_len, q.device)
    if mask is not None:  # SDPA's fused kernels with a mask lack enable_gqa: repeat k/v instead
        k, v, groups = repeat_kv(k, groups), repeat_kv(v, groups), 1
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [batch, heads, seq, dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=mask is None and q_len == k_len, enable_gqa=groups > 1)
    return out.transpose(1, 2)


def _varlen_boundaries(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens over the flattened batch: a segment starts at each row start and each change of doc id."""
    batch, seq = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.nonzero(starts.flatten(), as_tuple=False).flatten()
    cu = torch.cat([start_idx, start_idx.new_tensor([batch * seq])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flash_attention(q, k, v, doc_ids=None, dropout_p: float = 0.0) -> torch.Tensor:  # pragma: no cover - CUDA
    if doc_ids is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]  # flash-attn handles grouped-query attention natively
    cu, max_len = _varlen_boundaries(doc_ids)
    out = flash_attn_varlen_func(q.reshape(-1, heads, dim), k.reshape(-1, kv_heads, dim),
                                 v.reshape(-1, kv_heads, dim), cu, cu, max_len, max_len, dropout_p=dropout_p,
                                 causal=True)
    return out.view(batch, seq, heads, dim)


def causal_attention(q, k, v, doc_ids=None, dropout_p: float = 0.0,
                     backend: AttentionBackend = "auto") -> torch.Tensor:
    """Dispatch on `backend` (auto|flash|sdpa). Cached decoding (q shorter than k) always uses SDPA."""
    use_flash = backend == "flash" or (backend == "auto" and flash_available(q))
    if use_flash and q.shape[1] == k.shape[1]:
        if flash_attn_func is None:
            raise RuntimeError("attention: 'flash' requested but flash-attn is not installed")
        return flash_attention(q, k, v, doc_ids, dropout_p)
    return sdpa_attention(q, k, v, doc_ids, dropout_p)

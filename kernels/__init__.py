"""Fused kernels behind one seam. The model calls these functions with `impl` from its config:

    auto   -> Triton on CUDA tensors when triton imports, torch otherwise
    triton -> Triton (on CPU only under TRITON_INTERPRET=1, for tests)
    torch  -> the torch references (for the loss: the chunked torch path, which never builds the full logits)

Every Triton kernel sits next to its torch reference in the kernel's own file; docs/kernels.md has the
derivations, the test tiers and the benchmark.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

from fuxi.kernels.cross_entropy import (IGNORE_INDEX, default_vocab_chunk, linear_cross_entropy_chunked,
                                   linear_cross_entropy_torch)
from fuxi.kernels.gelu import bias_gelu_torch, bias_gelu_triton, gelu_fast_torch
from fuxi.kernels.rms_norm import add_rms_norm_torch, add_rms_norm_triton, rms_norm_torch, rms_norm_triton
from fuxi.kernels.rope import apply_rope_torch, apply_rope_triton, rope_cos_sin, rotate_half
from fuxi.kernels.swiglu import swiglu_torch, swiglu_triton
from fuxi.kernels.triton_runtime import HAS_TRITON, check_launchable

__all__ = ["HAS_TRITON", "IGNORE_INDEX", "IMPLEMENTATIONS", "Implementation", "add_rms_norm", "apply_rope",
           "bias_gelu", "default_vocab_chunk", "gelu_fast_torch", "linear_cross_entropy",
           "linear_cross_entropy_torch", "rms_norm", "rope_cos_sin", "rotate_half", "swiglu", "use_triton"]

Implementation = Literal["auto", "triton", "torch"]  # `impl` of every kernel, `kernels` of the model config
IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)


def use_triton(impl: Implementation, tensor: torch.Tensor, kernel: str = "kernel") -> bool:
    """Resolve `impl` for a call on `tensor`. impl='triton' where Triton cannot run raises a clear error."""
    if impl == "torch":
        return False
    if impl == "auto":
        return HAS_TRITON and tensor.is_cuda
    if impl == "triton":
        check_launchable(tensor, kernel)
        return True
    raise ValueError(f"kernels.{kernel}: unknown implementation {impl!r}; expected one of {list(IMPLEMENTATIONS)}")


def _check_last_dim(name: str, kernel: str, tensor: torch.Tensor, size: int, what: str) -> None:
    if tensor.shape[-1] != size:
        raise ValueError(f"kernels.{kernel}: {name} has last dimension {tensor.shape[-1]}, expected {size} "
                         f"({what}); got shape {tuple(tensor.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: Implementation = "auto") -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps), statistics in fp32. x [..., h], weight [h]."""
    if weight.dim() != 1:
        raise ValueError(f"kernels.rms_norm: weight must be 1-D [hidden], got shape {tuple(weight.shape)}")
    _check_last_dim("x", "rms_norm", x, weight.shape[0], "the weight's size")
    if use_triton(impl, x, "rms_norm") and x.numel():
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 impl: Implementation = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: new_residual = residual + x; returns (rms_norm(new_residual),
    new_residual). With residual None (first layer) new_residual is x."""
    if weight.dim() != 1:
        raise ValueError(f"kernels.add_rms_norm: weight must be 1-D [hidden], got shape {tuple(weight.shape)}")
    _check_last_dim("x", "add_rms_norm", x, weight.shape[0], "the weight's size")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"kernels.add_rms_norm: residual shape {tuple(residual.shape)} differs from x "
                         f"{tuple(x.shape)}")
    if use_triton(impl, x, "add_rms_norm") and x.numel():
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_torch(x, residual, weight, eps)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, impl: Implementation = "auto") -> torch.Tensor:
    """gelu_fast(x + bias) (tanh approximation) over the last dim; bias [F] or None."""
    if bias is not None:
        if bias.dim() != 1:
            raise ValueError(f"kernels.bias_gelu: bias must be 1-D, got shape {tuple(bias.shape)}")
        _check_last_dim("x", "bias_gelu", x, bias.shape[0], "the bias's size")
    if use_triton(impl, x, "bias_gelu") and x.numel():
        return bias_gelu_triton(x, bias)
    return bias_gelu_torch(x, bias)


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: Implementation = "auto") -> torch.Tensor:
    """silu(gate) * up, the gated MLP's activation; gate and up [..., F] of one shape (no broadcasting). They may
    be the two halves of one fused projection (`gate_up.chunk(2, -1)`): the Triton path reads such views in
    place."""
    if gate.shape != up.shape:
        raise ValueError(f"kernels.swiglu: gate shape {tuple(gate.shape)} differs from up {tuple(up.shape)}")
    if use_triton(impl, gate, "swiglu") and gate.numel():
        return swiglu_triton(gate, up)
    return swiglu_torch(gate, up)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               impl: Implementation = "auto", inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE. q [B, T, Hq, D], k [B, T, Hk, D], cos/sin [B or 1, T, D].

    inplace=True (Triton path) writes the result into q and k and returns them. It is safe for autograd
    because RoPE's backward needs only cos/sin; the caller must own q and k (e.g. fresh projection outputs
    viewed as heads) and not need their un-rotated values. Ignored on the torch path, and when cos/sin need
    gradients, a head dim has a non-unit stride, or cos/sin would promote q/k's dtype.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"kernels.apply_rope: q and k must be [batch, seq, heads, head_dim], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    batch, seq, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim:
        raise ValueError(f"kernels.apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, "
                         "seq or head_dim")
    if head_dim % 2:
        raise ValueError(f"kernels.apply_rope: head_dim must be even, got {head_dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 3 or table.shape[0] not in (1, batch) or table.shape[1] != seq \
                or table.shape[2] != head_dim:
            raise ValueError(f"kernels.apply_rope: {name} must be [1 or {batch}, {seq}, {head_dim}], got "
                             f"{tuple(table.shape)}")
    if not use_triton(impl, q, "apply_rope") or cos.requires_grad or sin.requires_grad or not q.numel():
        return apply_rope_torch(q, k, cos, sin)
    inplace = (inplace and q.stride(-1) == 1 and k.stride(-1) == 1
               and torch.promote_types(q.dtype, cos.dtype) == q.dtype
               and torch.promote_types(k.dtype, cos.dtype) == k.dtype)
    return apply_rope_triton(q, k, cos, sin, inplace=inplace)


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels outside [0, vocab) that are not ignore_index are an error (the chunked loss would silently treat
    them as a target logit of 0).

    CPU tensors: a ValueError naming the value; reading the answer costs nothing there. Other devices: reading
    it back would make the host wait for the GPU once per call, i.e. every micro-batch, so the check is queued
    as a device-side assertion (torch._assert_async) that stops the process at the next synchronisation, as
    F.cross_entropy's own bound check does on CUDA. CUDA_LAUNCH_BLOCKING=1 (or the same batch on CPU) names
    the call and the value."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.device.type != "cpu":
        torch._assert_async(~bad.any(), f"kernels.linear_cross_entropy: a label is outside the vocabulary "
                                        f"[0, {vocab}) and is not ignore_index ({ignore_index})")
        return
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"kernels.linear_cross_entropy: label {value} is outside the vocabulary [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0, impl: Implementation = "auto",
                         vocab_chunk: int | None = None) -> torch.Tensor:
    """Per-token fp32 losses [N] of softmax(hidden @ weight^T) against labels (0 where ignored), plus
    z_loss * logsumexp^2, chunked over the vocabulary so the [N, V] logits never exist (both impls).

    hidden [N, h], weight [V, h], labels [N] ints in [0, V) or ignore_index. vocab_chunk: columns per chunk
    (default: default_vocab_chunk).
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"kernels.linear_cross_entropy: hidden must be [tokens, h] and weight [vocab, h], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    _check_last_dim("hidden", "linear_cross_entropy", hidden, weight.shape[1], "the weight's hidden size")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"kernels.linear_cross_entropy: labels must be [{hidden.shape[0]}], got "
                         f"{tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"kernels.linear_cross_entropy: labels must be integer token ids, got {labels.dtype}")
    if z_loss < 0:
        raise ValueError(f"kernels.linear_cross_entropy: z_loss must be >= 0, got {z_loss}")
    if vocab_chunk is not None and vocab_chunk <= 0:
        raise ValueError(f"kernels.linear_cross_entropy: vocab_chunk must be > 0, got {vocab_chunk}")
    _check_labels(labels, weight.shape[0], ignore_index)
    if hidden.shape[0] == 0:
        return linear_cross_entropy_torch(hidden, weight, labels, ignore_index, z_loss)
    triton_steps = use_triton(impl, hidden, "linear_cross_entropy")
    return linear_cross_entropy_chunked(hidden, weight, labels, ignore_index, z_loss, vocab_chunk,
                                        use_triton=triton_steps)

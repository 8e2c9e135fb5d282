"""Tolerance rule for low-precision kernels (the policy of flash-attention/tests/test_flash_attn.py).

A bf16 kernel is compared against an fp32 (or fp64) reference, and its error may be at most `factor` times
the error the plain PyTorch implementation makes in the same low precision: 2x for forward outputs, 3x for
gradients. The bound scales with what bf16 can achieve on that input, instead of a hand-picked atol.
"""
from __future__ import annotations

import torch

FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0


def max_abs_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item()


def assert_within_reference_error(name: str, kernel_out: torch.Tensor, torch_lowp_out: torch.Tensor,
                                  reference: torch.Tensor, factor: float, floor: float = 1e-6) -> None:
    """max|kernel - ref| <= factor * max|torch_lowp - ref| + floor (floor: for outputs torch gets exact)."""
    kernel_err = max_abs_error(kernel_out, reference)
    torch_err = max_abs_error(torch_lowp_out, reference)
    bound = factor * torch_err + floor
    if not kernel_err <= bound:
        raise AssertionError(f"{name}: max abs error {kernel_err:.3e} exceeds {factor:g} x the PyTorch "
                             f"{torch_lowp_out.dtype} error {torch_err:.3e} (+{floor:g})")

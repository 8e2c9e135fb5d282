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


def reference_error(kernel_out: torch.Tensor, torch_lowp_out: torch.Tensor, reference: torch.Tensor,
                    factor: float, floor: float = 1e-6) -> dict:
    """The rule as a record: both max abs errors against the reference, the bound and whether it holds (the
    GPU check reports these instead of raising)."""
    kernel_err = max_abs_error(kernel_out, reference)
    torch_err = max_abs_error(torch_lowp_out, reference)
    bound = factor * torch_err + floor
    return {"max_abs_err": kernel_err, "torch_max_abs_err": torch_err, "factor": factor, "floor": floor,
            "bound": bound, "passed": bool(kernel_err <= bound)}


def assert_within_reference_error(name: str, kernel_out: torch.Tensor, torch_lowp_out: torch.Tensor,
                                  reference: torch.Tensor, factor: float, floor: float = 1e-6) -> None:
    """max|kernel - ref| <= factor * max|torch_lowp - ref| + floor (floor: for outputs torch gets exact)."""
    check = reference_error(kernel_out, torch_lowp_out, reference, factor, floor)
    if not check["passed"]:
        raise AssertionError(f"{name}: max abs error {check['max_abs_err']:.3e} exceeds {factor:g} x the PyTorch "
                             f"{torch_lowp_out.dtype} error {check['torch_max_abs_err']:.3e} (+{floor:g})")

"""MoE token permutation: tokens into expert-sorted order, and the weighted sum back (Triton + torch reference).

Dispatch sorts the T*K (token, choice) pairs by expert so every expert works on one contiguous slice of a
[T*K, h] buffer. One index table drives both directions: `positions[t, k]` is the row of the sorted buffer
that holds token t's k-th choice (a permutation of 0..T*K-1).

    permute  : out[positions[t, k]] = x[t]                      (backward: dx[t] = sum_k dout[positions[t, k]])
    combine  : out[t] = sum_k w[t, k] * y[positions[t, k]]      (backward: dy[positions[t, k]] = w[t, k] dout[t],
                                                                           dw[t, k] = <dout[t], y[positions[t, k]]>)

Every program owns whole tokens, and `positions` is a permutation, so each output row is written by exactly one
program: no atomics, and results are deterministic. The weighted sum accumulates in fp32 and rounds once.
The kernels load the index vector first and use it as offsets (the interpreter has no nested indirect loads).
"""
from __future__ import annotations

import torch

from fuxi.kernels import Implementation, use_triton
from fuxi.kernels.triton_runtime import next_power_of_2, rows_per_program, tl, triton


# ---- torch reference --------------------------------------------------------------------------------------

def source_tokens(positions: torch.Tensor) -> torch.Tensor:
    """[T*K] token index of every sorted row: the inverse of `positions`."""
    num_tokens, top_k = positions.shape
    src = torch.empty(num_tokens * top_k, dtype=torch.long, device=positions.device)
    src[positions.reshape(-1)] = torch.arange(num_tokens, device=positions.device).repeat_interleave(top_k)
    return src


def permute_tokens_torch(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, source_tokens(positions))


def combine_tokens_torch(y: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    gathered = y[positions].float()  # [T, K, h]
    if weights is not None:
        gathered = gathered * weights.float().unsqueeze(-1)
    return gathered.sum(1).to(y.dtype)


# ---- Triton kernels ---------------------------------------------------------------------------------------

@triton.jit
def _scatter_rows_kernel(X, POS, OUT, n_tokens, hidden,
                         TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[positions[t, k]] = x[t] for every k: one load of the token row, TOP_K stores."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < n_tokens
    mask = token_mask[:, None] & (cols < hidden)[None, :]
    x = tl.load(X + tokens.to(tl.int64)[:, None] * hidden + cols[None, :], mask=mask, other=0.0)
    for k in tl.static_range(TOP_K):
        rows = tl.load(POS + tokens * TOP_K + k, mask=token_mask, other=0).to(tl.int64)
        tl.store(OUT + rows[:, None] * hidden + cols[None, :], x, mask=mask)


@triton.jit
def _gather_sum_kernel(Y, POS, W, OUT, n_tokens, hidden,
                       HAS_WEIGHTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """out[t] = sum_k w[t, k] * y[positions[t, k]] in fp32 (w = 1 without weights: the permute backward)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < n_tokens
    mask = token_mask[:, None] & (cols < hidden)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        rows = tl.load(POS + tokens * TOP_K + k, mask=token_mask, other=0).to(tl.int64)
        y = tl.load(Y + rows[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(W + tokens * TOP_K + k, mask=token_mask, other=0.0).to(tl.float32)
            y = y * w[:, None]
        acc += y
    tl.store(OUT + tokens.to(tl.int64)[:, None] * hidden + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(DOUT, Y, POS, W, DY, DW_PARTIAL, n_tokens, hidden,
                        COMPUTE_DW: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """dy[positions[t, k]] = w[t, k] * dout[t]; this column block's share of dw[t, k] = <dout[t], y[pos]>."""
    pid_h = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < n_tokens
    mask = token_mask[:, None] & (cols < hidden)[None, :]
    dout = tl.load(DOUT + tokens.to(tl.int64)[:, None] * hidden + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)
    for k in tl.static_range(TOP_K):
        rows = tl.load(POS + tokens * TOP_K + k, mask=token_mask, other=0).to(tl.int64)
        w = tl.load(W + tokens * TOP_K + k, mask=token_mask, other=0.0).to(tl.float32)
        tl.store(DY + rows[:, None] * hidden + cols[None, :], (dout * w[:, None]).to(DY.dtype.element_ty),
                 mask=mask)
        if COMPUTE_DW:
            y = tl.load(Y + rows[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            partial = tl.sum(dout * y, axis=1)
            tl.store(DW_PARTIAL + (pid_h * n_tokens + tokens).to(tl.int64) * TOP_K + k, partial, mask=token_mask)


def _tiles(t: torch.Tensor, hidden: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_H): on a GPU a few K elements per program; under the interpreter few, large tiles."""
    block_h = min(next_power_of_2(hidden), 1024 if t.is_cuda else 4096)
    return rows_per_program(block_h, t), block_h


def _grid(n_tokens: int, hidden: int, block_t: int, block_h: int) -> tuple[int, int]:
    return triton.cdiv(n_tokens, block_t), triton.cdiv(hidden, block_h)


def permute_tokens_triton(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    n_tokens, top_k = positions.shape
    hidden = x.shape[1]
    out = x.new_empty(n_tokens * top_k, hidden)
    block_t, block_h = _tiles(x, hidden)
    _scatter_rows_kernel[_grid(n_tokens, hidden, block_t, block_h)](
        x, positions, out, n_tokens, hidden, TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h)
    return out


def gather_sum_triton(y: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    n_tokens, top_k = positions.shape
    hidden = y.shape[1]
    out = y.new_empty(n_tokens, hidden)
    block_t, block_h = _tiles(y, hidden)
    _gather_sum_kernel[_grid(n_tokens, hidden, block_t, block_h)](
        y, positions, weights if weights is not None else y, out, n_tokens, hidden,
        HAS_WEIGHTS=weights is not None, TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h)
    return out


def combine_backward_triton(dout: torch.Tensor, y: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor,
                            compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_tokens, top_k = positions.shape
    hidden = y.shape[1]
    block_t, block_h = _tiles(y, hidden)
    grid = _grid(n_tokens, hidden, block_t, block_h)
    dy = torch.empty_like(y)
    dw_partial = torch.empty(grid[1], n_tokens, top_k, dtype=torch.float32, device=y.device) if compute_dw else dy
    _combine_bwd_kernel[grid](dout, y, positions, weights, dy, dw_partial, n_tokens, hidden,
                              COMPUTE_DW=compute_dw, TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h)
    return dy, (dw_partial.sum(0).to(weights.dtype) if compute_dw else None)


class _PermuteTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions):
        ctx.save_for_backward(positions)
        return permute_tokens_triton(x, positions)

    @staticmethod
    def backward(ctx, dout):
        (positions,) = ctx.saved_tensors
        return gather_sum_triton(dout.contiguous(), positions, None), None


class _CombineTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, positions, weights):
        ctx.save_for_backward(y, positions, weights)
        return gather_sum_triton(y, positions, weights)

    @staticmethod
    def backward(ctx, dout):
        y, positions, weights = ctx.saved_tensors
        dy, dw = combine_backward_triton(dout.contiguous(), y, positions, weights, ctx.needs_input_grad[2])
        return dy, None, dw


# ---- the seam the MoE layer calls -------------------------------------------------------------------------

def _check_positions(kernel: str, positions: torch.Tensor, n_tokens: int, what: str) -> None:
    if positions.dim() != 2 or positions.shape[0] != n_tokens:
        raise ValueError(f"kernels.{kernel}: positions must be [{n_tokens} tokens, top_k] ({what}), got "
                         f"{tuple(positions.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kernels.{kernel}: positions must be int32/int64 row indices, got {positions.dtype}")


def permute_tokens(x: torch.Tensor, positions: torch.Tensor, impl: Implementation = "auto") -> torch.Tensor:
    """x [T, h] -> [T*K, h] in expert-sorted order: row positions[t, k] holds x[t]."""
    if x.dim() != 2:
        raise ValueError(f"kernels.permute_tokens: x must be [tokens, hidden], got {tuple(x.shape)}")
    _check_positions("permute_tokens", positions, x.shape[0], "one row per token of x")
    if not use_triton(impl, x, "permute_tokens") or not x.numel():
        return permute_tokens_torch(x, positions)
    return _PermuteTokens.apply(x.contiguous(), positions.contiguous())


def combine_tokens(y: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor,
                   impl: Implementation = "auto") -> torch.Tensor:
    """y [T*K, h] expert outputs in sorted order -> [T, h]: out[t] = sum_k weights[t, k] * y[positions[t, k]]."""
    if y.dim() != 2:
        raise ValueError(f"kernels.combine_tokens: y must be [tokens * top_k, hidden], got {tuple(y.shape)}")
    n_tokens = weights.shape[0] if weights.dim() == 2 else -1
    _check_positions("combine_tokens", positions, n_tokens, "the shape of weights")
    if weights.shape != positions.shape or positions.numel() != y.shape[0]:
        raise ValueError(f"kernels.combine_tokens: weights {tuple(weights.shape)} and positions "
                         f"{tuple(positions.shape)} must match and cover the {y.shape[0]} rows of y")
    if not use_triton(impl, y, "combine_tokens") or not y.numel():
        return combine_tokens_torch(y, positions, weights)
    return _CombineTokens.apply(y.contiguous(), positions.contiguous(), weights.contiguous())

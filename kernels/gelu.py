"""Bias + tanh-approximation GELU (`gelu_fast`), the activation of FuxiTranyu's non-gated MLP.

The model runs the up-projection matmul without its bias and hands the bias here, so the bias add, the
activation and (in backward) the bias gradient cost one pass over the [tokens, 4h] activation each way.
The kernels compute in fp32 and round once; the backward recomputes gelu'(x + b) from the saved input
instead of saving the activation, and reduces the bias gradient per program (no atomics).

0.5 * (1 + tanh(u)) == sigmoid(2u), so gelu_fast(x) = x * sigmoid(2u) with u = sqrt(2/pi) x (1 + 0.044715 x^2):
the same function, one transcendental, and no cancellation in 1 + tanh(u) for very negative x.
"""
import torch

from kernels.triton_runtime import (compute_dtype, next_power_of_2, persistent_programs, stats_dtype, tl,
                                    triton)

SQRT_2_OVER_PI = 0.7978845608
GELU_CUBIC = 0.044715


# ---- torch reference --------------------------------------------------------------------------------------

def gelu_fast_torch(x: torch.Tensor) -> torch.Tensor:
    """transformers' FastGELUActivation, term for term: 0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2)))."""
    return 0.5 * x * (1.0 + torch.tanh(x * SQRT_2_OVER_PI * (1.0 + 0.044715 * x * x)))


def bias_gelu_torch(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return gelu_fast_torch(x if bias is None else x + bias)


# ---- Triton kernels ---------------------------------------------------------------------------------------

@triton.jit
def _bias_gelu_fwd_kernel(X, BIAS, Y, n_elements, n_cols, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        x += tl.load(BIAS + offs % n_cols, mask=mask, other=0.0).to(COMPUTE)
    u = 0.7978845608 * x * (1.0 + 0.044715 * x * x)
    y = x * tl.sigmoid(2.0 * u)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, BIAS, DX, DB_PARTIAL, n_rows, n_cols,
                          HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (column blocks, row groups). dx = dy * gelu'(x + b); the program's partial bias gradient is the
    sum of its dx over the rows it visits (rows pid_m*BLOCK_M, + groups*BLOCK_M, ...)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(COMPUTE)
    db_acc = tl.zeros([BLOCK_N], dtype=COMPUTE)
    for start in range(pid_m * BLOCK_M, n_rows, tl.num_programs(1) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
        if HAS_BIAS:
            x += b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
        x2 = x * x
        s = tl.sigmoid(2.0 * 0.7978845608 * x * (1.0 + 0.044715 * x2))
        # d/dx [x * sigmoid(2u)] = s + x * s (1 - s) * 2 u'(x), u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        dgelu = s + x * s * (1.0 - s) * (2.0 * 0.7978845608) * (1.0 + 3.0 * 0.044715 * x2)
        dx = dy * dgelu
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        db_acc += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid_m * n_cols + cols, db_acc, mask=col_mask)


def _backward_tiles(x2: torch.Tensor) -> tuple[int, int]:
    n_rows, n_cols = x2.shape
    if x2.is_cuda:
        return 8, min(256, next_power_of_2(n_cols))  # 2K elements a tile, rows looped per program
    block_n = min(1024, next_power_of_2(n_cols))     # interpreter: few, large tiles
    return max(1, min(next_power_of_2(n_rows), 65536 // block_n)), block_n


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        out_dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        block = 1024 if x.is_cuda else 65536
        grid = (triton.cdiv(x2.numel(), block),)
        _bias_gelu_fwd_kernel[grid](x2, bias if bias is not None else x2, y, x2.numel(), n_cols,
                                    HAS_BIAS=bias is not None, COMPUTE=compute_dtype(out_dtype), BLOCK=block,
                                    num_warps=4)
        ctx.save_for_backward(x2, bias)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, bias = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(n_rows, n_cols).contiguous()
        block_m, block_n = _backward_tiles(x2)
        col_blocks = triton.cdiv(n_cols, block_n)
        row_groups = max(1, persistent_programs(x2, 4 * col_blocks * triton.cdiv(n_rows, block_m)) // col_blocks)
        row_groups = min(row_groups, triton.cdiv(n_rows, block_m))
        dx = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x2.dtype, dy.dtype), device=x2.device)
        has_bias = bias is not None
        db_partial = torch.empty((row_groups, n_cols) if has_bias else (1,), dtype=stats_dtype(dx.dtype),
                                 device=x2.device)
        _bias_gelu_bwd_kernel[(col_blocks, row_groups)](dy2, x2, bias if has_bias else x2, dx, db_partial,
                                                        n_rows, n_cols, HAS_BIAS=has_bias,
                                                        COMPUTE=compute_dtype(dx.dtype),
                                                        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
        dbias = db_partial.sum(0).to(bias.dtype) if has_bias and ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape).to(ctx.x_dtype), dbias


def bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return BiasGeluFunction.apply(x, bias)

"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32; optionally fused with the residual add.

The torch reference and the Triton kernels live side by side. The Triton forward stores one fp32 rstd per
row; the backward recomputes the normalised row from it and reduces the weight gradient per program into a
[programs, hidden] fp32 buffer that one torch sum finishes (so no atomics, and a deterministic result).
"""
import torch

from fuxi.kernels.triton_runtime import (compute_dtype, next_power_of_2, num_warps_for, persistent_programs,
                                    rows_per_program, stats_dtype, tl, triton)


# ---- torch reference --------------------------------------------------------------------------------------

def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference (and CPU path). Same arithmetic order as the HF Llama-family RMSNorm, for export parity."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = residual + x; returns (rms_norm(new_residual), new_residual). residual None: x itself."""
    new_residual = x if residual is None else residual + x
    return rms_norm_torch(new_residual, weight, eps), new_residual


# ---- Triton kernels ---------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_fwd_kernel(X, RES_IN, Y, RES_OUT, W, RSTD,
                         stride_x, stride_res_in, stride_y, stride_res_out,
                         n_rows, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, COMPUTE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = rows.to(tl.int64)  # row offsets: rows x stride can pass 2^31 elements
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + offs[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    if HAS_RESIDUAL:
        # Rounded to the residual stream's dtype, exactly like `residual + x` in torch.
        r = tl.load(RES_IN + offs[:, None] * stride_res_in + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        x_low = (r + x).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + offs[:, None] * stride_res_out + cols[None, :], x_low, mask=mask)
    else:
        x_low = x.to(X.dtype.element_ty)
    x = x_low.to(COMPUTE)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    # Reference order: normalise in fp32, round to the input dtype, then scale by the weight.
    normed = (x * rstd[:, None]).to(x_low.dtype).to(COMPUTE)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE)
    tl.store(Y + offs[:, None] * stride_y + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DRES, DX, DW_PARTIAL,
                         stride_dy, stride_x, stride_dres, stride_dx,
                         n_rows, n_cols,
                         HAS_DRES: tl.constexpr, COMPUTE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = rstd * (dy*w - n * mean(dy*w*n)) [+ dres], n = x*rstd; dw partial = sum over this program's rows
    of dy * n. Each program walks row tiles pid, pid + programs, ..."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE)
    dw_acc = tl.zeros([BLOCK_N], dtype=COMPUTE)
    for start in range(pid * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        offs = rows.to(tl.int64)  # row offsets: rows x stride can pass 2^31 elements
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + offs[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(DY + offs[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0).to(COMPUTE)
        normed = x * rstd[:, None]
        # The weight sees the normalised row after its rounding to the input dtype (as in the reference).
        dw_acc += tl.sum(dy * normed.to(X.dtype.element_ty).to(COMPUTE), axis=0)
        dn = dy * w[None, :]
        dx = rstd[:, None] * (dn - normed * (tl.sum(dn * normed, axis=1) / n_cols)[:, None])
        if HAS_DRES:
            dx += tl.load(DRES + offs[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        tl.store(DX + offs[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., h] -> [rows, h] with unit stride along h (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_forward(x2: torch.Tensor, res2: torch.Tensor | None, weight: torch.Tensor, eps: float,
                    out_dtype: torch.dtype, res_dtype: torch.dtype):
    n_rows, n_cols = x2.shape
    block_n = next_power_of_2(n_cols)
    block_m = rows_per_program(block_n, x2, n_rows)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=stats_dtype(res_dtype), device=x2.device)
    res_out = torch.empty((n_rows, n_cols), dtype=res_dtype, device=x2.device) if res2 is not None else x2
    res_in = res2 if res2 is not None else x2
    grid = (triton.cdiv(n_rows, block_m),)
    _rms_norm_fwd_kernel[grid](x2, res_in, y, res_out, weight, rstd,
                               x2.stride(0), res_in.stride(0), y.stride(0), res_out.stride(0),
                               n_rows, n_cols, eps, HAS_RESIDUAL=res2 is not None,
                               COMPUTE=compute_dtype(res_dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                               num_warps=num_warps_for(block_m * block_n))
    return y, (res_out if res2 is not None else None), rstd


def _launch_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     dres2: torch.Tensor | None):
    n_rows, n_cols = x2.shape
    block_n = next_power_of_2(n_cols)
    block_m = rows_per_program(block_n, x2, n_rows)
    programs = persistent_programs(x2, triton.cdiv(n_rows, block_m))
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    dw_partial = torch.empty((programs, n_cols), dtype=stats_dtype(x2.dtype), device=x2.device)
    dres_arg = dres2 if dres2 is not None else dy2
    _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dres_arg, dx, dw_partial,
                                      dy2.stride(0), x2.stride(0), dres_arg.stride(0), dx.stride(0),
                                      n_rows, n_cols, HAS_DRES=dres2 is not None,
                                      COMPUTE=compute_dtype(x2.dtype),
                                      BLOCK_M=block_m, BLOCK_N=block_n,
                                      num_warps=num_warps_for(block_m * block_n))
    return dx, dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _as_rows(x)
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y, _, rstd = _launch_forward(x2, None, weight, eps, out_dtype, x.dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], x.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _launch_backward(_as_rows(dy), x2, weight, rstd, None)
        return dx.view(ctx.x_shape), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    """(x, residual) -> (rms_norm(residual + x), residual + x) in one pass over memory each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        x2, r2 = _as_rows(x), _as_rows(residual)
        res_dtype = torch.promote_types(x.dtype, residual.dtype)
        out_dtype = torch.promote_types(res_dtype, weight.dtype)
        y, new_res, rstd = _launch_forward(x2, r2, weight, eps, out_dtype, res_dtype)
        ctx.save_for_backward(new_res, weight, rstd)
        ctx.shape, ctx.x_dtype, ctx.res_dtype = x.shape, x.dtype, residual.dtype
        return y.view(x.shape), new_res.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dres: torch.Tensor):
        # Autograd materialises the gradient of an unused output as zeros, so both are tensors.
        new_res, weight, rstd = ctx.saved_tensors
        dsum, dw = _launch_backward(_as_rows(dy), new_res, weight, rstd, _as_rows(dres))
        dsum = dsum.view(ctx.shape)
        return dsum.to(ctx.x_dtype), dsum.to(ctx.res_dtype), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        return rms_norm_triton(x, weight, eps), x
    return AddRMSNormFunction.apply(x, residual, weight, eps)

"""Bias + tanh-approximation GELU (`gelu_fast`), the activation of FuxiTranyu's non-gated MLP.

The model runs the up-projection matmul without its bias and hands the bias here, so the bias add, the
activation and (in backward) the bias gradient cost one pass over the [tokens, 4h] activation each way.
The kernels compute in fp32 and round once; the backward recomputes gelu'(x + b) from the saved input
instead of saving the activation, and reduces the bias gradient per program into a small [row groups, F]
buffer that one torch sum finishes (no atomics, deterministic). On a GPU both kernels are autotuned per width
and row-count bucket.

0.5 * (1 + tanh(u)) == sigmoid(2u), so gelu_fast(x) = x * sigmoid(2u) with u = sqrt(2/pi) x (1 + 0.044715 x^2):
the same function, one transcendental, and no cancellation in 1 + tanh(u) for very negative x.
"""
import torch

from fuxi.kernels.triton_runtime import (autotuned, compute_dtype, interpreter_tile, persistent_programs, rows_bucket,
                                         sm_count, stats_dtype, tl, triton)

SQRT_2_OVER_PI = 0.7978845608
GELU_CUBIC = 0.044715


# ---- torch reference --------------------------------------------------------------------------------------

def gelu_fast_torch(x: torch.Tensor) -> torch.Tensor:
    """transformers' FastGELUActivation, term for term: 0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2)))."""
    return 0.5 * x * (1.0 + torch.tanh(x * SQRT_2_OVER_PI * (1.0 + 0.044715 * x * x)))


def bias_gelu_torch(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return gelu_fast_torch(x if bias is None else x + bias)


# ---- Triton kernels ---------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["rows_bucket"])
def _bias_gelu_fwd_kernel(X, BIAS, Y, n_rows, n_cols, rows_bucket, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (row blocks, column blocks): one BLOCK_M x BLOCK_N tile, its bias slice loaded once and broadcast
    over the rows (no per-element `offset % n_cols`). `rows_bucket` is only part of the autotuning key."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        x += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
    u = 0.7978845608 * x * (1.0 + 0.044715 * x * x)
    y = x * tl.sigmoid(2.0 * u)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows_bucket"])
def _bias_gelu_bwd_kernel(DY, X, BIAS, DX, DB_PARTIAL, n_rows, n_cols, rows_bucket,
                          HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (column blocks, row groups). dx = dy * gelu'(x + b); the program's partial bias gradient is the
    sum of its dx over the row tiles it visits (pid_m, pid_m + groups, ...), written to row pid_m of
    DB_PARTIAL [groups, n_cols] (a program past the last tile writes zeros)."""
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
        if HAS_BIAS:
            db_acc += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid_m * n_cols + cols, db_acc, mask=col_mask)


# GPU launch configurations, autotuned per width and row bucket (both kernels overwrite their outputs, so trial
# runs are harmless). Tiles of 2K-8K elements at 4-8 warps: enough loads in flight per SM for a memory-bound kernel.
FWD_CONFIGS = [(dict(BLOCK_M=1, BLOCK_N=4096), 8), (dict(BLOCK_M=2, BLOCK_N=2048), 8),
               (dict(BLOCK_M=4, BLOCK_N=1024), 4), (dict(BLOCK_M=8, BLOCK_N=1024), 8),
               (dict(BLOCK_M=16, BLOCK_N=256), 4)]
BWD_CONFIGS = [(dict(BLOCK_M=8, BLOCK_N=256), 4), (dict(BLOCK_M=16, BLOCK_N=256), 8),
               (dict(BLOCK_M=4, BLOCK_N=512), 4), (dict(BLOCK_M=8, BLOCK_N=512), 8),
               (dict(BLOCK_M=4, BLOCK_N=1024), 8)]
_BWD_MAX_BLOCK_N = max(meta["BLOCK_N"] for meta, _ in BWD_CONFIGS)
TUNING_KEY = ["n_cols", "rows_bucket"]
_bias_gelu_fwd_tuned = autotuned(_bias_gelu_fwd_kernel, FWD_CONFIGS, key=TUNING_KEY)
_bias_gelu_bwd_tuned = autotuned(_bias_gelu_bwd_kernel, BWD_CONFIGS, key=TUNING_KEY)


def _row_groups(x2: torch.Tensor, tile: dict | None) -> int:
    """Row groups of the backward grid; they fix the bias-gradient partial buffer [groups, n_cols].

    Autotuned (tile None): the count does not depend on the tile. About 8 programs per SM at the widest column
    block (more at narrower ones) so that every SM streams several tiles at once, and at least 32 rows per
    group so that the partial buffer stays small: 4096 x 16384 on 132 SMs gives 66 groups, 1,056-4,224
    programs and a 4 MB buffer against 400 MB of dy, x and dx (the old 8x256 grid ran 256 programs of 4
    warps, about 12% occupancy). Fixed tile: a few groups per column block (persistent_programs; a handful
    under the interpreter, so that the loop and the cross-group sum still run in the CPU tests).
    """
    n_rows, n_cols = x2.shape
    if tile is None:
        groups = triton.cdiv(8 * sm_count(x2) * _BWD_MAX_BLOCK_N, n_cols)
        return max(1, min(groups, triton.cdiv(n_rows, 32)))
    row_tiles = triton.cdiv(n_rows, tile["BLOCK_M"])
    col_blocks = triton.cdiv(n_cols, tile["BLOCK_N"])
    return max(1, min(row_tiles, persistent_programs(x2, col_blocks * row_tiles) // col_blocks))


def bias_gelu_forward(x2: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                      tile: dict | None = None, tuned=None) -> torch.Tensor:
    """y = gelu_fast(x2 + bias) for x2 [rows, F]. With `tile` (BLOCK_M, BLOCK_N, num_warps): that fixed launch.
    Without: the autotuned kernel on CUDA (`tuned`, for tests: another autotuner of the same kernel), else the
    interpreter's large tiles."""
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    args = (x2, bias if bias is not None else x2, y, n_rows, n_cols, rows_bucket(n_rows))
    consts = dict(HAS_BIAS=bias is not None, COMPUTE=compute_dtype(out_dtype))
    tuned = None if tile is not None else (tuned or (_bias_gelu_fwd_tuned if x2.is_cuda else None))
    if tuned is not None:
        tuned[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"]))](
            *args, **consts)
    else:
        tile = tile or interpreter_tile(n_rows, n_cols)
        grid = (triton.cdiv(n_rows, tile["BLOCK_M"]), triton.cdiv(n_cols, tile["BLOCK_N"]))
        _bias_gelu_fwd_kernel[grid](*args, **consts, **tile)
    return y


def bias_gelu_backward(dy2: torch.Tensor, x2: torch.Tensor, bias: torch.Tensor | None,
                       tile: dict | None = None, tuned=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dbias in fp32) for dy2, x2 [rows, F]; `tile` and `tuned` as in bias_gelu_forward."""
    n_rows, n_cols = x2.shape
    tuned = None if tile is not None else (tuned or (_bias_gelu_bwd_tuned if x2.is_cuda else None))
    if tuned is None:
        tile = tile or interpreter_tile(n_rows, n_cols)
    groups = _row_groups(x2, None if tuned is not None else tile)
    dx = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x2.dtype, dy2.dtype), device=x2.device)
    has_bias = bias is not None
    db_partial = torch.empty((groups, n_cols) if has_bias else (1,), dtype=stats_dtype(dx.dtype),
                             device=x2.device)
    args = (dy2, x2, bias if has_bias else x2, dx, db_partial, n_rows, n_cols, rows_bucket(n_rows))
    consts = dict(HAS_BIAS=has_bias, COMPUTE=compute_dtype(dx.dtype))
    if tuned is not None:
        tuned[lambda meta: (triton.cdiv(n_cols, meta["BLOCK_N"]), groups)](*args, **consts)
    else:
        _bias_gelu_bwd_kernel[(triton.cdiv(n_cols, tile["BLOCK_N"]), groups)](*args, **consts, **tile)
    return dx, (db_partial.sum(0) if has_bias else None)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out_dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
        y = bias_gelu_forward(x2, bias, out_dtype)
        ctx.save_for_backward(x2, bias)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, bias = ctx.saved_tensors
        dx, dbias = bias_gelu_backward(dy.reshape(x2.shape).contiguous(), x2, bias)
        dbias = dbias.to(bias.dtype) if dbias is not None and ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape).to(ctx.x_dtype), dbias


def bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return BiasGeluFunction.apply(x, bias)

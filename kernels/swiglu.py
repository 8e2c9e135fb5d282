"""SwiGLU: silu(gate) * up, the activation of the gated MLP (Llama, Qwen2, Mistral: down(silu(gate x) * up x)).

Unfused, eager PyTorch writes silu(gate) to memory and reads it back for the product, and its backward runs
several elementwise passes; the kernels here read gate and up once and write the product once (forward), and
read dy, gate and up once and write both gradients once (backward), recomputing sigmoid(gate) instead of saving
anything but the inputs. They compute in fp32 and round once on store. gate and up may be row-strided views (the
two halves of one fused gate_up projection, `gate_up.chunk(2, -1)`), read in place without a copy; the last
dimension needs unit stride. On a GPU both kernels are autotuned per width and row-count bucket, as bias-GELU's.

With s = sigmoid(g): y = g s u;  dy/du = g s;  dy/dg = u s (1 + g (1 - s)).
"""
import torch
import torch.nn.functional as F

from fuxi.kernels.triton_runtime import autotuned, compute_dtype, interpreter_tile, rows_bucket, tl, triton


# ---- torch reference --------------------------------------------------------------------------------------

def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaMLP activation, term for term: act_fn(gate) * up with act_fn = SiLU."""
    return F.silu(gate) * up


# ---- Triton kernels ---------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["rows_bucket"])
def _swiglu_fwd_kernel(GATE, UP, Y, stride_gate, stride_up, n_rows, n_cols, rows_bucket,
                       COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (row blocks, column blocks): one BLOCK_M x BLOCK_N tile. gate/up rows are `stride_*` elements
    apart, y is contiguous. `rows_bucket` is only part of the autotuning key."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(GATE + rows64 * stride_gate + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(UP + rows64 * stride_up + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows64 * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows_bucket"])
def _swiglu_bwd_kernel(DY, GATE, UP, DGATE, DUP, stride_dy, stride_gate, stride_up, n_rows, n_cols, rows_bucket,
                       COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Same grid as the forward. dup = dy g s, dgate = dy u s (1 + g (1 - s)); both outputs contiguous, each
    in its input's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(GATE + rows64 * stride_gate + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(UP + rows64 * stride_up + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    s = tl.sigmoid(g)
    dup = dy * g * s
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    out = rows64 * n_cols + cols[None, :]
    tl.store(DGATE + out, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + out, dup.to(DUP.dtype.element_ty), mask=mask)


# GPU launch configurations, autotuned per width and row bucket (both kernels overwrite their outputs, so trial
# runs are harmless). Tiles of 1K-4K elements at 4-8 warps: the backward keeps three inputs and two outputs
# live per element, so its tiles are no larger than the forward's.
FWD_CONFIGS = [(dict(BLOCK_M=1, BLOCK_N=4096), 8), (dict(BLOCK_M=2, BLOCK_N=2048), 8),
               (dict(BLOCK_M=4, BLOCK_N=1024), 4), (dict(BLOCK_M=8, BLOCK_N=512), 8),
               (dict(BLOCK_M=16, BLOCK_N=256), 4)]
BWD_CONFIGS = [(dict(BLOCK_M=1, BLOCK_N=2048), 8), (dict(BLOCK_M=2, BLOCK_N=1024), 4),
               (dict(BLOCK_M=4, BLOCK_N=1024), 8), (dict(BLOCK_M=8, BLOCK_N=256), 4),
               (dict(BLOCK_M=16, BLOCK_N=256), 8)]
TUNING_KEY = ["n_cols", "rows_bucket"]
_swiglu_fwd_tuned = autotuned(_swiglu_fwd_kernel, FWD_CONFIGS, key=TUNING_KEY)
_swiglu_bwd_tuned = autotuned(_swiglu_bwd_kernel, BWD_CONFIGS, key=TUNING_KEY)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim] without a copy where its layout allows (a chunk of a wider tensor keeps its row
    stride); copied only when the last dimension is strided, which the kernels cannot read."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(kernel, tuned, tile: dict | None, n_rows: int, n_cols: int, args: tuple, consts: dict) -> None:
    """`tile` (BLOCK_M, BLOCK_N, num_warps): that fixed launch. Without: `tuned` (the autotuned kernel on CUDA,
    or for tests another autotuner of the same kernel), else the interpreter's large tiles."""
    if tile is None and tuned is not None:
        tuned[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"]))](
            *args, **consts)
        return
    tile = tile or interpreter_tile(n_rows, n_cols)
    kernel[(triton.cdiv(n_rows, tile["BLOCK_M"]), triton.cdiv(n_cols, tile["BLOCK_N"]))](*args, **consts, **tile)


def swiglu_forward(gate2: torch.Tensor, up2: torch.Tensor, out_dtype: torch.dtype, tile: dict | None = None,
                   tuned=None) -> torch.Tensor:
    """y = silu(gate2) * up2 for gate2, up2 [rows, F] (row-strided, unit last stride); y contiguous."""
    n_rows, n_cols = gate2.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=gate2.device)
    tuned = tuned or (_swiglu_fwd_tuned if gate2.is_cuda else None)
    _launch(_swiglu_fwd_kernel, tuned, tile, n_rows, n_cols,
            (gate2, up2, y, gate2.stride(0), up2.stride(0), n_rows, n_cols, rows_bucket(n_rows)),
            dict(COMPUTE=compute_dtype(out_dtype)))
    return y


def swiglu_backward(dy2: torch.Tensor, gate2: torch.Tensor, up2: torch.Tensor, tile: dict | None = None,
                    tuned=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), contiguous, in gate2's and up2's dtypes; all three inputs [rows, F], row-strided."""
    n_rows, n_cols = gate2.shape
    dgate = torch.empty((n_rows, n_cols), dtype=gate2.dtype, device=gate2.device)
    dup = torch.empty((n_rows, n_cols), dtype=up2.dtype, device=gate2.device)
    compute = compute_dtype(torch.promote_types(torch.promote_types(gate2.dtype, up2.dtype), dy2.dtype))
    tuned = tuned or (_swiglu_bwd_tuned if gate2.is_cuda else None)
    _launch(_swiglu_bwd_kernel, tuned, tile, n_rows, n_cols,
            (dy2, gate2, up2, dgate, dup, dy2.stride(0), gate2.stride(0), up2.stride(0), n_rows, n_cols,
             rows_bucket(n_rows)),
            dict(COMPUTE=compute))
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """Saves only the inputs (views, no copies); the backward recomputes sigmoid(gate)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate2, up2 = as_rows(gate), as_rows(up)
        y = swiglu_forward(gate2, up2, torch.promote_types(gate.dtype, up.dtype))
        ctx.save_for_backward(gate2, up2)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate2, up2 = ctx.saved_tensors
        dgate, dup = swiglu_backward(as_rows(dy), gate2, up2)
        return (dgate.view(ctx.shape) if ctx.needs_input_grad[0] else None,
                dup.view(ctx.shape) if ctx.needs_input_grad[1] else None)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(gate, up)

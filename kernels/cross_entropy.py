"""Linear + cross-entropy over a large vocabulary without the [tokens, vocab] logits; per-token losses out.

Design (why it is vocab-chunked, not token-chunked as in Liger): the weight gradient of a chunk is
dlogits_chunk^T @ hidden, a [V, h] matrix. Chunking over *tokens* adds that whole [V, h] product once per
chunk: 32 chunks at V = 250,680 x h = 4,096 move 32 x 4 GB of fp32 gradient through memory (and need a 4 GB
fp32 accumulator). Chunking over the *vocabulary* gives each slice grad_W[v0:v1] from one GEMM over all tokens,
accumulated in the GEMM's fp32 registers and written once; the only running accumulator is grad_hidden
[tokens, h] in fp32, which is small. The price is that the softmax of a vocab chunk needs each token's full
log-sum-exp, so:

    forward   pass 1: per vocab chunk, logits = hidden @ W_c^T; merge the chunk's log-sum-exp into a running
              per-token lse, pick up the target logit  ->  loss = lse - target + z * lse^2   (1 matmul)
    backward  pass 2: per vocab chunk, recompute the logits, turn them in place into
              dloss/dlogits = g * (softmax * (1 + 2 z lse) - onehot(label)), then
              grad_W[c] = dlogits^T @ hidden and grad_hidden += dlogits @ W_c            (3 matmuls)

Four matmuls in all, the same count as computing the gradients in the forward pass (Liger's choice, which must
also run the logits matmul once per chunk), but the backward here knows the per-token output gradient g, so the
gradients are exact for any weighting of the per-token losses (per-language loss weights, masks), and only
the fp32 lse [tokens] is kept between forward and backward. Peak extra memory is one [tokens, chunk] logits
block plus the fp32 grad_hidden accumulator.

The per-chunk softmax steps come in two implementations with the same arguments: Triton kernels (each reads the
logits block once in pass 1 and reads+writes it once in pass 2) and plain torch (the CPU path). The eager
reference, which does build the full logits, is `linear_cross_entropy_torch`.
"""
import warnings

import torch
import torch.nn.functional as F

from fuxi.kernels.triton_runtime import compute_dtype, next_power_of_2, num_warps_for, stats_dtype, tl, triton

IGNORE_INDEX = -100


# ---- eager reference --------------------------------------------------------------------------------------

def linear_cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0) -> torch.Tensor:
    """Eager reference: materialises the full [tokens, vocab] logits. hidden [N, h], weight [V, h], labels [N].

    Returns fp32 per-token losses [N], 0 where labels == ignore_index; z_loss adds z * logsumexp^2.
    """
    logits = F.linear(hidden, weight).float()
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        losses = losses + z_loss * lse.pow(2) * (labels != ignore_index)
    return losses


# ---- per-chunk softmax steps: torch -----------------------------------------------------------------------

def _block_stats_torch(logits: torch.Tensor, labels: torch.Tensor, v_start: int, lse: torch.Tensor,
                       target: torch.Tensor) -> None:
    """Merge this vocab chunk's log-sum-exp into `lse` and record target logits that fall in the chunk."""
    x = logits.to(lse.dtype)
    torch.logaddexp(lse, torch.logsumexp(x, dim=-1), out=lse)
    local = labels - v_start
    in_block = (local >= 0) & (local < x.shape[1])
    picked = x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None])[:, 0]
    target.copy_(torch.where(in_block, picked, target))


def _block_grad_torch(logits: torch.Tensor, labels: torch.Tensor, v_start: int, lse: torch.Tensor,
                      scale: torch.Tensor, z_loss: float) -> None:
    """Overwrite the logits block with scale * (softmax * (1 + 2 z lse) - onehot(label))."""
    x = logits.to(lse.dtype)  # the block itself when it is fp32: every step below is in place
    x.sub_(lse[:, None]).exp_().mul_((scale * (1.0 + 2.0 * z_loss * lse))[:, None])
    local = labels - v_start
    in_block = (local >= 0) & (local < x.shape[1])
    rows = in_block.nonzero()[:, 0]
    x[rows, local[rows]] -= scale[rows]
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)


# ---- per-chunk softmax steps: Triton ----------------------------------------------------------------------

@triton.jit
def _ce_block_stats_kernel(LOGITS, stride_l, LABELS, LSE, TARGET, n_rows, n_cols, v_start,
                           COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    local = tl.load(LABELS + rows, mask=row_mask, other=-1) - v_start
    row_base = rows.to(tl.int64)[:, None] * stride_l
    m = tl.full([BLOCK_M], -float("inf"), dtype=COMPUTE)
    s = tl.zeros([BLOCK_M], dtype=COMPUTE)
    picked = tl.zeros([BLOCK_M], dtype=COMPUTE)
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(LOGITS + row_base + cols[None, :], mask=mask, other=-float("inf")).to(COMPUTE)
        x = tl.where(row_mask[:, None], x, 0.0)  # rows past the end: finite, never stored
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        picked += tl.sum(tl.where(cols[None, :] == local[:, None], x, 0.0), axis=1)
    block_lse = m + tl.log(s)
    running = tl.load(LSE + rows, mask=row_mask, other=0.0)
    top = tl.maximum(running, block_lse)
    tl.store(LSE + rows, top + tl.log(tl.exp(running - top) + tl.exp(block_lse - top)), mask=row_mask)
    in_block = (local >= 0) & (local < n_cols)
    tl.store(TARGET + rows, picked, mask=row_mask & in_block)


@triton.jit
def _ce_block_grad_kernel(LOGITS, stride_l, LABELS, LSE, SCALE, n_rows, n_cols, v_start, z_loss,
                          COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    local = tl.load(LABELS + rows, mask=row_mask, other=-1) - v_start
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(SCALE + rows, mask=row_mask, other=0.0)
    coef = g * (1.0 + 2.0 * z_loss * lse)
    row_base = rows.to(tl.int64)[:, None] * stride_l
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(LOGITS + row_base + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        grad = tl.exp(x - lse[:, None]) * coef[:, None]
        grad -= tl.where(cols[None, :] == local[:, None], g[:, None], 0.0)
        tl.store(LOGITS + row_base + cols[None, :], grad.to(LOGITS.dtype.element_ty), mask=mask)


def _tiles(logits: torch.Tensor) -> tuple[int, int]:
    n_rows, n_cols = logits.shape
    if logits.is_cuda:
        return 1, min(4096, next_power_of_2(n_cols))  # a row per program, looping over 4K-column tiles
    block_v = min(1024, next_power_of_2(n_cols))       # interpreter: few, large programs
    return min(next_power_of_2(n_rows), max(1, 65536 // block_v)), block_v


def _block_stats_triton(logits, labels, v_start, lse, target) -> None:
    block_m, block_v = _tiles(logits)
    _ce_block_stats_kernel[(triton.cdiv(logits.shape[0], block_m),)](
        logits, logits.stride(0), labels, lse, target, logits.shape[0], logits.shape[1], v_start,
        COMPUTE=compute_dtype(lse.dtype), BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps_for(block_m * block_v))


def _block_grad_triton(logits, labels, v_start, lse, scale, z_loss) -> None:
    block_m, block_v = _tiles(logits)
    _ce_block_grad_kernel[(triton.cdiv(logits.shape[0], block_m),)](
        logits, logits.stride(0), labels, lse, scale, logits.shape[0], logits.shape[1], v_start, float(z_loss),
        COMPUTE=compute_dtype(lse.dtype), BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps_for(block_m * block_v))


# ---- matmuls with fp32 accumulation -----------------------------------------------------------------------
#
# grad_hidden = sum over ~31 vocab chunks of dlogits_c @ W_c. With bf16 operands the product should leave the
# GEMM in fp32 (its accumulator) and be summed in fp32. torch's out_dtype GEMM, `torch.mm(a, b, torch.float32)`
# (aten::mm.dtype), does that on CUDA for fp16/bf16 inputs (torch >= 2.8; CPU has no kernel for it). Its addmm
# form cannot accumulate into an fp32 tensor: aten's _addmm_dtype_out_cuda requires `self` in the inputs' dtype,
# so an fp32 accumulator is rejected. Without the out_dtype GEMM the product is rounded to bf16 before the fp32
# sum ("bf16 fallback"): never silently -- `last_path()` says which ran, and a fallback warns once.

FP32_OUT_MM = "fp32-out mm"
SAME_DTYPE = "addmm in the compute dtype"

_last_path: str | None = None
_warned: set[str] = set()


def last_path() -> str | None:
    """How the fused loss's most recent backward accumulated grad_hidden: "fp32-out mm", "addmm in the compute
    dtype" (fp32 or fp64 operands: nothing to round), or "bf16 fallback (<reason>)"; None before any backward."""
    return _last_path


def _record_path(path: str) -> None:
    global _last_path
    _last_path = path
    if path.startswith("bf16 fallback") and path not in _warned:
        _warned.add(path)
        warnings.warn(f"fuxi.kernels.cross_entropy: grad_hidden products are rounded to the compute dtype before "
                      f"the fp32 sum: {path}", RuntimeWarning, stacklevel=3)


def _fp32_out_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b as fp32 from half-precision a, b (cuBLAS's fp32 accumulator written out as is)."""
    return torch.mm(a, b, torch.float32, out=out)


def _fp32_out_mm_reason(a: torch.Tensor) -> str | None:
    """Why the out_dtype GEMM cannot run here (None: it can)."""
    if not a.is_cuda:
        return f"torch's out_dtype mm has no {a.device.type} kernel"
    return None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, str]:
    """(a @ b as fp32, FP32_OUT_MM), or (None, "bf16 fallback (reason)") where the out_dtype GEMM is missing
    or fails (the error's type and message are the reason)."""
    reason = _fp32_out_mm_reason(a)
    if reason is None:
        try:
            return _fp32_out_mm(a, b, out), FP32_OUT_MM
        except (RuntimeError, NotImplementedError, TypeError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    short = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(a.dtype, str(a.dtype).replace("torch.", ""))
    return None, f"{short} fallback ({reason})"


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: list) -> str:
    """fp32 acc += a @ b in place; returns the path taken. `scratch` holds a reused fp32 product buffer."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return SAME_DTYPE
    if not scratch:
        scratch.append(torch.empty(acc.shape, dtype=torch.float32, device=acc.device))
    product, path = _mm_fp32(a, b, out=scratch[0])
    acc.add_(product if product is not None else torch.mm(a, b))
    return path


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out[...] = a @ b, one GEMM (fp32 accumulation inside it) written straight into out."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
        return
    if out.dtype != torch.float32 or _mm_fp32(a, b, out=out)[0] is None:
        out.copy_(torch.mm(a, b))


# ---- the chunked function ---------------------------------------------------------------------------------

def default_vocab_chunk(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Vocab columns per chunk so one [tokens, chunk] logits block is about 64M elements on a GPU (128 MB in
    bf16: big GEMMs, ~1/30 of the eager logits at 8K tokens x 250K) and 8M on a CPU."""
    target = 2 ** 26 if torch.device(device).type == "cuda" else 2 ** 23
    chunk = next_power_of_2(max(1, target // max(1, n_tokens)))
    return max(1, min(vocab, max(chunk, 256)))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                z_loss: float, vocab_chunk: int, use_triton: bool, compute_dtype: torch.dtype) -> torch.Tensor:
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        stats = _block_stats_triton if use_triton else _block_stats_torch
        with torch.autocast(device.type, enabled=False):
            hid = hidden.to(compute_dtype).contiguous()
            buf = torch.empty(n_tokens * min(vocab_chunk, vocab), dtype=compute_dtype, device=device)
            lse = torch.full((n_tokens,), -float("inf"), dtype=stats_dtype(compute_dtype), device=device)
            target = torch.zeros(n_tokens, dtype=lse.dtype, device=device)
            for v0 in range(0, vocab, vocab_chunk):
                logits, _ = _logits_block(hid, weight, v0, min(vocab, v0 + vocab_chunk), buf, compute_dtype)
                stats(logits, labels, v0, lse, target)
            valid = labels != ignore_index
            losses = torch.where(valid, lse - target + z_loss * lse * lse, 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.config = (ignore_index, z_loss, vocab_chunk, use_triton, compute_dtype)
        ctx.mark_non_differentiable(labels)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        ignore_index, z_loss, vocab_chunk, use_triton, compute_dtype = ctx.config
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        grad_step = _block_grad_triton if use_triton else _block_grad_torch
        with torch.autocast(device.type, enabled=False):
            scale = torch.where(labels != ignore_index, grad_losses.to(lse.dtype), 0.0).contiguous()
            hid = hidden.to(compute_dtype).contiguous()
            buf = torch.empty(n_tokens * min(vocab_chunk, vocab), dtype=compute_dtype, device=device)
            grad_hidden = torch.zeros(hidden.shape, dtype=lse.dtype, device=device) if need_hidden else None
            grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_weight else None
            scratch: list = []
            path = None
            for v0 in range(0, vocab, vocab_chunk):
                v1 = min(vocab, v0 + vocab_chunk)
                dlogits, w_block = _logits_block(hid, weight, v0, v1, buf, compute_dtype)
                grad_step(dlogits, labels, v0, lse, scale, z_loss)
                if need_weight:
                    _mm_into(grad_weight[v0:v1], dlogits.t(), hid)
                if need_hidden:
                    path = _accumulate_mm(grad_hidden, dlogits, w_block, scratch)
            if path is not None:
                _record_path(path)
        grad_hidden = grad_hidden.to(hidden.dtype) if need_hidden else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _logits_block(hid: torch.Tensor, weight: torch.Tensor, v0: int, v1: int, buf: torch.Tensor,
                  compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """hid @ weight[v0:v1]^T into the front of `buf` (contiguous [tokens, v1 - v0]); also the weight slice."""
    w_block = weight[v0:v1].to(compute_dtype)
    logits = buf[: hid.shape[0] * (v1 - v0)].view(hid.shape[0], v1 - v0)
    torch.mm(hid, w_block.t(), out=logits)
    return logits, w_block


def linear_cross_entropy_chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0,
                                 vocab_chunk: int | None = None, use_triton: bool = False) -> torch.Tensor:
    """fp32 per-token losses [N] (0 where ignored) of hidden [N, h] @ weight[V, h]^T, chunked over the vocab
    (fp64 losses and statistics for fp64 inputs, so float64 gradcheck applies).

    Matmuls run in the autocast dtype when autocast is on, else in the promoted dtype of hidden and weight;
    the softmax statistics and the grad_hidden accumulation are fp32. Gradients come back in the inputs'
    dtypes. `use_triton` picks the Triton softmax steps (CUDA, or CPU under TRITON_INTERPRET=1).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    chunk = vocab_chunk or default_vocab_chunk(hidden.shape[0], weight.shape[0], hidden.device)
    return LinearCrossEntropyFunction.apply(hidden, weight, labels.contiguous(), int(ignore_index),
                                            float(z_loss), int(chunk), bool(use_triton), compute_dtype)

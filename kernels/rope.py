"""Rotary position embeddings, rotate-half (NeoX/Llama) convention over the full head dimension.

With x = [x1, x2] (halves of the head dimension) and cos/sin = [c1, c2], [s1, s2]:
    forward   o1 = x1 c1 - x2 s1,   o2 = x2 c2 + x1 s2
    backward  d1 = g1 c1 + g2 s2,   d2 = g2 c2 - g1 s1      (the transpose of the forward map)
The backward needs only cos/sin, never q or k, which is what makes the in-place forward safe for autograd:
one Triton kernel does both directions, q and k in one launch, any strides with a unit-stride head dim.
"""
import torch

from fuxi.kernels.triton_runtime import compute_dtype, next_power_of_2, num_warps_for, tl, triton


# ---- torch reference --------------------------------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [*positions.shape, head_dim], computed in fp32 and cast to `dtype`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [batch, seq, heads, head_dim]; cos, sin: [batch or 1, seq, head_dim]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---- Triton kernel ----------------------------------------------------------------------------------------

@triton.jit
def _rope_rotate(X, O, pos_x, pos_o, stride_xh, stride_oh, n_heads, c1, c2, s1, s2, d, pmask, dmask,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr, COMPUTE: tl.constexpr):
    """Rotate every head of the [BLOCK_T] positions whose element offsets are pos_x (pos_o for the output)."""
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = pmask[:, None, None] & (h < n_heads)[None, :, None] & dmask[None, None, :]
        x_off = pos_x[:, None, None] + h[None, :, None] * stride_xh + d[None, None, :]
        o_off = pos_o[:, None, None] + h[None, :, None] * stride_oh + d[None, None, :]
        x1 = tl.load(X + x_off, mask=mask, other=0.0).to(COMPUTE)
        x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(COMPUTE)
        if BACKWARD:
            o1 = x1 * c1[:, None, :] + x2 * s2[:, None, :]
            o2 = x2 * c2[:, None, :] - x1 * s1[:, None, :]
        else:
            o1 = x1 * c1[:, None, :] - x2 * s1[:, None, :]
            o2 = x2 * c2[:, None, :] + x1 * s2[:, None, :]
        tl.store(O + o_off, o1.to(O.dtype.element_ty), mask=mask)
        tl.store(O + o_off + HALF, o2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, n_pos, seq_len, n_heads_q, n_heads_k,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h,
                 sc_b, sc_t, ss_b, ss_t,
                 HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 BACKWARD: tl.constexpr, COMPUTE: tl.constexpr):
    """One program per BLOCK_T (batch, position) pairs: loads cos/sin once and rotates all q and k heads."""
    pos = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    pmask = pos < n_pos
    b = (pos // seq_len).to(tl.int64)
    t = (pos % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cmask = pmask[:, None] & dmask[None, :]
    c_off = (b * sc_b + t * sc_t)[:, None] + d[None, :]
    s_off = (b * ss_b + t * ss_t)[:, None] + d[None, :]
    c1 = tl.load(COS + c_off, mask=cmask, other=0.0).to(COMPUTE)
    c2 = tl.load(COS + c_off + HALF, mask=cmask, other=0.0).to(COMPUTE)
    s1 = tl.load(SIN + s_off, mask=cmask, other=0.0).to(COMPUTE)
    s2 = tl.load(SIN + s_off + HALF, mask=cmask, other=0.0).to(COMPUTE)
    _rope_rotate(Q, QO, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, sq_h, sqo_h, n_heads_q,
                 c1, c2, s1, s2, d, pmask, dmask, HALF, BLOCK_H, BACKWARD, COMPUTE)
    _rope_rotate(K, KO, b * sk_b + t * sk_t, b * sko_b + t * sko_t, sk_h, sko_h, n_heads_k,
                 c1, c2, s1, s2, d, pmask, dmask, HALF, BLOCK_H, BACKWARD, COMPUTE)


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _table_strides(table: torch.Tensor) -> tuple[int, int]:
    """(batch, position) strides of a [batch or 1, seq, head_dim] table; batch 1 broadcasts (stride 0)."""
    return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1)


def _launch(q, k, qo, ko, cos, sin, backward: bool) -> None:
    """Rotate q into qo and k into ko (k None: q only)."""
    batch, seq, n_heads_q, head_dim = q.shape
    n_heads_k = k.shape[2] if k is not None else 0
    if k is None:
        k = ko = q
    half = head_dim // 2
    block_d = next_power_of_2(half)
    block_h = min(next_power_of_2(max(n_heads_q, n_heads_k)), max(1, 4096 // block_d))
    n_pos = batch * seq
    # GPU: one position per program. Interpreter: as many positions as fit a 16K-element tile.
    block_t = 1 if q.is_cuda else max(1, min(next_power_of_2(n_pos), 16384 // (block_h * block_d)))
    sc_b, sc_t = _table_strides(cos)
    ss_b, ss_t = _table_strides(sin)
    _rope_kernel[(triton.cdiv(n_pos, block_t),)](
        q, k, qo, ko, cos, sin, n_pos, seq, n_heads_q, n_heads_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        sc_b, sc_t, ss_b, ss_t,
        HALF=half, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward,
        COMPUTE=compute_dtype(torch.promote_types(q.dtype, cos.dtype)),
        num_warps=num_warps_for(block_h * block_d))


def _backward(cos, sin, grads, dtypes):
    grads = [_unit_stride_last(g) for g in grads]  # autograd materialises unused grads as zeros
    outs = [torch.empty(g.shape, dtype=dt, device=g.device) for g, dt in zip(grads, dtypes)]
    _launch(grads[0], grads[1] if len(grads) > 1 else None, outs[0], outs[1] if len(outs) > 1 else None,
            cos, sin, backward=True)
    return outs


class RopeFunction(torch.autograd.Function):
    """q and k rotated out of place in one launch."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q, k = _unit_stride_last(q), _unit_stride_last(k)
        qo = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
        ko = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
        _launch(q, k, qo, ko, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return qo, ko

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _backward(cos, sin, [dq, dk], ctx.dtypes)
        return dq_in, dk_in, None, None


class RopeInplaceFunction(torch.autograd.Function):
    """One tensor rotated in place. One output per Function: autograd only allows in-place writes to a view
    (q_proj(x).view(B, T, H, D)) in a Function that returns a single tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        _launch(x, None, x, None, cos, sin, backward=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return x

    @staticmethod
    def backward(ctx, dx: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _backward(cos, sin, [dx], [ctx.dtype])[0], None, None


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """In place writes the rotated values into q and k (unit stride on head_dim required) and returns them."""
    cos, sin = _unit_stride_last(cos), _unit_stride_last(sin)
    if inplace:
        return RopeInplaceFunction.apply(q, cos, sin), RopeInplaceFunction.apply(k, cos, sin)
    return RopeFunction.apply(q, k, cos, sin)

"""The GhostGRU recurrence (docs/methods.md §4): a GRU of m intrinsic units plus per-step "ghost" units.

One time step, with m intrinsic units, G = H - m ghost units and the carried state h (width Hs: H when ghosts
are fed back, variant A; m when they are not, variant B):

    r, z = sigmoid(gx_r + U_r h[:K_rz] + b_hr), sigmoid(gx_z + U_z h[:K_rz] + b_hz)
    n    = tanh(gx_n + r * (U_n h[:K_n] + b_hn))          # PyTorch GRU convention: reset after the matmul
    i    = (1 - z) * n + z * h[:m]                         # intrinsic state
    g    = act(A i + c)                                    # the cheap operation, stateless and per step
    out  = concat(i, g),  next state = out[:Hs]

where gx = x W_ih^T + b_ih is precomputed for all time steps by one matmul outside the recurrence, and
K_rz, K_n are the widths of the state the gates and the candidate read (H or m).

Two implementations of the recurrence share that contract:
- `ghost_gru_scan_torch`: the reference, a Python loop over time under autograd (the CPU path);
- `GhostGRUScanTriton`: one Triton program per block of batch rows loops over time (forward) and over reversed
  time (backward). Only the sequential part runs in the kernels; every weight gradient is one large matmul over
  all (batch, time) pairs afterwards, from the per-step pre-activation gradients the backward kernel writes.
`ghost_gru_scan(..., impl)` picks one, like the seam in kernels/__init__.py.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from fuxi.common.typed_config import require_choice
from fuxi.kernels import Implementation, use_triton
from fuxi.kernels.triton_runtime import next_power_of_2, tl, triton

GhostActivation = Literal["identity", "tanh", "relu", "sigmoid"]  # also the `ghost_act` of the model config
GHOST_ACTIVATIONS: tuple[str, ...] = get_args(GhostActivation)
_ACT_CODE = {name: code for code, name in enumerate(GHOST_ACTIVATIONS)}  # the kernels' ACT constexpr


def check_ghost_act(act: str) -> None:
    require_choice("ghost_act", act, GHOST_ACTIVATIONS)


def ghost_activation(q: torch.Tensor, act: GhostActivation) -> torch.Tensor:
    check_ghost_act(act)
    if act == "tanh":
        return torch.tanh(q)
    if act == "relu":
        return torch.relu(q)
    if act == "sigmoid":
        return torch.sigmoid(q)
    return q  # identity


# ----------------------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------------------
def ghost_gru_step_torch(gx_t: torch.Tensor, h: torch.Tensor, w_rz: torch.Tensor, w_n: torch.Tensor,
                         b_hh: torch.Tensor, ghost_weight: torch.Tensor, ghost_bias: torch.Tensor,
                         act: GhostActivation) -> torch.Tensor:
    """One step. gx_t [B, 3m]; h [B, Hs]; w_rz [2m, K_rz]; w_n [m, K_n]; b_hh [3m]; ghost_weight [G, m].

    Returns out_t [B, m + G] = concat(intrinsic, ghost).
    """
    m = w_n.shape[0]
    gh_rz = F.linear(h[:, : w_rz.shape[1]], w_rz, b_hh[: 2 * m])
    gh_n = F.linear(h[:, : w_n.shape[1]], w_n, b_hh[2 * m:])
    gx_r, gx_z, gx_n = gx_t.split(m, dim=-1)
    r = torch.sigmoid(gx_r + gh_rz[:, :m])
    z = torch.sigmoid(gx_z + gh_rz[:, m:])
    n = torch.tanh(gx_n + r * gh_n)
    intrinsic = (1 - z) * n + z * h[:, :m]
    if ghost_weight.shape[0] == 0:
        return intrinsic
    ghost = ghost_activation(F.linear(intrinsic, ghost_weight, ghost_bias), act)
    return torch.cat([intrinsic, ghost], dim=-1)


def ghost_gru_scan_torch(gx: torch.Tensor, w_rz: torch.Tensor, w_n: torch.Tensor, b_hh: torch.Tensor,
                         ghost_weight: torch.Tensor, ghost_bias: torch.Tensor, h0: torch.Tensor,
                         keep: torch.Tensor | None = None, act: GhostActivation = "tanh") -> torch.Tensor:
    """The whole sequence. gx [B, T, 3m]; h0 [B, Hs]; keep [B, T] (0 resets the state before step t).

    Returns out [B, T, H]; the final state is out[:, -1, :Hs].
    """
    state_size = h0.shape[1]
    h = h0
    outputs = []
    for t in range(gx.shape[1]):
        if keep is not None:
            h = h * keep[:, t, None].to(h.dtype)
        out_t = ghost_gru_step_torch(gx[:, t], h, w_rz, w_n, b_hh, ghost_weight, ghost_bias, act)
        outputs.append(out_t)
        h = out_t[:, :state_size]
    return torch.stack(outputs, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (defined everywhere; launched only where kernels.triton_runtime.can_launch says so)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _matmul_acc(acc, a, b):
    """acc += a @ b with fp32 accumulation; exact fp32 products (no TF32) when the weights are fp32."""
    if b.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b, acc=acc, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b, acc=acc)


@triton.jit
def _ghost_gru_fwd_kernel(
    gx_ptr, keep_ptr, w_rz_t_ptr, w_n_t_ptr, b_hh_ptr, a_t_ptr, c_ptr, states_ptr, gates_ptr,
    B, T, M, G, K_RZ, K_N,
    stride_gx_b, stride_gx_t, stride_keep_b, stride_st_b, stride_st_t, stride_ga_b, stride_ga_t,
    ACT: tl.constexpr, HAS_RESET: tl.constexpr, SAVE_GATES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """states [B, T+1, H]: row 0 holds h0, row t+1 receives out_t. gates [B, T, 4m]: r, z, n, U_n h + b_hn.

    w_rz_t [K_rz, 2m], w_n_t [K_n, m], a_t [m, G] are the transposed weights (coalesced tile loads).
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows_b = offs_b.to(tl.int64)  # batch-row offsets: B x (T+1) x H elements can pass 2^31
    for t in range(T):
        prev_ptr = states_ptr + rows_b[:, None] * stride_st_b + t * stride_st_t
        cur_ptr = prev_ptr + stride_st_t
        gx_row = gx_ptr + rows_b[:, None] * stride_gx_b + t * stride_gx_t
        if HAS_RESET:
            keep = tl.load(keep_ptr + rows_b * stride_keep_b + t, mask=mask_b, other=0.0).to(tl.float32)
        # Phase 1: the intrinsic GRU units, BLOCK_M at a time.
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_bm = mask_b[:, None] & (offs_m < M)[None, :]
            acc_r = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
            acc_z = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
            acc_n = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K_RZ, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K_RZ
                h = tl.load(prev_ptr + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
                if HAS_RESET:
                    h = h * keep[:, None]
                w_mask = mask_k[:, None] & (offs_m < M)[None, :]
                w_r = tl.load(w_rz_t_ptr + offs_k[:, None] * (2 * M) + offs_m[None, :], mask=w_mask, other=0.0)
                w_z = tl.load(w_rz_t_ptr + offs_k[:, None] * (2 * M) + M + offs_m[None, :], mask=w_mask,
                              other=0.0)
                acc_r = _matmul_acc(acc_r, h, w_r)
                acc_z = _matmul_acc(acc_z, h, w_z)
            for k0 in range(0, K_N, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K_N
                h = tl.load(prev_ptr + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
                if HAS_RESET:
                    h = h * keep[:, None]
                w_n = tl.load(w_n_t_ptr + offs_k[:, None] * M + offs_m[None, :],
                              mask=mask_k[:, None] & (offs_m < M)[None, :], other=0.0)
                acc_n = _matmul_acc(acc_n, h, w_n)
            mask_m = offs_m < M
            b_r = tl.load(b_hh_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            b_z = tl.load(b_hh_ptr + M + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            b_n = tl.load(b_hh_ptr + 2 * M + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            gx_r = tl.load(gx_row + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            gx_z = tl.load(gx_row + M + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            gx_n = tl.load(gx_row + 2 * M + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            r = tl.sigmoid(gx_r + acc_r + b_r[None, :])
            z = tl.sigmoid(gx_z + acc_z + b_z[None, :])
            hn = acc_n + b_n[None, :]
            n = _tanh(gx_n + r * hn)
            h_carry = tl.load(prev_ptr + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            if HAS_RESET:
                h_carry = h_carry * keep[:, None]
            intrinsic = n + z * (h_carry - n)
            tl.store(cur_ptr + offs_m[None, :], intrinsic.to(states_ptr.dtype.element_ty), mask=mask_bm)
            if SAVE_GATES:
                ga_row = gates_ptr + rows_b[:, None] * stride_ga_b + t * stride_ga_t + offs_m[None, :]
                tl.store(ga_row, r.to(gates_ptr.dtype.element_ty), mask=mask_bm)
                tl.store(ga_row + M, z.to(gates_ptr.dtype.element_ty), mask=mask_bm)
                tl.store(ga_row + 2 * M, n.to(gates_ptr.dtype.element_ty), mask=mask_bm)
                tl.store(ga_row + 3 * M, hn.to(gates_ptr.dtype.element_ty), mask=mask_bm)
        tl.debug_barrier()  # every intrinsic unit of step t is written before the ghosts read them
        # Phase 2: ghost units g = act(A i + c).
        for g0 in range(0, G, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            mask_g = offs_g < G
            acc = tl.zeros((BLOCK_B, BLOCK_G), dtype=tl.float32)
            for k0 in range(0, M, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < M
                i_tile = tl.load(cur_ptr + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
                a = tl.load(a_t_ptr + offs_k[:, None] * G + offs_g[None, :],
                            mask=mask_k[:, None] & mask_g[None, :], other=0.0)
                acc = _matmul_acc(acc, i_tile, a)
            q = acc + tl.load(c_ptr + offs_g, mask=mask_g, other=0.0).to(tl.float32)[None, :]
            if ACT == 1:
                q = _tanh(q)
            elif ACT == 2:
                q = tl.maximum(q, 0.0)
            elif ACT == 3:
                q = tl.sigmoid(q)
            tl.store(cur_ptr + M + offs_g[None, :], q.to(states_ptr.dtype.element_ty),
                     mask=mask_b[:, None] & mask_g[None, :])
        tl.debug_barrier()  # step t is complete before step t+1 reads it


@triton.jit
def _ghost_gru_bwd_kernel(
    grad_out_ptr, states_ptr, gates_ptr, keep_ptr, w_rz_ptr, w_n_ptr, a_ptr,
    dh_ptr, dcarry_ptr, dgates_ptr, dq_ptr,
    B, T, M, G, K_RZ, K_N, HS,
    stride_go_b, stride_go_t, stride_st_b, stride_st_t, stride_ga_b, stride_ga_t, stride_keep_b,
    stride_dh_b, stride_dc_b, stride_dg_b, stride_dg_t, stride_dq_b, stride_dq_t,
    ACT: tl.constexpr, HAS_RESET: tl.constexpr, FEED_GHOSTS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Reverse-time loop. dh [B, H] fp32 carries dL/dstate (in: zeros; out: dL/dh0).

    Writes per step dgates [B, T, 4m] = (da_r, da_z, da_n, d(U_n h + b_hn)) and dq [B, T, G] = dL/d(A i + c),
    the pre-activation gradients from which every weight gradient is one matmul afterwards.
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows_b = offs_b.to(tl.int64)  # batch-row offsets: B x (T+1) x H elements can pass 2^31
    dh_row = dh_ptr + rows_b[:, None] * stride_dh_b
    dc_row = dcarry_ptr + rows_b[:, None] * stride_dc_b
    for step in range(T):
        t = T - 1 - step
        prev_ptr = states_ptr + rows_b[:, None] * stride_st_b + t * stride_st_t
        cur_ptr = prev_ptr + stride_st_t
        go_row = grad_out_ptr + rows_b[:, None] * stride_go_b + t * stride_go_t
        dq_row = dq_ptr + rows_b[:, None] * stride_dq_b + t * stride_dq_t
        dg_row = dgates_ptr + rows_b[:, None] * stride_dg_b + t * stride_dg_t
        ga_row = gates_ptr + rows_b[:, None] * stride_ga_b + t * stride_ga_t
        if HAS_RESET:
            keep = tl.load(keep_ptr + rows_b * stride_keep_b + t, mask=mask_b, other=0.0).to(tl.float32)
        # Phase 1: through the ghost activation.
        for g0 in range(0, G, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            mask_bg = mask_b[:, None] & (offs_g < G)[None, :]
            d_ghost = tl.load(go_row + M + offs_g[None, :], mask=mask_bg, other=0.0).to(tl.float32)
            if FEED_GHOSTS:
                d_ghost += tl.load(dh_row + M + offs_g[None, :], mask=mask_bg, other=0.0)
            ghost = tl.load(cur_ptr + M + offs_g[None, :], mask=mask_bg, other=0.0).to(tl.float32)
            if ACT == 1:
                d_ghost = d_ghost * (1.0 - ghost * ghost)
            elif ACT == 2:
                d_ghost = tl.where(ghost > 0.0, d_ghost, 0.0)
            elif ACT == 3:
                d_ghost = d_ghost * ghost * (1.0 - ghost)
            tl.store(dq_row + offs_g[None, :], d_ghost, mask=mask_bg)
        tl.debug_barrier()
        # Phase 2: into the intrinsic units and their gates.
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            mask_bm = mask_b[:, None] & mask_m[None, :]
            d_i = tl.load(go_row + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            d_i += tl.load(dh_row + offs_m[None, :], mask=mask_bm, other=0.0)
            for k0 in range(0, G, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < G
                dq = tl.load(dq_row + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
                a = tl.load(a_ptr + offs_k[:, None] * M + offs_m[None, :],
                            mask=mask_k[:, None] & mask_m[None, :], other=0.0)
                d_i = _matmul_acc(d_i, dq, a)
            r = tl.load(ga_row + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            z = tl.load(ga_row + M + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            n = tl.load(ga_row + 2 * M + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            hn = tl.load(ga_row + 3 * M + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            h_carry = tl.load(prev_ptr + offs_m[None, :], mask=mask_bm, other=0.0).to(tl.float32)
            if HAS_RESET:
                h_carry = h_carry * keep[:, None]
            da_n = d_i * (1.0 - z) * (1.0 - n * n)
            da_z = d_i * (h_carry - n) * z * (1.0 - z)
            da_r = da_n * hn * r * (1.0 - r)
            d_hn = da_n * r
            tl.store(dg_row + offs_m[None, :], da_r, mask=mask_bm)
            tl.store(dg_row + M + offs_m[None, :], da_z, mask=mask_bm)
            tl.store(dg_row + 2 * M + offs_m[None, :], da_n, mask=mask_bm)
            tl.store(dg_row + 3 * M + offs_m[None, :], d_hn, mask=mask_bm)
            tl.store(dc_row + offs_m[None, :], d_i * z, mask=mask_bm)
        tl.debug_barrier()
        # Phase 3: dL/dh_{t-1} = [da_r, da_z] U_rz + d_hn U_n + d_i * z (on the intrinsic slice).
        for col0 in range(0, HS, BLOCK_H):
            offs_h = col0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < HS
            acc = tl.load(dc_row + offs_h[None, :], mask=mask_b[:, None] & (offs_h < M)[None, :], other=0.0)
            for k0 in range(0, M, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_bk = mask_b[:, None] & (offs_k < M)[None, :]
                da_r = tl.load(dg_row + offs_k[None, :], mask=mask_bk, other=0.0)
                da_z = tl.load(dg_row + M + offs_k[None, :], mask=mask_bk, other=0.0)
                d_hn = tl.load(dg_row + 3 * M + offs_k[None, :], mask=mask_bk, other=0.0)
                rz_mask = (offs_k < M)[:, None] & (offs_h < K_RZ)[None, :]
                w_r = tl.load(w_rz_ptr + offs_k[:, None] * K_RZ + offs_h[None, :], mask=rz_mask, other=0.0)
                w_z = tl.load(w_rz_ptr + (M + offs_k[:, None]) * K_RZ + offs_h[None, :], mask=rz_mask,
                              other=0.0)
                w_n = tl.load(w_n_ptr + offs_k[:, None] * K_N + offs_h[None, :],
                              mask=(offs_k < M)[:, None] & (offs_h < K_N)[None, :], other=0.0)
                acc = _matmul_acc(acc, da_r, w_r)
                acc = _matmul_acc(acc, da_z, w_z)
                acc = _matmul_acc(acc, d_hn, w_n)
            if HAS_RESET:
                acc = acc * keep[:, None]
            tl.store(dh_row + offs_h[None, :], acc, mask=mask_b[:, None] & mask_h[None, :])
        tl.debug_barrier()


def launch_options(arch: int) -> dict:
    """num_warps/num_stages of both kernels on compute capability `arch` (90 = Hopper, 80 = Ampere).

    At Triton's default (3 stages) with 4 warps, ptxas needs 255 registers per thread and spills 1.8-5.4 KB. One
    stage compiles with no spills at 8 warps on sm_90 (16 warps there cap registers at 64 and spill again) and
    at 16 warps on sm_80 (8 spill 40-270 B); tests/test_kernels_aot.py checks both.
    """
    return {"num_warps": 8 if arch >= 90 else 16, "num_stages": 1}


def _device_arch(t: torch.Tensor) -> int:
    if not t.is_cuda:
        return 90  # the interpreter ignores launch options
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _pow2_block(n: int, cap: int) -> int:
    """A power-of-two tile width, at least 16 (tl.dot's minimum) and at most `cap`."""
    return max(16, min(cap, next_power_of_2(max(int(n), 1))))


class GhostGRUScanTriton(torch.autograd.Function):
    """Forward and backward of the whole recurrence in two Triton kernels; weight gradients by torch matmuls."""

    @staticmethod
    def forward(ctx, gx, w_rz, w_n, b_hh, ghost_weight, ghost_bias, h0, keep, act, block_sizes):
        batch, steps, three_m = gx.shape
        m, k_n = w_n.shape
        k_rz = w_rz.shape[1]
        ghosts = ghost_weight.shape[0]
        hidden, state_size = m + ghosts, h0.shape[1]
        gx = gx.contiguous()
        states = gx.new_zeros(batch, steps + 1, hidden)
        states[:, 0, :state_size] = h0.to(states.dtype)
        save = any(ctx.needs_input_grad[:7])
        gates = gx.new_empty(batch, steps, 4 * m) if save else gx.new_empty(1, 1, 1)
        keep_f = keep.to(torch.float32).contiguous() if keep is not None else gx.new_empty(1, 1, dtype=torch.float32)
        blocks = _block_sizes(m, ghosts, state_size, block_sizes)
        grid = (triton.cdiv(batch, blocks["BLOCK_B"]),)
        _ghost_gru_fwd_kernel[grid](
            gx, keep_f, w_rz.t().contiguous(), w_n.t().contiguous(), b_hh.contiguous(),
            ghost_weight.t().contiguous(), ghost_bias.contiguous(), states, gates,
            batch, steps, m, ghosts, k_rz, k_n,
            gx.stride(0), gx.stride(1), keep_f.stride(0), states.stride(0), states.stride(1),
            gates.stride(0), gates.stride(1),
            ACT=_ACT_CODE[act], HAS_RESET=keep is not None, SAVE_GATES=save,
            BLOCK_B=blocks["BLOCK_B"], BLOCK_M=blocks["BLOCK_M"], BLOCK_K=blocks["BLOCK_K"],
            BLOCK_G=blocks["BLOCK_G"], **launch_options(_device_arch(gx)),
        )
        if save:
            ctx.save_for_backward(w_rz, w_n, b_hh, ghost_weight, ghost_bias, h0, states, gates,
                                  keep_f if keep is not None else None)
        ctx.act, ctx.blocks, ctx.gx_dtype = act, blocks, gx.dtype
        return states[:, 1:]

    @staticmethod
    def backward(ctx, grad_out):
        w_rz, w_n, b_hh, ghost_weight, ghost_bias, h0, states, gates, keep = ctx.saved_tensors
        batch, steps_plus_1, hidden = states.shape
        steps = steps_plus_1 - 1
        m, k_n = w_n.shape
        k_rz, ghosts, state_size = w_rz.shape[1], ghost_weight.shape[0], h0.shape[1]
        grad_out = grad_out.contiguous()
        f32 = dict(device=states.device, dtype=torch.float32)
        dh = torch.zeros(batch, hidden, **f32)
        dcarry = torch.zeros(batch, m, **f32)
        dgates = torch.empty(batch, steps, 4 * m, **f32)
        dq = torch.empty(batch, steps, max(ghosts, 1), **f32)
        keep_arg = keep if keep is not None else dh
        blocks = ctx.blocks
        grid = (triton.cdiv(batch, blocks["BLOCK_B"]),)
        _ghost_gru_bwd_kernel[grid](
            grad_out, states, gates, keep_arg, w_rz.contiguous(), w_n.contiguous(), ghost_weight.contiguous(),
            dh, dcarry, dgates, dq,
            batch, steps, m, ghosts, k_rz, k_n, state_size,
            grad_out.stride(0), grad_out.stride(1), states.stride(0), states.stride(1),
            gates.stride(0), gates.stride(1), keep_arg.stride(0),
            dh.stride(0), dcarry.stride(0), dgates.stride(0), dgates.stride(1), dq.stride(0), dq.stride(1),
            ACT=_ACT_CODE[ctx.act], HAS_RESET=keep is not None, FEED_GHOSTS=state_size == hidden and ghosts > 0,
            BLOCK_B=blocks["BLOCK_B"], BLOCK_M=blocks["BLOCK_M"], BLOCK_K=blocks["BLOCK_K"],
            BLOCK_G=blocks["BLOCK_G"], BLOCK_H=blocks["BLOCK_H"], **launch_options(_device_arch(states)),
        )
        # Weight gradients: sums over all (batch, time) pairs, one matmul each.
        prev = states[:, :steps].float()
        if keep is not None:
            prev = prev * keep[:, :, None]
        prev = prev.reshape(-1, hidden)
        dgates_2d = dgates.reshape(-1, 4 * m)
        grad_w_rz = (dgates_2d[:, : 2 * m].t() @ prev[:, :k_rz]).to(w_rz.dtype)
        grad_w_n = (dgates_2d[:, 3 * m:].t() @ prev[:, :k_n]).to(w_n.dtype)
        grad_b_hh = torch.cat([dgates_2d[:, : 2 * m].sum(0), dgates_2d[:, 3 * m:].sum(0)]).to(b_hh.dtype)
        dq_2d = dq.reshape(-1, dq.shape[-1])[:, :ghosts]
        intrinsic = states[:, 1:, :m].float().reshape(-1, m)
        grad_ghost_weight = (dq_2d.t() @ intrinsic).to(ghost_weight.dtype)
        grad_ghost_bias = dq_2d.sum(0).to(ghost_bias.dtype)
        grad_gx = dgates[:, :, : 3 * m].to(ctx.gx_dtype)
        grad_h0 = dh[:, :state_size].to(h0.dtype)
        return (grad_gx, grad_w_rz, grad_w_n, grad_b_hh, grad_ghost_weight, grad_ghost_bias, grad_h0,
                None, None, None)


def _block_sizes(m: int, ghosts: int, state_size: int, override: dict | None) -> dict:
    cap = 64
    blocks = {"BLOCK_B": 16, "BLOCK_M": _pow2_block(m, cap), "BLOCK_K": _pow2_block(max(m, state_size), cap),
              "BLOCK_G": _pow2_block(ghosts, cap), "BLOCK_H": _pow2_block(state_size, cap)}
    for key, value in (override or {}).items():
        if key not in blocks:
            raise ValueError(f"block_sizes: unknown key {key!r}; known: {sorted(blocks)}")
        if value < 16 or value & (value - 1):
            raise ValueError(f"block_sizes.{key}: {value} must be a power of two >= 16")
        blocks[key] = value
    return blocks


# ----------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------
def ghost_gru_scan(gx: torch.Tensor, w_rz: torch.Tensor, w_n: torch.Tensor, b_hh: torch.Tensor,
                   ghost_weight: torch.Tensor, ghost_bias: torch.Tensor, h0: torch.Tensor,
                   keep: torch.Tensor | None = None, act: GhostActivation = "tanh",
                   impl: Implementation = "auto", block_sizes: dict | None = None) -> torch.Tensor:
    """The recurrence over gx [B, T, 3m] from h0 [B, Hs] -> out [B, T, m + G]. See the module docstring."""
    check_ghost_act(act)
    m = w_n.shape[0]
    if gx.dim() != 3 or gx.shape[2] != 3 * m:
        raise ValueError(f"gx: expected [batch, time, {3 * m}], got {list(gx.shape)}")
    widest = max(w_rz.shape[1], w_n.shape[1], m)
    if h0.dim() != 2 or h0.shape[0] != gx.shape[0] or h0.shape[1] < widest:
        raise ValueError(f"h0: expected [{gx.shape[0]}, state >= {widest}], got {list(h0.shape)}")
    if keep is not None and keep.shape != gx.shape[:2]:
        raise ValueError(f"keep: expected {list(gx.shape[:2])}, got {list(keep.shape)}")
    if gx.shape[1] == 0:
        return gx.new_zeros(gx.shape[0], 0, m + ghost_weight.shape[0])
    if use_triton(impl, gx, "ghost_gru"):
        return GhostGRUScanTriton.apply(gx, w_rz, w_n, b_hh, ghost_weight, ghost_bias, h0, keep, act, block_sizes)
    return ghost_gru_scan_torch(gx, w_rz, w_n, b_hh, ghost_weight, ghost_bias, h0, keep, act)

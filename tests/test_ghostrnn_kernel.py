"""The fused Triton GhostGRU recurrence (kernels/ghost_gru.py) against its torch reference under autograd.

CPU tier: TRITON_INTERPRET=1 (tests/conftest.py), fp32, tiny grids (one or two programs of 16 batch rows).
GPU tier (@pytest.mark.gpu): larger shapes in fp32, and bf16 by FlashAttention's rule against an fp32 reference.
"""
from __future__ import annotations

import math

import pytest
import torch

from fuxi.kernels.ghost_gru import ghost_gru_scan, ghost_gru_scan_torch
from fuxi.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_reference_error
from fuxi.model.config import GhostRNNConfig, ModelConfig
from fuxi.model.ghostrnn import GhostGRU
from fuxi.model.registry import build_model

SMALL_BLOCKS = {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_G": 16, "BLOCK_H": 16}


def make_inputs(batch, steps, hidden, ratio, feed, gate, device="cpu", dtype=torch.float32, seed=0):
    """Random recurrence inputs with the widths a GhostGRU layer of these switches has."""
    gen = torch.Generator().manual_seed(seed)
    m = math.ceil(hidden / ratio)
    ghosts = hidden - m
    state = hidden if feed else m
    k_rz = state if gate == "full" else m

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_()

    return dict(gx=rand(batch, steps, 3 * m), w_rz=rand(2 * m, k_rz, scale=0.4), w_n=rand(m, state, scale=0.4),
                b_hh=rand(3 * m, scale=0.2), ghost_weight=rand(ghosts, m, scale=0.4),
                ghost_bias=rand(ghosts, scale=0.2),
                h0=rand(batch, state, scale=0.5))


def forward_and_grads(inputs, impl, keep=None, act="tanh", block_sizes=None, seed=1):
    out = ghost_gru_scan(**inputs, keep=keep, act=act, impl=impl, block_sizes=block_sizes)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    grads = torch.autograd.grad((out * weights).float().sum(), list(inputs.values()), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs.values())]
    return out, dict(zip(inputs, grads))


def assert_matches_reference(inputs, keep=None, act="tanh", block_sizes=None, atol=2e-5):
    ref_out, ref_grads = forward_and_grads(inputs, "torch", keep, act)
    out, grads = forward_and_grads(inputs, "triton", keep, act, block_sizes)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=atol)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=atol, msg=f"grad of {name}")


@pytest.mark.parametrize("feed, gate", [(True, "full"), (True, "intrinsic"), (False, "intrinsic")])
@pytest.mark.parametrize("ratio, act", [(2, "tanh"), (3, "relu")])
def test_triton_matches_reference_forward_and_backward(feed, gate, ratio, act):
    assert_matches_reference(make_inputs(3, 5, 20, ratio, feed, gate), act=act)


@pytest.mark.parametrize("act", ["identity", "sigmoid"])
def test_triton_other_activations_with_reset_mask(act):
    inputs = make_inputs(3, 6, 18, 3, True, "full")
    keep = torch.ones(3, 6)
    keep[0, 2] = keep[2, 0] = keep[1, 4] = 0.0
    assert_matches_reference(inputs, keep=keep, act=act)


def test_triton_ratio_one_has_no_ghost_units():
    assert_matches_reference(make_inputs(2, 4, 12, 1, True, "full"))


def test_triton_multiple_tiles_and_programs():
    """40 units in 16-wide tiles (3 tiles with a ragged last one) and 17 rows (two programs of 16)."""
    assert_matches_reference(make_inputs(17, 3, 40, 2, True, "full"), block_sizes=SMALL_BLOCKS)
    assert_matches_reference(make_inputs(17, 3, 40, 3, False, "intrinsic"), block_sizes=SMALL_BLOCKS, act="relu")


def test_triton_forward_without_grad_skips_saving():
    inputs = {k: v.detach() for k, v in make_inputs(2, 4, 20, 2, True, "full").items()}
    torch.testing.assert_close(ghost_gru_scan(**inputs, impl="triton"), ghost_gru_scan_torch(**inputs),
                               rtol=1e-5, atol=1e-6)


def test_lm_with_triton_kernel_matches_torch_path():
    def lm(kernels):
        config = ModelConfig(type="ghostrnn_lm", vocab_size=61, hidden_size=24, num_layers=2, num_heads=4,
                             kernels=kernels, document_masking=True,
                             ghostrnn=GhostRNNConfig(ratio=2, feed_ghost_back=True, gate_input="full"))
        config.validate()
        torch.manual_seed(0)
        return build_model(config)

    ids = torch.randint(0, 61, (2, 7))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 2, 2]])
    losses, grads = [], []
    for impl in ("torch", "triton"):
        model = lm(impl)
        out = model(ids, labels=ids, doc_ids=doc_ids)
        out.loss.backward()
        losses.append(out.loss)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, ref in grads[0].items():
        torch.testing.assert_close(grads[1][name], ref, rtol=1e-4, atol=1e-5, msg=name)


def test_dispatch_validates_inputs():
    inputs = {k: v.detach() for k, v in make_inputs(2, 3, 8, 2, True, "full").items()}
    with pytest.raises(ValueError, match="ghost_act"):
        ghost_gru_scan(**inputs, act="gelu")
    with pytest.raises(ValueError, match="unknown implementation"):
        ghost_gru_scan(**inputs, impl="cuda")
    with pytest.raises(ValueError, match="keep"):
        ghost_gru_scan(**inputs, keep=torch.ones(2, 4), impl="torch")
    with pytest.raises(ValueError, match="block_sizes"):
        ghost_gru_scan(**inputs, impl="triton", block_sizes={"BLOCK_M": 24})
    bad = dict(inputs, gx=inputs["gx"][..., :-1])
    with pytest.raises(ValueError, match="gx"):
        ghost_gru_scan(**bad, impl="torch")
    # auto picks torch on CPU tensors, so it matches the reference bit for bit.
    assert torch.equal(ghost_gru_scan(**inputs, impl="auto"), ghost_gru_scan_torch(**inputs))


# ---- GPU tier --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("feed, gate", [(True, "full"), (True, "intrinsic"), (False, "intrinsic")])
def test_gpu_fp32_matches_reference(feed, gate):
    inputs = make_inputs(64, 48, 256, 2, feed, gate, device="cuda")
    keep = (torch.rand(64, 48, device="cuda") > 0.05).float()
    assert_matches_reference(inputs, keep=keep, atol=1e-4)


@pytest.mark.gpu
def test_gpu_auto_uses_triton_and_bf16_error_within_twice_torch():
    """FlashAttention's rule: the kernel's bf16 error against an fp32 reference is at most 2x (3x for gradients)
    the error of the torch path run in bf16."""
    fp32 = make_inputs(32, 64, 256, 2, True, "full", device="cuda")
    bf16 = {k: v.detach().bfloat16().requires_grad_() for k, v in fp32.items()}
    ref_out, ref_grads = forward_and_grads(fp32, "torch")
    torch_out, torch_grads = forward_and_grads(bf16, "torch")
    out, grads = forward_and_grads(bf16, "auto")
    assert out.grad_fn is not None and "GhostGRUScanTriton" in type(out.grad_fn).__name__
    assert_within_reference_error("out", out, torch_out, ref_out, FORWARD_FACTOR)
    for name in ref_grads:
        assert_within_reference_error(f"grad of {name}", grads[name], torch_grads[name], ref_grads[name],
                                      GRADIENT_FACTOR, floor=1e-5)


@pytest.mark.gpu
def test_gpu_ratio_one_matches_cudnn_gru():
    gru = torch.nn.GRU(128, 256, num_layers=2, batch_first=True).cuda()
    ghost = GhostGRU(128, 256, 2, ratio=1, impl="triton").cuda().load_gru_(gru)
    x = torch.randn(16, 40, 128, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref, _ = gru(x)
    out, _ = ghost(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)

"""RoPE: Triton (interpreter on CPU) against the torch reference, RoPE's defining properties and float64 gradcheck;
in place on projection outputs viewed as heads."""
import pytest
import torch

from fuxi import kernels
from fuxi.kernels.rope import apply_rope_torch, rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tables(batch, seq, head_dim, theta=10_000.0, per_batch=False):
    if per_batch:  # packed documents: positions restart per row
        positions = torch.stack([torch.arange(seq), torch.arange(seq).flip(0)])[:batch].to(DEVICE)
    else:
        positions = torch.arange(seq, device=DEVICE)[None]
    return rope_cos_sin(positions, head_dim, theta)


def _run(fn, q, k, dq, dk):
    q.grad = k.grad = None
    qo, ko = fn(q, k)
    torch.autograd.backward([qo, ko], [dq, dk])
    return qo.detach(), ko.detach(), q.grad.clone(), k.grad.clone()


# (batch, seq, q heads, k heads, head_dim, cos/sin per batch row); head_dim 96: half 48, a masked tile.
@pytest.mark.parametrize("batch,seq,heads_q,heads_k,head_dim,per_batch", [
    (1, 1, 1, 1, 2, False), (2, 7, 3, 3, 16, False), (2, 7, 3, 3, 16, True), (1, 33, 4, 2, 96, False),
    (2, 33, 5, 5, 128, False), (2, 33, 5, 5, 128, True)])
def test_rope_matches_reference(batch, seq, heads_q, heads_k, head_dim, per_batch):
    cos, sin = _tables(batch, seq, head_dim, per_batch=per_batch)
    q = torch.randn(batch, seq, heads_q, head_dim, device=DEVICE, requires_grad=True)
    k = torch.randn(batch, seq, heads_k, head_dim, device=DEVICE, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    got = _run(lambda a, b: kernels.apply_rope(a, b, cos, sin, impl="triton"), q, k, dq, dk)
    want = _run(lambda a, b: apply_rope_torch(a, b, cos, sin), q, k, dq, dk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rope_properties_theta_from_config():
    """Independent of the reference: rotations keep norms and make <R_m q, R_n k> depend on m - n only."""
    head_dim, theta = 64, 500_000.0
    positions = torch.tensor([[3, 10, 40, 47]], device=DEVICE)
    cos, sin = rope_cos_sin(positions, head_dim, theta)
    q = torch.randn(1, 1, 1, head_dim, device=DEVICE).expand(1, 4, 1, head_dim).contiguous()
    k = torch.randn(1, 1, 1, head_dim, device=DEVICE).expand(1, 4, 1, head_dim).contiguous()
    qo, ko = kernels.apply_rope(q, k, cos, sin, impl="triton")
    torch.testing.assert_close(qo.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # positions 10 - 3 == 47 - 40: same relative offset, same score.
    s1 = (qo[0, 1, 0] * ko[0, 0, 0]).sum()
    s2 = (qo[0, 3, 0] * ko[0, 2, 0]).sum()
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-5)
    # theta matters: a different theta gives a different rotation.
    cos2, sin2 = rope_cos_sin(positions, head_dim, 10_000.0)
    assert (kernels.apply_rope(q, k, cos2, sin2, impl="triton")[0] - qo).abs().max() > 1e-2


def test_rope_in_place_on_projection_views():
    batch, seq, heads, head_dim = 2, 7, 3, 16
    hidden = heads * head_dim
    x = torch.randn(batch, seq, hidden, device=DEVICE)
    proj_q = torch.nn.Linear(hidden, hidden).to(DEVICE)
    proj_k = torch.nn.Linear(hidden, hidden).to(DEVICE)
    cos, sin = _tables(batch, seq, head_dim)
    dq = torch.randn(batch, seq, heads, head_dim, device=DEVICE)
    dk = torch.randn(batch, seq, heads, head_dim, device=DEVICE)

    def forward(inplace, impl):
        proj_q.zero_grad()
        proj_k.zero_grad()
        q = proj_q(x).view(batch, seq, heads, head_dim)
        k = proj_k(x).view(batch, seq, heads, head_dim)
        ptr = q.data_ptr()
        qo, ko = kernels.apply_rope(q, k, cos, sin, impl=impl, inplace=inplace)
        torch.autograd.backward([qo, ko], [dq, dk])
        return qo.detach(), ko.detach(), proj_q.weight.grad.clone(), proj_k.bias.grad.clone(), qo.data_ptr() == ptr

    *got, in_place = forward(True, "triton")
    *want, _ = forward(False, "torch")
    assert in_place
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rope_strided_heads_layout():
    """q given as a transposed [B, H, T, D] tensor (non-contiguous), as some attention code produces."""
    cos, sin = _tables(2, 9, 32)
    q = torch.randn(2, 4, 9, 32, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 4, 9, 32, device=DEVICE).transpose(1, 2).requires_grad_()
    dq, dk = torch.randn(2, 9, 4, 32, device=DEVICE), torch.randn(2, 9, 4, 32, device=DEVICE)
    got = _run(lambda a, b: kernels.apply_rope(a, b, cos, sin, impl="triton"), q, k, dq, dk)
    want = _run(lambda a, b: apply_rope_torch(a, b, cos, sin), q, k, dq, dk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rope_float64_gradcheck():
    cos, sin = rope_cos_sin(torch.arange(5, device=DEVICE)[None], 8, 10_000.0, torch.float64)
    q = torch.randn(2, 5, 3, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 1, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kernels.apply_rope(a, b, cos, sin, impl="triton"), (q, k),
                                    fast_mode=True)


def test_rope_bad_shapes():
    cos, sin = _tables(1, 7, 16)
    q = torch.randn(1, 7, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="cos must be"):
        kernels.apply_rope(q, q, cos[:, :5], sin, impl="torch")
    with pytest.raises(ValueError, match="head_dim must be even"):
        kernels.apply_rope(q[..., :15], q[..., :15], cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="does not match q"):
        kernels.apply_rope(q, torch.randn(1, 6, 2, 16, device=DEVICE), cos, sin)

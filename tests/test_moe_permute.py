"""MoE token permutation (kernels/moe_permute.py): the torch reference against a plain loop over experts, and
the Triton kernels (CPU interpreter, fp32) against the torch reference, forward and backward."""
import pytest
import torch

from fuxi.kernels.moe_permute import combine_tokens, permute_tokens, source_tokens
from fuxi.model.moe import plan_dispatch


def _routing(num_tokens, top_k, num_experts, seed=0, empty_expert=None):
    """Distinct experts per token (as top-k gives), optionally never choosing one expert."""
    g = torch.Generator().manual_seed(seed)
    pool = [e for e in range(num_experts) if e != empty_expert]
    ids = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:top_k]]
                       for _ in range(num_tokens)])
    return ids, plan_dispatch(ids, num_experts)


def test_plan_sorts_by_expert_and_reference_matches_a_loop_over_experts():
    ids, plan = _routing(num_tokens=23, top_k=2, num_experts=5, empty_expert=3)
    x = torch.randn(23, 16)
    # Independent construction: for each expert in turn, its (token, k) pairs in token order.
    rows, owners = [], []
    for e in range(5):
        for t in range(23):
            for k in range(2):
                if ids[t, k] == e:
                    rows.append(x[t])
                    owners.append((t, k))
    expected = torch.stack(rows)
    assert plan.counts.tolist() == [int((ids == e).sum()) for e in range(5)] and plan.counts[3] == 0
    assert torch.equal(permute_tokens(x, plan.positions, impl="torch"), expected)
    for row, (t, k) in enumerate(owners):
        assert plan.positions[t, k] == row
    assert torch.equal(source_tokens(plan.positions), torch.tensor([t for t, _ in owners]))
    y = torch.randn(46, 16)
    w = torch.rand(23, 2)
    combined = combine_tokens(y, plan.positions, w, impl="torch")
    loop = torch.stack([sum(w[t, k] * y[plan.positions[t, k]] for k in range(2)) for t in range(23)])
    torch.testing.assert_close(combined, loop, rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_k, hidden", [(1, 64), (2, 80), (3, 40)])
def test_triton_matches_torch_forward_and_backward(top_k, hidden):
    ids, plan = _routing(num_tokens=37, top_k=top_k, num_experts=4, seed=top_k, empty_expert=1)
    x = torch.randn(37, hidden, requires_grad=True)
    out_tr = permute_tokens(x, plan.positions, impl="triton")
    out_ref = permute_tokens(x, plan.positions, impl="torch")
    assert torch.equal(out_tr, out_ref)  # a pure copy: bitwise
    grad = torch.randn_like(out_ref)
    (gx_tr,) = torch.autograd.grad(out_tr, x, grad)
    (gx_ref,) = torch.autograd.grad(out_ref, x, grad)
    torch.testing.assert_close(gx_tr, gx_ref, rtol=1e-6, atol=1e-6)

    y = torch.randn(37 * top_k, hidden, requires_grad=True)
    w = torch.rand(37, top_k, requires_grad=True)
    c_tr = combine_tokens(y, plan.positions, w, impl="triton")
    c_ref = combine_tokens(y, plan.positions, w, impl="torch")
    torch.testing.assert_close(c_tr, c_ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(c_ref)
    gy_tr, gw_tr = torch.autograd.grad(c_tr, (y, w), grad)
    gy_ref, gw_ref = torch.autograd.grad(c_ref, (y, w), grad)
    assert torch.equal(gy_tr, gy_ref)  # w * dout, one product per element either way
    torch.testing.assert_close(gw_tr, gw_ref, rtol=1e-5, atol=1e-5)


def test_triton_gradients_match_finite_differences():
    """Both maps are linear in each argument, so fp32 central differences with a large step are exact up to
    rounding: the Triton backward is checked against the forward alone."""
    _, plan = _routing(num_tokens=5, top_k=2, num_experts=3, seed=7)
    y = torch.randn(10, 6, requires_grad=True)
    w = torch.rand(5, 2, requires_grad=True)
    x = torch.randn(5, 6, requires_grad=True)
    tol = dict(eps=1e-2, atol=1e-3, rtol=1e-3, fast_mode=True)
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(lambda y, w: combine_tokens(y, plan.positions, w, impl="triton"), (y, w),
                                        **tol)
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(lambda x: permute_tokens(x, plan.positions, impl="triton"), (x,), **tol)


def test_bad_inputs_name_the_argument():
    _, plan = _routing(num_tokens=4, top_k=2, num_experts=3)
    with pytest.raises(ValueError, match="positions must be \\[5 tokens"):
        permute_tokens(torch.randn(5, 8), plan.positions, impl="torch")
    with pytest.raises(ValueError, match="weights .* must match"):
        combine_tokens(torch.randn(8, 8), plan.positions, torch.rand(4, 3), impl="torch")
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        permute_tokens(torch.randn(4, 8), plan.positions, impl="cuda")


@pytest.mark.gpu
def test_triton_bf16_on_gpu_matches_fp32_reference():
    ids, plan = _routing(num_tokens=4096, top_k=2, num_experts=8)
    plan = type(plan)(plan.positions.cuda(), plan.counts.cuda())
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(permute_tokens(x, plan.positions, impl="triton"),
                       permute_tokens(x, plan.positions, impl="torch"))
    y = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(4096, 2, device="cuda")
    ref = combine_tokens(y.float(), plan.positions, w, impl="torch")
    out = combine_tokens(y, plan.positions, w, impl="triton")
    # fp32 accumulation, one rounding: within bf16 rounding of the fp32 result.
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=8e-3)

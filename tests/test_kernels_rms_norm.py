"""RMSNorm and fused add+RMSNorm: Triton (interpreter on CPU) against the torch reference and float64 gradcheck."""
import pytest
import torch

from fuxi import kernels
from fuxi.kernels.rms_norm import add_rms_norm_torch, rms_norm_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def _inputs(shape, dtype=torch.float32):
    x = torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (1.0 + 0.2 * torch.randn(shape[-1], device=DEVICE, dtype=dtype)).requires_grad_()
    return x, w


def _grads(fn, inputs, grad_outputs):
    for t in inputs:
        t.grad = None
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grad_outputs)
    return [o.detach() for o in outs], [t.grad.clone() for t in inputs]


# rows 1, 7, 33 and 300 (300 rows forces several programs, so the per-program weight-gradient partials are
# really reduced across programs); hidden 96 and 1000 (not powers of two: masked tails).
@pytest.mark.parametrize("rows", [1, 7, 33, 300])
@pytest.mark.parametrize("hidden", [96, 1000])
def test_rms_norm_matches_reference(rows, hidden):
    x, w = _inputs((rows, hidden))
    dy = torch.randn(rows, hidden, device=DEVICE)
    (y_t,), (dx_t, dw_t) = _grads(lambda: kernels.rms_norm(x, w, EPS, impl="triton"), [x, w], [dy])
    (y_r,), (dx_r, dw_r) = _grads(lambda: rms_norm_torch(x, w, EPS), [x, w], [dy])
    torch.testing.assert_close(y_t, y_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_t, dx_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw_t, dw_r, atol=1e-4 * max(1, rows / 32), rtol=1e-5)


def test_rms_norm_3d_and_strided_input():
    base = torch.randn(2, 9, 200, device=DEVICE)
    x = base[:, 1:, :96].detach().requires_grad_()  # non-contiguous rows: stride 200 along hidden rows
    w = torch.randn(96, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 8, 96, device=DEVICE)
    (y_t,), g_t = _grads(lambda: kernels.rms_norm(x, w, EPS, impl="triton"), [x, w], [dy])
    (y_r,), g_r = _grads(lambda: rms_norm_torch(x, w, EPS), [x, w], [dy])
    assert y_t.shape == (2, 8, 96)
    torch.testing.assert_close(y_t, y_r, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_t, g_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rms_norm_definition():
    """Independent of the reference: unit RMS per row when the weight is one."""
    x = 3.0 * torch.randn(7, 1000, device=DEVICE)
    y = kernels.rms_norm(x, torch.ones(1000, device=DEVICE), 1e-12, impl="triton")
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(7, device=DEVICE), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 7, 33])
def test_add_rms_norm_matches_reference(rows):
    hidden = 1000 if rows == 7 else 96
    x, w = _inputs((rows, hidden))
    res = torch.randn(rows, hidden, device=DEVICE, requires_grad=True)
    dy, dres = torch.randn(rows, hidden, device=DEVICE), torch.randn(rows, hidden, device=DEVICE)
    outs_t, g_t = _grads(lambda: kernels.add_rms_norm(x, res, w, EPS, impl="triton"), [x, res, w], [dy, dres])
    outs_r, g_r = _grads(lambda: add_rms_norm_torch(x, res, w, EPS), [x, res, w], [dy, dres])
    for a, b in zip(outs_t + g_t, outs_r + g_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_add_rms_norm_only_normed_output_used_and_no_residual():
    x, w = _inputs((7, 96))
    res = torch.randn(7, 96, device=DEVICE, requires_grad=True)
    dy = torch.randn(7, 96, device=DEVICE)
    _, g_t = _grads(lambda: kernels.add_rms_norm(x, res, w, EPS, impl="triton")[0], [x, res, w], [dy])
    _, g_r = _grads(lambda: add_rms_norm_torch(x, res, w, EPS)[0], [x, res, w], [dy])
    for a, b in zip(g_t, g_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    normed, new_res = kernels.add_rms_norm(x, None, w, EPS, impl="triton")
    assert new_res is x
    torch.testing.assert_close(normed, rms_norm_torch(x, w, EPS), atol=1e-5, rtol=1e-5)


def test_rms_norm_float64_gradcheck():
    x = torch.randn(5, 13, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kernels.rms_norm(a, b, EPS, impl="triton"), (x, w),
                                    fast_mode=True)
    res = torch.randn(5, 13, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, r, b: kernels.add_rms_norm(a, r, b, EPS, impl="triton"),
                                    (x, res, w), fast_mode=True)


def test_rms_norm_bad_shapes_name_the_argument():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        kernels.rms_norm(x, torch.ones(2, 4, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="last dimension 8, expected 9"):
        kernels.rms_norm(x, torch.ones(9, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="residual shape"):
        kernels.add_rms_norm(x, torch.randn(3, 9, device=DEVICE), torch.ones(8, device=DEVICE), EPS)

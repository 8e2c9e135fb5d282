"""Bias + tanh-GELU: Triton (interpreter on CPU) against the torch reference, torch's own tanh GELU and float64
gradcheck."""
import pytest
import torch
import torch.nn.functional as F

from fuxi import kernels
from fuxi.kernels.gelu import BWD_CONFIGS, FWD_CONFIGS, bias_gelu_backward, bias_gelu_forward, bias_gelu_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(fn, x, b, dy):
    x.grad = None
    if b is not None:
        b.grad = None
    y = fn(x, b)
    y.backward(dy)
    return y.detach(), x.grad.clone(), (b.grad.clone() if b is not None else None)


# 300 x 1000 splits the rows over several programs, so the bias-gradient partials are reduced across them.
@pytest.mark.parametrize("rows", [1, 7, 33, 300])
@pytest.mark.parametrize("cols", [96, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_matches_reference(rows, cols, with_bias):
    x = (2.0 * torch.randn(rows, cols, device=DEVICE)).requires_grad_()
    b = torch.randn(cols, device=DEVICE, requires_grad=True) if with_bias else None
    dy = torch.randn(rows, cols, device=DEVICE)
    y_t, dx_t, db_t = _run(lambda a, c: kernels.bias_gelu(a, c, impl="triton"), x, b, dy)
    y_r, dx_r, db_r = _run(bias_gelu_torch, x, b, dy)
    torch.testing.assert_close(y_t, y_r, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dx_t, dx_r, atol=1e-5, rtol=1e-5)
    if with_bias:
        torch.testing.assert_close(db_t, db_r, atol=1e-4 * max(1, rows / 32), rtol=1e-5)


@pytest.mark.parametrize("config", range(max(len(FWD_CONFIGS), len(BWD_CONFIGS))))
def test_every_gpu_launch_config_is_correct(config):
    """The tiles the GPU autotuner chooses from, each run as a fixed launch (under the interpreter on CPU):
    a width that no column block divides and row counts that leave partial tiles and idle row groups."""
    rows, cols = 37, 1000
    x = 2.0 * torch.randn(rows, cols, device=DEVICE)
    b = torch.randn(cols, device=DEVICE)
    dy = torch.randn(rows, cols, device=DEVICE)
    xr = x.clone().requires_grad_()
    br = b.clone().requires_grad_()
    ref = bias_gelu_torch(xr, br)
    ref.backward(dy)
    fwd_meta, fwd_warps = FWD_CONFIGS[config % len(FWD_CONFIGS)]
    y = bias_gelu_forward(x, b, torch.float32, tile={**fwd_meta, "num_warps": fwd_warps})
    torch.testing.assert_close(y, ref.detach(), atol=2e-6, rtol=1e-5)
    bwd_meta, bwd_warps = BWD_CONFIGS[config % len(BWD_CONFIGS)]
    dx, db = bias_gelu_backward(dy, x, b, tile={**bwd_meta, "num_warps": bwd_warps})
    torch.testing.assert_close(dx, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, br.grad, atol=1e-4, rtol=1e-5)


def test_autotuned_launch_path_with_a_cpu_timer(monkeypatch):
    """The GPU launch path (the autotuner choosing among the configs, grids from the chosen tile, row groups from
    the SM count) under the interpreter, with a CPU timer in place of the CUDA-event benchmarker; a second row
    count in another power-of-two bucket is tuned anew (one expert's few rows must not fix the launch for the
    full batch), a third in the same bucket reuses the choice."""
    import time

    from fuxi.kernels import gelu
    from fuxi.kernels.triton_runtime import ROWS_BUCKET_CAP, autotuned

    def cpu_timer(fn, quantiles):
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return [ms] * len(quantiles)

    fwd = autotuned(gelu._bias_gelu_fwd_kernel, FWD_CONFIGS, key=gelu.TUNING_KEY, do_bench=cpu_timer)
    bwd = autotuned(gelu._bias_gelu_bwd_kernel, BWD_CONFIGS, key=gelu.TUNING_KEY, do_bench=cpu_timer)
    monkeypatch.setattr(gelu, "sm_count", lambda tensor: 132)  # an H100's
    b = torch.randn(1000, device=DEVICE)
    for rows, tuned_shapes in ((70, 1), (20, 2), (17, 2)):  # buckets 128, 32, 32
        x = 2.0 * torch.randn(rows, 1000, device=DEVICE)
        dy = torch.randn(rows, 1000, device=DEVICE)
        xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
        ref = bias_gelu_torch(xr, br)
        ref.backward(dy)
        y = bias_gelu_forward(x, b, torch.float32, tuned=fwd)
        dx, db = bias_gelu_backward(dy, x, b, tuned=bwd)
        assert len(fwd.cache) == len(bwd.cache) == tuned_shapes
        torch.testing.assert_close(y, ref.detach(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(dx, xr.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(db, br.grad, atol=1e-4, rtol=1e-5)
    assert gelu.rows_bucket(17) == gelu.rows_bucket(20) == 32 and gelu.rows_bucket(10**6) == ROWS_BUCKET_CAP


def test_bias_gelu_is_torch_tanh_gelu_on_3d_input():
    """Independent reference: torch's F.gelu(approximate='tanh') of x + b, and its autograd gradients."""
    x = (3.0 * torch.randn(2, 7, 96, device=DEVICE)).requires_grad_()
    b = torch.randn(96, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 7, 96, device=DEVICE)
    y_t, dx_t, db_t = _run(lambda a, c: kernels.bias_gelu(a, c, impl="triton"), x, b, dy)
    y_r, dx_r, db_r = _run(lambda a, c: F.gelu(a + c, approximate="tanh"), x, b, dy)
    assert y_t.shape == (2, 7, 96)
    torch.testing.assert_close(y_t, y_r, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dx_t, dx_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db_t, db_r, atol=1e-4, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy; sigmoid -> 0
def test_bias_gelu_extreme_inputs_stay_finite():
    x = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4]], device=DEVICE, requires_grad=True)
    y = kernels.bias_gelu(x, None, impl="triton")
    y.sum().backward()
    torch.testing.assert_close(y.detach(), F.gelu(x.detach(), approximate="tanh"), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0, -0.0, 0.5, 1.0, 1.0, 1.0]], device=DEVICE),
                               atol=1e-4, rtol=0)


def test_bias_gelu_float64_gradcheck():
    x = torch.randn(7, 13, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: kernels.bias_gelu(a, c, impl="triton"), (x, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a: kernels.bias_gelu(a, None, impl="triton"), (x,), fast_mode=True)


def test_bias_gelu_bad_bias_shape():
    with pytest.raises(ValueError, match="last dimension 8, expected 9"):
        kernels.bias_gelu(torch.randn(3, 8, device=DEVICE), torch.zeros(9, device=DEVICE))

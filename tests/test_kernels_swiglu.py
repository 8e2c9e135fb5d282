"""SwiGLU (silu(gate) * up): Triton (interpreter on CPU) against the torch reference, a float64 closed form,
the halves of a fused gate_up projection read in place, and float64 gradcheck."""
import importlib
import time

import pytest
import torch

from fuxi import kernels
from fuxi.kernels.swiglu import BWD_CONFIGS, FWD_CONFIGS, as_rows, swiglu_backward, swiglu_forward, swiglu_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The module itself (the package attribute `kernels.swiglu` is the seam's function of the same name).
swiglu_module = importlib.import_module("fuxi.kernels.swiglu")


def _run(fn, gate, up, dy):
    gate.grad = up.grad = None
    y = fn(gate, up)
    y.backward(dy)
    return y.detach(), gate.grad.clone(), up.grad.clone()


def _triton(gate, up):
    return kernels.swiglu(gate, up, impl="triton")


def _inputs(*shape, dtype=torch.float32):
    gate = (3.0 * torch.randn(*shape, device=DEVICE, dtype=dtype)).requires_grad_()
    up = torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)
    return gate, up, torch.randn(*shape, device=DEVICE, dtype=dtype)


# Widths no tile divides (1, 96, 1000, 1,376 = 11008 / 8) and row counts that leave partial row tiles; 300 x 1000
# spans several programs in both grid dimensions.
@pytest.mark.parametrize("shape", [(1, 96), (1, 1000), (7, 1), (7, 96), (33, 1000), (300, 1000), (3, 5, 1376),
                                   (2, 1, 96)])
def test_swiglu_matches_reference(shape):
    gate, up, dy = _inputs(*shape)
    y_t, dg_t, du_t = _run(_triton, gate, up, dy)
    y_r, dg_r, du_r = _run(swiglu_torch, gate, up, dy)
    assert y_t.shape == shape and dg_t.shape == shape and du_t.shape == shape
    torch.testing.assert_close(y_t, y_r, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dg_t, dg_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(du_t, du_r, atol=1e-5, rtol=1e-5)


def test_swiglu_matches_the_float64_closed_form():
    """Independent reference: g / (1 + exp(-g)) * u and its derivatives written out, in float64."""
    gate, up, dy = _inputs(2, 7, 173)
    y_t, dg_t, du_t = _run(_triton, gate, up, dy)
    g, u, d = gate.detach().double(), up.detach().double(), dy.double()
    s = 1.0 / (1.0 + torch.exp(-g))
    torch.testing.assert_close(y_t.double(), g * s * u, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(du_t.double(), d * g * s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dg_t.double(), d * u * (s + g * s * (1.0 - s)), atol=1e-5, rtol=1e-5)


def test_halves_of_a_fused_gate_up_projection_are_read_in_place():
    """gate_up.chunk(2, -1) gives row-strided views: the kernel reads them without a copy, and the gradient of
    the fused tensor matches the reference's."""
    width = 173
    fused = torch.randn(3, 11, 2 * width, device=DEVICE, requires_grad=True)
    dy = torch.randn(3, 11, width, device=DEVICE)
    gate, up = fused.chunk(2, dim=-1)
    assert as_rows(gate).data_ptr() == gate.data_ptr() and as_rows(up).stride(0) == 2 * width
    _triton(gate, up).backward(dy)
    grad_t = fused.grad.clone()
    fused.grad = None
    gate, up = fused.chunk(2, dim=-1)
    y_r = swiglu_torch(gate, up)
    y_r.backward(dy)
    torch.testing.assert_close(_triton(*fused.detach().chunk(2, -1)), y_r.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad_t, fused.grad, atol=1e-5, rtol=1e-5)


def test_strided_last_dimension_and_one_input_needing_grad():
    """A transposed input (last dim strided) is copied, not misread; an input without requires_grad gets none."""
    gate = (3.0 * torch.randn(40, 9, device=DEVICE)).t()  # [9, 40], stride (1, 9)
    up = torch.randn(9, 40, device=DEVICE, requires_grad=True)
    dy = torch.randn(9, 40, device=DEVICE)
    y = _triton(gate, up)
    y.backward(dy)
    torch.testing.assert_close(y.detach(), swiglu_torch(gate, up).detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(up.grad, dy * torch.nn.functional.silu(gate), atol=1e-5, rtol=1e-5)
    assert gate.grad is None


@pytest.mark.parametrize("config", range(max(len(FWD_CONFIGS), len(BWD_CONFIGS))))
def test_every_gpu_launch_config_is_correct(config):
    """The tiles the GPU autotuner chooses from, each run as a fixed launch (under the interpreter on CPU), on
    row-strided inputs whose width no column block divides and whose rows leave partial tiles."""
    fused = 3.0 * torch.randn(37, 2 * 1000, device=DEVICE)
    gate, up = fused[:, :1000], fused[:, 1000:]
    dy = torch.randn(37, 1000, device=DEVICE)
    gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
    ref = swiglu_torch(gr, ur)
    ref.backward(dy)
    fwd_meta, fwd_warps = FWD_CONFIGS[config % len(FWD_CONFIGS)]
    y = swiglu_forward(gate, up, torch.float32, tile={**fwd_meta, "num_warps": fwd_warps})
    torch.testing.assert_close(y, ref.detach(), atol=2e-6, rtol=1e-5)
    bwd_meta, bwd_warps = BWD_CONFIGS[config % len(BWD_CONFIGS)]
    dgate, dup = swiglu_backward(dy, gate, up, tile={**bwd_meta, "num_warps": bwd_warps})
    torch.testing.assert_close(dgate, gr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dup, ur.grad, atol=1e-5, rtol=1e-5)


def test_autotuned_launch_path_with_a_cpu_timer():
    """The GPU launch path (the autotuner choosing among the configs, grids from the chosen tile) under the
    interpreter with a CPU timer in place of the CUDA-event benchmarker; a row count in another power-of-two
    bucket is tuned anew, one in the same bucket reuses the choice."""
    from fuxi.kernels.triton_runtime import autotuned

    def cpu_timer(fn, quantiles):
        start = time.perf_counter()
        fn()
        return [(time.perf_counter() - start) * 1e3] * len(quantiles)

    fwd = autotuned(swiglu_module._swiglu_fwd_kernel, FWD_CONFIGS, key=swiglu_module.TUNING_KEY, do_bench=cpu_timer)
    bwd = autotuned(swiglu_module._swiglu_bwd_kernel, BWD_CONFIGS, key=swiglu_module.TUNING_KEY, do_bench=cpu_timer)
    for rows, tuned_shapes in ((70, 1), (20, 2), (17, 2)):  # buckets 128, 32, 32
        gate, up, dy = (3.0 * torch.randn(rows, 600, device=DEVICE), torch.randn(rows, 600, device=DEVICE),
                        torch.randn(rows, 600, device=DEVICE))
        gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
        ref = swiglu_torch(gr, ur)
        ref.backward(dy)
        y = swiglu_forward(gate, up, torch.float32, tuned=fwd)
        dgate, dup = swiglu_backward(dy, gate, up, tuned=bwd)
        assert len(fwd.cache) == len(bwd.cache) == tuned_shapes
        torch.testing.assert_close(y, ref.detach(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(dgate, gr.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dup, ur.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy; sigmoid -> 0
def test_swiglu_extreme_inputs_stay_finite():
    gate = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4]], device=DEVICE, requires_grad=True)
    up = torch.full_like(gate, 2.0, requires_grad=True)
    y = _triton(gate, up)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), swiglu_torch(gate.detach(), up.detach()), atol=1e-6, rtol=1e-6)
    # d/dg = 2 (s + g s (1 - s)): 0 far left, 1 at 0, 2 far right; d/du = silu(g).
    torch.testing.assert_close(gate.grad, torch.tensor([[0.0, 0.0, -0.05309, 1.0, 2.05309, 2.0, 2.0]], device=DEVICE),
                               atol=1e-4, rtol=0)
    assert torch.isfinite(up.grad).all()


def test_swiglu_float64_gradcheck():
    gate = torch.randn(7, 13, device=DEVICE, dtype=torch.float64, requires_grad=True)
    up = torch.randn(7, 13, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_triton, (gate, up), fast_mode=True)


def test_swiglu_dispatch_and_bad_shapes():
    gate, up = torch.randn(4, 10), torch.randn(4, 10)
    assert torch.equal(kernels.swiglu(gate, up, impl="torch"), swiglu_torch(gate, up))
    assert torch.equal(kernels.swiglu(gate, up, impl="auto"), swiglu_torch(gate, up))  # CPU tensors: torch path
    assert kernels.swiglu(torch.empty(0, 10), torch.empty(0, 10), impl="triton").shape == (0, 10)
    with pytest.raises(ValueError, match=r"kernels.swiglu: gate shape \(4, 10\) differs from up \(4, 9\)"):
        kernels.swiglu(gate, torch.randn(4, 9))
    with pytest.raises(ValueError, match="differs from up"):
        kernels.swiglu(gate, torch.randn(10), impl="triton")  # no broadcasting

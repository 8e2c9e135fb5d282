"""The kernels seam: how `impl` resolves, and the error where Triton cannot run."""
import os
import subprocess
import sys

import pytest
import torch

from fuxi import kernels
from fuxi.kernels.rms_norm import rms_norm_torch


def test_impl_resolution_on_cpu():
    x = torch.randn(3, 8)
    assert kernels.use_triton("torch", x) is False
    assert kernels.use_triton("auto", x) is False  # auto: Triton only for CUDA tensors
    if not torch.cuda.is_available():
        assert kernels.use_triton("triton", x) is True  # conftest set TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="unknown implementation 'fast'"):
        kernels.use_triton("fast", x)
    w = torch.randn(8)
    assert torch.equal(kernels.rms_norm(x, w, 1e-5, impl="auto"), rms_norm_torch(x, w, 1e-5))


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = ("import torch\nfrom fuxi import kernels\n"
            "try:\n"
            "    kernels.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-5, impl='triton')\n"
            "except RuntimeError as e:\n"
            "    print('ERROR', e)\n"
            "print('AUTO', kernels.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-5, impl='auto').shape)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "ERROR kernels.rms_norm: impl='triton' on a cpu tensor needs a CUDA device, or TRITON_INTERPRET=1" \
        in out.stdout
    assert "AUTO torch.Size([2, 4])" in out.stdout

"""Where Triton kernels can run, and launch settings shared by every kernel file.

A `@triton.jit` function can be *defined* on any machine with triton installed; *launching* it needs a CUDA
device, or the CPU interpreter (`TRITON_INTERPRET=1`, read when triton is first imported, so it must be set
before `kernels` is imported; tests/conftest.py does that).
"""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel files)

    HAS_TRITON = True
except ImportError:  # triton has no wheels for macOS/Windows: the torch paths still work there
    # Just enough for the kernel files to be *defined*; can_launch() is False, so none is ever called.
    triton = SimpleNamespace(jit=lambda fn=None, **options: fn if fn is not None else (lambda f: f), cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=int, float32=None, float64=None)
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_launch(tensor: torch.Tensor) -> bool:
    """True when a Triton kernel can run on `tensor`'s device in this process."""
    return HAS_TRITON and (tensor.is_cuda or (INTERPRET and tensor.device.type == "cpu"))


def check_launchable(tensor: torch.Tensor, kernel: str) -> None:
    """Raise a clear error for impl='triton' where Triton cannot run, instead of triton's '0 active drivers'."""
    if not HAS_TRITON:
        raise RuntimeError(f"kernels.{kernel}: impl='triton' but triton is not installed; use impl='torch'")
    if not can_launch(tensor):
        raise RuntimeError(
            f"kernels.{kernel}: impl='triton' on a {tensor.device.type} tensor needs a CUDA device, or "
            "TRITON_INTERPRET=1 set in the environment before `kernels` is imported (CPU interpreter, for "
            "tests); use impl='auto' or 'torch' otherwise")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_warps_for(block_elems: int) -> int:
    """Warps for a program that touches `block_elems` elements at once (Liger/Triton-tutorial heuristic)."""
    if block_elems >= 32768:
        return 32
    if block_elems >= 8192:
        return 16
    if block_elems >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(tensor: torch.Tensor, work_items: int) -> int:
    """Programs for a kernel that loops over `work_items` and reduces per program (weight/bias gradients).

    On a GPU: a couple of waves over the SMs. Under the interpreter every program instance costs about
    1.7 ms, so a handful.
    """
    if tensor.is_cuda:
        return max(1, min(work_items, 2 * sm_count(tensor)))
    return max(1, min(work_items, 4))


def sm_count(tensor: torch.Tensor) -> int:
    """Streaming multiprocessors of `tensor`'s CUDA device."""
    return _sm_count(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())


def autotuned(kernel, configs: list[tuple[dict, int]], key: list[str], do_bench=None):
    """`kernel` wrapped in @triton.autotune over `configs` ((meta-parameters, num_warps) pairs), keyed on the
    argument names in `key`. None under the interpreter or without triton unless `do_bench` (a CPU timer,
    `fn, quantiles -> ms`) is given: the autotuner's default benchmarker times with CUDA events. Callers launch
    the tuned kernel on CUDA tensors and otherwise the plain kernel with meta-parameters of their own. Only for
    kernels that overwrite their outputs: the autotuner runs every config on the real arguments."""
    if not HAS_TRITON or (INTERPRET and do_bench is None):
        return None
    return triton.autotune(configs=[triton.Config(meta, num_warps=warps) for meta, warps in configs],
                           key=key, do_bench=do_bench)(kernel)


def rows_per_program(block_cols: int, tensor: torch.Tensor, n_rows: int | None = None) -> int:
    """Rows one program handles in a row-wise kernel (a power of two). On a GPU a wide row is one program's
    work (a few rows when rows are narrow); under the interpreter, where every program instance and every op
    has a fixed cost, pack as many rows as fit a 64K-element tile."""
    if tensor.is_cuda:
        return max(1, min(16, 4096 // block_cols))
    cap = next_power_of_2(n_rows) if n_rows else 1 << 30
    return max(1, min(cap, 65536 // block_cols))


ROWS_BUCKET_CAP = 8192


def rows_bucket(n_rows: int) -> int:
    """The row count's power-of-two bucket, part of the autotuning key of the 2-D-tiled elementwise kernels
    (bias-GELU, SwiGLU): in the MoE expert loop one width sees a few dozen rows (one expert's tokens) and the
    full batch, which want different tiles (and bias-GELU's backward row-group count depends on the rows), so
    the first call must not fix the launch for every row count. Capped: past 8K rows the choice no longer
    changes, and each new bucket costs a tuning run."""
    return min(next_power_of_2(n_rows), ROWS_BUCKET_CAP)


def interpreter_tile(n_rows: int, n_cols: int) -> dict:
    """A 2-D tile for the interpreter, where each program instance has a fixed cost: few, large (64K-element)
    tiles."""
    block_n = min(1024, next_power_of_2(n_cols))
    return dict(BLOCK_M=max(1, min(next_power_of_2(n_rows), 65536 // block_n)), BLOCK_N=block_n, num_warps=4)


def compute_dtype(dtype: torch.dtype):
    """The Triton type kernels do arithmetic in: fp64 for fp64 tensors (float64 gradcheck), else fp32.

    Kernels never do arithmetic on bf16/fp16 values: they load, convert, compute, and round on store (the
    interpreter's bf16 arithmetic is wrong, and rounding once is also what the fused kernels are for).
    """
    return tl.float64 if dtype == torch.float64 else tl.float32


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch dtype of per-row statistics (rstd, log-sum-exp) and partial reductions for `dtype` inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32

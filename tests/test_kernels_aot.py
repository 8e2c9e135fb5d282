"""Ahead-of-time compile of every Triton kernel for Hopper (sm_90) and Ampere (sm_80), no GPU needed.

Triton's own compiler and bundled ptxas build each kernel at the launch options the project uses on a GPU
(every autotune config; the tiles the benches' shapes give: 8B widths 4,096/14,336, V = 250,752, GhostGRU at
H = 512), and the wheel's cuobjdump reads the cubin's resource usage. A kernel fails on a compile error,
on more shared memory per block than the target has (sm_90: 227 KB = 232,448 B opt-in; sm_80: 163 KB =
166,912 B), or on more than SPILL_LIMIT bytes of register spills (ptxas reports them as the stack frame,
STACK, and local memory, LOCAL).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

import importlib  # noqa: E402

# By module path: `fuxi.kernels` re-exports functions named like some of its modules (swiglu, rms_norm, ...).
cross_entropy, gelu, ghost_gru, moe_permute, rms_norm, rope, swiglu = (
    importlib.import_module(f"fuxi.kernels.{name}")
    for name in ("cross_entropy", "gelu", "ghost_gru", "moe_permute", "rms_norm", "rope", "swiglu"))
from fuxi.kernels.ghost_gru import _block_sizes  # noqa: E402
from fuxi.kernels.triton_runtime import next_power_of_2, num_warps_for  # noqa: E402

SPILL_LIMIT = 16  # bytes
SHARED_LIMIT = {90: 232_448, 80: 166_912}  # max dynamic shared memory per block (opt-in), bytes
TARGETS = (90, 80)
FLOATS = {"eps", "z_loss"}


def _nvidia_backend():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as exc:
        return None, f"triton {triton.__version__} has no NVIDIA backend ({exc})"
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return None, f"triton {triton.__version__} ships no cuobjdump at {cuobjdump}"
    return (GPUTarget, cuobjdump), ""


def _signature(fn, consts: dict, pointers: dict) -> dict:
    """Argument types: constexprs; pointers (*_ptr names in kernels that use them, else upper-case names; bf16
    unless `pointers` says); float scalars; every other scalar i32."""
    ptr_suffix = any(name.endswith("_ptr") for name in fn.arg_names)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name.endswith("_ptr") if ptr_suffix else name.isupper():
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def _cases() -> list[tuple[str, object, dict, dict, int, int]]:
    """(id, kernel, constexprs, pointer types, num_warps, num_stages) as the project launches them on a GPU;
    num_warps may instead be a function of the target's arch giving both (GhostGRU's launch_options)."""
    f32 = triton.language.float32
    cases = []
    for module, fwd, bwd, extra in ((gelu, gelu._bias_gelu_fwd_kernel, gelu._bias_gelu_bwd_kernel,
                                     {"HAS_BIAS": True}),
                                    (swiglu, swiglu._swiglu_fwd_kernel, swiglu._swiglu_bwd_kernel, {})):
        for kernel, configs, ptrs in ((fwd, module.FWD_CONFIGS, {}),
                                      (bwd, module.BWD_CONFIGS, {"DB_PARTIAL": "*fp32"})):
            for meta, warps in configs:
                cases.append((f"{kernel.__name__}-{meta['BLOCK_M']}x{meta['BLOCK_N']}-w{warps}", kernel,
                              {**extra, "COMPUTE": f32, **meta}, ptrs, warps, 3))
    for width in (4096, 14336):  # 8B hidden size; MLP width (the norm only sees the hidden size)
        block_n = next_power_of_2(width)
        block_m = max(1, min(16, 4096 // block_n))
        if width == 4096:
            cases.append((f"rms_norm_fwd-{width}", rms_norm._rms_norm_fwd_kernel,
                          {"HAS_RESIDUAL": True, "COMPUTE": f32, "BLOCK_M": block_m, "BLOCK_N": block_n},
                          {"RSTD": "*fp32"}, num_warps_for(block_m * block_n), 3))
            cases.append((f"rms_norm_bwd-{width}", rms_norm._rms_norm_bwd_kernel,
                          {"HAS_DRES": True, "COMPUTE": f32, "BLOCK_M": block_m, "BLOCK_N": block_n},
                          {"RSTD": "*fp32", "DW_PARTIAL": "*fp32"}, num_warps_for(block_m * block_n), 3))
    block_v = min(4096, next_power_of_2(250_752))  # cross_entropy._tiles on CUDA: a row per program
    ce_ptrs = {"LABELS": "*i64", "LSE": "*fp32", "TARGET": "*fp32", "SCALE": "*fp32"}
    for kernel in (cross_entropy._ce_block_stats_kernel, cross_entropy._ce_block_grad_kernel):
        cases.append((kernel.__name__, kernel, {"COMPUTE": f32, "BLOCK_M": 1, "BLOCK_V": block_v}, ce_ptrs,
                      num_warps_for(block_v), 3))
    half, heads = 64, 32  # head_dim 128, 32 query heads (8 KV heads)
    block_h = min(next_power_of_2(heads), max(1, 4096 // half))
    for backward in (False, True):
        cases.append((f"rope-bwd{int(backward)}", rope._rope_kernel,
                      {"HALF": half, "BLOCK_T": 1, "BLOCK_H": block_h, "BLOCK_D": half, "BACKWARD": backward,
                       "COMPUTE": f32}, {"COS": "*fp32", "SIN": "*fp32"}, num_warps_for(block_h * half), 3))
    hidden_block = min(next_power_of_2(4096), 1024)
    block_t = max(1, min(16, 4096 // hidden_block))
    tiles = {"TOP_K": 2, "BLOCK_T": block_t, "BLOCK_H": hidden_block}
    moe_ptrs = {"POS": "*i64", "W": "*fp32", "DW_PARTIAL": "*fp32"}
    cases += [("moe_scatter", moe_permute._scatter_rows_kernel, tiles, moe_ptrs, 4, 3),
              ("moe_gather", moe_permute._gather_sum_kernel, {"HAS_WEIGHTS": True, **tiles}, moe_ptrs, 4, 3),
              ("moe_combine_bwd", moe_permute._combine_bwd_kernel, {"COMPUTE_DW": True, **tiles}, moe_ptrs, 4, 3)]
    # GhostGRU at the bench's H = 512: ratio 1 (no ghosts), and ratio 2 in variants A (state H) and B (state m).
    for label, m, ghosts, state in (("s1", 512, 0, 512), ("s2A", 256, 256, 512), ("s2B", 256, 256, 256)):
        blocks = _block_sizes(m, ghosts, state, None)
        fwd_consts = {"ACT": 0, "HAS_RESET": False, "SAVE_GATES": True,
                      **{k: v for k, v in blocks.items() if k != "BLOCK_H"}}
        bwd_consts = {"ACT": 0, "HAS_RESET": False, "FEED_GHOSTS": state == m + ghosts and ghosts > 0, **blocks}
        for kernel, consts in ((ghost_gru._ghost_gru_fwd_kernel, fwd_consts),
                               (ghost_gru._ghost_gru_bwd_kernel, bwd_consts)):
            cases.append((f"{kernel.__name__}-{label}", kernel, consts, {}, ghost_gru.launch_options, None))
    # The fp32 GhostGRU pointers: every *_ptr of the GhostGRU kernels is fp32 in the bench.
    return [(i, k, c, (p if not k.__name__.startswith("_ghost") else
                       {n: "*fp32" for n in k.arg_names if n.endswith("_ptr")}), w, s) for i, k, c, p, w, s in cases]


CASES = _cases()


def compile_all() -> dict:
    """Compile each case once per target: {"case id|arch": {"usage": {...}, "shared": bytes} or {"error": str}}.

    Runs in a child process (the test below): under TRITON_INTERPRET=1, which the test session sets, @triton.jit
    gives interpreter functions that cannot be compiled."""
    backend, reason = _nvidia_backend()
    if backend is None:
        return {"skip": reason}
    gpu_target, cuobjdump = backend
    results, done = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case_id, kernel, consts, ptrs, warps, stages in CASES:
            sig = _signature(kernel, consts, ptrs)
            for arch in TARGETS:
                key = f"{case_id}|{arch}"
                options = warps(arch) if callable(warps) else {"num_warps": warps, "num_stages": stages}
                same = (kernel.__name__, repr(sorted(sig.items())), repr(sorted(consts.items())),
                        repr(sorted(options.items())), arch)
                if same in done:  # e.g. GhostGRU's forward in variants A and B: one compile
                    results[key] = results[done[same]]
                    continue
                done[same] = key
                try:
                    out = triton.compile(triton.compiler.ASTSource(kernel, sig, consts),
                                         target=gpu_target("cuda", arch, 32), options=options)
                except Exception as exc:  # noqa: BLE001 - any compile failure is this test's finding
                    results[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                    continue
                results[key] = {"usage": _resource_usage(cuobjdump, out.asm["cubin"]),
                                "shared": out.metadata.shared}
    return results


def _resource_usage(cuobjdump: Path, cubin: bytes) -> dict:
    """REG/STACK/SHARED/LOCAL of the cubin's one function, as cuobjdump --dump-resource-usage prints them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return usage


def test_every_kernel_compiles_for_sm90_and_sm80_within_limits():
    """One test over all cases, so that pytest-xdist's workers do not each compile everything; the failure
    message lists every case over a limit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"compile child failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    assert len(results) == len(CASES) * len(TARGETS)
    problems = []
    for key, result in results.items():
        case_id, arch = key.rsplit("|", 1)
        arch = int(arch)
        if "error" in result:
            problems.append(f"{case_id} does not compile for sm_{arch}: {result['error']}")
            continue
        usage, shared = result["usage"], result["shared"]
        if shared + usage["SHARED"] > SHARED_LIMIT[arch]:
            problems.append(f"{case_id} sm_{arch}: {shared + usage['SHARED']} B shared memory > "
                            f"{SHARED_LIMIT[arch]} B")
        spills = usage["STACK"] + usage["LOCAL"]
        if spills > SPILL_LIMIT:
            problems.append(f"{case_id} sm_{arch}: {spills} B of spills (STACK {usage['STACK']}, LOCAL "
                            f"{usage['LOCAL']}, {usage['REG']} registers) > {SPILL_LIMIT} B")
    assert not problems, "\n".join(problems)


def test_every_triton_kernel_is_covered():
    """Each @triton.jit kernel launched by the project (top-level *_kernel functions) has a case here."""
    covered = {kernel.__name__ for _, kernel, *_ in CASES}
    launched = set()
    for module in (cross_entropy, gelu, ghost_gru, moe_permute, rms_norm, rope, swiglu):
        launched |= {name for name, obj in vars(module).items()
                     if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction")}
    assert launched and launched - covered == set()


if __name__ == "__main__":
    print(json.dumps(compile_all()))

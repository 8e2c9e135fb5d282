"""`fuxi bench kernels`: each fused kernel against eager PyTorch, torch.compile and Liger-Kernel (if installed).

For every kernel at FuxiTranyu-8B shapes (hidden 4096, ffn 16384, 32 heads x 128, vocab 250,680) and each
token count: forward, backward and full (forward + backward) time, the median of repeated runs
(triton.testing.do_bench on a GPU, perf_counter on a CPU); peak memory of the full pass above the inputs;
achieved GB/s from a minimal bytes-moved model (each input read once, each output written once) against the
measured copy bandwidth of the device. All providers of one shape run side by side in the same process.

On a CPU machine the Triton kernels would only run in the interpreter, so the benchmark runs the torch paths
(eager vs torch.compile) on a reduced set of shapes, and compares the fused loss's peak memory with eager at
vocab 250,680: each variant runs in its own fresh subprocess; before each forward + backward the process's
resident-set high-water mark is reset (/proc/self/clear_refs) and the peak is VmHWM after it minus VmRSS before
it (inputs allocated, weight gradient included for both variants).

Writes kernels.csv, kernels.md and kernels.png under --out; the last printed line is one JSON object.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import multiprocessing
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from fuxi import kernels
from fuxi.common.atomic import save_figure, write_text
from fuxi.kernels.cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_torch
from fuxi.kernels.gelu import bias_gelu_torch
from fuxi.kernels.rms_norm import rms_norm_torch
from fuxi.kernels.rope import apply_rope_torch, rope_cos_sin
from fuxi.kernels.swiglu import swiglu_torch
from fuxi.kernels.triton_runtime import INTERPRET

HIDDEN, FFN, HEADS, HEAD_DIM, VOCAB = 4096, 16_384, 32, 128, 250_680
GPU_TOKENS = (4096, 8192, 16384)
CPU_TOKENS = (512,)
KERNELS = ("rms_norm", "bias_gelu", "swiglu", "rope", "flce")


@dataclass
class Result:
    kernel: str
    provider: str
    tokens: int
    fwd_ms: float = math.nan
    bwd_ms: float = math.nan
    full_ms: float = math.nan
    peak_mem_mb: float = math.nan
    gbps: float = math.nan          # bytes model / full time
    pct_bw: float = math.nan        # gbps / measured copy bandwidth
    tflops: float = math.nan        # flce only: the provider's matmul FLOPs (FLCE_MATMULS x 2 N h V) / full time
    note: str = ""

    @classmethod
    def from_csv_row(cls, row: dict[str, str]) -> Result:
        """A row of kernels.csv (csv.DictReader's strings) as a Result again; absent numbers are NaN."""
        convert = {"int": int, "float": lambda v: float(v) if v not in (None, "") else math.nan, "str": str}
        return cls(**{f.name: convert[f.type](row.get(f.name, "")) for f in fields(cls)})


@dataclass
class Case:
    """One kernel at one shape: named providers over the same inputs, and how to drive backward."""
    kernel: str
    tokens: int
    providers: dict[str, Callable[[], object]]
    leaves: list[torch.Tensor]
    grads: Callable[[object], tuple[list[torch.Tensor], list[torch.Tensor]]]
    full_bytes: int = 0
    flops: float = 0.0   # per provider: `provider_flops` overrides it
    notes: dict[str, str] = field(default_factory=dict)
    provider_flops: dict[str, float] = field(default_factory=dict)


# ---- streamed results -------------------------------------------------------------------------------------

def print_row(row: dict, key: str = "row") -> None:
    """One finished result as one JSON line, flushed at once: a bench killed at its time box (the GPU check's)
    still leaves every row it measured. key "row": a measurement; "check": a correctness check (passed and its
    error figures). launch/gpu_check.py collects both kinds into the step's record."""
    print(json.dumps({key: row}, default=str), flush=True)


# ---- timing and memory ------------------------------------------------------------------------------------

def median_ms(fn: Callable[[], object], device: torch.device, reps: int, grad_to_none=None) -> float:
    """Median time of `fn` in ms: triton's do_bench on a GPU, perf_counter over `reps` runs after a warm-up on a
    CPU. `grad_to_none`: tensors whose .grad is cleared before each run, outside the timed region."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()  # warm-up (and first-call compilation)
    times = []
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_bandwidth_gbps(device: torch.device, reps: int) -> float:
    """Device memory bandwidth as a large tensor copy achieves it: 2 x bytes (read + write) / time."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, reps: int = 3, n: int | None = None) -> float:
    """Dense matmul rate the device reaches: an n x n x n product on random data (8192 on a GPU, where it is
    the practical ceiling MFU is also quoted against; 512 on a CPU)."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = median_ms(lambda: torch.mm(a, b), device, reps)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def _backward(case: Case, out) -> None:
    outputs, grads = case.grads(out)
    torch.autograd.backward(outputs, grads, retain_graph=True)


def run_case(case: Case, device: torch.device, reps: int, bandwidth_gbps: float) -> list[Result]:
    results = []
    for name, fn in case.providers.items():
        row = Result(case.kernel, name, case.tokens, note=case.notes.get(name, ""))
        try:
            row.fwd_ms = median_ms(fn, device, reps)
            out = fn()
            row.bwd_ms = median_ms(lambda: _backward(case, out), device, reps, grad_to_none=case.leaves)
            del out

            def full():
                o = fn()
                outputs, grads = case.grads(o)
                torch.autograd.backward(outputs, grads)

            row.full_ms = median_ms(full, device, reps, grad_to_none=case.leaves)
            if device.type == "cuda":
                for t in case.leaves:
                    t.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                full()
                torch.cuda.synchronize()
                row.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            if case.full_bytes:
                row.gbps = case.full_bytes / (row.full_ms * 1e-3) / 1e9
                row.pct_bw = 100.0 * row.gbps / bandwidth_gbps
            flops = case.provider_flops.get(name, case.flops)
            if flops:
                row.tflops = flops / (row.full_ms * 1e-3) / 1e12
        except Exception as err:  # noqa: BLE001 - OOM, a Triton compile error, a bad Liger API: an error row
            row.note = (row.note + " " if row.note else "") + f"failed: {type(err).__name__}: {str(err)[:120]}"
        finally:
            for t in case.leaves:
                t.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
        print_row(asdict(row))
    return results


# ---- the cases --------------------------------------------------------------------------------------------

def _compiled(fn: Callable, enabled: bool) -> Callable | None:
    return torch.compile(fn) if enabled else None


def _add_liger(providers: dict, kernel: str, build: Callable[[], Callable]) -> None:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return
    try:
        providers["liger"] = build()
    except Exception as err:  # noqa: BLE001 - a Liger build that fails costs only its own row
        print(f"liger {kernel}: not benchmarked ({type(err).__name__}: {err})")


@dataclass
class Widths:
    """Model widths the cases run at (FuxiTranyu-8B by default; the GPU check's dry run shrinks them)."""
    hidden: int = HIDDEN
    ffn: int = FFN
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    vocab: int = VOCAB


def rms_norm_case(tokens: int, dtype, device, compile_: bool, triton_ok: bool, widths: Widths) -> Case:
    hidden = widths.hidden
    x = torch.randn(tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(tokens, hidden, dtype=dtype, device=device)
    eps = 1e-5
    providers = {"eager": lambda: rms_norm_torch(x, w, eps)}
    compiled = _compiled(rms_norm_torch, compile_)
    if compiled:
        providers["compile"] = lambda: compiled(x, w, eps)
    if triton_ok:
        providers["triton"] = lambda: kernels.rms_norm(x, w, eps, impl="triton")

    def liger():
        from liger_kernel.transformers import LigerRMSNorm

        module = LigerRMSNorm(hidden, eps=eps).to(device=device, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(w)
        return lambda: module(x)

    _add_liger(providers, "rms_norm", liger)
    elem = x.element_size()
    return Case("rms_norm", tokens, providers, [x, w], lambda out: ([out], [dy]),
                full_bytes=5 * tokens * hidden * elem)


def bias_gelu_case(tokens: int, dtype, device, compile_: bool, triton_ok: bool, widths: Widths) -> Case:
    ffn = widths.ffn
    x = torch.randn(tokens, ffn, dtype=dtype, device=device, requires_grad=True)
    b = (0.1 * torch.randn(ffn, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(tokens, ffn, dtype=dtype, device=device)
    providers = {"eager": lambda: bias_gelu_torch(x, b)}
    compiled = _compiled(bias_gelu_torch, compile_)
    if compiled:
        providers["compile"] = lambda: compiled(x, b)
    if triton_ok:
        providers["triton"] = lambda: kernels.bias_gelu(x, b, impl="triton")
    elem = x.element_size()
    return Case("bias_gelu", tokens, providers, [x, b], lambda out: ([out], [dy]),
                full_bytes=5 * tokens * ffn * elem, notes={})


def swiglu_case(tokens: int, dtype, device, compile_: bool, triton_ok: bool, widths: Widths) -> Case:
    """silu(gate) * up at --ffn (the same width as bias-GELU's; Llama-3-8B's gated MLP has 14,336)."""
    ffn = widths.ffn
    gate = (3 * torch.randn(tokens, ffn, device=device)).to(dtype).requires_grad_()
    up = torch.randn(tokens, ffn, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(tokens, ffn, dtype=dtype, device=device)
    providers = {"eager": lambda: swiglu_torch(gate, up)}
    compiled = _compiled(swiglu_torch, compile_)
    if compiled:
        providers["compile"] = lambda: compiled(gate, up)
    if triton_ok:
        providers["triton"] = lambda: kernels.swiglu(gate, up, impl="triton")
    leaves = [gate, up]

    def liger():
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        # Liger's backward writes the gradients over its saved inputs (in a model they are the projections'
        # outputs, dead after backward), so it gets copies of its own, cleared like the others' between runs.
        gate_l, up_l = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
        leaves.extend([gate_l, up_l])
        return lambda: LigerSiLUMulFunction.apply(gate_l, up_l)

    _add_liger(providers, "swiglu", liger)
    elem = gate.element_size()
    # forward reads gate, up and writes y; backward reads dy, gate, up and writes both gradients
    return Case("swiglu", tokens, providers, leaves, lambda out: ([out], [dy]),
                full_bytes=8 * tokens * ffn * elem,
                notes={"liger": "own input copies (its backward overwrites them)"} if "liger" in providers else {})


def rope_case(tokens: int, dtype, device, compile_: bool, triton_ok: bool, widths: Widths) -> Case:
    heads, head_dim = widths.heads, widths.head_dim
    seq = min(tokens, 4096)
    batch = max(1, tokens // seq)
    q = torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(seq, device=device)[None], head_dim, 10_000.0, dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    providers = {"eager": lambda: apply_rope_torch(q, k, cos, sin)}
    compiled = _compiled(apply_rope_torch, compile_)
    if compiled:
        providers["compile"] = lambda: compiled(q, k, cos, sin)
    if triton_ok:
        providers["triton"] = lambda: kernels.apply_rope(q, k, cos, sin, impl="triton")

    def liger():
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        def run():  # Liger takes the HF layout [batch, heads, seq, head_dim]
            qo, ko = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return qo.transpose(1, 2), ko.transpose(1, 2)
        return run

    _add_liger(providers, "rope", liger)
    elem = q.element_size()
    return Case("rope", batch * seq, providers, [q, k], lambda out: (list(out), [dq, dk]),
                full_bytes=8 * batch * seq * heads * head_dim * elem)


def flce_case(tokens: int, dtype, device, compile_: bool, triton_ok: bool, widths: Widths,
              vocab_chunk: int | None = None) -> Case:
    hidden, vocab = widths.hidden, widths.vocab
    h = (torch.randn(tokens, hidden, device=device) / math.sqrt(hidden)).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[::17] = kernels.IGNORE_INDEX
    scale = torch.full((tokens,), 1.0 / tokens, device=device)
    providers = {"eager": lambda: linear_cross_entropy_torch(h, w, labels)}
    compiled = _compiled(linear_cross_entropy_torch, compile_)
    if compiled:
        providers["compile"] = lambda: compiled(h, w, labels)
    providers["chunked_torch"] = lambda: linear_cross_entropy_chunked(h, w, labels, vocab_chunk=vocab_chunk)
    if triton_ok:
        providers["triton"] = lambda: linear_cross_entropy_chunked(h, w, labels, vocab_chunk=vocab_chunk,
                                                                   use_triton=True)

    def liger():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda: loss_fn(w, h, labels)

    _add_liger(providers, "flce", liger)

    def grads(out):
        if out.dim() == 0:  # Liger's summed loss
            return [out], [scale[0]]
        return [out], [scale]

    return Case("flce", tokens, providers, [h, w], grads, flops=flce_flops("eager", tokens, hidden, vocab),
                notes={"liger": "reduction=sum"},
                provider_flops={p: flce_flops(p, tokens, hidden, vocab) for p in providers})


# Matmuls of N x h x V (2 N h V FLOPs each) a provider runs for one forward + backward of the fused loss:
# eager and torch.compile 3 (logits, grad_hidden, grad_weight): 6NhV; the chunked loss (torch and Triton
# softmax steps) 4, its backward recomputes the logits (kernels/cross_entropy.py): 8NhV; Liger 3 (logits and
# both gradients per token chunk in its forward, a rescale in backward): 6NhV.
FLCE_MATMULS = {"eager": 3, "compile": 3, "chunked_torch": 4, "triton": 4, "liger": 3}


def flce_flops(provider: str, tokens: int, hidden: int, vocab: int) -> float:
    """Matmul FLOPs the provider does: FLCE_MATMULS[provider] x 2 N h V (6NhV eager, 8NhV chunked)."""
    return FLCE_MATMULS[provider] * 2.0 * tokens * hidden * vocab


CASE_BUILDERS = {"rms_norm": rms_norm_case, "bias_gelu": bias_gelu_case, "swiglu": swiglu_case, "rope": rope_case,
                 "flce": flce_case}


# ---- CPU memory comparison of the fused loss (fresh subprocess per variant) -------------------------------

def _reset_peak_rss() -> None:
    """Reset this process's resident-set high-water mark (VmHWM); Linux >= 4.0."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_mb(field_name: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _flce_cpu_child(variant: str, tokens: int, hidden: int, vocab: int, vocab_chunk: int | None, reps: int,
                    queue) -> None:
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden).div_(math.sqrt(hidden)).requires_grad_()
    w = torch.randn(vocab, hidden).mul_(0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    if variant == "eager":
        fn = linear_cross_entropy_torch
    else:
        def fn(a, b, c):
            return linear_cross_entropy_chunked(a, b, c, vocab_chunk=vocab_chunk)
    peaks, times = [], []
    for _ in range(reps):
        h.grad = w.grad = None
        before = _rss_mb("VmRSS")
        _reset_peak_rss()
        start = time.perf_counter()
        losses = fn(h, w, labels)
        (losses.sum() / tokens).backward()
        times.append((time.perf_counter() - start) * 1e3)
        peaks.append(_rss_mb("VmHWM") - before)
        del losses
    with torch.no_grad():
        loss = float(fn(h, w, labels).mean())
    queue.put({"variant": variant, "peak_mem_mb": max(peaks), "full_ms": statistics.median(times), "loss": loss})


def flce_cpu_memory(tokens: int, hidden: int, vocab: int, vocab_chunk: int | None, reps: int
                    ) -> dict[str, dict]:
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for variant in ("eager", "chunked_torch"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_flce_cpu_child, args=(variant, tokens, hidden, vocab, vocab_chunk, reps, queue))
        proc.start()
        out[variant] = queue.get()
        proc.join()
    return out


# ---- correctness of the fused loss in low precision (run by the GPU check) ---------------------------------

def flce_gradient_check(tokens: int, widths: Widths, device: torch.device, use_triton: bool,
                        vocab_chunk: int | None, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """The fused loss in `dtype` against eager in `dtype`, both against eager in fp32 (TF32 off): losses within
    2x and both gradients within 3x of eager's own low-precision error (kernels/testing.py, the project's rule).
    Each check names the grad_hidden path that actually ran (kernels.cross_entropy.last_path)."""
    from fuxi.kernels import cross_entropy
    from fuxi.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, reference_error

    gen = torch.Generator(device="cpu").manual_seed(1)
    h32 = (torch.randn(tokens, widths.hidden, generator=gen) / math.sqrt(widths.hidden)).to(device)
    w32 = (torch.randn(widths.vocab, widths.hidden, generator=gen) * 0.02).to(device)
    labels = torch.randint(0, widths.vocab, (tokens,), generator=gen).to(device)
    labels[::17] = kernels.IGNORE_INDEX
    g = torch.rand(tokens, generator=gen).to(device) / tokens  # arbitrary per-token weights, as a mask would give
    runs = {}
    variants = (("fp32 eager", torch.float32, linear_cross_entropy_torch),
                ("eager", dtype, linear_cross_entropy_torch),
                ("fused", dtype, lambda a, b, c: linear_cross_entropy_chunked(a, b, c, vocab_chunk=vocab_chunk,
                                                                              use_triton=use_triton)))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, run_dtype, fn in variants:
            a, b = h32.to(run_dtype).detach().requires_grad_(), w32.to(run_dtype).detach().requires_grad_()
            losses = fn(a, b, labels)
            losses.backward(g)
            runs[name] = [losses.detach().float(), a.grad.float(), b.grad.float()]
            del a, b, losses
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    path = cross_entropy.last_path()
    fused = "triton" if use_triton else "chunked_torch"
    checks = []
    for i, (what, factor) in enumerate((("losses", FORWARD_FACTOR), ("grad_hidden", GRADIENT_FACTOR),
                                        ("grad_weight", GRADIENT_FACTOR))):
        result = reference_error(runs["fused"][i], runs["eager"][i], runs["fp32 eager"][i], factor)
        checks.append({"check": f"flce {fused} vs eager, {what}", "dtype": str(dtype).replace("torch.", ""),
                       "tokens": tokens, "hidden": widths.hidden, "vocab": widths.vocab, "path": path, **result})
    return checks


# ---- reporting --------------------------------------------------------------------------------------------

def _write_csv(rows: list[Result], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(Result)])
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    write_text(path, buffer.getvalue())


def _fmt(v: float, digits: int = 3) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.{digits}g}"


def markdown_table(rows: list[Result]) -> str:
    lines = ["| kernel | tokens | provider | fwd ms | bwd ms | full ms | peak MB | GB/s | % BW | TFLOP/s | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.tokens} | {r.provider} | {_fmt(r.fwd_ms)} | {_fmt(r.bwd_ms)} | "
                     f"{_fmt(r.full_ms)} | {_fmt(r.peak_mem_mb, 4)} | {_fmt(r.gbps)} | {_fmt(r.pct_bw)} | "
                     f"{_fmt(r.tflops)} | {r.note} |")
    return "\n".join(lines)


def write_plot(rows: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernel_names = [k for k in KERNELS if any(r.kernel == k for r in rows)]
    flce_mem = [r for r in rows if r.kernel == "flce" and not math.isnan(r.peak_mem_mb)]
    panels = len(kernel_names) + (1 if flce_mem else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), squeeze=False)

    def bars(ax, mine, value, ylabel, title):
        providers = list(dict.fromkeys(r.provider for r in mine))
        tokens = sorted({r.tokens for r in mine})
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            ys = [next((value(r) for r in mine if r.provider == p and r.tokens == t), math.nan) for t in tokens]
            ax.bar([j + i * width for j in range(len(tokens))], ys, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tokens))], [str(t) for t in tokens])
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    for ax, kernel in zip(axes[0], kernel_names):
        bars(ax, [r for r in rows if r.kernel == kernel], lambda r: r.full_ms, "ms (median)",
             f"{kernel}: forward + backward")
    if flce_mem:
        bars(axes[0][-1], flce_mem, lambda r: r.peak_mem_mb, "MiB above inputs", "flce: peak memory")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _headline(rows: list[Result], bandwidth: float, device: torch.device, dtype: torch.dtype,
              fast: str) -> dict:
    summary: dict[str, object] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                  "dtype": str(dtype).replace("torch.", ""),
                                  "measured_bw_gbps": round(bandwidth, 1)}
    for kernel in ("rms_norm", "bias_gelu", "swiglu", "rope"):
        mine = [r for r in rows if r.kernel == kernel]
        if not mine:
            continue
        t_max = max(r.tokens for r in mine)
        by = {r.provider: r for r in mine if r.tokens == t_max}
        if fast in by:
            summary[f"{kernel}_{fast}_pct_bw"] = round(by[fast].pct_bw, 1)
            for base in ("eager", "compile"):
                if base in by and base != fast:
                    summary[f"{kernel}_speedup_vs_{base}"] = round(by[base].full_ms / by[fast].full_ms, 3)
    flce = [r for r in rows if r.kernel == "flce"]
    if flce and fast == "triton":
        t_ref = 8192 if any(r.tokens == 8192 for r in flce) else max(r.tokens for r in flce)
        by = {r.provider: r for r in flce if r.tokens == t_ref}
        if "triton" in by and "eager" in by:
            summary["flce_tokens"] = t_ref
            if device.type == "cuda":
                summary["flce_peak_mem_ratio"] = round(by["triton"].peak_mem_mb / by["eager"].peak_mem_mb, 4)
            summary["flce_time_ratio"] = round(by["triton"].full_ms / by["eager"].full_ms, 3)
            if "liger" in by:
                summary["flce_liger_time_ratio"] = round(by["liger"].full_ms / by["eager"].full_ms, 3)
                if device.type == "cuda":
                    summary["flce_liger_peak_mem_ratio"] = round(by["liger"].peak_mem_mb / by["eager"].peak_mem_mb, 4)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help=f"token counts (default: {GPU_TOKENS} on a GPU, {CPU_TOKENS} on a CPU)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions on a CPU (GPU: do_bench)")
    parser.add_argument("--flce-cpu-tokens", type=int, default=2048)
    parser.add_argument("--flce-cpu-hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="model width of rms_norm and the fused loss")
    parser.add_argument("--ffn", type=int, default=FFN, help="bias_gelu and swiglu width")
    parser.add_argument("--heads", type=int, default=HEADS, help="rope heads")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM, help="rope head dim")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU: run the GPU benchmark path (Triton providers, the fused loss in-process) under "
                             "TRITON_INTERPRET=1; a dry run at tiny shapes, not a speed measurement")
    parser.add_argument("--vocab-chunk", type=int, default=None,
                        help="vocab columns per chunk of the fused loss (default: kernels.default_vocab_chunk)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the fused loss's bf16 gradient check against eager (GPU path only)")
    parser.add_argument("--out", default="runs/bench/kernels", help="folder for kernels.csv/.md/.png")


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if args.interpret and not on_gpu and not (kernels.HAS_TRITON and INTERPRET):
        raise SystemExit("fuxi bench kernels: --interpret needs triton and TRITON_INTERPRET=1 in the environment")
    gpu_path = on_gpu or args.interpret  # Triton providers and the in-process fused-loss cases
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if on_gpu else "fp32")]
    tokens_list = args.tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS)
    triton_ok = gpu_path and kernels.HAS_TRITON
    widths = Widths(args.hidden, args.ffn, args.heads, args.head_dim, args.vocab)
    builders = {**CASE_BUILDERS, "flce": functools.partial(flce_case, vocab_chunk=args.vocab_chunk)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    bandwidth = measure_bandwidth_gbps(device, args.reps)
    print(f"device {device.type}, dtype {dtype}, measured copy bandwidth {bandwidth:.1f} GB/s")
    rows: list[Result] = []
    for kernel in args.kernels:
        if kernel == "flce" and not gpu_path:
            continue  # CPU: measured in subprocesses below
        for tokens in tokens_list:
            case = builders[kernel](tokens, dtype, device, not args.no_compile, triton_ok, widths)
            rows.extend(run_case(case, device, args.reps, bandwidth))
            del case
            _write_csv(rows, out_dir / "kernels.csv")  # after every case: a run killed later keeps these rows
            print(f"  {kernel} x {tokens} tokens done", flush=True)

    checks = []
    if "flce" in args.kernels and gpu_path and not args.no_check:
        try:
            checks = flce_gradient_check(tokens_list[0], widths, device, triton_ok, args.vocab_chunk)
        except Exception as err:  # noqa: BLE001 - an OOM or a kernel error is the check's result, not a crash
            checks = [{"check": "flce vs eager", "passed": False, "error": f"{type(err).__name__}: {str(err)[:200]}"}]
        for check in checks:
            print_row(check, key="check")
    summary = _headline(rows, bandwidth, device, dtype, "triton" if triton_ok else "compile")
    if checks:
        summary["checks"] = checks
    if args.interpret:
        summary["interpreted"] = True  # tiny shapes on a CPU: the numbers say nothing about speed
    if "flce" in args.kernels and not gpu_path:
        mem = flce_cpu_memory(args.flce_cpu_tokens, args.flce_cpu_hidden, args.vocab, args.vocab_chunk,
                              reps=args.reps)
        for variant, m in mem.items():
            rows.append(Result("flce", variant, args.flce_cpu_tokens, full_ms=m["full_ms"],
                               peak_mem_mb=m["peak_mem_mb"],
                               tflops=flce_flops(variant, args.flce_cpu_tokens, args.flce_cpu_hidden, args.vocab)
                               / (m["full_ms"] * 1e-3) / 1e12,
                               note=f"hidden {args.flce_cpu_hidden}, fp32, own process, peak RSS (VmHWM) - RSS before"))
            print_row(asdict(rows[-1]))
        summary.update({
            "flce_tokens": args.flce_cpu_tokens, "flce_hidden": args.flce_cpu_hidden, "flce_vocab": args.vocab,
            "flce_peak_mem_mb_eager": round(mem["eager"]["peak_mem_mb"], 1),
            "flce_peak_mem_mb_fused": round(mem["chunked_torch"]["peak_mem_mb"], 1),
            "flce_peak_mem_ratio": round(mem["chunked_torch"]["peak_mem_mb"] / mem["eager"]["peak_mem_mb"], 4),
            "flce_time_ratio": round(mem["chunked_torch"]["full_ms"] / mem["eager"]["full_ms"], 3),
            "flce_mean_loss_abs_diff": abs(mem["eager"]["loss"] - mem["chunked_torch"]["loss"]),
        })

    _write_csv(rows, out_dir / "kernels.csv")
    table = markdown_table(rows)
    write_text(out_dir / "kernels.md", table + "\n")
    if rows:
        write_plot(rows, out_dir / "kernels.png")
    print(table)
    print(f"wrote {out_dir / 'kernels.csv'}, {out_dir / 'kernels.md'}, {out_dir / 'kernels.png'}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())

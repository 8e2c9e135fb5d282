"""`fuxi bench moe`: the MoE-LPR feed-forward layer (router, permutation, experts, combine) with its experts run
as one grouped GEMM (torch.nn.functional.grouped_mm) against a loop over the experts, side by side in one run.

Defaults on a GPU: FuxiTranyu-MoE-8B's layer (hidden 4096, FFN 16384, 6 experts, top-2), 8,192 tokens, bf16,
medians of triton.testing.do_bench; on a CPU a small layer in fp32, medians of perf_counter timings. Both
variants share the same weights and inputs, so their outputs are also compared; then a bf16 check of grouped_mm
against the loop, forward and every gradient, against an fp32 reference (`grouped_vs_loop_check`). Each row
and check is printed as a JSON line as soon as it is measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import math

import torch

from fuxi.common.tables import format_table
from fuxi.kernels import IMPLEMENTATIONS
from fuxi.kernels.bench import median_ms, print_row
from fuxi.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, reference_error
from fuxi.model.config import ModelConfig, MoEConfig
from fuxi.model.moe import MoEFeedForward, grouped_mm_available


def add_arguments(parser: argparse.ArgumentParser) -> None:
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=8192 if on_gpu else 512)
    parser.add_argument("--hidden", type=int, default=4096 if on_gpu else 128)
    parser.add_argument("--ffn", type=int, default=16384 if on_gpu else 512)
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (GPU: do_bench)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the bf16 check of grouped_mm against the expert loop (forward and gradients)")
    parser.add_argument("--kernels", default="auto", choices=IMPLEMENTATIONS,
                        help="permutation and bias-GELU kernels (triton on a CPU: under TRITON_INTERPRET=1)")


def run(args: argparse.Namespace) -> dict:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = ModelConfig(type="fuxitranyu_moe", vocab_size=128, hidden_size=args.hidden, num_layers=1,
                         num_heads=max(1, args.hidden // 128), ffn_hidden_size=args.ffn, kernels=args.kernels,
                         moe=MoEConfig(num_experts=args.experts, top_k=args.top_k))
    layer = MoEFeedForward(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.router.weight.mul_(4.0)  # varied routing, so the experts get uneven token counts
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    variants = ["loop"] + (["grouped_mm"] if grouped_mm_available() else [])
    # One token's forward + backward: 3 GEMMs (forward, two gradients) of 2 x hidden x ffn MACs per expert.
    flops = 6.0 * 2 * args.hidden * args.ffn * args.tokens * args.top_k

    rows, outputs = [], {}
    for variant in variants:
        layer.expert_compute = variant

        def forward():
            with torch.no_grad():
                return layer(x)[0]

        def train_step():
            layer(x)[0].backward(dy)

        row = {"variant": variant, "fwd_ms": math.nan, "fwd_bwd_ms": math.nan, "expert_tflops": math.nan}
        try:
            outputs[variant] = forward().float()
            row["fwd_ms"] = median_ms(forward, device, args.reps)
            row["fwd_bwd_ms"] = median_ms(train_step, device, args.reps, grad_to_none=[x, *layer.parameters()])
            row["expert_tflops"] = flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
        except Exception as err:  # noqa: BLE001 - a failing variant (OOM, no grouped_mm kernel) is its row
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            outputs.pop(variant, None)
        rows.append(row)
        print_row(row)
    base = rows[0]
    for row in rows:
        row["fwd_bwd_speedup_vs_loop"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        row["fwd_speedup_vs_loop"] = base["fwd_ms"] / row["fwd_ms"]

    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"MoE layer on {device_name}: {args.tokens} tokens, hidden {args.hidden}, FFN {args.ffn}, "
          f"{args.experts} experts, top-{args.top_k}, {args.dtype}")
    print(format_table(["expert compute", "fwd ms", "fwd+bwd ms", "TFLOP/s", "x loop"],
                       [[r["variant"], r["fwd_ms"], r["fwd_bwd_ms"], r["expert_tflops"], r["fwd_bwd_speedup_vs_loop"]]
                        for r in rows]))
    result = {"device": device_name, "tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn,
              "experts": args.experts, "top_k": args.top_k, "dtype": args.dtype, "rows": rows}
    for row in rows:
        if "error" in row:
            print(f"{row['variant']}: failed: {row['error']}")
    if "grouped_mm" in outputs and "loop" in outputs:
        ref = outputs["loop"]
        result["grouped_vs_loop_max_rel_diff"] = float((outputs["grouped_mm"] - ref).abs().max()
                                                       / ref.abs().max().clamp_min(1e-12))
        result["grouped_mm_fwd_bwd_speedup_vs_loop"] = round(rows[1]["fwd_bwd_speedup_vs_loop"], 3)
    if "grouped_mm" in variants and not args.no_check:
        layer.zero_grad(set_to_none=True)
        try:
            checks = grouped_vs_loop_check(layer, x.detach(), dy)
        except Exception as err:  # noqa: BLE001 - an OOM or a kernel error is the check's result
            checks = [{"check": "moe grouped_mm vs loop", "passed": False,
                       "error": f"{type(err).__name__}: {str(err)[:200]}"}]
        for check in checks:
            print(f"{check['check']}: {'passed' if check['passed'] else 'FAILED'}"
                  + (f" (max abs error {check['max_abs_err']:.3g}, bound {check['bound']:.3g})" if "bound" in check
                     else f" ({check.get('error')})"))
            print_row(check, key="check")
        result["checks"] = checks
    print(json.dumps(result))
    return result


class _FixedRouter(torch.nn.Module):
    """Router of the fp32 reference: the low-precision layer's router, so both runs pick the same experts (a
    top-2 choice that flips on a rounding difference would dominate every error figure). The weight stays an fp32
    leaf, cast to the low dtype inside: its gradient is still compared."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().float().clone())
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.dtype), self.weight.to(self.dtype)).float()


def grouped_vs_loop_check(layer: MoEFeedForward, x: torch.Tensor, dy: torch.Tensor,
                          dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """grouped_mm and the expert loop in `dtype`, both against the loop in fp32 (TF32 off) with the same routing:
    the output within 2x and every gradient (input, router, each expert's weights and biases) within 3x of the
    loop's own low-precision error (kernels/testing.py). Two checks: forward, and backward (its worst tensor)."""
    low = copy.deepcopy(layer).to(dtype)
    ref = copy.deepcopy(low).float()
    ref.router = _FixedRouter(low.router.weight, dtype)
    ref.expert_compute = "loop"
    runs = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, module, compute in (("ref", ref, "loop"), ("loop", low, "loop"), ("grouped_mm", low, "grouped_mm")):
            module.expert_compute = compute
            module.zero_grad(set_to_none=True)
            inp = x.detach().to(torch.float32 if name == "ref" else dtype).requires_grad_()
            out, routing = module(inp)
            out.backward(dy.to(out.dtype))
            grads = {"input": inp.grad.float()}
            grads.update({n: p.grad.float() for n, p in module.named_parameters() if p.grad is not None})
            runs[name] = {"output": out.detach().float(), "experts": routing.expert_ids, "grads": grads}
            del out, inp
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    same_routing = bool(torch.equal(runs["ref"]["experts"], runs["loop"]["experts"]))
    shape = {"dtype": str(dtype).replace("torch.", ""), "tokens": x.shape[0], "same_routing": same_routing}
    forward = reference_error(runs["grouped_mm"]["output"], runs["loop"]["output"], runs["ref"]["output"],
                              FORWARD_FACTOR)
    checks = [{"check": "moe grouped_mm vs loop, forward", **shape, **forward}]
    per_tensor = {}
    names = sorted(runs["ref"]["grads"])
    missing = [n for n in names if n not in runs["grouped_mm"]["grads"] or n not in runs["loop"]["grads"]]
    for name in names:
        if name not in missing:
            per_tensor[name] = reference_error(runs["grouped_mm"]["grads"][name], runs["loop"]["grads"][name],
                                               runs["ref"]["grads"][name], GRADIENT_FACTOR)
    worst = max(per_tensor, key=lambda n: per_tensor[n]["max_abs_err"] / per_tensor[n]["bound"])
    backward = {"check": f"moe grouped_mm vs loop, backward ({len(names)} gradients)", **shape,
                **per_tensor[worst], "worst": worst,
                "passed": all(r["passed"] for r in per_tensor.values()) and not missing and same_routing,
                "failed_tensors": [n for n, r in per_tensor.items() if not r["passed"]] + missing, "tensors": names}
    checks[0]["passed"] = checks[0]["passed"] and same_routing
    checks.append(backward)
    return checks


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())

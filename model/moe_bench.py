"""`fuxi bench moe`: the MoE-LPR feed-forward layer (router, permutation, experts, combine) with its experts run
as one grouped GEMM (torch.nn.functional.grouped_mm) against a loop over the experts, side by side in one run.

Defaults on a GPU: FuxiTranyu-MoE-8B's layer (hidden 4096, FFN 16384, 6 experts, top-2), 8,192 tokens, bf16,
medians of triton.testing.do_bench; on a CPU a small layer in fp32, medians of perf_counter timings. Both
variants share the same weights and inputs, so their outputs are also compared.
"""
from __future__ import annotations

import argparse
import json
import math
import torch

from fuxi.common.tables import format_table
from fuxi.kernels import IMPLEMENTATIONS
from fuxi.kernels.bench import median_ms
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
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())

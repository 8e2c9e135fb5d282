"""`fuxi bench train`: tokens/s and MFU of the training step (DeepSpeed ZeRO engine, fused kernels) on
8B-shaped layers: full width, full vocabulary, as many layers as fit one GPU (`--layers auto`). On CPU it runs a
tiny shape.

Synthetic token ids, so the number measures the model + optimizer step, not the data pipeline. MFU is quoted
twice: against the device's dense bf16 spec peak (989.4 TFLOP/s for an H100/H200 SXM, as Megatron and
torchtitan quote it) and against the bf16 matmul rate measured on the same device in the same run. The model
FLOPs count attention non-causally (12·L·h·s per token, the full score square), as Megatron and PaLM do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import get_args

import torch

from fuxi.kernels import IMPLEMENTATIONS
from fuxi.pretrain.config import Precision, ZeroStage
from fuxi.pretrain.estimates import GRAD_BYTES, OPTIMIZER_BYTES, PARAM_BYTES

# Bytes per parameter of ZeRO-1/2 mixed-precision AdamW on one rank (24): bf16 parameter and gradient (2 + 2),
# fp32 master, momentum and variance (12; pretrain/estimates.py), the fp32 gradient partition DeepSpeed builds
# for the optimizer step (4), and the fp32 temporaries of torch's foreach AdamW (the default on CUDA), which
# computes the update for a whole parameter group at once (4).
FP32_GRAD_PARTITION_BYTES = 4
FOREACH_ADAMW_BYTES = 4
STEP_BYTES_PER_PARAM = (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES + FP32_GRAD_PARTITION_BYTES
                        + FOREACH_ADAMW_BYTES)
# Activation bytes per token and hidden unit kept by one layer for backward in bf16 (Korthikanti et al. count
# 34 for this block with flash attention; rounded up), and with per-layer checkpointing (the layer input).
ACTIVATION_BYTES = {False: 40, True: 4}
# What MFU counts: the model's flops_per_token, 6N + 12·L·h·s, whose attention term is the score and value matmuls
# over the full s x s square (PaLM's and Megatron's convention); a causal kernel does about half of that work,
# so MFU is about 12·L·h·s / 2 per token above what a causal count would give (~5% at 8B, seq 4096).
ATTENTION_FLOPS_NOTE = "non-causal: 12*L*h*s per token (full s x s scores; a causal kernel does about half)"
RESERVED_BYTES = 4e9  # CUDA context, cuBLAS workspace, DeepSpeed buckets, the fused loss's logits block


def add_arguments(parser: argparse.ArgumentParser) -> None:
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--layers", default="auto" if on_gpu else "2",
                        help="layer count, or 'auto': as many as fit the GPU (see --memory-fraction)")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="share of the GPU's memory --layers auto plans for")
    parser.add_argument("--hidden", type=int, default=4096 if on_gpu else 128)
    parser.add_argument("--heads", type=int, default=32 if on_gpu else 4)
    parser.add_argument("--ffn", type=int, default=16384 if on_gpu else 512)
    parser.add_argument("--vocab", type=int, default=250_680 if on_gpu else 4096)
    parser.add_argument("--seq-len", type=int, default=4096 if on_gpu else 256)
    parser.add_argument("--micro-batch", type=int, default=1 if on_gpu else 2)
    parser.add_argument("--grad-accum", type=int, default=8 if on_gpu else 2)
    parser.add_argument("--zero-stage", type=int, default=2, choices=get_args(ZeroStage))
    parser.add_argument("--precision", default="bf16" if on_gpu else "fp32", choices=get_args(Precision))
    parser.add_argument("--kernels", default="auto", choices=IMPLEMENTATIONS)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5 if on_gpu else 3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: from the device name")


def model_config(args: argparse.Namespace, layers: int):
    from fuxi.model import ModelConfig

    cfg = ModelConfig(vocab_size=args.vocab, pad_vocab_multiple=128 if args.vocab > 65536 else 1,
                      hidden_size=args.hidden, num_layers=layers, num_heads=args.heads,
                      ffn_hidden_size=args.ffn, max_seq_len=args.seq_len, kernels=args.kernels,
                      activation_checkpointing=args.activation_checkpointing)
    cfg.validate()
    return cfg


def layers_that_fit(args: argparse.Namespace, memory_bytes: float) -> dict:
    """The most layers whose model states (STEP_BYTES_PER_PARAM per parameter) and activations fit
    `memory_bytes` on one rank, at least 1; parameter counts from meta-device models of 1 and 2 layers."""
    from fuxi.model import build_model

    one, two = (build_model(model_config(args, n), device="meta").num_parameters() for n in (1, 2))
    per_layer_params, fixed_params = two - one, 2 * one - two
    tokens = args.micro_batch * args.seq_len
    activation = ACTIVATION_BYTES[False] * tokens * args.hidden
    per_layer = STEP_BYTES_PER_PARAM * per_layer_params + ACTIVATION_BYTES[args.activation_checkpointing] \
        * tokens * args.hidden
    # The embedding, LM head and final norm; with checkpointing one layer's activations exist during recompute.
    fixed = STEP_BYTES_PER_PARAM * fixed_params + RESERVED_BYTES + activation
    layers = max(1, int((memory_bytes - fixed) // per_layer))
    return {"layers": layers, "planned_gb": memory_bytes / 1e9, "fixed_gb": fixed / 1e9,
            "per_layer_gb": per_layer / 1e9}


def run(args: argparse.Namespace) -> dict:
    from fuxi.data_pipeline.config import DataConfig
    from fuxi.kernels.bench import measure_matmul_tflops, print_row
    from fuxi.model import build_model
    from fuxi.pretrain.config import OptimizerConfig, ParallelismConfig, ScheduleConfig, TrainConfig
    from fuxi.pretrain.distributed import build_engine, init_distributed
    from fuxi.pretrain.estimates import device_peak_tflops, mfu, model_report

    ctx = init_distributed()
    on_gpu = ctx.device.type == "cuda"
    fit = None
    if args.layers == "auto":
        if on_gpu:
            total = torch.cuda.get_device_properties(ctx.device).total_memory
            fit = layers_that_fit(args, args.memory_fraction * total)
            layers = fit["layers"]
        else:
            layers = 2
    else:
        layers = int(args.layers)
    model_cfg = model_config(args, layers)
    global_batch = args.micro_batch * args.grad_accum * ctx.world_size
    cfg = TrainConfig(model=model_cfg, data=DataConfig(train_manifest="<synthetic>", seq_len=args.seq_len),
                      optimizer=OptimizerConfig(), schedule=ScheduleConfig(global_batch=global_batch),
                      parallelism=ParallelismConfig(zero_stage=args.zero_stage, micro_batch=args.micro_batch,
                                                    precision=args.precision))
    if ctx.is_main:
        print(f"fuxi bench train: {layers} layers" + (f" (fit to {fit['planned_gb']:.1f} GB: {fit['fixed_gb']:.1f} "
                                                      f"GB fixed + {fit['per_layer_gb']:.2f} GB per layer)"
                                                      if fit else ""), flush=True)
    matmul_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    measured_peak = measure_matmul_tflops(ctx.device, matmul_dtype) if on_gpu else None
    torch.manual_seed(0)
    # Built on the device: initialising billions of parameters on the host is slow.
    model = build_model(model_cfg, device=ctx.device if on_gpu else None)
    engine = build_engine(model, cfg, ctx, global_batch)
    ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), device=ctx.device)

    def optimizer_step() -> float:
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.grad_accum):
            loss = engine(ids[:, :-1], labels=ids[:, 1:]).loss
            engine.backward(loss)
            engine.step()
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    tokens_per_step = global_batch * args.seq_len

    def timed_step(index: int, phase: str) -> float:
        seconds = optimizer_step()
        if ctx.is_main:  # one JSON line per optimizer step: a run killed at its time box keeps these
            print_row({"phase": phase, "step": index, "layers": layers, "step_time_s": seconds,
                       "tokens_per_s": tokens_per_step / seconds})
        return seconds

    for i in range(args.warmup_steps):
        timed_step(i, "warmup")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times = [timed_step(i, "timed") for i in range(args.steps)]
    step_time = statistics.median(times)
    tokens_per_s = tokens_per_step / step_time
    report = model_report(model_cfg, ctx.world_size, args.seq_len, args.micro_batch)  # ZeRO-3 safe counts
    flops_per_token = report.flops_per_token
    peak = device_peak_tflops(args.peak_tflops)
    tflops = tokens_per_s * flops_per_token / 1e12 / ctx.world_size
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "world_size": ctx.world_size, "layers": layers, "hidden": args.hidden, "heads": args.heads,
        "ffn": args.ffn, "vocab": model_cfg.padded_vocab_size, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "zero_stage": args.zero_stage,
        "precision": args.precision, "kernels": args.kernels,
        "activation_checkpointing": args.activation_checkpointing, "layers_fit": fit,
        "parameters": report.parameters, "flops_per_token": flops_per_token, "step_time_s": step_time,
        "step_times_s": times, "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / ctx.world_size,
        "tflops_per_device": tflops,
        "peak_tflops": peak, "mfu": mfu(tokens_per_s, flops_per_token, peak, ctx.world_size) if peak else None,
        "attention_flops": ATTENTION_FLOPS_NOTE,
        "measured_matmul_tflops": measured_peak,
        "mfu_vs_measured_matmul": tflops / measured_peak if measured_peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None,
        "total_mem_gb": torch.cuda.get_device_properties(ctx.device).total_memory / 1e9 if on_gpu else None,
    }
    if ctx.is_main:
        print(f"{'metric':<26}{'value':>20}")
        for key in ("device", "layers", "parameters", "step_time_s", "tokens_per_s_per_device", "tflops_per_device",
                    "mfu", "measured_matmul_tflops", "mfu_vs_measured_matmul", "peak_mem_gb"):
            value = result[key]
            text = f"{value:,.4g}" if isinstance(value, float) else str(value)
            print(f"{key:<26}{text:>20}")
        print(json.dumps(result))
    return result

"""`fuxi bench train`: tokens/s and MFU of the training step (DeepSpeed ZeRO engine, fused kernels) on
8B-shaped layers: full width, full vocabulary, fewer layers so it fits one GPU. On CPU it runs a tiny shape.

Synthetic token ids, so the number measures the model + optimizer step, not the data pipeline.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--layers", type=int, default=4 if on_gpu else 2)
    parser.add_argument("--hidden", type=int, default=4096 if on_gpu else 128)
    parser.add_argument("--heads", type=int, default=32 if on_gpu else 4)
    parser.add_argument("--ffn", type=int, default=16384 if on_gpu else 512)
    parser.add_argument("--vocab", type=int, default=250_680 if on_gpu else 4096)
    parser.add_argument("--seq-len", type=int, default=4096 if on_gpu else 256)
    parser.add_argument("--micro-batch", type=int, default=1 if on_gpu else 2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--precision", default="bf16" if on_gpu else "fp32", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: from the device name")


def run(args: argparse.Namespace) -> dict:
    from data_pipeline.config import DataConfig
    from model import ModelConfig, build_model
    from pretrain.config import OptimizerConfig, ParallelismConfig, ScheduleConfig, TrainConfig
    from pretrain.distributed import build_engine, init_distributed
    from pretrain.estimates import device_peak_tflops, mfu, model_report

    ctx = init_distributed()
    model_cfg = ModelConfig(vocab_size=args.vocab, pad_vocab_multiple=128 if args.vocab > 65536 else 1,
                            hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                            ffn_hidden_size=args.ffn, max_seq_len=args.seq_len, kernels=args.kernels,
                            activation_checkpointing=args.activation_checkpointing)
    model_cfg.validate()
    global_batch = args.micro_batch * args.grad_accum * ctx.world_size
    cfg = TrainConfig(model=model_cfg, data=DataConfig(train_manifest="<synthetic>", seq_len=args.seq_len),
                      optimizer=OptimizerConfig(), schedule=ScheduleConfig(global_batch=global_batch),
                      parallelism=ParallelismConfig(zero_stage=args.zero_stage, micro_batch=args.micro_batch,
                                                    precision=args.precision))
    torch.manual_seed(0)
    model = build_model(model_cfg)
    engine = build_engine(model, cfg, ctx, global_batch)
    ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), device=ctx.device)

    def optimizer_step() -> float:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.grad_accum):
            loss = engine(ids[:, :-1], labels=ids[:, 1:]).loss
            engine.backward(loss)
            engine.step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup_steps):
        optimizer_step()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [optimizer_step() for _ in range(args.steps)]
    step_time = statistics.median(times)
    tokens_per_step = global_batch * args.seq_len
    tokens_per_s = tokens_per_step / step_time
    report = model_report(model_cfg, ctx.world_size, args.seq_len, args.micro_batch)  # ZeRO-3 safe counts
    flops_per_token = report.flops_per_token
    peak = device_peak_tflops(args.peak_tflops)
    result = {
        "device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu",
        "world_size": ctx.world_size, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
        "zero_stage": args.zero_stage, "precision": args.precision, "kernels": args.kernels,
        "parameters": report.parameters, "step_time_s": step_time,
        "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / ctx.world_size,
        "tflops_per_device": tokens_per_s * flops_per_token / 1e12 / ctx.world_size,
        "peak_tflops": peak, "mfu": mfu(tokens_per_s, flops_per_token, peak, ctx.world_size) if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if ctx.device.type == "cuda" else None,
    }
    if ctx.is_main:
        print(f"{'metric':<26}{'value':>20}")
        for key in ("device", "parameters", "step_time_s", "tokens_per_s_per_device", "tflops_per_device", "mfu",
                    "peak_mem_gb"):
            value = result[key]
            text = f"{value:,.4g}" if isinstance(value, float) else str(value)
            print(f"{key:<26}{text:>20}")
        print(json.dumps(result))
    return result

"""`fuxi bench ghostrnn`: GhostGRU layer step time against torch.nn.GRU (cuDNN on a GPU) at the same hidden size.

On a GPU the GhostGRU runs the fused Triton kernel and times come from triton.testing.do_bench (median); on a
CPU it runs the torch path and the median of `--repeats` perf_counter timings. Every row is measured in the
same run, side by side; ratios are nn.GRU time / this time (above 1 = faster than nn.GRU). Each layer's row is
printed as a JSON line when measured; the summary JSON is the last line.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from fuxi.common.tables import format_table
from fuxi.kernels import IMPLEMENTATIONS
from fuxi.kernels.bench import print_row
from fuxi.model.ghostrnn import GhostGRU, GhostGRUShape

VARIANTS = {  # name -> (feed_ghost_back, gate_input); each runs at every ratio of --ratios
    "A": (True, "full"),
    "B": (False, "intrinsic"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 32 on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 256 on GPU, 64 on CPU")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size H (= input size); default 512/256")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--ratios", default="2,3", help="comma-separated ghost ratios s")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions on CPU (GPU: do_bench)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--impl", default="auto", choices=IMPLEMENTATIONS,
                        help="GhostGRU recurrence: auto = the Triton kernel on a GPU, the torch loop on a CPU "
                             "(triton on a CPU: under TRITON_INTERPRET=1, a dry run)")


def _time_cpu(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _time_gpu(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def run(args: argparse.Namespace) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    on_gpu = device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (64 if on_gpu else 32)
    steps = args.seq_len or (256 if on_gpu else 64)
    hidden = args.hidden or (512 if on_gpu else 256)
    dtype = getattr(torch, args.dtype)
    impl = args.impl if args.impl != "auto" else ("triton" if on_gpu else "torch")
    timer = _time_gpu if on_gpu else (lambda fn: _time_cpu(fn, args.repeats))
    torch.manual_seed(0)
    x = torch.randn(batch, steps, hidden, device=device, dtype=dtype, requires_grad=True)

    models = {"nn.GRU" + (" (cuDNN)" if on_gpu else ""): torch.nn.GRU(hidden, hidden, args.layers, batch_first=True)}
    shapes = {next(iter(models)): GhostGRUShape.of(hidden, hidden, 1)}
    models[f"GhostGRU s=1 ({impl})"] = GhostGRU(hidden, hidden, args.layers, ratio=1, impl=impl)
    shapes[f"GhostGRU s=1 ({impl})"] = GhostGRUShape.of(hidden, hidden, 1)
    for ratio in (int(r) for r in args.ratios.split(",")):
        for variant, (feed, gate) in VARIANTS.items():
            name = f"GhostGRU {variant} s={ratio} ({impl})"
            models[name] = GhostGRU(hidden, hidden, args.layers, ratio, feed, gate, "tanh", impl=impl)
            shapes[name] = GhostGRUShape.of(hidden, hidden, ratio, feed, gate)

    rows = []
    for name, module in models.items():
        module.to(device=device, dtype=dtype)

        def forward(module=module):
            with torch.no_grad():
                module(x)

        def train_step(module=module):
            out, _ = module(x)
            out.float().sum().backward()

        row = {"name": name, "params": sum(p.numel() for p in module.parameters()),
               "macs_per_step": shapes[name].macs_per_step() * args.layers,
               "state_floats": shapes[name].state_size * args.layers, "fwd_ms": math.nan, "fwd_bwd_ms": math.nan}
        try:
            # The cuDNN baseline in IEEE fp32 as GhostGRU's kernels (input_precision="ieee"), not TF32.
            with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                            benchmark=torch.backends.cudnn.benchmark,
                                            deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
                row["fwd_ms"], row["fwd_bwd_ms"] = timer(forward), timer(train_step)
        except Exception as err:  # noqa: BLE001 - one failing layer (a Triton compile error, OOM) is its row
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        print_row(row)  # at once: the GPU check's time box may end the run before the last layer
    base = rows[0]
    for row in rows:
        row["fwd_speedup_vs_gru"] = base["fwd_ms"] / row["fwd_ms"]
        row["fwd_bwd_speedup_vs_gru"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        row["us_per_step_fwd"] = 1e3 * row["fwd_ms"] / steps

    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"GhostGRU vs nn.GRU on {device_name} ({torch.get_num_threads()} CPU threads): batch {batch}, "
          f"{steps} steps, H = D = {hidden}, {args.layers} layer(s), {args.dtype}")
    columns = ["name", "params", "macs_per_step", "state_floats", "fwd_ms", "fwd_bwd_ms", "fwd_speedup_vs_gru",
               "fwd_bwd_speedup_vs_gru"]
    print(format_table(["layer", "params", "MACs/step", "state", "fwd ms", "fwd+bwd ms", "fwd x", "f+b x"],
                       [[row[c] for c in columns] for row in rows]))
    for row in rows:
        if "error" in row:
            print(f"{row['name']}: failed: {row['error']}")
    result = {"device": device_name, "threads": torch.get_num_threads(), "impl": impl, "batch": batch,
              "seq_len": steps, "hidden": hidden,
              "layers": args.layers, "dtype": args.dtype, "rows": rows}
    for row in rows[1:]:
        key = row["name"].split(" (")[0].replace("GhostGRU ", "").replace("=", "").replace(" ", "_").lower()
        result[f"{key}_fwd_bwd_speedup_vs_gru"] = round(row["fwd_bwd_speedup_vs_gru"], 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    run(p.parse_args())

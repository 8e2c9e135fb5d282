"""The whole training path on a GPU, checked against the CPU: `python -m fuxi.launch.pretrain_sanity --out DIR`.

A small FuxiTranyu trains for 20 optimizer steps through `fuxi pretrain` twice on the same shards, from the same
initial weights and in the same data order: once on the GPU (bf16, ZeRO-2, the Triton kernels, validation,
checkpoint and Hugging Face export included) and once on the CPU in fp32 with the torch kernels, both processes
side by side. The GPU run passes when its losses follow the CPU run's within bf16's error and both fall.
Shards come from the bundled corpus (`fuxi data prepare`, a few seconds), which also exercises the data
pipeline's packages on the GPU machine.

`--dry-run` (no GPU): the "device" run is a second CPU run with the Triton kernels under TRITON_INTERPRET=1 in
fp32, compared with the torch run at fp32 tolerance. Writes metrics of both runs, pretrain_sanity.json and
pretrain_sanity.png under --out; the last printed line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fuxi.common.atomic import save_figure, write_json

REPO = Path(__file__).resolve().parents[1]
MODEL = {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 256,
         "max_seq_len": 64}
# |device - cpu| / cpu allowed on the first EARLY steps and on the last step: bf16 rounds every matmul input
# (~0.4% each), fp32 differs only in summation order.
EARLY = 5
TOLERANCE = {"bf16": (0.02, 0.05), "fp32": (1e-3, 1e-2)}


def run_config(data: Path, out: Path, device: str, precision: str, kernels: str, steps: int,
               dry_run: bool) -> dict:
    """The run YAML as a dict. The dry run skips validation and halves the batch: the interpreter spends
    seconds per forward pass."""
    return {
        "stage": "pretrain",
        "model": {**MODEL, "kernels": kernels},
        "data": {"train_manifest": str(data / "train" / "manifest.json"),
                 "val_manifest": str(data / "valid" / "manifest.json"), "seq_len": MODEL["max_seq_len"],
                 "num_workers": 0 if dry_run else 1, "seed": 0, "tokenizer": str(data / "tokenizer")},
        "optimizer": {"lr": 3e-3},
        "schedule": {"total_steps": steps, "warmup_steps": 2, "global_batch": 8 if dry_run else 16},
        "parallelism": {"zero_stage": 2, "micro_batch": 8, "precision": precision},
        "checkpoint": {"every_steps": steps, "keep_last": 1, "resume": False},
        "logging": {"every_steps": 1, "val_every_steps": max(1, steps // 2),
                    "val_batches_per_language": 0 if dry_run else 1, "tensorboard": False},
        "run": {"name": f"sanity-{device}", "output_dir": str(out), "seed": 1234, "tokenizer": str(data / "tokenizer"),
                "export_hf": device == "gpu"},
    }


def _env(cpu_only: bool, interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "4"))
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def compare(device_losses: dict[int, float], cpu_losses: dict[int, float], precision: str) -> dict:
    """Relative loss differences step by step, and whether they are within `precision`'s tolerance."""
    steps = sorted(set(device_losses) & set(cpu_losses))
    if not steps:
        return {"passed": False, "reason": "no common logged steps"}
    rel = {s: abs(device_losses[s] - cpu_losses[s]) / abs(cpu_losses[s]) for s in steps}
    early_tol, final_tol = TOLERANCE[precision]
    early = max(rel[s] for s in steps[:EARLY])
    final = rel[steps[-1]]
    fell = all(losses[steps[-1]] < losses[steps[0]] for losses in (device_losses, cpu_losses))
    return {"steps": len(steps), "max_rel_diff_first_steps": early, "rel_diff_last_step": final,
            "tolerance_first_steps": early_tol, "tolerance_last_step": final_tol, "both_losses_fell": fell,
            "passed": early <= early_tol and final <= final_tol and fell}


def plot(runs: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in runs.items():
        steps = sorted(losses)
        ax.plot(steps, [losses[s] for s in steps], marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("fuxi pretrain: device run vs CPU fp32 reference")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20; dry run 3)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: Triton under the interpreter on CPU")
    args = parser.parse_args(argv)
    from fuxi.pretrain.metrics import read_metrics

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (3 if args.dry_run else 20)
    started = time.time()
    data = out / "data"
    docs = "6" if args.dry_run else "12"
    subprocess.run([sys.executable, "-m", "fuxi.launch.cli", "data", "prepare", str(data), "--vocab-size",
                    str(MODEL["vocab_size"]), "--seq-len", str(MODEL["max_seq_len"]), "--max-docs-per-language",
                    docs, "--quiet"], cwd=REPO, env=_env(cpu_only=True, interpret=False), check=True)
    prepared_s = time.time() - started

    device = "cpu-interpreter" if args.dry_run else "gpu"
    precision = "fp32" if args.dry_run else "bf16"
    runs = {device: (precision, "triton" if args.dry_run else "auto", args.dry_run),
            "cpu": ("fp32", "torch", False)}
    procs = {}
    for name, (prec, kernels, interpret) in runs.items():  # side by side: one on the GPU, one on the cores
        run_dir = out / name
        config = out / f"{name}.yaml"
        config.write_text(yaml.safe_dump(run_config(data, run_dir, name, prec, kernels, steps, args.dry_run)))
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "fuxi.launch.cli", "pretrain", "--config", str(config)],
                                        cwd=REPO, env=_env(cpu_only=name != "gpu", interpret=interpret),
                                        stdout=log, stderr=subprocess.STDOUT), log, run_dir)
    losses, failed = {}, []
    for name, (proc, log, run_dir) in procs.items():
        proc.wait()
        log.close()
        if proc.returncode != 0:
            failed.append(name)
            tail = (out / f"{name}.log").read_text(errors="replace")[-3000:]
            print(f"--- {name} run failed ({proc.returncode}):\n{tail}", file=sys.stderr)
            continue
        losses[name] = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")}

    result = {"dry_run": args.dry_run, "steps": steps, "device_run": device, "precision": precision,
              "prepare_s": round(prepared_s, 1), "seconds": round(time.time() - started, 1), "failed_runs": failed}
    if not failed:
        result.update(compare(losses[device], losses["cpu"], precision))
        result["losses"] = {name: [losses[name][s] for s in sorted(losses[name])] for name in losses}
        train = read_metrics(out / device / "metrics.jsonl", "train")[-1]
        result["device_tokens_per_s"] = train.get("tokens_per_s")
        result["device_mem_alloc_gb"] = train.get("mem_alloc_gb")
        result["hf_export"] = (out / device / "hf" / "config.json").is_file() if device == "gpu" else None
        plot({f"{device} ({precision})": losses[device], "cpu (fp32, torch kernels)": losses["cpu"]},
             out / "pretrain_sanity.png")
    else:
        result["passed"] = False
    write_json(out / "pretrain_sanity.json", result)
    print(f"device run vs CPU: {'passed' if result['passed'] else 'FAILED'}; first {EARLY} steps max rel diff "
          f"{result.get('max_rel_diff_first_steps', float('nan')):.2e}, last step "
          f"{result.get('rel_diff_last_step', float('nan')):.2e}")
    print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Training metrics: loss and bits-per-byte per language, throughput and MFU, and where they are written
(console, JSONL, TensorBoard, a PNG of loss per language at the end)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from fuxi.common.atomic import save_figure
from fuxi.pretrain.distributed import all_reduce_sum


class LanguageLoss:
    """Sums of per-token loss and token counts per language, kept on the device and reduced across ranks only
    when read, so the training step never synchronises for them."""

    def __init__(self, num_languages: int, device: torch.device):
        self.loss_sum = torch.zeros(num_languages, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_languages, dtype=torch.float64, device=device)

    def add(self, token_losses: torch.Tensor, lang_ids: torch.Tensor, labels: torch.Tensor,
            ignore_index: int = -100) -> None:
        # Weights instead of a boolean index, so the training step never waits on the host; ignored positions
        # may carry any language id (a stage's own data uses -1), so they are pointed at row 0 with weight 0.
        keep = (labels != ignore_index).flatten()
        langs = torch.where(keep, lang_ids.flatten(), 0)
        weight = keep.double()
        self.loss_sum.index_add_(0, langs, token_losses.detach().flatten().double() * weight)
        self.count.index_add_(0, langs, weight)

    def reduce_and_reset(self) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = all_reduce_sum(self.loss_sum.clone()), all_reduce_sum(self.count.clone())
        self.loss_sum.zero_()
        self.count.zero_()
        return sums.cpu(), counts.cpu()


def per_language_report(sums: torch.Tensor, counts: torch.Tensor, languages: list[str],
                        bytes_per_token: dict[str, float] | None = None) -> dict:
    """{lang: {"loss": nats/token, "bpb": bits/byte, "tokens": n}} for languages that had tokens."""
    report = {}
    for i, lang in enumerate(languages):
        n = float(counts[i])
        if n == 0:
            continue
        loss = float(sums[i]) / n
        entry = {"loss": loss, "tokens": int(n)}
        if bytes_per_token and bytes_per_token.get(lang):
            entry["bpb"] = loss / math.log(2) / bytes_per_token[lang]
        report[lang] = entry
    return report


class SpeedMonitor:
    """Tokens/s, TFLOP/s and MFU over the window since the last read (OLMo-core's speed monitor, simplified)."""

    def __init__(self, flops_per_token: float, peak_tflops: float | None, world_size: int):
        self.flops_per_token, self.peak_tflops, self.world_size = flops_per_token, peak_tflops, world_size
        self.tokens, self.start = 0, time.perf_counter()

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def read_and_reset(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens * self.world_size / elapsed
        tflops = tokens_per_s * self.flops_per_token / 1e12 / self.world_size
        self.tokens, self.start = 0, time.perf_counter()
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": mfu}


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem_alloc_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return {"mem_rss_gb": int(line.split()[1]) * 1024 / 1e9}
    except OSError:
        pass
    return {}


class MetricsLogger:
    """Rank 0 writes: a compact console line, metrics.jsonl (one object per event), TensorBoard scalars."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.jsonl_path = output_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, kind: str, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.tb is not None:
            for key, value in _flatten(metrics).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self.tb is not None:
                self.tb.close()


def _flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def console_line(step: int, total: int, m: dict) -> str:
    parts = [f"step {step:>6}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
             f"gnorm {m['grad_norm']:.3f}" if m.get("grad_norm") is not None else "gnorm -",
             f"tok/s {m['tokens_per_s']:,.0f}",
             f"mfu {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else f"TFLOP/s {m['tflops_per_device']:.3f}"]
    if m.get("loss_scale") not in (None, 1.0):
        parts.append(f"scale {m['loss_scale']:.0f}")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    if m.get("skipped_samples"):  # corrupt or missing samples the stream replaced (data.on_error: skip)
        parts.append(f"bad samples {m['skipped_samples']}")
    return " | ".join(parts)


def read_metrics(jsonl_path: str | Path, kind: str) -> list[dict]:
    records = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == kind:
                records.append(record)
    return records


def plot_loss_per_language(jsonl_path: str | Path, png_path: str | Path, kind: str = "val") -> Path | None:
    """One line per language of the `per_language` loss over steps (validation by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(jsonl_path, kind) if r.get("per_language")]
    if not records:
        return None
    languages = sorted({lang for r in records for lang in r["per_language"]})
    fig, ax = plt.subplots(figsize=(11, 6))
    colors, styles = plt.get_cmap("tab20").colors, ("-", "--", ":")
    for i, lang in enumerate(languages):  # 20 colours x 3 line styles: distinct up to 60 languages
        points = [(r["step"], r["per_language"][lang]["loss"]) for r in records if lang in r["per_language"]]
        ax.plot(*zip(*points), color=colors[i % 20], linestyle=styles[(i // 20) % 3],
                marker="o" if len(points) < 30 else None, markersize=3, label=lang)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{kind} loss (nats/token)")
    ax.set_title(f"{kind} loss per language")
    ax.grid(alpha=0.3)
    ax.legend(ncol=1 + len(languages) // 20, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, png_path, dpi=120)
    return Path(png_path)

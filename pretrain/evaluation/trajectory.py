"""Evaluate every checkpoint of a run over tokens seen (the report analyses its released intermediate
checkpoints the same way): `fuxi eval --run runs/NAME`.

Results are cached per checkpoint under `<run>/eval/<settings fingerprint>/<tag>.json`, each written atomically
once its evaluation finished, so a second call evaluates only checkpoints that are new (or whose evaluation was
interrupted) and different settings never reuse each other's results. Out: one table (checkpoints x
benchmarks), `trajectory.json`, and a PNG per language of every benchmark's metric over tokens seen.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from fuxi.common.atomic import atomic_write, save_figure, write_json
from fuxi.common.tables import format_table
from fuxi.pretrain.checkpointing import COMPLETE, TAG_PATTERN
from fuxi.pretrain.evaluation.benchmarks import HIGHER_IS_BETTER
from fuxi.pretrain.evaluation.checkpoint_eval import EvalSettings, evaluate_checkpoint
from fuxi.pretrain.evaluation.errors import EvalError


def run_checkpoints(run_dir: Path) -> list[dict]:
    """The complete training checkpoints of a run (or of its checkpoints/ folder), oldest first, with the
    tokens seen when each was written (summed over languages and ranks, from trainer_state.json)."""
    root = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    found = []
    for tag_dir in sorted(p for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)) \
            if root.is_dir() else []:
        if not (tag_dir / COMPLETE).is_file():
            continue  # an interrupted save
        state_file = tag_dir / "trainer_state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        step = int(TAG_PATTERN.match(tag_dir.name).group(1))
        found.append({"tag": tag_dir.name, "step": step, "path": str(tag_dir),
                      "tokens_seen": sum((state.get("tokens_per_language") or {}).values()) or None,
                      # COMPLETE is written last by every save: a checkpoint re-written under the same tag
                      # (a run restarted from scratch) gets a new one, so its cached results are not reused.
                      "written_ns": (tag_dir / COMPLETE).stat().st_mtime_ns})
    if not found:
        raise EvalError(f"--run {run_dir}: no complete checkpoints (step_*/{COMPLETE}) in {root}")
    return found


def evaluate_run(run_dir: str | Path, settings: EvalSettings, eval_root: str | Path | None = None,
                 progress: bool = True) -> dict:
    from tqdm import tqdm

    run_dir = Path(run_dir)
    checkpoints = run_checkpoints(run_dir)
    tasks = settings.resolve()
    fingerprint = settings.fingerprint(tasks)
    eval_dir = Path(eval_root or run_dir / "eval") / fingerprint
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_json(eval_dir / "settings.json", {"settings": asdict(settings), "tasks": [asdict(t) for t in tasks]})
    entries = []
    for ckpt in tqdm(checkpoints, desc="checkpoints", unit="ckpt", disable=not progress):
        cache = eval_dir / f"{ckpt['tag']}.json"
        previous = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else None
        cached = previous is not None and previous.get("written_ns") == ckpt["written_ns"]
        if cached:
            report = previous["report"]
        else:
            report, harness_results = evaluate_checkpoint(ckpt["path"], settings, tasks)
            with atomic_write(eval_dir / f"{ckpt['tag']}.harness.json") as f:
                json.dump(harness_results, f, indent=1, default=str)
            write_json(cache, {**{k: ckpt[k] for k in ("tag", "step", "tokens_seen", "written_ns")},
                               "fingerprint": fingerprint, "report": report})
        entries.append({**{k: ckpt[k] for k in ("tag", "step", "tokens_seen")}, "cached": cached,
                        "report": report})
    trajectory = {"run": str(run_dir), "eval_dir": str(eval_dir), "fingerprint": fingerprint,
                  "checkpoints": entries}
    write_json(eval_dir / "trajectory.json", trajectory)
    trajectory["plots"] = [str(p) for p in plot_trajectory(entries, eval_dir / "plots")]
    return trajectory


def format_trajectory(trajectory: dict) -> str:
    """One row per checkpoint: step, tokens seen, whether cached, each benchmark's mean metric."""
    benchmarks = list(dict.fromkeys(b for e in trajectory["checkpoints"] for b in e["report"]["summary"]))
    headers = ["step", "tokens seen", "cached"] + [
        f"{b} {trajectory['checkpoints'][-1]['report']['summary'].get(b, {}).get('metric', '')}".strip()
        for b in benchmarks]
    rows = [[e["step"], e["tokens_seen"] if e["tokens_seen"] is not None else "-", "yes" if e["cached"] else "no",
             *[e["report"]["summary"].get(b, {}).get("mean", "-") for b in benchmarks]]
            for e in trajectory["checkpoints"]]
    return format_table(headers, rows)


def per_language_series(entries: list[dict]) -> dict[str, dict[tuple[str, str], list[tuple[float, float, float]]]]:
    """{language: {(benchmark, metric): [(x, value, stderr), ...]}}; x is tokens seen (the step when unknown),
    stderr the harness's standard error (0 where it gives none)."""
    series: dict = {}
    for entry in entries:
        x = entry["tokens_seen"] if entry["tokens_seen"] is not None else entry["step"]
        for row in entry["report"]["rows"]:
            metric = row["metric"]
            if metric is None or metric not in row["metrics"]:
                continue
            series.setdefault(row["language"], {}).setdefault((row["benchmark"], metric), []).append(
                (x, row["metrics"][metric], row["metrics"].get(f"{metric}_stderr", 0.0)))
    return series


def plot_trajectory(entries: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per language: accuracy-like metrics (higher is better, on 0-1 with the harness's standard errors,
    so noise near chance does not look like a trend) on the left, bits per byte and perplexities on the right,
    over tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    by_tokens = all(e["tokens_seen"] is not None for e in entries)
    written = []
    for lang, curves in sorted(per_language_series(entries).items()):
        panels = [[k for k in curves if HIGHER_IS_BETTER.get(k[1], True)],
                  [k for k in curves if not HIGHER_IS_BETTER.get(k[1], True)]]
        panels = [p for p in panels if p]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, keys in zip(axes[0], panels):
            higher = HIGHER_IS_BETTER.get(keys[0][1], True)
            for benchmark, metric in sorted(keys):
                xs, values, errors = zip(*sorted(curves[(benchmark, metric)]))
                ax.errorbar(xs, values, yerr=errors if higher else None, marker="o", markersize=3, capsize=2,
                            label=f"{benchmark} ({metric})")
            if higher:
                ax.set_ylim(0.0, 1.0)
            ax.set_xlabel("tokens seen" if by_tokens else "optimizer step")
            better = "higher" if higher else "lower"
            ax.set_ylabel(f"{', '.join(sorted({metric for _, metric in keys}))} ({better} is better)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{lang}: downstream evaluation over training")
        fig.tight_layout()
        path = out_dir / f"{lang if lang != '-' else 'other_tasks'}.png"
        save_figure(fig, path, dpi=110)
        written.append(path)
    return written

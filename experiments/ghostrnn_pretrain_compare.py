"""GRU vs GhostGRU A/B at s = 2, 3 through the real trainer (`fuxi pretrain`), on the bundled corpus.

One run config (configs/train/ghostrnn-compare.yaml) fixes the sizes, the data, the seeds and the schedule, and
therefore the token budget. For each of configs/model/ghostrnn-{gru,a-s2,b-s2,a-s3,b-s3}.yaml, that variant's
`ghostrnn:` switches replace the run config's, and `pretrain.trainer.train` runs in this process. The runs go
one after another on the same BPE token stream. The trainer's per-language validation (loss in nats per token
and bits per byte) at the start and at the end is collected into a table, results.json and a PNG.

    python -m fuxi.experiments.ghostrnn_pretrain_compare [--set schedule.total_steps=600] [--variants gru,a-s2]

The tokenizer and shards are built into the run config's data folder when they are missing. The last printed
line is one JSON object of the figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from fuxi.common.atomic import save_figure, write_json
from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import read_yaml
from fuxi.pretrain.config import TrainConfig, load_train_config
from fuxi.pretrain.schedule import sequences_before

logger = logging.getLogger(__name__)

# slug -> (label, model YAML whose `ghostrnn:` switches define the variant)
VARIANTS = {
    "gru": ("GRU", "configs/model/ghostrnn-gru.yaml"),
    "a-s2": ("A s=2", "configs/model/ghostrnn-a-s2.yaml"),
    "b-s2": ("B s=2", "configs/model/ghostrnn-b-s2.yaml"),
    "a-s3": ("A s=3", "configs/model/ghostrnn-a-s3.yaml"),
    "b-s3": ("B s=3", "configs/model/ghostrnn-b-s3.yaml"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/train/ghostrnn-compare.yaml", help="the shared run config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the run config for every variant (e.g. model.hidden_size=256)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--out", default="runs/ghostrnn_pretrain_compare",
                        help="each variant trains into <out>/<variant>; results.json goes here")
    parser.add_argument("--plot", default="docs/ghostrnn_pretrain_compare.png", help="PNG path ('' to skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


# ---- configs ----------------------------------------------------------------------------------------------

def variant_configs(config_path: str | Path, overrides: list[str], variants: list[str],
                    out: str | Path) -> dict[str, TrainConfig]:
    """One TrainConfig per variant: the run config with the variant's `ghostrnn:` block, output in <out>/<slug>."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError("--variants", f"{unknown} not among {list(VARIANTS)}")
    raw = read_yaml(config_path)
    base_model = raw.get("model")
    if isinstance(base_model, str):
        base_model = read_yaml(base_model)
    if not isinstance(base_model, dict) or base_model.get("type") != "ghostrnn_lm":
        raise ConfigError(config_path, "model must be a ghostrnn_lm config (inline or a YAML path)")
    configs = {}
    for slug in variants:
        variant_path = VARIANTS[slug][1]
        variant = read_yaml(variant_path)
        if variant.get("type") != "ghostrnn_lm" or not isinstance(variant.get("ghostrnn"), dict):
            raise ConfigError(variant_path, "expected type ghostrnn_lm with a ghostrnn: block")
        data = copy.deepcopy(raw)
        data["model"] = {**copy.deepcopy(base_model), "ghostrnn": dict(variant["ghostrnn"])}
        cfg = load_train_config(None, overrides, data=data)
        cfg.run.output_dir = str(Path(out) / slug)
        cfg.run.name = f"{cfg.run.name}-{slug}"
        configs[slug] = cfg
    return configs


def token_budget(cfg: TrainConfig) -> int:
    """Input tokens the schedule feeds the model (global batch per step, ramp included, times seq_len)."""
    return sequences_before(cfg.schedule.total_steps, cfg.schedule) * cfg.data.seq_len


def ensure_dataset(cfg: TrainConfig) -> None:
    """Build tokenizer + shards with prepare_dataset's layout (<dir>/{tokenizer,train,valid}) if missing."""
    train_manifest = Path(cfg.data.train_manifest)
    if train_manifest.is_file():
        return
    data_dir = train_manifest.parent.parent
    expected = {"data.val_manifest": (cfg.data.val_manifest, data_dir / "valid" / "manifest.json"),
                "run.tokenizer": (cfg.run.tokenizer, data_dir / "tokenizer")}
    for name, (given, wanted) in expected.items():
        if given is None or Path(given) != wanted:
            raise ConfigError(name, f"{given} is not {wanted}; the driver only builds prepare_dataset's layout "
                              f"(run `fuxi data prepare` yourself for another one)")
    from fuxi.data_pipeline.prepare import prepare_dataset

    print(f"preparing the bundled corpus into {data_dir} (tokenizer {cfg.model.vocab_size}, seq_len "
          f"{cfg.data.seq_len})", flush=True)
    prepare_dataset(data_dir, vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len, progress=True)


# ---- measurements -----------------------------------------------------------------------------------------

def parameter_counts(cfg: TrainConfig) -> dict[str, int]:
    from fuxi.model import build_model

    model = build_model(cfg.model)
    return {"params": model.num_parameters(), "rnn_params": sum(p.numel() for p in model.rnn.parameters())}


def tokens_seen(output_dir: str | Path) -> dict[str, int]:
    """Input tokens per language from the last train record of the trainer's metrics.jsonl."""
    last = {}
    with open(Path(output_dir) / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "train":
                last = record["tokens_per_language"]
    return last


def mean_over_languages(report: dict, key: str) -> float:
    """Unweighted mean over languages (each language counts once, as in the per-language table)."""
    values = [v[key] for v in report.values() if v.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def train_variant(cfg: TrainConfig) -> dict:
    from fuxi.pretrain.trainer import train

    shutil.rmtree(cfg.run.output_dir, ignore_errors=True)  # resume is off: each variant starts clean
    started = time.time()
    result = train(cfg)
    seconds = time.time() - started
    if result.preempted or not result.final_val:
        raise RuntimeError(f"{cfg.run.name}: the run stopped at step {result.step} without a final validation")
    tokens = tokens_seen(cfg.run.output_dir)
    return {
        **parameter_counts(cfg), "steps": result.step, "skipped_steps": result.skipped_steps,
        "tokens": sum(tokens.values()), "seconds": round(seconds, 1),
        "start_mean_loss": mean_over_languages(result.start_val, "loss"),
        "mean_loss": mean_over_languages(result.final_val, "loss"),
        "start_mean_bpb": mean_over_languages(result.start_val, "bpb"),
        "mean_bpb": mean_over_languages(result.final_val, "bpb"),
        "per_language": {lang: {"loss": v["loss"], "bpb": v.get("bpb")} for lang, v in result.final_val.items()},
    }


# ---- report -----------------------------------------------------------------------------------------------

def summary_table(results: dict[str, dict]) -> str:
    gru_rnn = results.get("gru", {}).get("rnn_params")
    header = (f"{'variant':<8}{'params':>11}{'rnn params':>12}{'vs GRU':>8}{'tokens':>10}{'start loss':>12}"
              f"{'val loss':>10}{'val bpb':>9}{'Δbpb':>8}{'seconds':>9}")
    lines = [header, "-" * len(header)]
    base_bpb = results.get("gru", {}).get("mean_bpb")
    for slug, r in results.items():
        share = f"{100 * r['rnn_params'] / gru_rnn:.0f}%" if gru_rnn else "-"
        delta = f"{r['mean_bpb'] - base_bpb:+.3f}" if base_bpb is not None else "-"
        lines.append(f"{VARIANTS[slug][0]:<8}{r['params']:>11,}{r['rnn_params']:>12,}{share:>8}{r['tokens']:>10,}"
                     f"{r['start_mean_loss']:>12.3f}{r['mean_loss']:>10.3f}{r['mean_bpb']:>9.3f}{delta:>8}"
                     f"{r['seconds']:>9.1f}")
    return "\n".join(lines)


def language_table(results: dict[str, dict]) -> str:
    languages = sorted(next(iter(results.values()))["per_language"])
    lines = [f"{'bpb':<16}" + "".join(f"{VARIANTS[s][0]:>8}" for s in results)]
    for lang in languages:
        lines.append(f"{lang:<16}" + "".join(f"{r['per_language'][lang]['bpb']:>8.3f}" for r in results.values()))
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [VARIANTS[s][0] for s in results]
    languages = sorted(next(iter(results.values()))["per_language"])
    fig, (ax_mean, ax_lang) = plt.subplots(2, 1, figsize=(14, 8), gridspec_kw={"height_ratios": [1, 1.3]})
    means = [r["mean_bpb"] for r in results.values()]
    bars = ax_mean.bar(labels, means, color=[f"C{i}" for i in range(len(labels))])
    ax_mean.bar_label(bars, fmt="%.3f")
    low = min(means)
    ax_mean.set_ylim(low - 0.1 * (max(means) - low + 0.05) - 0.05, max(means) + 0.05)
    ax_mean.set_ylabel("mean validation bits/byte")
    ax_mean.set_title(title)
    if "gru" in results:
        base = results["gru"]["per_language"]
        others = [s for s in results if s != "gru"]
        width = 0.8 / max(len(others), 1)
        for i, slug in enumerate(others):
            deltas = [results[slug]["per_language"][lang]["bpb"] - base[lang]["bpb"] for lang in languages]
            xs = [x + (i - (len(others) - 1) / 2) * width for x in range(len(languages))]
            ax_lang.bar(xs, deltas, width, label=VARIANTS[slug][0], color=f"C{list(results).index(slug)}")
        ax_lang.axhline(0, color="black", linewidth=0.8)
        ax_lang.set_ylabel("validation bpb − GRU's")
        ax_lang.legend(ncol=len(others), fontsize=8)
    else:
        for i, slug in enumerate(results):
            ax_lang.plot(languages, [results[slug]["per_language"][lang]["bpb"] for lang in languages], "o-",
                         label=VARIANTS[slug][0])
        ax_lang.set_ylabel("validation bits/byte")
        ax_lang.legend(fontsize=8)
    ax_lang.set_xticks(range(len(languages)))
    ax_lang.set_xticklabels(languages, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    configs = variant_configs(args.config, args.set, variants, args.out)
    budgets = {slug: token_budget(cfg) for slug, cfg in configs.items()}
    if len(set(budgets.values())) != 1:
        raise ConfigError("schedule", f"token budgets differ between variants: {budgets}")
    first = next(iter(configs.values()))
    ensure_dataset(first)
    print(f"{len(configs)} variants, {first.schedule.total_steps} steps x {first.schedule.global_batch} x "
          f"{first.data.seq_len} tokens = {budgets[variants[0]]:,} tokens each; hidden {first.model.hidden_size}, "
          f"{first.model.num_layers} layers, vocabulary {first.model.vocab_size}", flush=True)

    results = {}
    for slug, cfg in configs.items():
        print(f"--- {VARIANTS[slug][0]} ({VARIANTS[slug][1]}) -> {cfg.run.output_dir}", flush=True)
        results[slug] = train_variant(cfg)
        r = results[slug]
        print(f"    {r['steps']} steps, {r['tokens']:,} tokens, {r['seconds']:.0f} s: mean val loss "
              f"{r['start_mean_loss']:.3f} -> {r['mean_loss']:.3f}, mean bpb {r['mean_bpb']:.3f}", flush=True)

    print(summary_table(results))
    print(language_table(results))
    title = (f"fuxi pretrain, bundled corpus: {first.schedule.total_steps} steps, "
             f"{budgets[variants[0]]:,} BPE tokens each, H = {first.model.hidden_size}, "
             f"{first.model.num_layers} layers")
    if args.plot:
        plot(results, Path(args.plot), title)
        print(f"plot: {args.plot}")
    summary = {"config": str(args.config), "overrides": args.set, "token_budget": budgets[variants[0]],
               "hidden_size": first.model.hidden_size, "num_layers": first.model.num_layers,
               "vocab_size": first.model.vocab_size, "seq_len": first.data.seq_len,
               "variants": {VARIANTS[s][0]: r for s, r in results.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", summary)
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "fuxi.data_pipeline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

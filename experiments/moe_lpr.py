"""The MoE-LPR forgetting experiment of docs/moe_lpr.md, in one driver, at toy scale on the bundled corpus.

1. data: tokenizer and shards for the original and expansion languages (`prepare_dataset`);
2. dense: a tiny FuxiTranyu trained on the original languages (configs/train/moe-lpr-tiny-dense.yaml);
3. (a) dense-cont: the dense model trained further on the expansion languages, every parameter;
4. upcycle: `fuxi upcycle` of the dense model (4 experts, top-2, expert 0 = the dense FFN);
5. (b) moe-stage1: MoE-LPR stage 1 on the expansion languages, the same steps, batch and learning rate as (a);
6. (c) moe-stage2: MoE-LPR stage 2 (routers only, LM + 0.1 x LPR) on a replay mix, from (b);
7. evaluation: held-out loss per language of dense, (a), (b), (c), and the routers' mean G_0 per language.

Every training phase is a real `fuxi pretrain` run (a subprocess, like a user's) whose config is written to
<out>/configs/ from the shipped configs/train/moe-lpr-tiny-*.yaml; the exact commands go to the report.

    python -m experiments.moe_lpr --out runs/moe_lpr_experiment --docs-png docs/moe_lpr_forgetting.png

Writes results.json, report.md and forgetting.png under --out; prints tables and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"dense": "configs/train/moe-lpr-tiny-dense.yaml", "stage1": "configs/train/moe-lpr-tiny-stage1.yaml",
             "stage2": "configs/train/moe-lpr-tiny-stage2.yaml"}
MODELS = {  # report column -> (run folder, label)
    "dense": ("dense", "dense (original languages)"),
    "a": ("dense_cont", "(a) dense, continued on expansion"),
    "b": ("moe_stage1", "(b) MoE-LPR stage 1"),
    "c": ("moe_stage2", "(c) MoE-LPR stages 1+2"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/moe_lpr_experiment", help="output folder")
    parser.add_argument("--original", default="en,de,fr,es,zh", help="languages of the dense base model")
    parser.add_argument("--expansion", default="ru,ja,pl", help="languages added by (a), (b) and (c)")
    parser.add_argument("--vocab", type=int, default=2048, help="tokenizer size (the model's vocab_size)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dense-steps", type=int, default=None, help="default: the dense template's")
    parser.add_argument("--expansion-steps", type=int, default=None,
                        help="steps of (a) and of (b), the same token budget (default: the stage-1 template's)")
    parser.add_argument("--expansion-lr", type=float, default=None, help="lr of (a) and (b) (default: stage 1's)")
    parser.add_argument("--review-steps", type=int, default=None, help="stage-2 steps (default: the template's)")
    parser.add_argument("--review-lr", type=float, default=None, help="stage-2 lr (default: the template's)")
    parser.add_argument("--original-weight", type=float, default=1.0,
                        help="replay mix: total weight of the original languages (expansion languages: 2)")
    parser.add_argument("--val-batches", type=int, default=4, help="held-out batches of 16 blocks per language")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training runs")
    parser.add_argument("--corpus", default=None, help="folder with train/ and valid/ JSONL (default: bundled)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--reuse", action="store_true", help="keep finished phases found under --out")
    parser.add_argument("--docs-png", default=None, help="also copy the plot here (e.g. docs/...png)")


# ---- phases ------------------------------------------------------------------------------------------------

def prepare_data(args, out: Path, languages: list[str]) -> Path:
    from data_pipeline.prepare import prepare_dataset

    data_dir = out / "data"
    stamp = {"languages": languages, "vocab": args.vocab, "seq_len": 128, "corpus": args.corpus}
    stamp_file = data_dir / "experiment_stamp.json"
    if args.reuse and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return data_dir
    prepare_dataset(data_dir, args.corpus, vocab_size=args.vocab, seq_len=128, languages=languages)
    stamp_file.write_text(json.dumps(stamp))
    return data_dir


def load_template(name: str) -> dict:
    return yaml.safe_load((REPO / TEMPLATES[name]).read_text())


def run_config(template: str, out: Path, data_dir: Path, run_name: str, **overrides) -> dict:
    """A template with this experiment's paths; `overrides` replace keys inside sections (section={...})."""
    cfg = load_template(template)
    cfg["data"].update(train_manifest=str(data_dir / "train" / "manifest.json"),
                       val_manifest=str(data_dir / "valid" / "manifest.json"), tokenizer=str(data_dir / "tokenizer"))
    cfg["run"].update(output_dir=str(out / run_name), name=run_name, tokenizer=str(data_dir / "tokenizer"))
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    return cfg


def schedule_with_steps(template: str, steps: int | None) -> dict:
    """The template's schedule, or one of `steps` steps with the warmup scaled to fit."""
    schedule = dict(load_template(template)["schedule"])
    if steps:
        schedule["warmup_steps"] = min(schedule["warmup_steps"], steps // 10)
        schedule["total_steps"] = steps
    return schedule


def shown(path: Path) -> str:
    """A path as a person would type it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def subprocess_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_command(command: list[str], log_path: Path, threads: int) -> float:
    """Run one phase; its output goes to log_path. Returns the wall time; raises with the log's tail."""
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        result = subprocess.run(command, cwd=REPO, env=subprocess_env(threads), stdout=log_file,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"{shlex.join(command)} failed ({result.returncode}); see {log_path}:\n{tail}")
    return time.perf_counter() - started


def train_phase(name: str, cfg: dict, out: Path, args, commands: list[str]) -> dict:
    """`fuxi pretrain` on cfg (written to <out>/configs/<name>.yaml); returns its wall time and tokens."""
    run_dir = Path(cfg["run"]["output_dir"])
    config_path = out / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    command = [sys.executable, "-m", "launch.cli", "pretrain", "--config", str(config_path)]
    commands.append(f"OMP_NUM_THREADS={args.threads} fuxi pretrain --config {shown(config_path)}")
    wall = None
    if not (args.reuse and (run_dir / "final" / "config.yaml").is_file()):
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        wall = run_command(command, out / "logs" / f"{name}.log", args.threads)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]
    last = [r for r in records if r["kind"] == "train"][-1]
    return {"wall_s": wall, "steps": last["step"], "tokens": sum(last["tokens_per_language"].values()),
            "tokens_per_language": {k: v for k, v in last["tokens_per_language"].items() if v},
            "final_train_loss": last["loss"]}


def upcycle_phase(out: Path, args, original: list[str], commands: list[str]) -> Path:
    target = out / "upcycled"
    command = [sys.executable, "-m", "launch.cli", "upcycle", "--checkpoint", str(out / "dense" / "final"),
               "--experts", str(args.experts), "--top-k", str(args.top_k), "--out", str(target),
               "--original-languages", *original, "--seed", str(args.seed)]
    commands.append("fuxi " + shlex.join(shown(Path(c)) if "/" in c else c for c in command[3:]))
    if not (args.reuse and (target / "config.yaml").is_file()):
        (out / "logs").mkdir(parents=True, exist_ok=True)
        run_command(command, out / "logs" / "upcycle.log", args.threads)
    return target


def moe_model_section(upcycled: Path, stage: str) -> dict:
    """The upcycled checkpoint's own model config with the stage's loss coefficients (methods.md 2.3, 2.4)."""
    from checkpoints.model_checkpoint import read_model_config
    from model.typed_config import to_dict

    model = to_dict(read_model_config(upcycled))
    template = load_template("stage1" if stage == "moe_lpr_stage1" else "stage2")["model"]["moe"]
    model["moe"].update(balance_loss_coef=template["balance_loss_coef"], lpr_loss_coef=template["lpr_loss_coef"])
    return model


# ---- evaluation ----------------------------------------------------------------------------------------------

def validation_batches(data_dir: Path, languages: list[str], batches: int) -> dict:
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_val_batches

    cfg = DataConfig(train_manifest=str(data_dir / "train" / "manifest.json"),
                     val_manifest=str(data_dir / "valid" / "manifest.json"), seq_len=128,
                     tokenizer=str(data_dir / "tokenizer"), languages=languages)
    return build_val_batches(cfg, batch_size=16, max_batches_per_language=batches)


@torch.no_grad()
def evaluate(checkpoint: Path, val_batches: dict, table: list[str], with_router: bool) -> dict:
    """Held-out loss (nats/token) per language and, for MoE models, mean G_0 and expert shares per language."""
    from checkpoints.model_checkpoint import load_model
    from pretrain.distributed import DistributedContext
    from pretrain.moe_stages import router_stats_on_batches
    from pretrain.validation import evaluate_per_language

    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = load_model(checkpoint).eval()
    report = evaluate_per_language(model, val_batches, table, None, ctx)
    result = {"loss": {lang: report[lang]["loss"] for lang in report},
              "tokens": {lang: report[lang]["tokens"] for lang in report}}
    if with_router:
        stats = router_stats_on_batches(model, val_batches, len(table), ctx)
        index = {lang: i for i, lang in enumerate(table)}
        result["g0"] = {lang: float(stats.mean_g0[:, index[lang]].mean()) for lang in report}
        result["expert_share"] = {lang: stats.expert_share[:, index[lang]].mean(0).tolist() for lang in report}
    return result


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summarise(evals: dict, original: list[str], expansion: list[str]) -> dict:
    summary = {}
    for key, ev in evals.items():
        if "loss" not in ev:
            continue
        entry = {"original_loss": mean(ev["loss"][lang] for lang in original),
                 "expansion_loss": mean(ev["loss"][lang] for lang in expansion)}
        if "g0" in ev:
            entry["original_g0"] = mean(ev["g0"][lang] for lang in original)
            entry["expansion_g0"] = mean(ev["g0"][lang] for lang in expansion)
        summary[key] = entry
    dense = summary["dense"]
    for entry in summary.values():
        entry["original_forgetting"] = entry["original_loss"] - dense["original_loss"]
        entry["expansion_gain"] = dense["expansion_loss"] - entry["expansion_loss"]
    return summary


# ---- report ----------------------------------------------------------------------------------------------------

def loss_table(evals: dict, original: list[str], expansion: list[str]) -> str:
    keys = [k for k in MODELS if k in evals]
    header = "| language | " + " | ".join(MODELS[k][1] for k in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 1)]
    for group, langs in (("original", original), ("expansion", expansion)):
        for lang in langs:
            lines.append(f"| {lang} ({group}) | " + " | ".join(f"{evals[k]['loss'][lang]:.3f}" for k in keys) + " |")
        lines.append(f"| **mean {group}** | " + " | ".join(
            f"**{mean(evals[k]['loss'][lang] for lang in langs):.3f}**" for k in keys) + " |")
    return "\n".join(lines)


def router_table(evals: dict, original: list[str], expansion: list[str]) -> str:
    keys = [k for k in ("upcycled", "b", "c") if k in evals]
    labels = {"upcycled": "upcycled (before stage 1)", "b": MODELS["b"][1], "c": MODELS["c"][1]}
    lines = ["| language | " + " | ".join(labels[k] for k in keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for group, langs in (("original", original), ("expansion", expansion)):
        for lang in langs:
            lines.append(f"| {lang} ({group}) | " + " | ".join(f"{evals[k]['g0'][lang]:.3f}" for k in keys) + " |")
        lines.append(f"| **mean {group}** | " + " | ".join(
            f"**{mean(evals[k]['g0'][lang] for lang in langs):.3f}**" for k in keys) + " |")
    return "\n".join(lines)


def plot(evals: dict, original: list[str], expansion: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    languages = original + expansion
    keys = [k for k in MODELS if k in evals]
    fig, (ax_loss, ax_g0) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(languages))]
        ax_loss.bar(xs, [evals[key]["loss"][lang] for lang in languages], width, label=MODELS[key][1])
    ax_loss.axvline(len(original) - 0.5, color="grey", linestyle="--", linewidth=1)
    ax_loss.set_xticks(range(len(languages)), [f"{lang}\n(orig)" if lang in original else f"{lang}\n(new)"
                                               for lang in languages])
    low = min(min(evals[k]["loss"].values()) for k in keys)
    ax_loss.set_ylim(max(0.0, low - 0.5), None)
    ax_loss.set_ylabel("held-out loss (nats/token)")
    ax_loss.set_title("validation loss per language")
    ax_loss.legend(fontsize="small")
    router_keys = [k for k in ("upcycled", "b", "c") if k in evals]
    labels = {"upcycled": "upcycled", "b": "after stage 1", "c": "after stage 2"}
    width = 0.8 / len(router_keys)
    for i, key in enumerate(router_keys):
        xs = [j + (i - (len(router_keys) - 1) / 2) * width for j in range(len(languages))]
        ax_g0.bar(xs, [evals[key]["g0"][lang] for lang in languages], width, label=labels[key])
    ax_g0.axvline(len(original) - 0.5, color="grey", linestyle="--", linewidth=1)
    ax_g0.set_xticks(range(len(languages)), languages)
    ax_g0.set_ylim(0, 1)
    ax_g0.set_ylabel("mean router probability of expert 0 (G_0)")
    ax_g0.set_title("routing to the frozen original FFN")
    ax_g0.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, args, original, expansion, evals, summary, phases, commands, png: Path) -> Path:
    lines = [f"# MoE-LPR forgetting experiment ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"original languages: {', '.join(original)}; expansion languages: {', '.join(expansion)}", "",
             "## Commands", "", "```bash", *commands, "```", "", "## Runs", "",
             "| phase | steps | tokens | wall (s) | final train loss |", "|---|---|---|---|---|"]
    for name, phase in phases.items():
        wall = "reused" if phase["wall_s"] is None else f"{phase['wall_s']:.0f}"
        lines.append(f"| {name} | {phase['steps']} | {phase['tokens']:,} | {wall} | {phase['final_train_loss']:.3f} |")
    lines += ["", "## Held-out loss per language (nats/token)", "", loss_table(evals, original, expansion), "",
              "## Mean G_0 per language", "", router_table(evals, original, expansion), "", "## Summary", "",
              "| model | original loss | forgetting | expansion loss | gain |", "|---|---|---|---|---|"]
    for key, entry in summary.items():
        lines.append(f"| {MODELS[key][1] if key in MODELS else key} | {entry['original_loss']:.3f} | "
                     f"{entry['original_forgetting']:+.3f} | {entry['expansion_loss']:.3f} | "
                     f"{entry['expansion_gain']:+.3f} |")
    lines += ["", f"![forgetting]({png.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ---- driver ------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)  # the in-process evaluation; oversubscribed threads are slow on CPU
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    original, expansion = args.original.split(","), args.expansion.split(",")
    overlap = set(original) & set(expansion)
    if overlap:
        raise ValueError(f"--original and --expansion share {sorted(overlap)}")
    languages = original + expansion
    commands = [f"python -m experiments.moe_lpr {shlex.join(sys.argv[1:])}".strip(), "# which runs:"]
    phases: dict[str, dict] = {}
    stage1 = load_template("stage1")
    expansion_steps = args.expansion_steps or stage1["schedule"]["total_steps"]
    expansion_lr = args.expansion_lr or stage1["optimizer"]["lr"]
    same_budget = schedule_with_steps("stage1", expansion_steps)  # (a) and (b): same steps, batch, lr
    model_section = load_template("dense")["model"]
    model_section["vocab_size"] = args.vocab
    seed = {"seed": args.seed}

    progress = tqdm(total=7, desc="moe-lpr experiment", unit="phase")

    def step(name: str):
        progress.set_postfix_str(name)

    step("data")
    data_dir = prepare_data(args, out, languages)
    progress.update()

    step("dense")
    schedule = schedule_with_steps("dense", args.dense_steps)
    phases["dense"] = train_phase("dense", run_config(
        "dense", out, data_dir, "dense", model=model_section, data={"languages": original},
        schedule=schedule, run=seed), out, args, commands)
    progress.update()

    step("(a) dense-cont")
    phases["(a) dense-cont"] = train_phase("dense_cont", run_config(
        "dense", out, data_dir, "dense_cont", model=model_section, data={"languages": expansion},
        optimizer={"lr": expansion_lr}, schedule=same_budget,
        checkpoint={"init_from": str(out / "dense" / "final")}, run=seed), out, args, commands)
    progress.update()

    step("upcycle")
    upcycled = upcycle_phase(out, args, original, commands)
    progress.update()

    step("(b) stage 1")
    phases["(b) moe-stage1"] = train_phase("moe_stage1", run_config(
        "stage1", out, data_dir, "moe_stage1", model=moe_model_section(upcycled, "moe_lpr_stage1"),
        data={"languages": expansion}, optimizer={"lr": expansion_lr}, schedule=same_budget,
        checkpoint={"init_from": str(upcycled)}, run=seed), out, args, commands)
    progress.update()

    step("(c) stage 2")
    weights = {**{lang: args.original_weight / len(original) for lang in original},
               **{lang: 2.0 / len(expansion) for lang in expansion}}
    review = schedule_with_steps("stage2", args.review_steps)
    phases["(c) moe-stage2"] = train_phase("moe_stage2", run_config(
        "stage2", out, data_dir, "moe_stage2", model=moe_model_section(upcycled, "moe_lpr_stage2"),
        data={"mixing": "weights", "weights": weights, "languages": None},
        optimizer={"lr": args.review_lr or load_template("stage2")["optimizer"]["lr"]},
        schedule=review, checkpoint={"init_from": str(out / "moe_stage1" / "final")}, run=seed),
        out, args, commands)
    progress.update()

    step("evaluate")
    from data_pipeline.manifest import load_manifest

    table = list(load_manifest(data_dir / "train" / "manifest.json").languages)
    val_batches = validation_batches(data_dir, languages, args.val_batches)
    evals = {"upcycled": evaluate(upcycled, val_batches, table, with_router=True)}
    for key, (folder, _) in MODELS.items():
        evals[key] = evaluate(out / folder / "final", val_batches, table, with_router=key in ("b", "c"))
    progress.update()
    progress.close()

    summary = summarise({k: v for k, v in evals.items() if k in MODELS}, original, expansion)
    png = plot(evals, original, expansion, out / "forgetting.png")
    if args.docs_png:  # the comparison, and the trainer's router plot of the stage-2 run beside it
        import shutil

        docs_png = Path(args.docs_png)
        docs_png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, docs_png)
        shutil.copyfile(out / "moe_stage2" / "router_shares.png", docs_png.with_name(f"{docs_png.stem}_router.png"))
    report = write_report(out, args, original, expansion, evals, summary, phases, commands, png)
    results = {"original": original, "expansion": expansion, "phases": phases, "evals": evals,
               "summary": summary, "commands": commands, "wall_s": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print(loss_table(evals, original, expansion))
    print()
    print(router_table(evals, original, expansion))
    print(f"\nreport: {report}\nplot: {png}")
    figures = {"wall_s": round(results["wall_s"], 1)}
    for key, entry in summary.items():
        for name, value in entry.items():
            figures[f"{key}/{name}"] = round(value, 4)
    print(json.dumps(figures))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.moe_lpr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("data_pipeline").setLevel(logging.WARNING)  # the cleaning report is in <out>/data
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The MoE-LPR forgetting experiment of docs/moe_lpr.md, with the controls that isolate each claim, at toy scale.

Per seed (the seed sets every model's initial weights, the upcycled routers and the data order):
  dense  a tiny FuxiTranyu trained on the original languages          (configs/train/moe-lpr-tiny-dense.yaml)
  (a)    dense continued on the expansion languages, every parameter  (the same steps, batch and lr as (b))
  (b)    `fuxi upcycle` + MoE-LPR stage 1 on the expansion languages  (configs/train/moe-lpr-tiny-stage1.yaml)
  (c)    (b) + the review: routers only, LM + gamma * LPR on a replay mix        (moe-lpr-tiny-stage2.yaml)
  (d)    (b) + the same review with gamma = 0: what the replay alone does to the routers
  (e)    (a) + the same replay, every parameter: what the replay alone does to the dense model
(c), (d) and (e) see the same batches (same mix, steps, batch, lr, data seed). The replay is sized by
--replay-share: the original-language tokens of the review as a fraction of stage 1's tokens (the paper: 0.138B
of 24B, 0.6%); the mix is 1 part original to 2 parts expansion, as the paper's. Each share (default 1% and
10%) has its own (c), (d), (e).

Every training phase is a real `fuxi pretrain` run (a subprocess, like a user's) whose config is written to
<out>/seed<k>/configs/; the exact commands go to the report. Held-out loss per language comes from the same
validation batches for every model. The LPR forms' router gradients are measured on (b)'s routing of the
original-language validation tokens (docs/moe_lpr.md, "Losses").

    python -m fuxi.experiments.moe_lpr --out runs/moe_lpr_experiment --seeds 3 --replay-share 0.01,0.1 \
        --docs-png docs/moe_lpr_forgetting.png

Writes results.json, report.md and forgetting.png under --out; prints tables and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from fuxi.common.atomic import save_figure, write_json, write_text

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 128
TEMPLATES = {"dense": "configs/train/moe-lpr-tiny-dense.yaml", "stage1": "configs/train/moe-lpr-tiny-stage1.yaml",
             "stage2": "configs/train/moe-lpr-tiny-stage2.yaml"}
ARMS = {  # key -> label (the review arms c, d, e get one key per replay share: "c@0.01")
    "dense": "dense (original languages)",
    "a": "(a) dense continued",
    "b": "(b) MoE stage 1 only",
    "c": "(c) review with LPR",
    "d": "(d) review without LPR",
    "e": "(e) dense continued + replay",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/moe_lpr_experiment", help="output folder")
    parser.add_argument("--original", default="en,de,fr,es,zh", help="languages of the dense base model")
    parser.add_argument("--expansion", default="ru,ja,pl", help="languages added by (a)-(e)")
    parser.add_argument("--vocab", type=int, default=2048, help="tokenizer size (the model's vocab_size)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dense-steps", type=int, default=None, help="default: the dense template's")
    parser.add_argument("--expansion-steps", type=int, default=None,
                        help="steps of (a) and of (b), the same token budget (default: the stage-1 template's)")
    parser.add_argument("--expansion-lr", type=float, default=None, help="lr of (a) and (b) (default: stage 1's)")
    parser.add_argument("--replay-share", default="0.01,0.1",
                        help="original-language tokens of the review / stage-1 tokens; comma-separated for several")
    parser.add_argument("--review-batch", type=int, default=None, help="review batch (default: the template's)")
    parser.add_argument("--review-lr", type=float, default=None,
                        help="lr of the review for (c), (d) and (e) (default: the stage-2 template's)")
    parser.add_argument("--gamma", type=float, default=None, help="LPR weight of (c) (default: the template's)")
    parser.add_argument("--lpr-form", default=None, choices=["code", "paper"], help="default: the template's")
    parser.add_argument("--val-batches", type=int, default=4, help="held-out batches of 16 blocks per language")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training runs")
    parser.add_argument("--corpus", default=None, help="folder with train/ and valid/ JSONL (default: bundled)")
    parser.add_argument("--seed", type=int, default=1234, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds to run")
    parser.add_argument("--reuse", action="store_true", help="keep finished phases found under --out")
    parser.add_argument("--docs-png", default=None, help="also copy the plot here (e.g. docs/...png)")


# ---- phases ------------------------------------------------------------------------------------------------

def prepare_data(args, out: Path, languages: list[str]) -> Path:
    from fuxi.data_pipeline.prepare import prepare_dataset

    data_dir = out / "data"
    stamp = {"languages": languages, "vocab": args.vocab, "seq_len": SEQ_LEN, "corpus": args.corpus}
    stamp_file = data_dir / "experiment_stamp.json"
    if args.reuse and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return data_dir
    stamp_file.unlink(missing_ok=True)  # stale: prepare_dataset replaces only a folder of its own outputs
    prepare_dataset(data_dir, args.corpus, vocab_size=args.vocab, seq_len=SEQ_LEN, languages=languages)
    stamp_file.write_text(json.dumps(stamp))
    return data_dir


def load_template(name: str) -> dict:
    return yaml.safe_load((REPO / TEMPLATES[name]).read_text())


def run_config(template: str, run_dir: Path, data_dir: Path, seed: int, **overrides) -> dict:
    """A template with this run's paths and seed; `overrides` replace keys inside sections (section={...})."""
    cfg = load_template(template)
    cfg["data"].update(train_manifest=str(data_dir / "train" / "manifest.json"),
                       val_manifest=str(data_dir / "valid" / "manifest.json"), tokenizer=str(data_dir / "tokenizer"),
                       seed=seed)
    cfg["run"].update(output_dir=str(run_dir), name=run_dir.name, tokenizer=str(data_dir / "tokenizer"), seed=seed)
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    return cfg


def schedule_with_steps(template: str, steps: int | None, batch: int | None = None) -> dict:
    """The template's schedule, or one of `steps` steps (and `batch` sequences) with the warmup scaled to fit."""
    schedule = dict(load_template(template)["schedule"])
    if steps:
        schedule["warmup_steps"] = min(schedule["warmup_steps"], max(1, steps // 10))
        schedule["total_steps"] = steps
    if batch:
        schedule["global_batch"] = batch
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
    env.update(PYTHONSAFEPATH="1", OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_command(command: list[str], log_path: Path, threads: int) -> float:
    """Run one phase; its output goes to log_path. Returns the wall time; raises with the log's tail."""
    started = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log_file:
        result = subprocess.run(command, cwd=REPO, env=subprocess_env(threads), stdout=log_file,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"{shlex.join(command)} failed ({result.returncode}); see {log_path}:\n{tail}")
    return time.perf_counter() - started


def train_phase(name: str, cfg: dict, seed_dir: Path, args, commands: list[str]) -> dict:
    """`fuxi pretrain` on cfg (written to <seed_dir>/configs/<name>.yaml); returns its wall time and tokens."""
    run_dir = Path(cfg["run"]["output_dir"])
    config_path = seed_dir / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    command = [sys.executable, "-m", "fuxi.launch.cli", "pretrain", "--config", str(config_path)]
    commands.append(f"OMP_NUM_THREADS={args.threads} fuxi pretrain --config {shown(config_path)}")
    wall = None
    if not (args.reuse and (run_dir / "final" / "config.yaml").is_file()):
        shutil.rmtree(run_dir, ignore_errors=True)
        wall = run_command(command, seed_dir / "logs" / f"{name}.log", args.threads)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]
    last = [r for r in records if r["kind"] == "train"][-1]
    return {"wall_s": wall, "steps": last["step"], "tokens": sum(last["tokens_per_language"].values()),
            "tokens_per_language": {k: v for k, v in last["tokens_per_language"].items() if v},
            "final_train_loss": last["loss"]}


def upcycle_phase(seed_dir: Path, args, seed: int, original: list[str], commands: list[str]) -> Path:
    target = seed_dir / "upcycled"
    command = [sys.executable, "-m", "fuxi.launch.cli", "upcycle", "--checkpoint", str(seed_dir / "dense" / "final"),
               "--experts", str(args.experts), "--top-k", str(args.top_k), "--out", str(target),
               "--original-languages", *original, "--seed", str(seed)]
    commands.append("fuxi " + shlex.join(shown(Path(c)) if "/" in c else c for c in command[3:]))
    if not (args.reuse and (target / "config.yaml").is_file()):
        run_command(command, seed_dir / "logs" / "upcycle.log", args.threads)
    return target


def moe_model_section(upcycled: Path, stage: str, **moe) -> dict:
    """The upcycled checkpoint's own model config with the stage's loss settings from its template."""
    from fuxi.checkpoints.model_checkpoint import read_model_config
    from fuxi.common.typed_config import to_dict

    model = to_dict(read_model_config(upcycled))
    template = load_template("stage1" if stage == "moe_lpr_stage1" else "stage2")["model"]["moe"]
    model["moe"].update({k: template[k] for k in ("balance_loss_coef", "lpr_loss_coef", "lpr_loss_form")
                         if k in template}, **moe)
    return model


def review_mix(original: list[str], expansion: list[str]) -> tuple[dict[str, float], float]:
    """The review's sampling weights per language, 1 part original to 2 parts expansion, and the original
    languages' share of them (what review_steps needs)."""
    weights = {**{lang: 1.0 / len(original) for lang in original},
               **{lang: 2.0 / len(expansion) for lang in expansion}}
    return weights, math.fsum(weights[lang] for lang in original) / math.fsum(weights.values())


def review_steps(share: float, stage1_tokens: int, batch: int, original_fraction: float) -> int:
    """Steps whose original-language tokens are `share` of stage 1's tokens (at least one)."""
    return max(1, math.ceil(share * stage1_tokens / (batch * SEQ_LEN * original_fraction)))


# ---- evaluation ----------------------------------------------------------------------------------------------

def validation_batches(data_dir: Path, languages: list[str], batches: int) -> dict:
    from fuxi.data_pipeline.config import DataConfig
    from fuxi.data_pipeline.loader import build_val_batches

    cfg = DataConfig(train_manifest=str(data_dir / "train" / "manifest.json"),
                     val_manifest=str(data_dir / "valid" / "manifest.json"), seq_len=SEQ_LEN,
                     tokenizer=str(data_dir / "tokenizer"), languages=languages)
    return build_val_batches(cfg, batch_size=16, max_batches_per_language=batches)


@torch.no_grad()
def evaluate(checkpoint: Path, val_batches: dict, table: list[str], with_router: bool) -> dict:
    """Held-out loss (nats/token) per language and, for MoE models, mean G_0 and expert shares per language."""
    from fuxi.checkpoints.model_checkpoint import load_model
    from fuxi.pretrain.distributed import DistributedContext
    from fuxi.pretrain.stages.moe_lpr import router_stats_on_batches
    from fuxi.pretrain.validation import evaluate_per_language

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


def lpr_gradient_ratio(logits: list[torch.Tensor], top_k: int) -> dict:
    """Router-logit gradient of the paper form (-log G_0) against the code form (cross-entropy over the
    probabilities), both averaged the same way, on the given original-language tokens' logits (one [T, N]
    tensor per MoE layer): the ratio of the gradient norms, and its per-token median."""
    from fuxi.model.moe import lpr_loss, route

    grads = {}
    for form in ("paper", "code"):
        leaves = [lg.detach().float().requires_grad_() for lg in logits]
        loss = lpr_loss([route(lg, top_k) for lg in leaves], torch.ones(leaves[0].shape[0], dtype=torch.bool), form)
        grads[form] = torch.stack(torch.autograd.grad(loss, leaves))  # [L, T, N]
    per_token = grads["paper"].norm(dim=-1) / grads["code"].norm(dim=-1)
    return {"norm_ratio": float(grads["paper"].norm() / grads["code"].norm()),
            "median_token_ratio": float(per_token.median()), "tokens": int(per_token.numel())}


@torch.no_grad()
def original_router_logits(checkpoint: Path, val_batches: dict, original: list[str]) -> list[torch.Tensor]:
    """Each MoE layer's router logits on the original languages' validation tokens."""
    from fuxi.checkpoints.model_checkpoint import load_model

    model = load_model(checkpoint).eval()
    per_layer: list[list[torch.Tensor]] = []
    for lang in original:
        for batch in val_batches[lang]:
            out = model(batch["input_ids"])
            for i, layer in enumerate(out.routing):
                if len(per_layer) <= i:
                    per_layer.append([])
                per_layer[i].append(layer.logits)
    return [torch.cat(chunks) for chunks in per_layer]


# ---- summary ---------------------------------------------------------------------------------------------------

def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def seed_summary(evals: dict, original: list[str], expansion: list[str]) -> dict:
    """Per model of one seed: mean original / expansion loss, forgetting and gain against the seed's dense."""
    summary = {}
    for key, ev in evals.items():
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


def aggregate(per_seed: list[dict]) -> dict:
    """key -> metric -> {mean, std (population), values}, over the seeds that have it."""
    keys = list(dict.fromkeys(k for s in per_seed for k in s))
    out = {}
    for key in keys:
        metrics = list(dict.fromkeys(m for s in per_seed if key in s for m in s[key]))
        out[key] = {}
        for metric in metrics:
            values = [s[key][metric] for s in per_seed if key in s and metric in s[key]]
            out[key][metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    return out


def paired(per_seed: list[dict], first: str, second: str, metric: str) -> dict:
    """first - second per seed (same seed, same data): mean, std and the values."""
    values = [s[first][metric] - s[second][metric] for s in per_seed]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def arm_keys(shares: list[float]) -> list[str]:
    return ["dense", "a", "b"] + [f"{arm}@{share:g}" for share in shares for arm in "cde"]


def label(key: str, main_share: float, several: bool) -> str:
    arm, _, share = key.partition("@")
    text = ARMS[arm]
    if share and (several or float(share) != main_share):
        text += f", replay {100 * float(share):g}%"
    return text


# ---- report ----------------------------------------------------------------------------------------------------

def cell(stat: dict, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return fmt.format(stat["mean"]) + (f" ± {stat['std']:.3f}" if len(stat["values"]) > 1 else "")


def summary_table(agg: dict, keys: list[str], shares: list[float]) -> str:
    lines = ["| model | original loss | forgetting | expansion loss | gain | G_0 original | G_0 expansion |",
             "|---|---|---|---|---|---|---|"]
    for key in keys:
        a = agg[key]
        g0 = [cell(a[m]) if m in a else "" for m in ("original_g0", "expansion_g0")]
        name = label(key, shares[0], len(shares) > 1)
        lines.append(f"| {name} | {cell(a['original_loss'])} | {cell(a['original_forgetting'], True)} | "
                     f"{cell(a['expansion_loss'])} | {cell(a['expansion_gain'], True)} | {g0[0]} | {g0[1]} |")
    return "\n".join(lines)


def language_table(per_seed_evals: list[dict], keys: list[str], original, expansion, shares) -> str:
    """Mean over seeds of the held-out loss per language."""
    header = "| language | " + " | ".join(label(k, shares[0], len(shares) > 1) for k in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 1)]
    for group, langs in (("original", original), ("expansion", expansion)):
        for lang in langs:
            lines.append(f"| {lang} ({group}) | " + " | ".join(
                f"{mean(ev[k]['loss'][lang] for ev in per_seed_evals):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def plot(agg: dict, keys: list[str], shares: list[float], path: Path, seeds: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown_keys = [k for k in keys if k != "dense"]
    labels = [label(k, shares[0], len(shares) > 1).replace(", ", ",\n") for k in shown_keys]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [3, 3, 2]})
    for ax, metric, title in ((axes[0], "original_forgetting", "forgetting: original-language loss - dense's"),
                              (axes[1], "expansion_loss", "expansion-language loss")):
        for i, key in enumerate(shown_keys):
            stat = agg[key][metric]
            ax.bar(i, stat["mean"], yerr=stat["std"] if seeds > 1 else None, capsize=3, color=f"C{i}")
            ax.plot([i] * len(stat["values"]), stat["values"], "k.", ms=5)
        ax.set_xticks(range(len(shown_keys)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("nats/token (held out)")
        ax.set_title(f"{title}\n(mean ± std over {seeds} seeds; dots: seeds)")
        ax.grid(axis="y", alpha=0.3)
    if "expansion_loss" in agg["dense"]:
        axes[1].axhline(agg["dense"]["expansion_loss"]["mean"], color="grey", ls="--", lw=1, label="dense")
        axes[1].legend(fontsize=8)
        low = min(agg[k]["expansion_loss"]["mean"] for k in shown_keys)
        axes[1].set_ylim(max(0.0, low - 1.0), agg["dense"]["expansion_loss"]["mean"] + 0.5)
    ax = axes[2]
    router_keys = ["upcycled", "b"] + [k for k in shown_keys if k.partition("@")[0] in ("c", "d")]
    for j, group in enumerate(("original_g0", "expansion_g0")):
        xs = np.arange(len(router_keys)) + (j - 0.5) * 0.38
        ax.bar(xs, [agg[k][group]["mean"] for k in router_keys], 0.38,
               yerr=[agg[k][group]["std"] for k in router_keys] if seeds > 1 else None, capsize=2,
               label="original tokens" if j == 0 else "expansion tokens")
    ax.set_xticks(range(len(router_keys)), ["upcycled"] + [label(k, shares[0], len(shares) > 1).replace(", ", ",\n")
                                                         for k in router_keys[1:]], fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean router probability of expert 0 (G_0)")
    ax.set_title("routing to the frozen original FFN")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=100)
    return path


# ---- driver ------------------------------------------------------------------------------------------------------

def run_seed(args, seed: int, out: Path, data_dir: Path, original, expansion, shares, progress) -> dict:
    """Train every arm of one seed. Returns the phases' summaries, the commands, the upcycled checkpoint, each
    arm's final checkpoint ("finals", by arm key) and arm (c)'s resolved LPR coefficient."""
    seed_dir = out / f"seed{seed}"
    commands: list[str] = []
    phases: dict[str, dict] = {}
    folders = {"dense": "dense", "a": "dense_cont", "b": "moe_stage1"}  # arm key -> run folder in seed_dir
    stage1 = load_template("stage1")
    stage2 = load_template("stage2")
    expansion_steps = args.expansion_steps or stage1["schedule"]["total_steps"]
    expansion_lr = args.expansion_lr or stage1["optimizer"]["lr"]
    same_budget = schedule_with_steps("stage1", expansion_steps)  # (a) and (b): same steps, batch, lr
    model_section = load_template("dense")["model"]
    model_section["vocab_size"] = args.vocab

    def step(name: str):
        progress.set_postfix_str(f"seed {seed}: {name}")

    step("dense")
    phases["dense"] = train_phase(folders["dense"], run_config(
        "dense", seed_dir / folders["dense"], data_dir, seed, model=model_section, data={"languages": original},
        schedule=schedule_with_steps("dense", args.dense_steps)), seed_dir, args, commands)
    progress.update()
    step("(a)")
    phases["a"] = train_phase(folders["a"], run_config(
        "dense", seed_dir / folders["a"], data_dir, seed, model=model_section, data={"languages": expansion},
        optimizer={"lr": expansion_lr}, schedule=same_budget,
        checkpoint={"init_from": str(seed_dir / folders["dense"] / "final")}), seed_dir, args, commands)
    progress.update()
    step("upcycle")
    upcycled = upcycle_phase(seed_dir, args, seed, original, commands)
    step("(b)")
    phases["b"] = train_phase(folders["b"], run_config(
        "stage1", seed_dir / folders["b"], data_dir, seed, model=moe_model_section(upcycled, "moe_lpr_stage1"),
        data={"languages": expansion}, optimizer={"lr": expansion_lr}, schedule=same_budget,
        checkpoint={"init_from": str(upcycled)}), seed_dir, args, commands)
    progress.update()

    # The review: 1 part original to 2 parts expansion (by sampling weight), sized by the replay share.
    weights, original_fraction = review_mix(original, expansion)
    batch = args.review_batch or stage2["schedule"]["global_batch"]
    review_lr = args.review_lr or stage2["optimizer"]["lr"]
    lpr = {"lpr_loss_coef": stage2["model"]["moe"]["lpr_loss_coef"] if args.gamma is None else args.gamma}
    if args.lpr_form:
        lpr["lpr_loss_form"] = args.lpr_form
    replay_data = {"mixing": "weights", "weights": weights, "languages": None}
    for share in shares:
        steps = review_steps(share, phases["b"]["tokens"], batch, original_fraction)
        review = schedule_with_steps("stage2", steps, batch)
        common = dict(data=replay_data, optimizer={"lr": review_lr}, schedule=review,
                      parallelism={"micro_batch": batch})
        stage1_final = seed_dir / folders["b"] / "final"
        runs = {
            "c": ("stage2", f"review_lpr@{share:g}", moe_model_section(upcycled, "moe_lpr_stage2", **lpr),
                  stage1_final),
            "d": ("stage2", f"review_no_lpr@{share:g}",
                  moe_model_section(upcycled, "moe_lpr_stage2", lpr_loss_coef=0.0), stage1_final),
            "e": ("dense", f"dense_replay@{share:g}", model_section, seed_dir / folders["a"] / "final"),
        }
        for arm, (template, folder, model, init_from) in runs.items():
            step(f"({arm}) replay {share:g}")
            folders[f"{arm}@{share:g}"] = folder
            phases[f"{arm}@{share:g}"] = train_phase(folder, run_config(
                template, seed_dir / folder, data_dir, seed, model=model, checkpoint={"init_from": str(init_from)},
                **common), seed_dir, args, commands)
            progress.update()
    return {"seed_dir": seed_dir, "phases": phases, "commands": commands, "upcycled": upcycled,
            "finals": {key: seed_dir / folder / "final" for key, folder in folders.items()},
            "lpr_loss_coef": lpr["lpr_loss_coef"]}


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)  # the in-process evaluation; oversubscribed threads are slow on CPU
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    original, expansion = args.original.split(","), args.expansion.split(",")
    overlap = set(original) & set(expansion)
    if overlap:
        raise ValueError(f"--original and --expansion share {sorted(overlap)}")
    shares = [float(s) for s in args.replay_share.split(",")]
    if any(not 0 < s for s in shares):
        raise ValueError(f"--replay-share: {args.replay_share!r} must be positive fractions")
    seeds = [args.seed + k for k in range(args.seeds)]
    languages = original + expansion
    keys = arm_keys(shares)

    progress = tqdm(total=1 + len(seeds) * (3 + 3 * len(shares) + 1), desc="moe-lpr experiment", unit="phase")
    progress.set_postfix_str("data")
    data_dir = prepare_data(args, out, languages)
    progress.update()
    from fuxi.data_pipeline.manifest import load_manifest

    table = list(load_manifest(data_dir / "train" / "manifest.json").languages)
    val_batches = validation_batches(data_dir, languages, args.val_batches)

    per_seed, per_seed_evals, seed_runs, gradient = [], [], {}, {}
    for seed in seeds:
        runs = run_seed(args, seed, out, data_dir, original, expansion, shares, progress)
        progress.set_postfix_str(f"seed {seed}: evaluate")
        evals = {"upcycled": evaluate(runs["upcycled"], val_batches, table, with_router=True)}
        for key in keys:
            evals[key] = evaluate(runs["finals"][key], val_batches, table,
                                  with_router=key.partition("@")[0] in ("b", "c", "d"))
        gradient[seed] = lpr_gradient_ratio(original_router_logits(runs["finals"]["b"], val_batches, original),
                                            args.top_k)
        gamma = runs["lpr_loss_coef"]  # arm (c)'s LPR coefficient, the same for every seed
        progress.update()
        per_seed.append(seed_summary(evals, original, expansion))
        per_seed_evals.append(evals)
        seed_runs[seed] = {"phases": runs["phases"], "commands": runs["commands"]}
    progress.close()

    agg = aggregate(per_seed)
    comparisons = {}
    for share in shares:
        c, d, e = (f"{arm}@{share:g}" for arm in "cde")
        comparisons[f"{share:g}"] = {
            "lpr_minus_no_lpr_original_loss": paired(per_seed, c, d, "original_loss"),
            "lpr_minus_no_lpr_expansion_loss": paired(per_seed, c, d, "expansion_loss"),
            "lpr_minus_dense_replay_original_loss": paired(per_seed, c, e, "original_loss"),
            "lpr_minus_dense_replay_expansion_loss": paired(per_seed, c, e, "expansion_loss"),
            "stage1_minus_review_no_lpr_original_loss": paired(per_seed, "b", d, "original_loss"),
            "stage1_minus_review_lpr_original_loss": paired(per_seed, "b", c, "original_loss"),
        }
        first = seed_runs[seeds[0]]["phases"]
        original_tokens = [sum(v for lang, v in seed_runs[s]["phases"][c]["tokens_per_language"].items()
                               if lang in original) for s in seeds]
        comparisons[f"{share:g}"]["replay"] = {
            "review_steps": first[c]["steps"], "review_tokens": first[c]["tokens"],
            "original_tokens": original_tokens, "stage1_tokens": first["b"]["tokens"],
            "realised_share": [t / first["b"]["tokens"] for t in original_tokens]}
    ratios = [g["norm_ratio"] for g in gradient.values()]
    gradient_summary = {"per_seed": gradient, "norm_ratio_mean": float(np.mean(ratios)),
                        "norm_ratio_range": [float(min(ratios)), float(max(ratios))],
                        "paper_gamma_matching_code_gamma": gamma / float(np.mean(ratios)), "experts": args.experts}

    png = plot(agg, keys, shares, out / "forgetting.png", len(seeds))
    if args.docs_png:
        docs_png = Path(args.docs_png)
        docs_png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, docs_png)
    wall = time.perf_counter() - started
    command = f"python -m fuxi.experiments.moe_lpr {shlex.join(sys.argv[1:])}".strip()
    results = {"command": command, "args": vars(args), "seeds": seeds, "original": original, "expansion": expansion,
               "shares": shares, "per_seed": per_seed, "summary": agg, "comparisons": comparisons,
               "lpr_gradient": gradient_summary, "evals": per_seed_evals, "runs": seed_runs, "wall_s": wall}
    write_json(out / "results.json", results, default=str)
    report = write_report(out, results, keys, png)

    table_md = summary_table(agg, keys, shares)
    print(table_md)
    print(f"\nreplay and paired differences: {json.dumps(comparisons, indent=1)}")
    print(f"LPR router-gradient ratio paper/code: {gradient_summary['norm_ratio_mean']:.2f} "
          f"(seeds {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"\nreport: {report}\nplot: {png}")
    figures = {"wall_s": round(wall, 1), "seeds": len(seeds),
               "lpr_gradient_ratio": round(gradient_summary["norm_ratio_mean"], 3)}
    for key in keys:
        for metric in ("original_forgetting", "expansion_loss"):
            figures[f"{key}/{metric}"] = round(agg[key][metric]["mean"], 4)
    print(json.dumps(figures))
    return figures


def write_report(out: Path, results: dict, keys: list[str], png: Path) -> Path:
    shares = results["shares"]
    lines = [f"# MoE-LPR forgetting experiment ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"`{results['command']}`; seeds {results['seeds']}; original {', '.join(results['original'])}; "
             f"expansion {', '.join(results['expansion'])}; {results['wall_s']:.0f} s", "",
             "## Mean ± std over seeds (held-out nats/token)", "", summary_table(results["summary"], keys, shares), "",
             "## Held-out loss per language (mean over seeds)", "",
             language_table(results["evals"], keys, results["original"], results["expansion"], shares), "",
             "## Replay and paired differences (per seed: same data, same batches)", "", "```",
             json.dumps(results["comparisons"], indent=1), "```", "",
             "## LPR router gradient, paper form / code form, on (b)'s original-language routing", "", "```",
             json.dumps(results["lpr_gradient"], indent=1), "```", "", f"![forgetting]({png.name})", "",
             "## Commands (first seed)", "", "```bash", *results["runs"][results["seeds"][0]]["commands"], "```", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuxi.experiments.moe_lpr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fuxi.data_pipeline").setLevel(logging.WARNING)  # the cleaning report is in <out>/data
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

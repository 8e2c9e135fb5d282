"""The GhostRNN measurements of docs/ghostrnn.md, in one driver:

1. costs: parameters, per-step MACs, carried state and saved activations of GhostGRU variants A and B (s = 2, 3)
   against a GRU of the same hidden size (formulas of docs/methods.md §4.3, checked against built modules);
2. lm: byte-level language models (GRU and the four GhostGRU variants, same seed, same batches) trained for the
   same number of bytes on the bundled multilingual corpus; validation loss (bits per byte) per language;
3. redundancy: docs/methods.md §4.6.6 on the trained GRU: the fraction of hidden-dimension pairs with |cos| > 0.9,
   against the same network at initialisation;
4. kws: a synthetic keyword-spotting toy (docs/methods.md §4.6.7): GRU vs GhostGRU A/B at s = 2, D = H.

    python -m fuxi.experiments.ghostrnn --out runs/ghostrnn_experiment

Writes results.json, report.md and PNG plots under --out; prints tables and, last, one JSON line.
Byte-level models (vocabulary 256) need no tokenizer, so bits per byte compare across languages and variants.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from fuxi.common.atomic import save_figure, write_json, write_text
from fuxi.model.config import GhostRNNConfig, ModelConfig
from fuxi.model.ghostrnn import GhostGRU, GhostGRUShape, GhostRNNForCausalLM, dimension_cosine_similarity
from fuxi.pretrain.schedule import cosine_lr

logger = logging.getLogger(__name__)

# name -> (ratio, feed_ghost_back, gate_input)
VARIANTS = {
    "GRU": (1, True, "full"),
    "A s=2": (2, True, "full"),
    "A s=3": (3, True, "full"),
    "B s=2": (2, False, "intrinsic"),
    "B s=3": (3, False, "intrinsic"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/ghostrnn_experiment", help="output folder")
    parser.add_argument("--parts", default="costs,lm,redundancy,kws", help="comma-separated parts to run")
    parser.add_argument("--cost-hidden", type=int, default=512, help="H = D for the cost table")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the byte-level LMs")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per LM (same bytes for all)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=0.3, help="temperature sampling exponent over languages")
    parser.add_argument("--val-windows", type=int, default=8, help="validation windows per language")
    parser.add_argument("--kws-steps", type=int, default=300)
    parser.add_argument("--kws-hidden", type=int, default=64)
    parser.add_argument("--kws-seeds", type=int, default=3, help="training seeds per KWS variant (mean, std)")
    parser.add_argument("--kws-noise", type=float, default=2.0, help="noise std (keyword templates: unit RMS)")
    parser.add_argument("--corpus", default=None, help="folder with train/ and valid/ JSONL (default: bundled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


# ---- 1. costs ----------------------------------------------------------------------------------------------

def cost_rows(hidden: int) -> list[dict]:
    """One row per variant at D = H = hidden; counts come from the formulas and are checked on built cells."""
    gru = GhostGRUShape.of(hidden, hidden, 1)
    rows = []
    for name, (ratio, feed, gate) in VARIANTS.items():
        shape = GhostGRUShape.of(hidden, hidden, ratio, feed, gate)
        built = GhostGRU(hidden, hidden, 1, ratio, feed, gate)
        assert sum(p.numel() for p in built.parameters()) == shape.num_parameters(), name
        rows.append({
            "variant": name, "intrinsic": shape.intrinsic, "ghosts": shape.ghosts,
            "params": shape.num_parameters(), "params_vs_gru": shape.num_parameters() / gru.num_parameters(),
            "macs_per_step": shape.macs_per_step(), "macs_vs_gru": shape.macs_per_step() / gru.macs_per_step(),
            "state_floats": shape.state_size, "state_bytes_fp32": 4 * shape.state_size,
            "param_bytes_fp32": 4 * shape.num_parameters(),
            "saved_floats_per_step": shape.saved_activations_per_step(),
        })
    return rows


def format_costs(rows: list[dict], hidden: int) -> str:
    lines = [f"One recurrent layer, D = H = {hidden} (per sequence, per time step):", "",
             "| variant | m | ghosts | parameters | vs GRU | MACs/step | vs GRU | carried state (fp32) "
             "| saved for backward/step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['intrinsic']} | {r['ghosts']} | {r['params']:,} | "
                     f"{100 * r['params_vs_gru']:.1f}% | {r['macs_per_step']:,} | {100 * r['macs_vs_gru']:.1f}% | "
                     f"{r['state_floats']} floats = {r['state_bytes_fp32']:,} B | "
                     f"{r['saved_floats_per_step']} floats |")
    return "\n".join(lines)


# ---- text ----------------------------------------------------------------------------------------------

@dataclass
class ByteStream:
    """One language's documents as a byte array with a document id per byte."""

    data: torch.Tensor     # uint8 [N]
    doc_ids: torch.Tensor  # int32 [N]


def _streams(docs: dict[str, list[str]]) -> dict[str, ByteStream]:
    out = {}
    for lang, texts in docs.items():
        chunks = [torch.frombuffer(bytearray(t.encode("utf-8")), dtype=torch.uint8) for t in texts if t]
        if not chunks:
            continue
        ids = [torch.full((len(c),), i, dtype=torch.int32) for i, c in enumerate(chunks)]
        out[lang] = ByteStream(torch.cat(chunks), torch.cat(ids))
    return out


def load_corpus(folder: str | None, min_bytes: int) -> tuple[dict[str, ByteStream], dict[str, ByteStream], str]:
    """(train, valid, description): the bundled corpus' JSONL splits, or Python's own sources if it is absent."""
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "valid": {}}
    root = Path(folder) if folder else None
    if root is None:
        try:
            from fuxi.data_pipeline.corpus import bundled_corpus

            root = Path(bundled_corpus())
        except ImportError:
            root = None
    if root is not None and (root / "train").is_dir() and (root / "valid").is_dir():
        for split in splits:
            for path in sorted((root / split).glob("*.jsonl")):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            record = json.loads(line)
                            splits[split].setdefault(record.get("lang") or path.stem, []).append(record["text"])
        description = f"bundled corpus {root}"
    else:
        import pydoc_data.topics as topics  # English prose of the language reference, shipped with Python

        prose = list(topics.topics.values())
        code = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(Path(json.__file__).parents[1]
                                                                            .glob("*.py"))[:120]]
        for lang, texts in (("en", prose), ("code_python", code)):
            cut = max(1, len(texts) // 20)
            splits["valid"][lang], splits["train"][lang] = texts[:cut], texts[cut:]
        description = "Python standard library sources and pydoc topics (bundled corpus not found)"
    train, valid = _streams(splits["train"]), _streams(splits["valid"])
    keep = sorted(lang for lang in train if lang in valid and len(train[lang].data) >= min_bytes
                  and len(valid[lang].data) >= min_bytes // 4)
    return {k: train[k] for k in keep}, {k: valid[k] for k in keep}, description


def sample_batch(streams: dict[str, ByteStream], langs: list[str], probs: torch.Tensor, batch: int,
                 seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    picks = torch.multinomial(probs, batch, replacement=True, generator=gen)
    rows, docs = [], []
    for i in picks.tolist():
        s = streams[langs[i]]
        start = int(torch.randint(0, len(s.data) - seq_len - 1, (1,), generator=gen))
        rows.append(s.data[start:start + seq_len + 1].long())
        docs.append(s.doc_ids[start:start + seq_len + 1].long())
    block, doc = torch.stack(rows), torch.stack(docs)
    return block[:, :-1], block[:, 1:], doc[:, :-1]


def validation_windows(streams: dict[str, ByteStream], windows: int, seq_len: int) -> dict[str, tuple]:
    """Fixed, evenly spaced windows per language (deterministic, the same for every variant)."""
    out = {}
    for lang, s in streams.items():
        span = len(s.data) - seq_len - 1
        starts = [int(span * k / max(windows - 1, 1)) for k in range(windows)]
        block = torch.stack([s.data[a:a + seq_len + 1].long() for a in starts])
        doc = torch.stack([s.doc_ids[a:a + seq_len + 1].long() for a in starts])
        out[lang] = (block[:, :-1], block[:, 1:], doc[:, :-1])
    return out


# ---- 2. language models ------------------------------------------------------------------------------------

def build_byte_lm(name: str, hidden: int, layers: int, seed: int) -> GhostRNNForCausalLM:
    ratio, feed, gate = VARIANTS[name]
    config = ModelConfig(type="ghostrnn_lm", vocab_size=256, hidden_size=hidden, num_layers=layers,
                         num_heads=2, kernels="torch", document_masking=True, init_std=0.02,
                         ghostrnn=GhostRNNConfig(ratio=ratio, feed_ghost_back=feed, gate_input=gate))
    config.validate()
    torch.manual_seed(seed)
    return GhostRNNForCausalLM(config)


@torch.no_grad()
def evaluate(model: GhostRNNForCausalLM, windows: dict[str, tuple]) -> dict[str, float]:
    """Bits per byte per language (byte-level: loss / ln 2)."""
    model.eval()
    result = {lang: model(ids, labels=labels, doc_ids=doc).loss.item() / math.log(2)
              for lang, (ids, labels, doc) in windows.items()}
    model.train()
    return result


def train_lm(name: str, args, train: dict[str, ByteStream], windows: dict[str, tuple]) -> dict:
    model = build_byte_lm(name, args.hidden, args.layers, args.seed)
    langs = sorted(train)
    sizes = torch.tensor([float(len(train[k].data)) for k in langs])
    probs = sizes.pow(args.alpha) / sizes.pow(args.alpha).sum()
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every variant
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, 1.0, 20, args.steps, 0.0))
    curve, start = [], time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"train {name}", leave=False, file=sys.stderr):
        ids, labels, doc = sample_batch(train, langs, probs, args.batch, args.seq_len, gen)
        loss = model(ids, labels=labels, doc_ids=doc).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            per_lang = evaluate(model, windows)
            curve.append((step + 1, sum(per_lang.values()) / len(per_lang)))
    per_lang = evaluate(model, windows)
    return {"model": model, "params": model.num_parameters(),
            "rnn_params": sum(p.numel() for p in model.rnn.parameters()), "val_bpb": per_lang,
            "val_bpb_mean": sum(per_lang.values()) / len(per_lang), "curve": curve,
            "bytes_seen": args.steps * args.batch * args.seq_len, "train_s": time.perf_counter() - start}


# ---- 3. redundancy -----------------------------------------------------------------------------------------

@torch.no_grad()
def layer_states(model: GhostRNNForCausalLM, windows: dict[str, tuple]) -> list[torch.Tensor]:
    """Every layer's outputs over all validation windows: [layers] of [positions, H]."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in model.rnn.layers]
    for ids, _, doc in windows.values():
        x = model.embed_tokens(ids)
        keep = model.document_keep_mask(doc)
        for i, layer in enumerate(model.rnn.layers):
            x, _ = layer.scan(x, None, keep)
            per_layer[i].append(x.reshape(-1, x.shape[-1]))
    return [torch.cat(states) for states in per_layer]


def redundancy_report(trained: GhostRNNForCausalLM, initial: GhostRNNForCausalLM, windows: dict[str, tuple],
                      thresholds=(0.5, 0.7, 0.9)) -> dict:
    out = {}
    for label, model in (("initial", initial), ("trained", trained)):
        for i, states in enumerate(layer_states(model, windows)):
            cos = dimension_cosine_similarity(states).abs()
            h = cos.shape[0]
            upper = cos[torch.triu_indices(h, h, offset=1).unbind()]
            out[f"{label}_layer{i}"] = {
                "positions": states.shape[0],
                **{f"frac_abs_cos_gt_{t}": float((upper > t).double().mean()) for t in thresholds},
                "mean_abs_cos": float(upper.mean()), "quantile_99": float(upper.quantile(0.99)),
                "abs_cos": upper,
            }
    return out


# ---- 4. keyword-spotting toy -------------------------------------------------------------------------------

class KeywordSpotter(nn.Module):
    """Linear front-end (features -> H, so the recurrent layer has D = H), one recurrent layer, classifier."""

    def __init__(self, features: int, hidden: int, classes: int, ratio: int, feed: bool, gate: str):
        super().__init__()
        self.front = nn.Linear(features, hidden)
        self.rnn = GhostGRU(hidden, hidden, 1, ratio, feed, gate, "tanh", impl="torch")
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.front(x))
        return self.head(out.mean(dim=1))


def keyword_data(n: int, gen: torch.Generator, templates: torch.Tensor, frames: int = 50,
                 noise: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise 'spectrograms' [n, frames, F] with one keyword template at a random offset; class K = no keyword
    (a distractor: a template of the last row of `templates`, not a keyword)."""
    keywords = templates.shape[0] - 1
    length, features = templates.shape[1], templates.shape[2]
    labels = torch.randint(0, keywords + 1, (n,), generator=gen)
    x = noise * torch.randn(n, frames, features, generator=gen)
    offsets = torch.randint(0, frames - length + 1, (n,), generator=gen)
    for i in range(n):
        o = int(offsets[i])
        x[i, o:o + length] += templates[int(labels[i])]
    return x, labels


def run_kws(args) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    keywords, features, length = 10, 16, 12
    # Smooth templates (cumulative sums of noise), scaled to unit RMS.
    templates = torch.randn(keywords + 1, length, features, generator=gen).cumsum(1)
    templates = templates / templates.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    test_x, test_y = keyword_data(1000, gen, templates, noise=args.kws_noise)
    rows = []
    for name in ("GRU", "A s=2", "B s=2"):
        ratio, feed, gate = VARIANTS[name]
        accuracies = []
        for seed in range(args.seed, args.seed + args.kws_seeds):
            torch.manual_seed(seed)
            model = KeywordSpotter(features, args.kws_hidden, keywords + 1, ratio, feed, gate)
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            data_gen = torch.Generator().manual_seed(seed + 2)
            for _ in tqdm(range(args.kws_steps), desc=f"kws {name} seed {seed}", leave=False, file=sys.stderr):
                x, y = keyword_data(64, data_gen, templates, noise=args.kws_noise)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                accuracies.append((model(test_x).argmax(-1) == test_y).float().mean().item())
        acc = torch.tensor(accuracies)
        rows.append({"variant": name, "rnn_params": sum(p.numel() for p in model.rnn.parameters()),
                     "total_params": sum(p.numel() for p in model.parameters()), "test_accuracies": accuracies,
                     "test_accuracy": acc.mean().item(),
                     "test_accuracy_std": acc.std().item() if len(acc) > 1 else 0.0})
    base = rows[0]["rnn_params"]
    for row in rows:
        row["rnn_param_saving"] = 1 - row["rnn_params"] / base
    return rows


# ---- plots and report --------------------------------------------------------------------------------------

def plot(out: Path, lm: dict, redundancy: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if lm:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in lm.items():
            steps, bpb = zip(*r["curve"])
            ax.plot([s * r["bytes_seen"] / r["curve"][-1][0] / 1e6 for s in steps], bpb, label=f"{name} "
                    f"({r['rnn_params'] / 1e3:.0f}k rnn params)")
        ax.set_xlabel("training bytes (M)")
        ax.set_ylabel("validation bits per byte (mean over languages)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, out / "lm_val_bpb.png", dpi=120)
        written.append("lm_val_bpb.png")
    if redundancy:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted(redundancy):
            ax.hist(redundancy[key]["abs_cos"].numpy(), bins=50, range=(0, 1), histtype="step", density=True,
                    label=key.replace("_", " "))
        ax.axvline(0.9, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("|cos| between hidden dimensions")
        ax.set_ylabel("density (log)")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, out / "gru_redundancy.png", dpi=120)
        written.append("gru_redundancy.png")
    return written


def run(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING)
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    results: dict = {"args": vars(args).copy()}
    results["args"].pop("func", None)
    report = ["# GhostRNN measurements", "", f"Command: `python -m fuxi.experiments.ghostrnn "
              f"{' '.join(sys.argv[1:])}`", ""]

    if "costs" in parts:
        rows = cost_rows(args.cost_hidden)
        results["costs"] = rows
        table = format_costs(rows, args.cost_hidden)
        print(table + "\n")
        report += ["## Costs", "", table, ""]

    lm, redundancy = {}, None
    if parts & {"lm", "redundancy"}:
        train, valid, description = load_corpus(args.corpus, min_bytes=4 * args.seq_len)
        windows = validation_windows(valid, args.val_windows, args.seq_len)
        results["corpus"] = {"source": description, "languages": sorted(train),
                             "train_bytes": {k: len(v.data) for k, v in train.items()}}
        names = list(VARIANTS) if "lm" in parts else ["GRU"]
        for name in names:
            lm[name] = train_lm(name, args, train, windows)
            print(f"{name:<6} val bits/byte {lm[name]['val_bpb_mean']:.3f}  ({lm[name]['train_s']:.0f} s)")
        langs = sorted(windows)
        header = "| variant | rnn params | vs GRU | mean bpb | " + " | ".join(langs) + " |"
        lines = [f"Byte-level LMs, H = {args.hidden}, {args.layers} layer(s), {lm['GRU']['bytes_seen']:,} "
                 f"training bytes each (same batches), {description}; validation bits per byte:", "",
                 header, "|" + "---|" * (4 + len(langs))]
        for name, r in lm.items():
            lines.append(f"| {name} | {r['rnn_params']:,} | {100 * r['rnn_params'] / lm['GRU']['rnn_params']:.0f}% "
                         f"| {r['val_bpb_mean']:.3f} | " + " | ".join(f"{r['val_bpb'][k]:.2f}" for k in langs) + " |")
        table = "\n".join(lines)
        print("\n" + table + "\n")
        report += ["## Validation bits per byte per language", "", table, ""]
        results["lm"] = {name: {k: v for k, v in r.items() if k != "model"} for name, r in lm.items()}
        if "redundancy" in parts:
            initial = build_byte_lm("GRU", args.hidden, args.layers, args.seed)
            redundancy = redundancy_report(lm["GRU"]["model"], initial, windows)
            lines = ["| GRU | positions | |cos| > 0.5 | |cos| > 0.7 | |cos| > 0.9 | mean |cos| | 99th pct |",
                     "|---|---|---|---|---|---|---|"]
            for key, r in redundancy.items():
                lines.append(f"| {key.replace('_', ' ')} | {r['positions']:,} | {100 * r['frac_abs_cos_gt_0.5']:.2f}% "
                             f"| {100 * r['frac_abs_cos_gt_0.7']:.2f}% | {100 * r['frac_abs_cos_gt_0.9']:.2f}% "
                             f"| {r['mean_abs_cos']:.3f} | {r['quantile_99']:.3f} |")
            table = "\n".join(lines)
            print(table + "\n")
            report += ["## Redundancy of a trained GRU (docs/methods.md §4.6.6)", "", table, ""]
            results["redundancy"] = {k: {kk: vv for kk, vv in v.items() if kk != "abs_cos"}
                                     for k, v in redundancy.items()}

    if "kws" in parts:
        rows = run_kws(args)
        results["kws"] = rows
        lines = [f"Synthetic keyword spotting: 10 keywords + 1 distractor class, 50 frames x 16 features, noise "
                 f"std {args.kws_noise}, {args.kws_steps} Adam steps of 64, D = H = {args.kws_hidden}, "
                 f"{args.kws_seeds} seeds; accuracy on 1000 held-out samples (mean +- std over seeds).", "",
                 "| KWS toy | recurrent params | saving vs GRU | total params | test accuracy |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['rnn_params']:,} | {100 * r['rnn_param_saving']:.1f}% | "
                  f"{r['total_params']:,} | {100 * r['test_accuracy']:.1f}% +- {100 * r['test_accuracy_std']:.1f} |"
                  for r in rows]
        table = "\n".join(lines)
        print(table + "\n")
        report += ["## Keyword-spotting toy (docs/methods.md §4.6.7)", "", table, ""]

    results["plots"] = plot(out, lm, redundancy)
    write_text(out / "report.md", "\n".join(report) + "\n")
    write_json(out / "results.json", results, default=float)
    headline = {"out": str(out)}
    if "costs" in results:
        headline.update({f"params_vs_gru_{r['variant'].replace(' ', '').replace('=', '')}": round(r["params_vs_gru"], 4)
                         for r in results["costs"]})
    if "lm" in results:
        headline.update({f"val_bpb_{k.replace(' ', '').replace('=', '')}": round(v["val_bpb_mean"], 4)
                         for k, v in results["lm"].items()})
    if "redundancy" in results:
        headline.update({f"redundancy_{k}": round(v["frac_abs_cos_gt_0.9"], 5)
                         for k, v in results["redundancy"].items()})
    if "kws" in results:
        headline.update({f"kws_acc_{r['variant'].replace(' ', '').replace('=', '')}": round(r["test_accuracy"], 4)
                         for r in results["kws"]})
    print(json.dumps(headline))
    return headline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

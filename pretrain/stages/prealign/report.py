"""How aligned a model is: per representation space, the mean cosine of aligned word pairs (two words of one
concept) against random pairs. The prealign_init stage measures its initial and final weights
(alignment_report.json and alignment_per_layer.png in the run folder); experiments/prealign.py its arms."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fuxi.common.atomic import save_figure
from fuxi.pretrain.stages.prealign.dictionary import DictionaryEntries
from fuxi.pretrain.stages.prealign.loss import word_vectors


def space_names(num_layers: int) -> list[str]:
    return ["embedding"] + [f"layer {i}" for i in range(1, num_layers + 1)] + ["output embedding"]


@torch.no_grad()
def alignment_report(model, output_embedding: torch.Tensor, entries: DictionaryEntries, num_layers: int,
                     max_concepts: int = 512, seed: int = 0, batch_rows: int = 256,
                     device: torch.device | str = "cpu") -> dict:
    """Per space: mean cosine of aligned pairs (two words of one concept) and of random pairs (words of two
    different concepts, a fixed derangement), and their gap. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(entries.concepts))[:max_concepts]
    a_words = [entries.concepts[c][0] for c in picked]
    b_words = [entries.concepts[c][1 + int(rng.integers(len(entries.concepts[c]) - 1))] for c in picked]
    shift = np.roll(np.arange(len(picked)), 1)  # concept i against the b-word of concept i-1
    distinct = list(dict.fromkeys(a_words + b_words))
    width = max(len(entries.words[w]) for w in distinct) + 1
    ids = torch.zeros(len(distinct), width, dtype=torch.long)
    mask = torch.zeros(len(distinct), width, dtype=torch.long)
    for r, w in enumerate(distinct):
        tokens = entries.words[w]
        ids[r, 1:len(tokens) + 1] = torch.tensor(tokens)
        mask[r, 1:len(tokens) + 1] = 1
    was_training = getattr(model, "training", False)
    model.eval()
    chunks = []
    for start in range(0, len(distinct), batch_rows):
        x, m = ids[start:start + batch_rows].to(device), mask[start:start + batch_rows].to(device)
        out = model(x, output_hidden_states=True)
        chunks.append(F.normalize(word_vectors(out.hidden_states, x, m, output_embedding), dim=-1).cpu())
    if was_training:
        model.train()
    z = torch.cat(chunks, dim=1)  # [S, words, h]
    row = {w: r for r, w in enumerate(distinct)}
    a = torch.tensor([row[w] for w in a_words])
    b = torch.tensor([row[w] for w in b_words])
    aligned = (z[:, a] * z[:, b]).sum(-1)  # [S, pairs]
    random_pairs = (z[:, a] * z[:, b[shift]]).sum(-1)
    same = torch.tensor([entries.words[x] == entries.words[y] for x, y in zip(a_words, [b_words[i] for i in shift])])
    random_pairs = random_pairs[:, ~same] if bool(same.any()) else random_pairs
    names = space_names(num_layers)
    return {"spaces": names, "pairs": len(picked),
            "aligned_cos": aligned.mean(1).tolist(), "random_cos": random_pairs.mean(1).tolist(),
            "gap": (aligned.mean(1) - random_pairs.mean(1)).tolist(),
            "aligned_cos_std": aligned.std(1).tolist(), "random_cos_std": random_pairs.std(1).tolist()}


def format_alignment_report(report: dict) -> str:
    lines = [f"{'space':<18}{'aligned cos':>12}{'random cos':>12}{'gap':>9}"]
    for name, a, r, g in zip(report["spaces"], report["aligned_cos"], report["random_cos"], report["gap"]):
        lines.append(f"{name:<18}{a:>12.3f}{r:>12.3f}{g:>9.3f}")
    return "\n".join(lines)


def plot_alignment_report(reports: dict[str, dict], path: str | Path, title: str) -> Path:
    """Aligned vs random cosine per space, one line pair per report (e.g. before / after)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for (label, report), color in zip(reports.items(), ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
        x = range(len(report["spaces"]))
        ax.plot(x, report["aligned_cos"], "-o", color=color, label=f"{label}: aligned pairs")
        ax.plot(x, report["random_cos"], "--x", color=color, label=f"{label}: random pairs")
        ax.set_xticks(list(x), report["spaces"], rotation=30, ha="right")
    ax.set_ylabel("mean cosine")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return Path(path)


"""Router statistics per language, for the trainer's logs and a PNG: does LPR send original-language tokens to
expert 0 (the frozen original FFN) while expanded-language tokens keep their routing (MoE-LPR Fig. 3)?"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from fuxi.common.atomic import save_figure


@dataclass
class RouterStats:
    """Means over the tokens of each language; NaN where a language has no token in the batch."""

    mean_g0: torch.Tensor       # [L_moe, languages] mean router probability of expert 0
    expert_share: torch.Tensor  # [L_moe, languages, N] fraction of the language's top-K selections per expert
    token_counts: torch.Tensor  # [languages]

    def as_log(self, languages: Sequence[str] | None = None) -> dict[str, float]:
        """Flat {"router/g0/<lang>": mean over layers, "router/share/<lang>/e<j>": ...} for present languages."""
        names = list(languages) if languages is not None else [str(i) for i in range(len(self.token_counts))]
        logs = {}
        for i, lang in enumerate(names):
            if self.token_counts[i] == 0:
                continue
            logs[f"router/g0/{lang}"] = float(self.mean_g0[:, i].mean())
            for j, share in enumerate(self.expert_share[:, i].mean(0).tolist()):
                logs[f"router/share/{lang}/e{j}"] = share
        return logs


def router_statistics(routing, lang_ids: torch.Tensor, num_languages: int,
                      token_mask: torch.Tensor | None = None) -> RouterStats:
    """Per-language mean G_0 and expert-selection shares, per MoE layer.

    routing: a MoECausalLMOutput, or a (probs [L, T, N], expert_ids [L, T, K]) pair of captured tensors.
    lang_ids: [B, S] (T = B*S) language id per token; ids outside [0, num_languages) and masked tokens are
    skipped.
    """
    if hasattr(routing, "router_probs"):
        probs, expert_ids = routing.router_probs(), routing.router_expert_ids()
    else:
        probs, expert_ids = routing
    probs = probs.detach().float()
    num_layers, num_tokens, num_experts = probs.shape
    lang = lang_ids.reshape(-1).to(probs.device)
    if lang.numel() != num_tokens:
        raise ValueError(f"lang_ids: {lang.numel()} tokens, the routing has {num_tokens}")
    valid = (lang >= 0) & (lang < num_languages)
    if token_mask is not None:
        valid &= token_mask.reshape(-1).to(probs.device).bool()
    one_hot_lang = F.one_hot(lang.clamp(0, num_languages - 1), num_languages).float() * valid[:, None]  # [T, G]
    counts = one_hot_lang.sum(0)                                                                    # [G]
    g0_sums = probs[..., 0] @ one_hot_lang                                                          # [L, G]
    selections = F.one_hot(expert_ids.to(probs.device), num_experts).sum(2).float()                 # [L, T, N]
    share_sums = torch.einsum("ltn,tg->lgn", selections, one_hot_lang)                             # [L, G, N]
    top_k = expert_ids.shape[-1]
    return RouterStats(mean_g0=g0_sums / counts, expert_share=share_sums / (counts[None, :, None] * top_k),
                       token_counts=counts.long())


def plot_router_shares(stats: RouterStats, path: str | Path, languages: Sequence[str] | None = None,
                       title: str = "MoE router") -> Path:
    """Two panels, averaged over MoE layers: mean G_0 per language, and stacked expert shares per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [i for i in range(len(stats.token_counts)) if stats.token_counts[i] > 0]
    if not present:
        raise ValueError("plot_router_shares: no language has tokens in these statistics")
    names = list(languages) if languages is not None else [str(i) for i in range(len(stats.token_counts))]
    labels = [names[i] for i in present]
    g0 = stats.mean_g0[:, present].mean(0).numpy()
    shares = stats.expert_share[:, present].mean(0).numpy()  # [G, N]
    fig, (ax_g0, ax_share) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(present) + 4), 4))
    ax_g0.bar(labels, g0, color="tab:blue")
    ax_g0.set_ylim(0, 1)
    ax_g0.set_ylabel("mean G_0 (expert 0 = original FFN)")
    ax_g0.set_title("router probability of expert 0")
    bottom = torch.zeros(len(present)).numpy()
    for j in range(shares.shape[1]):
        ax_share.bar(labels, shares[:, j], bottom=bottom, label=f"expert {j}")
        bottom = bottom + shares[:, j]
    ax_share.set_ylim(0, 1)
    ax_share.set_ylabel("share of top-K selections")
    ax_share.set_title("expert selection")
    ax_share.legend(fontsize="small", loc="upper right")
    for ax in (ax_g0, ax_share):
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=100)
    return path

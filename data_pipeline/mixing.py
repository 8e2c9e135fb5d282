"""Language mixing: target shares from measured token counts, a UniMax-style epoch cap, and the per-epoch
sample counts that realise them.

Shares: "natural" p_i = T_i / sum(T) over the tokens T_i of language i in the train shards; "temperature"
q_i ∝ p_i^alpha (XLM-R/mT5 use alpha = 0.3); "uniform" q_i = 1/n; "weights" q_i ∝ w_i (FuxiTranyu's hand-set
mix). A mixture epoch of S samples gives language i round(S·q_i) samples, but at most
floor(max_epochs · N_i) (N_i: its samples); what a capped language cannot use goes to the others in
proportion to their shares ("water-filling"). With uniform shares this is UniMax (Chung et al. 2023, Alg. 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fuxi.common.errors import ConfigError, DataError
from fuxi.common.tables import format_table
from fuxi.common.typed_config import require_choice
from fuxi.data_pipeline.config import MIXING_MODES, MixingMode


def target_shares(tokens: dict[str, int], mixing: MixingMode, alpha: float = 0.3,
                  weights: dict[str, float] | None = None) -> dict[str, float]:
    """Target share of each language (sums to 1)."""
    langs = list(tokens)
    if mixing == "weights":
        if not weights:
            raise ConfigError("weights", "mixing='weights' needs a {language: weight} mapping")
        missing = [lang for lang in langs if lang not in weights]
        if missing:
            raise ConfigError("weights", f"no weight for language(s) {missing}")
        raw = {lang: float(weights[lang]) for lang in langs}
    else:
        total = sum(tokens.values())
        if total <= 0:
            raise DataError("mixing: the selected languages have no tokens")
        if mixing == "natural":
            raw = {lang: tokens[lang] / total for lang in langs}
        elif mixing == "temperature":
            raw = {lang: (tokens[lang] / total) ** alpha if tokens[lang] > 0 else 0.0 for lang in langs}
        elif mixing == "uniform":
            raw = {lang: 1.0 for lang in langs}
        else:
            require_choice("mixing", mixing, MIXING_MODES)
    norm = sum(raw.values())
    if norm <= 0:
        raise ConfigError("weights", "all weights are zero")
    return {lang: raw[lang] / norm for lang in langs}


def water_fill(shares: dict[str, float], budget: float, caps: dict[str, float] | None) -> dict[str, float]:
    """Split `budget` in proportion to `shares`, never giving a language more than its cap; what capped
    languages cannot take is redistributed among the rest. Returns real-valued allocations."""
    alloc = {lang: 0.0 for lang in shares}
    active = [lang for lang in shares if shares[lang] > 0]
    remaining = float(budget)
    while active and remaining > 1e-9:
        norm = sum(shares[lang] for lang in active)
        proposal = {lang: remaining * shares[lang] / norm for lang in active}
        capped = [lang for lang in active if caps is not None and proposal[lang] >= caps[lang]]
        if not capped:
            for lang in active:
                alloc[lang] = proposal[lang]
            break
        for lang in capped:
            alloc[lang] = caps[lang]
            remaining -= caps[lang]
            active.remove(lang)
    return alloc


def round_allocation(alloc: dict[str, float], caps: dict[str, int] | None = None) -> dict[str, int]:
    """Integers summing to round(sum(alloc)), each within one of its real value and within its cap
    (largest-remainder rounding)."""
    total = round(sum(alloc.values()))
    counts = {lang: math.floor(v + 1e-9) for lang, v in alloc.items()}
    order = sorted(alloc, key=lambda lang: (-(alloc[lang] - counts[lang]), lang))
    short = total - sum(counts.values())
    for lang in order:
        if short <= 0:
            break
        if caps is None or counts[lang] + 1 <= caps[lang]:
            counts[lang] += 1
            short -= 1
    return counts


@dataclass
class MixturePlan:
    """How one mixture epoch is composed: per language its samples available, target share, and the
    samples drawn per epoch (`counts`)."""
    languages: list[str]  # the selected languages, in manifest order
    available: dict[str, int]  # samples in the train shards
    tokens: dict[str, int]
    target: dict[str, float]  # share before the cap
    counts: dict[str, int]  # samples per mixture epoch
    block_len: int
    requested_epoch_samples: int

    @property
    def epoch_samples(self) -> int:
        return sum(self.counts.values())

    @property
    def planned(self) -> dict[str, float]:
        total = self.epoch_samples
        return {lang: self.counts[lang] / total for lang in self.languages}

    @property
    def epochs(self) -> dict[str, float]:
        """Passes over each language's data per mixture epoch (>1: repeated, <1: subsampled)."""
        return {lang: self.counts[lang] / self.available[lang] for lang in self.languages}

    def table(self, realised: dict[str, float] | None = None) -> str:
        rows = []
        for lang in self.languages:
            row = [lang, self.available[lang], self.tokens[lang], self.target[lang], self.planned[lang],
                   self.counts[lang], self.epochs[lang]]
            if realised is not None:
                row.append(realised.get(lang, 0.0))
            rows.append(row)
        headers = ["lang", "samples", "tokens", "target share", "planned share", "per epoch", "epochs"]
        if realised is not None:
            headers.append("realised share")
        return format_table(headers, rows)


def plan_mixture(available: dict[str, int], block_len: int, mixing: MixingMode, alpha: float = 0.3,
                 weights: dict[str, float] | None = None, max_epochs: float | None = None,
                 epoch_samples: int | None = None) -> MixturePlan:
    """Samples per language per mixture epoch. `available`: samples per selected language (all > 0)."""
    empty = [lang for lang, n in available.items() if n <= 0]
    if empty:
        raise DataError(f"languages: no training samples for {empty} (is the language's text shorter than "
                        f"one block of {block_len} tokens, or missing from the manifest?)")
    tokens = {lang: n * block_len for lang, n in available.items()}
    shares = target_shares(tokens, mixing, alpha, weights)
    budget = epoch_samples if epoch_samples is not None else sum(available.values())
    caps = ({lang: math.floor(max_epochs * n) for lang, n in available.items()}
            if max_epochs is not None else None)
    alloc = water_fill(shares, budget, caps)
    counts = round_allocation(alloc, caps)
    if sum(counts.values()) == 0:
        raise DataError(f"mixing: a mixture epoch of {budget} samples gives no language a sample")
    return MixturePlan(languages=list(available), available=dict(available), tokens=tokens, target=shares,
                       counts=counts, block_len=block_len, requested_epoch_samples=budget)

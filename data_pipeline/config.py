"""The trainer-facing data config: which shards to stream, how to mix languages, what to do on bad samples.

Plain types only (str/int/float/bool/list/dict/Optional, Literal for a choice) so the trainer's strict YAML
loader (`fuxi.common.typed_config.from_dict`) can type-check it; `validate()` raises `ConfigError` keyed by the
field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import check_choices, require_at_least

MixingMode = Literal["temperature", "weights", "natural", "uniform"]
OnError = Literal["raise", "skip"]
CodeSwitchDirection = Literal["source_to_target", "all_to_all"]
MIXING_MODES = get_args(MixingMode)
CODESWITCH_DIRECTIONS = get_args(CodeSwitchDirection)


@dataclass
class DataConfig:
    # Manifests written by `fuxi data pack` / `prepare_dataset` (paths; shards are found next to them).
    train_manifest: str
    val_manifest: str | None = None
    # Tokens the model sees per sample; the shards hold blocks of seq_len + 1 tokens.
    seq_len: int = 2048
    seed: int = 0
    # DataLoader worker processes per rank (0: read in the training process).
    num_workers: int = 2
    # How languages are mixed: "temperature" (q_i ∝ p_i^alpha over token counts), "weights" (explicit),
    # "natural" (proportional to tokens), "uniform" (equal; with max_epochs_per_language this is UniMax).
    mixing: MixingMode = "temperature"
    alpha: float = 0.3
    weights: dict[str, float] | None = None
    # UniMax-style cap: at most this many passes over one language's data per mixture epoch.
    max_epochs_per_language: float | None = None
    # Languages to train on (default: every language in the train manifest).
    languages: list[str] | None = None
    # Size of one mixture epoch in tokens (default: the train split's size). With a cap, set it to the
    # training budget to get UniMax's per-run repetition limit.
    epoch_tokens: int | None = None
    # Samples per shuffled window of the mixture; bounds the memory of the sample order.
    mixing_window: int = 65536
    # Corrupt samples: "raise" (default) or "skip" (counted and reported, never silent).
    on_error: OnError = "raise"
    # Check each shard's sha256 the first time a process reads it (file sizes are always checked).
    verify_checksums: bool = True
    # Tokenizer dir the model was built for; its hash must match the manifest's.
    tokenizer: str | None = None
    # DataLoader batches each worker prefetches.
    prefetch_factor: int = 4
    # PreAlign input-only code-switching (data_pipeline/codeswitch.py): the probability that a word of the
    # alignment table is replaced by a translation in the input (PreAlign: 0.05; 0 disables it), and the table
    # (JSONL, data_pipeline/align_table.py; default: the shipped table).
    codeswitch_ratio: float = 0.0
    codeswitch_table: str | None = None
    # Which words are switched: "source_to_target" (the released code: each concept's first word, e.g. the
    # English pivot, is replaced by one of its translations) or "all_to_all" (every word by any other of its concept).
    codeswitch_direction: CodeSwitchDirection = "source_to_target"

    def validate(self) -> None:
        check_choices(self)
        if not self.train_manifest:
            raise ConfigError("train_manifest", "must name a manifest.json")
        require_at_least(self, 1, "seq_len", "epoch_tokens", "mixing_window", "prefetch_factor")
        require_at_least(self, 0, "num_workers")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha}")
        if self.mixing == "weights" and not self.weights:
            raise ConfigError("weights", "mixing='weights' needs a {language: weight} mapping")
        if self.weights is not None:
            bad = {k: v for k, v in self.weights.items() if not v >= 0}
            if bad:
                raise ConfigError("weights", f"weights must be >= 0, got {bad}")
            if sum(self.weights.values()) <= 0:
                raise ConfigError("weights", "at least one weight must be > 0")
        if self.max_epochs_per_language is not None and not self.max_epochs_per_language > 0:
            raise ConfigError("max_epochs_per_language", f"must be > 0, got {self.max_epochs_per_language}")
        if self.languages is not None:
            if not self.languages:
                raise ConfigError("languages", "an empty list selects no data; use null for all languages")
            dup = sorted({x for x in self.languages if self.languages.count(x) > 1})
            if dup:
                raise ConfigError("languages", f"listed twice: {dup}")
        if not 0.0 <= self.codeswitch_ratio <= 1.0:
            raise ConfigError("codeswitch_ratio", f"must be in [0, 1], got {self.codeswitch_ratio}")
        if self.codeswitch_table is not None and not self.codeswitch_table:
            raise ConfigError("codeswitch_table", "empty path; use null for the shipped table")

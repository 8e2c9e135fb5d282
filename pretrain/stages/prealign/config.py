"""The `prealign:` section of a run config: what stage prealign_init reads (docs/prealign.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import check_choices, require_at_least

# Which term alpha weights: "align": L = L_LM + alpha * L_align (both released trainers); "lm": L = L_align +
# alpha * L_LM (the other reading of the paper). docs/prealign.md compares the two.
AlphaWeights = Literal["align", "lm"]


@dataclass
class PreAlignConfig:
    """Entries per batch are schedule.global_batch (one concept per sample); negatives come from one micro-step
    across ranks."""

    # Alignment table (JSONL, data_pipeline/align_table.py); default: the shipped table.
    table: str | None = None
    temperature: float = 0.1
    alpha: float = 0.1
    alpha_weights: AlphaWeights = "align"
    # Words of one concept per sample: 2 is a translation pair; more gives the multi-way (supervised) form.
    words_per_entry: int = 2
    # Words tokenised longer than this are left out of the stage (logged).
    max_word_tokens: int = 16
    # Use only these languages' words (default: all in the table).
    languages: list[str] | None = None
    # Concepts measured by the end-of-run alignment report.
    report_concepts: int = 512

    def validate(self) -> None:
        check_choices(self)
        if not self.temperature > 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        require_at_least(self, 0, "alpha")
        require_at_least(self, 1, "max_word_tokens")
        require_at_least(self, 2, "words_per_entry", "report_concepts")
        if self.table is not None and not self.table:
            raise ConfigError("table", "empty path; use null for the shipped table")

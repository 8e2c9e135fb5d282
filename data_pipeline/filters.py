"""Heuristic document filters in the FuxiTranyu/BLOOM/Gopher tradition.

FuxiTranyu (§3.2) drops documents that contain URLs or flagged words and filters on repeated character/word
n-gram ratios and document length, as BLOOM and Gopher do. Natural-language documents get those rules; code
(languages named `code_*`) gets the StarCoder/The Stack rules instead (line lengths, alphanumeric fraction),
since code is legitimately repetitive. A document is dropped by the first rule it fails; the name of that rule
is what the cleaning report counts.

Definitions follow the papers' reference implementations (Gopher: Rae et al. 2021, App. A; BLOOM: Laurençon
et al. 2022, the ROOTS filters; StarCoder: Li et al. 2023, §3), with "words" replaced by script-aware word
units (`textstats.word_units`) so Chinese, Japanese and Thai are measured per character.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from fuxi.common.errors import ConfigError
from fuxi.data_pipeline.textstats import spaceless_fraction, word_units

URL_RE = re.compile(r"(?:https?|ftp)://\S+|\bwww\.[a-z0-9-]+\.[a-z]{2,}\S*", re.IGNORECASE)

# Order matters: it is the order rules are tried in, so it decides which rule a rejected document counts under.
TEXT_FILTERS = ("too_short", "too_long", "url", "flagged_words", "alpha_words", "dup_lines", "top_ngram",
                "dup_ngram", "char_repetition")
CODE_FILTERS = ("too_short", "too_long", "max_line_length", "mean_line_length", "alnum_fraction")


@dataclass
class FilterConfig:
    # Length, in word units (text) or characters (code).
    min_words: int = 20
    max_words: int = 100_000
    min_code_chars: int = 200
    max_code_chars: int = 200_000
    # Documents with more URLs than this are dropped (FuxiTranyu drops any document with a URL: 0).
    max_urls: int = 0
    # Flagged (blacklist) words; a document is dropped when their fraction of its words exceeds the limit.
    flagged_words: list[str] = field(default_factory=list)
    max_flagged_word_fraction: float = 0.0
    # Gopher: at least this fraction of words must contain an alphabetic character.
    min_alpha_word_fraction: float = 0.6
    # Gopher repetition rules.
    max_duplicate_line_fraction: float = 0.3
    max_top_ngram_char_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_duplicate_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    # BLOOM character repetition ratio (share of the sqrt(#distinct) most frequent character n-grams).
    char_repetition_n: int = 10
    max_char_repetition: float = 0.2
    # StarCoder code rules.
    max_code_line_length: int = 1000
    max_code_mean_line_length: float = 100.0
    min_code_alnum_fraction: float = 0.25
    # Languages whose name starts with this prefix are code.
    code_prefix: str = "code_"

    def validate(self) -> None:
        if self.min_words < 0 or self.max_words < self.min_words:
            raise ConfigError("min_words" if self.min_words < 0 else "max_words",
                              f"need 0 <= min_words <= max_words, got {self.min_words}/{self.max_words}")
        if self.max_urls < 0:
            raise ConfigError("max_urls", f"must be >= 0, got {self.max_urls}")
        for name in ("max_flagged_word_fraction", "min_alpha_word_fraction", "max_duplicate_line_fraction",
                     "max_char_repetition", "min_code_alnum_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(name, f"must be in [0, 1], got {value}")
        for name in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            for n, value in getattr(self, name).items():
                if int(n) < 1 or not 0.0 <= value <= 1.0:
                    raise ConfigError(name, f"bad entry {n}: {value}")
        if self.char_repetition_n < 1:
            raise ConfigError("char_repetition_n", f"must be >= 1, got {self.char_repetition_n}")


# --- measurements (each independent, so tests can check them against hand-computed values) -----------------

def duplicate_line_fraction(text: str) -> float:
    """Gopher: fraction of (non-empty) lines that repeat an earlier line."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return 0.0
    seen: set[str] = set()
    dups = 0
    for line in lines:
        if line in seen:
            dups += 1
        seen.add(line)
    return dups / len(lines)


def top_ngram_char_fraction(units: list[str], n: int) -> float:
    """Gopher: characters covered by the most frequent word n-gram (count x its length) / all characters."""
    total = sum(len(u) for u in units)
    if total == 0 or len(units) < n:
        return 0.0
    counts = Counter(tuple(units[i:i + n]) for i in range(len(units) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(len(u) for u in gram) * count / total


def duplicate_ngram_char_fraction(units: list[str], n: int) -> float:
    """Gopher: characters inside n-grams that occurred before (non-overlapping) / all characters."""
    total = sum(len(u) for u in units)
    if total == 0 or len(units) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    dup_chars = 0
    i = 0
    while i <= len(units) - n:
        gram = tuple(units[i:i + n])
        if gram in seen:
            dup_chars += sum(len(u) for u in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return dup_chars / total


def char_repetition_ratio(text: str, n: int = 10) -> float:
    """BLOOM: share of character n-gram occurrences taken by the floor(sqrt(#distinct)) most frequent ones,
    counting only n-grams that occur more than once."""
    if len(text) < n:
        return 0.0
    counts = Counter(text[i:i + n] for i in range(len(text) - n + 1))
    freqs = sorted(counts.values(), reverse=True)
    top = int(math.sqrt(len(freqs)))
    repeated = sum(f for f in freqs[:top] if f > 1)
    return repeated / sum(freqs)


def alpha_word_fraction(units: list[str]) -> float:
    """Gopher: fraction of words containing at least one alphabetic character."""
    if not units:
        return 0.0
    return sum(1 for u in units if any(c.isalpha() for c in u)) / len(units)


def count_urls(text: str) -> int:
    return len(URL_RE.findall(text))


def flagged_word_fraction(units: list[str], flagged: set[str]) -> float:
    if not units or not flagged:
        return 0.0
    return sum(1 for u in units if u.lower() in flagged) / len(units)


def code_line_stats(text: str) -> tuple[int, float, float]:
    """(longest line, mean line length, alphanumeric fraction of all characters) as in The Stack."""
    lines = text.split("\n")
    lengths = [len(line) for line in lines]
    alnum = sum(1 for c in text if c.isalnum())
    return max(lengths), sum(lengths) / len(lengths), alnum / max(1, len(text))


# --- the filter -------------------------------------------------------------------------------------------

class DocumentFilter:
    """Apply the configured rules to one document; `reject_reason` is None when it is kept."""

    def __init__(self, config: FilterConfig | None = None):
        self.config = config or FilterConfig()
        self.config.validate()
        self._flagged = {w.lower() for w in self.config.flagged_words}

    def is_code(self, lang: str) -> bool:
        return lang.startswith(self.config.code_prefix)

    def reject_reason(self, text: str, lang: str) -> str | None:
        return self._code_reason(text) if self.is_code(lang) else self._text_reason(text)

    def _code_reason(self, text: str) -> str | None:
        c = self.config
        if len(text) < c.min_code_chars:
            return "too_short"
        if len(text) > c.max_code_chars:
            return "too_long"
        longest, mean, alnum = code_line_stats(text)
        if longest > c.max_code_line_length:
            return "max_line_length"
        if mean > c.max_code_mean_line_length:
            return "mean_line_length"
        if alnum < c.min_code_alnum_fraction:
            return "alnum_fraction"
        return None

    def _text_reason(self, text: str) -> str | None:
        c = self.config
        units = word_units(text)
        if len(units) < c.min_words:
            return "too_short"
        if len(units) > c.max_words:
            return "too_long"
        if count_urls(text) > c.max_urls:
            return "url"
        if self._flagged and flagged_word_fraction(units, self._flagged) > c.max_flagged_word_fraction:
            return "flagged_words"
        if alpha_word_fraction(units) < c.min_alpha_word_fraction:
            return "alpha_words"
        if duplicate_line_fraction(text) > c.max_duplicate_line_fraction:
            return "dup_lines"
        if spaceless_fraction(text) > 0.5:
            # Gopher's word n-gram limits assume words; on single characters (Chinese, Japanese, Thai) they
            # flag ordinary text, so those documents get BLOOM's character repetition rule only.
            return self._char_repetition_reason(text)
        for n, limit in sorted(c.max_top_ngram_char_fraction.items()):
            if top_ngram_char_fraction(units, int(n)) > limit:
                return "top_ngram"
        for n, limit in sorted(c.max_duplicate_ngram_char_fraction.items()):
            if duplicate_ngram_char_fraction(units, int(n)) > limit:
                return "dup_ngram"
        return self._char_repetition_reason(text)

    def _char_repetition_reason(self, text: str) -> str | None:
        if char_repetition_ratio(text, self.config.char_repetition_n) > self.config.max_char_repetition:
            return "char_repetition"
        return None

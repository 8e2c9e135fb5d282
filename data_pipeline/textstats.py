"""Script-aware word units, shared by the filters, the near-duplicate shingles and the fertility report.

Chinese, Japanese and Thai (and other scripts written without spaces) have no whitespace-delimited words, so
"tokens per word" and word n-grams would count a whole sentence as one word. We treat each character of such a
script as one unit and every other run of non-space characters as one unit: for English that is the usual
whitespace word; for Chinese it is the character, the unit Chinese fertility figures are reported in.
"""
from __future__ import annotations

import re
import unicodedata

# Scripts written without spaces between words: Han, Hiragana/Katakana, Thai, Lao, Myanmar, Khmer, Tibetan,
# plus the CJK symbols/punctuation and full-width forms used with them.
_SPACELESS_RANGES = (
    "\u0e00-\u0e7f"  # Thai
    "\u0e80-\u0eff"  # Lao
    "\u0f00-\u0fff"  # Tibetan
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3000-\u303f"  # CJK symbols and punctuation
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff00-\uffef"  # half/full-width forms
    "\U00020000-\U0002ebef"  # CJK extensions B-F
)
_UNIT_RE = re.compile(f"[{_SPACELESS_RANGES}]|[^\\s{_SPACELESS_RANGES}]+")
_SPACELESS_RE = re.compile(f"[{_SPACELESS_RANGES}]")


def word_units(text: str) -> list[str]:
    """Words of spaced scripts and single characters of spaceless scripts, in order."""
    return _UNIT_RE.findall(text)


def word_unit_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each word unit of `text`."""
    return [m.span() for m in _UNIT_RE.finditer(text)]


def spaceless_fraction(text: str) -> float:
    """Fraction of non-space characters that belong to a script written without spaces."""
    chars = sum(1 for c in text if not c.isspace())
    return len(_SPACELESS_RE.findall(text)) / chars if chars else 0.0


def nfc(text: str) -> str:
    """Unicode NFC (canonical composition): one code point sequence per visible string, lossless."""
    return unicodedata.normalize("NFC", text)


def script_of(char: str) -> str:
    """The script family of one character, from its Unicode name ("LATIN", "CYRILLIC", "CJK", ...)."""
    try:
        name = unicodedata.name(char)
    except ValueError:
        return "UNKNOWN"
    first = name.split(" ")[0]
    if first in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL"):
        return {"HIRAGANA": "KANA", "KATAKANA": "KANA"}.get(first, first)
    return first


def dominant_script(text: str, sample: int = 2000) -> str:
    """The most common script among the letters of (the start of) `text`."""
    counts: dict[str, int] = {}
    for c in text[:sample]:
        if c.isalpha():
            s = script_of(c)
            counts[s] = counts.get(s, 0) + 1
    return max(counts, key=counts.get) if counts else "NONE"

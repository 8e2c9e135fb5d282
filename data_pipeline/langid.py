"""Language identification for documents that come without a usable label: py3langid (its model ships inside
the package, so nothing is downloaded), with a confidence floor below which clean drops the document."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LangIdConfig:
    # Fill missing/unknown labels with py3langid.
    enabled: bool = True
    # Documents identified with a lower (normalised) probability are dropped as "langid_low_confidence".
    min_confidence: float = 0.5
    # Restrict the identifier to these ISO 639-1 codes (None: all 97 it knows).
    languages: list[str] | None = None


_IDENTIFIERS: dict[tuple[str, ...] | None, object] = {}  # module-level: forked workers inherit loaded ones


def identifier(languages: list[str] | None):
    """py3langid's identifier, restricted to `languages`; loading its model takes about a second, so it is
    loaded on first use and kept."""
    key = tuple(sorted(languages)) if languages else None
    if key not in _IDENTIFIERS:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier  # lazily: see the docstring
        ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        if languages:
            ident.set_languages(languages)
        _IDENTIFIERS[key] = ident
    return _IDENTIFIERS[key]

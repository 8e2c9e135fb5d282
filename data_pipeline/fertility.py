"""Tokenizer fertility per language: tokens per word and UTF-8 bytes per token (FuxiTranyu Fig. 2).

Words are script-aware units (`textstats.word_units`): whitespace words, and single characters for scripts
written without spaces, so Chinese/Japanese/Thai figures are tokens per character. High tokens-per-word
means over-segmentation (FuxiTranyu links it to weak results on bn/hi/ta); bytes per token is what turns
per-language loss into bits per byte.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fuxi.common.atomic import save_figure
from fuxi.common.errors import DataError
from fuxi.common.tables import format_table
from fuxi.data_pipeline.corpus import iter_documents
from fuxi.data_pipeline.textstats import word_units
from fuxi.data_pipeline.tokenizer import load_tokenizer


def fertility(tokenizer_dir: str | Path, corpus: str | Path, max_docs_per_language: int | None = None
              ) -> dict[str, dict[str, float]]:
    """{language: {documents, words, tokens, bytes, tokens_per_word, bytes_per_token}} over `corpus`."""
    tok = load_tokenizer(tokenizer_dir)
    texts: dict[str, list[str]] = defaultdict(list)
    for doc in iter_documents(corpus):
        if doc.lang is None:
            raise DataError(f"{doc.origin}: document has no language label")
        if max_docs_per_language is None or len(texts[doc.lang]) < max_docs_per_language:
            texts[doc.lang].append(doc.text)
    out = {}
    for lang in sorted(texts):
        encodings = tok.encode_batch(texts[lang], add_special_tokens=False)
        tokens = sum(len(e.ids) for e in encodings)
        words = sum(len(word_units(t)) for t in texts[lang])
        nbytes = sum(len(t.encode("utf-8")) for t in texts[lang])
        out[lang] = {"documents": len(texts[lang]), "words": words, "tokens": tokens, "bytes": nbytes,
                     "tokens_per_word": tokens / words if words else float("nan"),
                     "bytes_per_token": nbytes / tokens if tokens else float("nan")}
    return out


def fertility_table(stats: dict[str, dict[str, float]]) -> str:
    rows = [[lang, int(s["documents"]), int(s["words"]), int(s["tokens"]), s["tokens_per_word"],
             s["bytes_per_token"]] for lang, s in sorted(stats.items(), key=lambda kv: kv[1]["tokens_per_word"])]
    return format_table(["lang", "docs", "words", "tokens", "tokens/word", "bytes/token"], rows)


def plot_fertility(stats: dict[str, dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Two bar charts, languages sorted by tokens per word."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    langs = sorted(stats, key=lambda lang: stats[lang]["tokens_per_word"])
    fig, axes = plt.subplots(1, 2, figsize=(12, max(4, 0.28 * len(langs) + 1.5)), sharey=True)
    axes[0].barh(langs, [stats[lang]["tokens_per_word"] for lang in langs], color="tab:blue")
    axes[0].set_xlabel("tokens per word (per character for zh/ja/th)")
    axes[1].barh(langs, [stats[lang]["bytes_per_token"] for lang in langs], color="tab:orange")
    axes[1].set_xlabel("UTF-8 bytes per token")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title or "Tokenizer fertility per language")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)
    return path

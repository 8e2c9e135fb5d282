"""Input-only code-switching (PreAlign stage 2, docs/methods.md §3.4): a transform for the training stream.

Words. A token starts a word iff its string begins with the tokenizer's whitespace marker ("Ġ" for byte-level
BPE, "▁" for sentencepiece); a word is the token span up to the next word start. Special tokens (EOS between
documents) are words of their own, so a word never swallows a document boundary. Concatenating the words gives
back the sequence.

Table. As in the released code, the keys are the *source* words (the first word of each concept: the
English pivot of a multi-way line, `src_text` of a one-to-one line) and their translations are the concept's
other words, so only source-language text is switched (`direction="source_to_target"`, the default).
`direction="all_to_all"` makes every word of a concept a key for all the others (an extension of ours).

Switching. Each word is drawn with probability `ratio`; a drawn word whose exact token-id tuple is a key of the
table is replaced by one of its translations (uniformly). So the switch rate over words present in the table
is `ratio`; other words are never switched. The last word of a block is never switched (it may continue in the
next block), nor a span that does not begin with a word start (the tail of a word cut at the block start).

Labels. The translation appears in the input only. With u the unshifted targets (u[t] is what position t-1
must predict), a switched span gets u = [first token of the original word, -100, ..., -100]: the token before
the span predicts the original word's first token, positions inside the span have no loss, and the span's last
token predicts the next original token. No label is ever a token of the translation.

Length. Switching changes the block's length; it is re-packed to seq_len + 1: a longer block drops its tail, a
shorter one is padded (input EOS, label -100, language and document id -1, the padding convention of the
trainer's stages). Translated tokens carry the language and document of the word they replace.

Determinism. The random draws of the sample at global stream position g come from a generator seeded by
(seed, g); the stream passes g in the raw sample ("position"), so a resumed stream switches the same words.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fuxi.common.errors import ConfigError, DataError
from fuxi.common.typed_config import require_choice
from fuxi.data_pipeline.config import CODESWITCH_DIRECTIONS, CodeSwitchDirection

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
WORD_MARKERS = ("Ġ", "▁")
_STREAM_TAG = 0x5C  # separates this generator's seeds from the stream's own (seed, 1|2|3, ...) generators


def segment_words(ids: np.ndarray, word_start: np.ndarray, special: np.ndarray | None = None) -> np.ndarray:
    """Start index of every word of `ids` (see the module docstring); position 0 always starts one."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = word_start[ids].copy()
    if special is not None:
        is_special = special[ids]
        starts |= is_special
        starts[1:] |= is_special[:-1]
    starts[0] = True
    return np.flatnonzero(starts)


def split_words(ids, word_start: np.ndarray, special: np.ndarray | None = None) -> list[tuple[int, ...]]:
    """The words of `ids` as token-id tuples (their concatenation is `ids`)."""
    ids = np.asarray(ids, dtype=np.int64)
    bounds = list(segment_words(ids, word_start, special)) + [len(ids)]
    return [tuple(int(t) for t in ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class CodeSwitchTable:
    """Token-level table: word (token-id tuple) -> its translations, plus which ids start a word."""

    translations: dict[tuple[int, ...], list[tuple[int, ...]]]
    word_start: np.ndarray  # bool [vocab]
    special: np.ndarray  # bool [vocab]

    def __len__(self) -> int:
        return len(self.translations)

    def __post_init__(self):
        for key, options in self.translations.items():
            if not key or not options or any(not o for o in options):
                raise DataError(f"code-switch table: empty word or translation list for {key!r}")

    @classmethod
    def from_concepts(cls, concepts: list[list[tuple[int, ...] | None]], word_start: np.ndarray,
                      special: np.ndarray, direction: CodeSwitchDirection = "source_to_target") -> "CodeSwitchTable":
        """source_to_target: each concept's first word (its source; None when left out) maps to the concept's
        other words. all_to_all: every word maps to every other word of its concept. A key in several concepts
        maps to the union of their translations."""
        require_choice("codeswitch_direction", direction, CODESWITCH_DIRECTIONS)
        translations: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for words in concepts:
            if not words or (direction == "source_to_target" and not words[0]):
                continue
            unique = list(dict.fromkeys(w for w in words if w))
            for word in unique[:1] if direction == "source_to_target" else unique:
                bucket = translations.setdefault(word, [])
                bucket.extend(o for o in unique if o != word and o not in bucket)
        translations = {k: v for k, v in translations.items() if v}
        return cls(translations, np.asarray(word_start, dtype=bool), np.asarray(special, dtype=bool))

    @classmethod
    def from_alignment_table(cls, table_path: str | Path, tokenizer_dir: str | Path,
                             languages: list[str] | None = None,
                             direction: CodeSwitchDirection = "source_to_target") -> "CodeSwitchTable":
        """Tokenise every word of an alignment table as it appears after a space (" " + word). Words of languages
        outside `languages` are left out; a concept whose source is left out switches nothing source_to_target."""
        from fuxi.data_pipeline.align_table import read_alignment_table
        from fuxi.data_pipeline.tokenizer import load_tokenizer

        table = read_alignment_table(table_path)
        tok = load_tokenizer(tokenizer_dir)
        word_start, special = tokenizer_word_starts(tok, tokenizer_dir)
        concepts = []
        for concept in table.concepts:
            concepts.append([tuple(tok.encode(" " + w, add_special_tokens=False).ids)
                             if languages is None or lang is None or lang in languages else None
                             for w, lang in zip(concept.words, concept.langs)])
        out = cls.from_concepts(concepts, word_start, special, direction)
        if not out.translations:
            raise DataError(f"{table_path}: no word of the table has a translation in languages {languages}")
        return out


def tokenizer_word_starts(tok, where: str | Path = "tokenizer") -> tuple[np.ndarray, np.ndarray]:
    """(word_start, special) boolean arrays over the vocabulary of a `tokenizers.Tokenizer`."""
    first = tok.encode(" a", add_special_tokens=False).ids
    marker = tok.id_to_token(first[0])[:1] if first else ""
    if marker not in WORD_MARKERS:
        raise DataError(f"{where}: the tokenizer marks no word boundary (' a' -> {tok.id_to_token(first[0])!r}); "
                        f"code-switching needs a whitespace marker {WORD_MARKERS}")
    size = tok.get_vocab_size(with_added_tokens=True)
    word_start = np.zeros(size, dtype=bool)
    special = np.zeros(size, dtype=bool)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        word_start[i] = token.startswith(marker)
    for i, added in tok.get_added_tokens_decoder().items():
        if added.special:
            special[i] = True
            word_start[i] = False
    return word_start, special


class CodeSwitchTransform:
    """The stream transform: raw block {tokens, lang_ids, doc_ids, position} (seq_len + 1 tokens) -> model
    inputs {input_ids, labels, lang_ids, doc_ids} (seq_len), with input-only code-switching."""

    def __init__(self, table: CodeSwitchTable, ratio: float, seed: int, pad_id: int = 0):
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError("codeswitch_ratio", f"must be in [0, 1], got {ratio}")
        self.table, self.ratio, self.seed, self.pad_id = table, ratio, seed, pad_id
        self.max_key_len = max((len(k) for k in table.translations), default=0)

    def rng(self, position: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), _STREAM_TAG, int(position)])

    def switch(self, tokens: np.ndarray, lang_ids: np.ndarray, doc_ids: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """-> (ids, unshifted targets, lang ids, doc ids, words switched), before re-packing."""
        starts = segment_words(tokens, self.table.word_start, self.table.special)
        ends = np.append(starts[1:], len(tokens))
        drawn = np.flatnonzero(rng.random(len(starts)) < self.ratio)
        pieces: list[tuple[int, int, tuple[int, ...]]] = []  # (start, end, translation)
        for w in drawn:
            s, e = int(starts[w]), int(ends[w])
            if e == len(tokens) or e - s > self.max_key_len or not self.table.word_start[tokens[s]]:
                continue
            options = self.table.translations.get(tuple(tokens[s:e].tolist()))
            if options:
                pieces.append((s, e, options[int(rng.integers(len(options)))]))
        if not pieces:
            return tokens, tokens, lang_ids, doc_ids, 0
        ids, targets, langs, docs = [], [], [], []
        prev = 0
        for s, e, translation in pieces:
            n = len(translation)
            ids += [tokens[prev:s], np.asarray(translation, dtype=tokens.dtype)]
            targets += [tokens[prev:s], np.asarray([tokens[s]] + [IGNORE_INDEX] * (n - 1), dtype=tokens.dtype)]
            langs += [lang_ids[prev:s], np.full(n, lang_ids[s], dtype=lang_ids.dtype)]
            docs += [doc_ids[prev:s], np.full(n, doc_ids[s], dtype=doc_ids.dtype)]
            prev = e
        ids.append(tokens[prev:])
        targets.append(tokens[prev:])
        langs.append(lang_ids[prev:])
        docs.append(doc_ids[prev:])
        return (np.concatenate(ids), np.concatenate(targets), np.concatenate(langs), np.concatenate(docs),
                len(pieces))

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        if "position" not in sample:
            raise DataError("code-switching needs the sample's stream position (sample['position']); "
                            "use it as the train stream's transform")
        tokens = sample["tokens"].numpy()
        lang_ids, doc_ids = sample["lang_ids"].numpy(), sample["doc_ids"].numpy()
        ids, targets, langs, docs, _ = self.switch(tokens, lang_ids, doc_ids, self.rng(int(sample["position"])))
        ids, targets, langs, docs = repack(len(tokens), self.pad_id, ids, targets, langs, docs)
        return {"input_ids": torch.from_numpy(ids[:-1]), "labels": torch.from_numpy(targets[1:]),
                "lang_ids": torch.from_numpy(langs[:-1]), "doc_ids": torch.from_numpy(docs[:-1])}


def repack(length: int, pad_id: int, ids: np.ndarray, targets: np.ndarray, langs: np.ndarray,
           docs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cut or pad the four aligned arrays to `length` (padding: pad_id, -100, -1, -1)."""
    if len(ids) >= length:
        return tuple(np.ascontiguousarray(a[:length], dtype=np.int64) for a in (ids, targets, langs, docs))
    extra = length - len(ids)

    def pad(a, value):
        return np.concatenate([a.astype(np.int64), np.full(extra, value, dtype=np.int64)])

    return pad(ids, pad_id), pad(targets, IGNORE_INDEX), pad(langs, -1), pad(docs, -1)


def build_codeswitch_transform(table_path: str, tokenizer_dir: str | None, ratio: float, seed: int,
                               languages: list[str] | None = None,
                               direction: CodeSwitchDirection = "source_to_target") -> CodeSwitchTransform:
    """The transform a DataConfig with `codeswitch_ratio > 0` asks for."""
    from fuxi.data_pipeline.tokenizer import EOS_ID

    if not tokenizer_dir:
        raise ConfigError("tokenizer", "code-switching tokenises the alignment table, so data.tokenizer (or "
                              "run.tokenizer) must name the tokenizer directory the shards were packed with")
    table = CodeSwitchTable.from_alignment_table(table_path, tokenizer_dir, languages, direction)
    log.info("code-switching: ratio %.3f, %s, %d words with translations (table %s)", ratio, direction, len(table),
             table_path)
    return CodeSwitchTransform(table, ratio, seed, pad_id=EOS_ID)

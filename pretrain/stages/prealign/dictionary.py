"""PreAlign's training data: dictionary entries instead of the text stream.

Each sample is one concept of the alignment table with `words_per_entry` of its words; each word is its own
short sequence [BOS, word tokens..., padding] (the word is tokenised as " " + word, the way it appears
mid-sentence). Samples are drawn by arithmetic on their global position, so the order is deterministic, split
across ranks like the text stream, and resumable from a count of batches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fuxi.common.errors import ConfigError
from fuxi.kernels import IGNORE_INDEX

log = logging.getLogger("fuxi.train")
STATE_VERSION = 1


@dataclass
class DictionaryEntries:
    """The alignment table, tokenised: distinct words (token-id tuples) and the concepts that group them."""

    words: list[tuple[int, ...]]
    word_langs: list[int]  # index into `languages`, per word
    concepts: list[list[int]]  # word indices per concept (at least two)
    concept_ids: list[int]  # the table's concept index, per concept
    languages: list[str]

    @property
    def max_word_tokens(self) -> int:
        return max(len(w) for w in self.words)

    @classmethod
    def from_token_concepts(cls, concepts: list[list[tuple[tuple[int, ...], int]]], languages: list[str],
                            concept_ids: list[int] | None = None) -> "DictionaryEntries":
        """concepts: per concept, (token ids, language index) per word. Words repeated inside a concept are kept
        once; concepts left with fewer than two words are dropped."""
        index: dict[tuple[int, ...], int] = {}
        words, langs, groups, ids = [], [], [], []
        for k, concept in enumerate(concepts):
            members: list[int] = []
            for tokens, lang in concept:
                tokens = tuple(int(t) for t in tokens)
                if not tokens:
                    continue
                if tokens not in index:
                    index[tokens] = len(words)
                    words.append(tokens)
                    langs.append(lang)
                if index[tokens] not in members:
                    members.append(index[tokens])
            if len(members) >= 2:
                groups.append(members)
                ids.append(concept_ids[k] if concept_ids is not None else k)
        if not groups:
            raise ConfigError("prealign.table", "no concept has two distinct words after tokenisation")
        return cls(words, langs, groups, ids, list(languages))

    @classmethod
    def from_table(cls, table_path: str | Path, tokenizer_dir: str | Path, languages: list[str],
                   max_word_tokens: int, only_languages: list[str] | None = None) -> "DictionaryEntries":
        """Tokenise an alignment table; `languages` is the run's language list (table languages it lacks are
        appended). Words longer than max_word_tokens tokens are skipped (counted in the log)."""
        from fuxi.data_pipeline.align_table import read_alignment_table
        from fuxi.data_pipeline.tokenizer import load_tokenizer

        table = read_alignment_table(table_path)
        tok = load_tokenizer(tokenizer_dir)
        languages = list(languages)
        concepts, too_long = [], 0
        for concept in table.concepts:
            members = []
            for word, lang in zip(concept.words, concept.langs):
                lang = lang or "und"
                if only_languages is not None and lang not in only_languages:
                    continue
                ids = tuple(tok.encode(" " + word, add_special_tokens=False).ids)
                if len(ids) > max_word_tokens:
                    too_long += 1
                    continue
                if lang not in languages:
                    languages.append(lang)
                members.append((ids, languages.index(lang)))
            concepts.append(members)
        entries = cls.from_token_concepts(concepts, languages, [c.index for c in table.concepts])
        log.info("prealign: %d concepts, %d distinct words from %s (%d words over %d tokens skipped)",
                 len(entries.concepts), len(entries.words), table_path, too_long, max_word_tokens)
        return entries


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class DictionaryBatches:
    """Sample g (a global position) -> one concept and `words_per_entry` of its words, by arithmetic: pass p over
    the concepts is a permutation seeded by (seed, p); the words are drawn with a generator seeded by (seed, g).
    Concepts with fewer words leave empty slots (concept id -1, excluded from the loss)."""

    def __init__(self, entries: DictionaryEntries, words_per_entry: int, seed: int, bos_id: int = 0,
                 width: int | None = None):
        self.entries, self.k, self.seed, self.bos_id = entries, words_per_entry, seed, bos_id
        self.width = (width or entries.max_word_tokens) + 1  # + BOS
        if self.width - 1 < entries.max_word_tokens:
            raise ConfigError("prealign.max_word_tokens", f"{self.width - 1} is shorter than the longest word "
                              f"({entries.max_word_tokens} tokens)")
        self._perm: tuple[int, np.ndarray] | None = None

    def concept_at(self, g: int) -> int:
        p, r = divmod(g, len(self.entries.concepts))
        if self._perm is None or self._perm[0] != p:
            self._perm = (p, _rng(self.seed, 11, p).permutation(len(self.entries.concepts)))
        return int(self._perm[1][r])

    def sample(self, g: int) -> dict[str, np.ndarray]:
        c = self.concept_at(g)
        members = self.entries.concepts[c]
        if len(members) > self.k:
            chosen = sorted(_rng(self.seed, 12, g).choice(len(members), self.k, replace=False).tolist())
            members = [members[i] for i in chosen]
        k, w = self.k, self.width
        ids = np.full((k, w), self.bos_id, dtype=np.int64)
        labels = np.full((k, w), IGNORE_INDEX, dtype=np.int64)
        langs = np.full((k, w), -1, dtype=np.int64)
        mask = np.zeros((k, w), dtype=np.int64)
        concept = np.full(k, -1, dtype=np.int64)
        word = np.full(k, -1, dtype=np.int64)
        for slot, wi in enumerate(members):
            tokens = self.entries.words[wi]
            n = len(tokens)
            ids[slot, 1:n + 1] = tokens
            labels[slot, :n] = tokens  # labels[t] is the token after input t: BOS predicts the first token
            langs[slot, :n + 1] = self.entries.word_langs[wi]
            mask[slot, 1:n + 1] = 1
            concept[slot] = self.entries.concept_ids[c]
            word[slot] = wi
        return {"input_ids": ids.reshape(-1), "labels": labels.reshape(-1), "lang_ids": langs.reshape(-1),
                "doc_ids": np.repeat(np.arange(k, dtype=np.int64), w), "word_mask": mask.reshape(-1),
                "concept_ids": concept, "word_ids": word}

    def batch(self, positions: list[int]) -> dict[str, torch.Tensor]:
        samples = [self.sample(g) for g in positions]
        return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


class DictionaryLoader:
    """The dictionary counterpart of data_pipeline's TrainLoader (same contract for the trainer): endless
    batches for one rank, rank r reading positions r, r + R, ...; state = batches consumed."""

    def __init__(self, batches: DictionaryBatches, batch_size: int, rank: int, world_size: int,
                 bytes_per_token: dict[str, float] | None = None):
        self.source, self.batch_size, self.rank, self.world_size = batches, batch_size, rank, world_size
        self.languages = batches.entries.languages
        self.bytes_per_token = dict(bytes_per_token or {})
        self.batches = 0
        self.tokens_seen = torch.zeros(len(self.languages), dtype=torch.int64)

    def fingerprint(self) -> dict:
        e = self.source.entries
        return {"seed": self.source.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "words_per_entry": self.source.k, "concepts": len(e.concepts),
                "words": len(e.words)}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "batches": self.batches, "tokens_seen": self.tokens_seen.tolist(),
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint():
            raise ConfigError("prealign", f"the saved dictionary-data state {state.get('fingerprint')} does not match "
                              f"this run's {self.fingerprint()}; the sample order would differ")
        self.batches = int(state["batches"])
        self.tokens_seen = torch.tensor(state["tokens_seen"], dtype=torch.int64)

    def mixture_report(self) -> str:
        """Word tokens consumed per language on this rank (the trainer logs it at the end of a run)."""
        from fuxi.common.tables import format_table

        total = max(int(self.tokens_seen.sum()), 1)
        rows = [[lang, int(n), f"{100 * int(n) / total:.1f}%"]
                for lang, n in zip(self.languages, self.tokens_seen.tolist()) if n]
        return format_table(["lang", "word tokens", "share"], rows)

    def __iter__(self):
        while True:
            first = self.batches * self.batch_size
            positions = [self.rank + self.world_size * k for k in range(first, first + self.batch_size)]
            batch = self.source.batch(positions)
            self.batches += 1
            langs = batch["lang_ids"][batch["word_mask"].bool()]
            self.tokens_seen += torch.bincount(langs, minlength=len(self.languages))[:len(self.languages)]
            yield batch


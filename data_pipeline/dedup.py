"""Exact and near-duplicate removal.

Exact: a 128-bit hash of the whitespace-normalised text; the first occurrence is kept. Near: MinHash signatures
of word-unit 5-gram shingles with LSH (datasketch), as in the BigCode near-deduplication script FuxiTranyu used
for code; a candidate from the LSH index is confirmed by its estimated Jaccard similarity, so LSH false
positives are not removed. Signatures are computed in worker processes (`minhash_signature` is picklable work);
the index itself is filled in document order in one process, so the result is deterministic.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH

from data_pipeline.errors import DataConfigError
from data_pipeline.textstats import word_units

_WS_RE = re.compile(r"\s+")


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    # MinHash / LSH parameters (BigCode uses 5-grams, 256 permutations, threshold 0.85 for code).
    ngram: int = 5
    num_perm: int = 128
    threshold: float = 0.8
    seed: int = 1

    def validate(self) -> None:
        if self.ngram < 1:
            raise DataConfigError(f"ngram: must be >= 1, got {self.ngram}")
        if self.num_perm < 16:
            raise DataConfigError(f"num_perm: must be >= 16, got {self.num_perm}")
        if not 0.0 < self.threshold < 1.0:
            raise DataConfigError(f"threshold: must be in (0, 1), got {self.threshold}")


def exact_key(text: str) -> bytes:
    """Hash of the text with runs of whitespace collapsed (so re-wrapped copies still match)."""
    return hashlib.blake2b(_WS_RE.sub(" ", text).strip().encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int) -> set[int]:
    """crc32 hashes of the distinct word-unit n-grams (the whole text if it has fewer than n units)."""
    units = word_units(text.lower())
    if len(units) < n:
        return {zlib.crc32(" ".join(units).encode("utf-8"))}
    return {zlib.crc32("\x1f".join(units[i:i + n]).encode("utf-8")) for i in range(len(units) - n + 1)}


def _identity(value: int) -> int:
    return value


_TEMPLATES: dict[tuple[int, int], MinHash] = {}
_LSH_PARAMS: dict[tuple[float, int], tuple[int, int]] = {}


def lsh_params(threshold: float, num_perm: int, points: int = 1001) -> tuple[int, int]:
    """(bands b, rows r), b·r <= num_perm, minimising the equally weighted areas of false positives
    (Jaccard < threshold, yet a candidate) and false negatives: datasketch's criterion, integrated for all
    (b, r) at once with numpy (datasketch's scalar quadrature takes seconds per index)."""
    key = (threshold, num_perm)
    if key not in _LSH_PARAMS:
        pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
        s = np.linspace(0.0, 1.0, points)
        candidate = 1.0 - (1.0 - s[None, :] ** pairs[:, 1:2]) ** pairs[:, 0:1]
        below = s <= threshold
        false_pos = np.trapezoid(np.where(below, candidate, 0.0), s, axis=1)
        false_neg = np.trapezoid(np.where(below, 0.0, 1.0 - candidate), s, axis=1)
        b, r = pairs[int(np.argmin(0.5 * false_pos + 0.5 * false_neg))]
        _LSH_PARAMS[key] = (int(b), int(r))
    return _LSH_PARAMS[key]


def _template(num_perm: int, seed: int) -> MinHash:
    key = (num_perm, seed)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
    return _TEMPLATES[key]


def minhash_signature(text: str, config: DedupConfig) -> np.ndarray:
    """The MinHash hash values of a document's shingle set (uint32[num_perm])."""
    m = _template(config.num_perm, config.seed).copy()
    m.update_batch(sorted(shingles(text, config.ngram)))
    return m.hashvalues


class NearDuplicateIndex:
    """Sequential MinHash-LSH index over one language: `is_duplicate` answers for a new document and inserts
    it if it is new (so the first of a group of near-duplicates is the one kept)."""

    def __init__(self, config: DedupConfig):
        config.validate()
        self.config = config
        self._lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm,
                               params=lsh_params(config.threshold, config.num_perm))
        self._template = _template(config.num_perm, config.seed)
        self._signatures: dict[int, MinHash] = {}
        self._next_key = 0

    def _wrap(self, hashvalues: np.ndarray) -> MinHash:
        return MinHash(hashvalues=hashvalues, permutations=self._template.permutations, seed=self.config.seed,
                       scheme=self._template.scheme, hashfunc=_identity)

    def is_duplicate(self, hashvalues: np.ndarray) -> bool:
        m = self._wrap(hashvalues)
        for key in self._lsh.query(m):
            if self._signatures[key].jaccard(m) >= self.config.threshold:
                return True
        key = self._next_key
        self._next_key += 1
        self._signatures[key] = m
        self._lsh.insert(key, m)
        return False

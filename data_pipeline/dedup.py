"""Exact and near-duplicate detection: the per-document pieces and the math of the banding.

Exact: a 128-bit hash of the whitespace-normalised text; the first occurrence (validation split first, then
input order) is kept. Near: MinHash signatures of script-aware word-unit 5-gram shingles (a CJK or Thai
character is one unit, `textstats.word_units`), split into b bands of r rows (LSH). Two documents of the same
language that agree on all rows of some band are candidates, and a candidate pair is confirmed only if the
exact Jaccard similarity of the two shingle sets reaches the threshold, so LSH false positives are never
removed. The banding is chosen from the S-curve P(candidate | s) = 1 - (1 - s^r)^b: the (b, r) with b·r <=
num_perm that puts P(candidate | threshold) >= `min_recall` and has the fewest candidates below the threshold
(`lsh_params`). At 128 permutations and threshold 0.8 that is 21 bands of 6 rows: P = 0.9983 at s = 0.80 (the
9x13 banding this replaced gave 0.40 there).

The disk-backed stages that use these pieces (signatures per input chunk -> per-band buckets -> clusters ->
filter) are in `dedup_stages.py`.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import require_at_least
from fuxi.data_pipeline.textstats import word_units

_WS_RE = re.compile(r"\s+")
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    # MinHash / LSH parameters (BigCode uses 5-grams and 256 permutations; FineWeb 5-grams and 112).
    ngram: int = 5
    num_perm: int = 128
    threshold: float = 0.8
    # The banding is chosen so that a pair at exactly `threshold` becomes a candidate with this probability.
    min_recall: float = 0.99
    seed: int = 1
    # Candidates of one band bucket compared with at most this many earlier members each (bounds the work of a
    # huge bucket of boilerplate; the first confirmed one links the document into its cluster).
    max_comparisons: int = 8

    def validate(self) -> None:
        require_at_least(self, 1, "ngram", "max_comparisons")
        require_at_least(self, 16, "num_perm")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError("threshold", f"must be in (0, 1), got {self.threshold}")
        if not 0.0 < self.min_recall < 1.0:
            raise ConfigError("min_recall", f"must be in (0, 1), got {self.min_recall}")

    @property
    def bands(self) -> tuple[int, int]:
        """(bands b, rows per band r)."""
        return lsh_params(self.threshold, self.num_perm, self.min_recall)


def candidate_probability(s: np.ndarray | float, bands: int, rows: int) -> np.ndarray | float:
    """The LSH S-curve: probability that a pair of Jaccard s agrees on all rows of at least one band."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


@lru_cache(maxsize=None)
def lsh_params(threshold: float, num_perm: int, min_recall: float = 0.99, points: int = 1001) -> tuple[int, int]:
    """(b, r), b·r <= num_perm, with candidate_probability(threshold) >= min_recall and the smallest expected
    candidate rate below the threshold (the area under the S-curve on [0, threshold]: Jaccard confirmation
    rejects those pairs, but each costs a comparison). Falls back to r = 1 if nothing reaches min_recall."""
    s = np.linspace(0.0, threshold, points)
    best, best_area = (num_perm, 1), np.inf
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if candidate_probability(threshold, b, r) < min_recall:
            continue
        area = float(np.trapezoid(candidate_probability(s, b, r), s))
        if area < best_area:
            best, best_area = (b, r), area
    return best


def exact_key(text: str) -> bytes:
    """Hash of the text with runs of whitespace collapsed (so re-wrapped copies still match)."""
    return hashlib.blake2b(_WS_RE.sub(" ", text).strip().encode("utf-8"), digest_size=16).digest()


def exact_key_words(text: str) -> tuple[int, int]:
    """The 128-bit exact-duplicate key as two 64-bit integers."""
    key = exact_key(text)
    return int.from_bytes(key[:8], "big"), int.from_bytes(key[8:], "big")


def shingles(text: str, n: int) -> np.ndarray:
    """Sorted distinct crc32 hashes (uint32) of the lower-cased word-unit n-grams (the whole text if it has
    fewer than n units)."""
    units = word_units(text.lower())
    if len(units) < n:
        grams = {zlib.crc32(" ".join(units).encode("utf-8"))}
    else:
        grams = {zlib.crc32("\x1f".join(units[i:i + n]).encode("utf-8")) for i in range(len(units) - n + 1)}
    return np.unique(np.fromiter(grams, dtype=np.uint32, count=len(grams)))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted distinct arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


@lru_cache(maxsize=None)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the universal hash family h(x) = ((a·x + b) mod (2^61 - 1)) mod 2^32."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_MERSENNE), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_MERSENNE), size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signature(shingle_hashes: np.ndarray, config: DedupConfig) -> np.ndarray:
    """The MinHash values (uint64 below 2^32, one per permutation) of a shingle set."""
    a, b = _permutations(config.num_perm, config.seed)
    hv = shingle_hashes.astype(np.uint64)[:, None]
    return (((hv * a + b) % _MERSENNE) & _MAX32).min(axis=0)


@lru_cache(maxsize=None)
def _band_multipliers(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, rows, 0xBA4D]).integers(1, 1 << 63, size=rows + 1, dtype=np.uint64) | 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads a 64-bit value over all bits (band keys are range-partitioned)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def band_keys(signatures: np.ndarray, language_seeds: np.ndarray, config: DedupConfig) -> np.ndarray:
    """uint64 key per (band, document): [bands, docs]. Keys of different languages never meet (the language
    is hashed in), so near-dedup is per language; within a language equal bands give equal keys, and unequal
    ones collide with probability about 2^-63 (a multilinear hash, then mixed)."""
    n_bands, rows = config.bands
    mult = _band_multipliers(rows, config.seed)
    with np.errstate(over="ignore"):
        bands = signatures[:, :n_bands * rows].reshape(len(signatures), n_bands, rows)
        keys = (bands * mult[:rows]).sum(axis=2, dtype=np.uint64)
        keys = keys + language_seeds.astype(np.uint64)[:, None] * mult[rows]
        keys = keys + np.arange(n_bands, dtype=np.uint64)[None, :]
        return _mix64(keys).T.copy()


def language_seed(lang: str) -> int:
    return zlib.crc32(lang.encode("utf-8"))


class UnionFind:
    """Connected components of confirmed near-duplicate pairs; the smallest document id is each root."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo
            self.parent.setdefault(lo, lo)

    def non_roots(self) -> np.ndarray:
        """Every member that is not the smallest of its component: the documents to drop."""
        return np.array(sorted(x for x in self.parent if self.find(x) != x), dtype=np.uint64)

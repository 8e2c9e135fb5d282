"""Disk-backed deduplication: no process holds the corpus index.

The `process` stage leaves, per input chunk, sorted runs on disk: `sig/<chunk>.npy` ([bands, n, 2] uint64:
band key, document id; each band sorted by key) and `exact/<chunk>.npy` ([n, 3]: the 128-bit exact key as two
words, document id; sorted), plus the shingle sets of the chunk's documents (`shingles/<chunk>.*`, read back
by memory map only for candidate pairs).

`buckets` (the bands and the exact keys, dealt to the tasks) merges the runs of all chunks in slices of the
key space, each slice holding about `ROUND_ENTRIES` entries whatever the corpus size, so its memory is bounded.
Documents with equal band keys are candidates; each is compared with earlier members of its bucket by exact
Jaccard of the shingle sets until one reaches the threshold, which gives an edge. `clusters` joins the edges
into connected components and drops all but the first (smallest id: validation first, then input order)
document of each; it holds only the duplicate graph.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from fuxi.common.atomic import atomic_write
from fuxi.data_pipeline.chunks import ID_BITS, load_plan
from fuxi.data_pipeline.dedup import DedupConfig, UnionFind, jaccard
from fuxi.data_pipeline.engine import TaskStep

log = logging.getLogger(__name__)
ROUND_ENTRIES = 1 << 20  # entries merged at once (16-24 MB)
_LOCAL_MASK = (1 << ID_BITS) - 1


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to a temp name, renamed into place (a killed task never leaves a partial array)."""
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def _slices(total: int) -> list[tuple[int, int | None]]:
    """Key ranges [lo, hi) covering uint64 in about total / ROUND_ENTRIES equal parts (hi None: to the end)."""
    parts = max(1, -(-total // ROUND_ENTRIES))
    step = (1 << 64) // parts
    return [(i * step, (i + 1) * step if i + 1 < parts else None) for i in range(parts)]


def merged_groups(runs: list[np.ndarray], key_cols: int) -> Iterator[np.ndarray]:
    """Sorted runs of rows (key columns first, document id last, sorted by key) -> every group of two or more
    rows with equal keys, as the sorted array of their document ids. Memory: one key-space slice at a time."""
    total = sum(len(r) for r in runs)
    for lo, hi in _slices(total):
        parts = []
        for run in runs:
            col = run[:, 0]
            a = int(np.searchsorted(col, np.uint64(lo), side="left"))
            b = len(run) if hi is None else int(np.searchsorted(col, np.uint64(hi), side="left"))
            if b > a:
                parts.append(np.asarray(run[a:b]))
        if not parts:
            continue
        rows = np.concatenate(parts)
        rows = rows[np.lexsort(tuple(rows[:, c] for c in range(rows.shape[1] - 1, -1, -1)))]
        keys = rows[:, :key_cols]
        same = np.all(keys[1:] == keys[:-1], axis=1)
        if not same.any():
            continue
        # group boundaries: starts of runs of equal keys
        starts = np.flatnonzero(np.concatenate([[True], ~same]))
        ends = np.append(starts[1:], len(rows))
        for s, e in zip(starts, ends):
            if e - s > 1:
                yield rows[s:e, -1]


class ShingleStore:
    """Shingle sets by document id, read by memory map from the `process` stage's files."""

    def __init__(self, root: Path, max_open: int = 256):
        self.root = root
        self.max_open = max_open
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _chunk(self, chunk: int):
        if chunk not in self._open:
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open)))
            base = self.root / "shingles" / f"{chunk:06d}"
            values = Path(f"{base}.values.u32")
            self._open[chunk] = (np.load(f"{base}.ids.npy"), np.load(f"{base}.offsets.npy"),
                                 np.memmap(values, dtype=np.uint32, mode="r") if values.stat().st_size
                                 else np.empty(0, dtype=np.uint32))
        return self._open[chunk]

    def __getitem__(self, doc: int) -> np.ndarray:
        ids, offsets, values = self._chunk(doc >> ID_BITS)
        i = int(np.searchsorted(ids, doc & _LOCAL_MASK))
        return np.asarray(values[offsets[i]:offsets[i + 1]])


def confirmed_edges(group: np.ndarray, store: ShingleStore, config: DedupConfig,
                    counts: dict[str, int]) -> list[tuple[int, int]]:
    """Link each member of a bucket to the first earlier member (at most max_comparisons tried) whose exact
    Jaccard similarity reaches the threshold."""
    edges = []
    members = [int(x) for x in group]
    sets = {}
    for k in range(1, len(members)):
        doc = members[k]
        for prev in members[max(0, k - config.max_comparisons):k]:
            for d in (doc, prev):
                if d not in sets:
                    sets[d] = store[d]
            counts["compared"] += 1
            if jaccard(sets[doc], sets[prev]) >= config.threshold:
                edges.append((prev, doc))
                counts["confirmed"] += 1
                break
    return edges


class FindDuplicates(TaskStep):
    """Near-duplicate edges per band and the exact duplicates (all but the first of each key); the bands and
    the exact keys are dealt round-robin to the tasks. Reads clean's job: its work folder and `dedup` config."""

    name = "buckets"

    def __init__(self, job, bands: int):
        super().__init__(job)
        self.bands = bands

    def _items(self, rank: int, world_size: int) -> list[int | str]:
        return ([*range(self.bands), "exact"])[rank::world_size]

    def describe(self, rank: int, world_size: int) -> str:
        return ", ".join(f"band {i}" if i != "exact" else "exact keys" for i in self._items(rank, world_size))

    def run_task(self, rank: int, world_size: int) -> dict:
        root = self.job.work_dir
        chunks = [c.index for c in load_plan(root)]
        counts = {"groups": 0, "compared": 0, "confirmed": 0, "entries": 0, "exact_duplicates": 0}
        for item in self._items(rank, world_size):
            if item == "exact":
                self._exact(root, chunks, counts)
            else:
                self._band(root, chunks, item, counts)
        for k, v in counts.items():
            self.count(k, v)
        return {"docs_in": counts["entries"], "docs_out": counts["confirmed"] + counts["exact_duplicates"], **counts}

    def _exact(self, root: Path, chunks: list[int], counts: dict) -> None:
        runs = [r for c in chunks if len(r := np.load(root / "exact" / f"{c:06d}.npy", mmap_mode="r"))]
        drops = [g[1:] for g in merged_groups(runs, key_cols=2)]
        counts["entries"] += sum(len(r) for r in runs)
        out = np.sort(np.concatenate(drops)) if drops else np.empty(0, dtype=np.uint64)
        counts["exact_duplicates"] += len(out)
        save_npy(root / "dedup" / "exact_drop.npy", out.astype(np.uint64))

    def _band(self, root: Path, chunks: list[int], band: int, counts: dict) -> None:
        runs = [r for c in chunks if (p := root / "sig" / f"{c:06d}.npy").is_file()
                and len(r := np.load(p, mmap_mode="r")[band])]
        counts["entries"] += sum(len(r) for r in runs)
        store = ShingleStore(root)
        edges: list[tuple[int, int]] = []
        for group in merged_groups(runs, key_cols=1):
            counts["groups"] += 1
            edges += confirmed_edges(group, store, self.job.dedup, counts)
        save_npy(root / "dedup" / f"edges-{band:04d}.npy", np.array(edges, dtype=np.uint64).reshape(-1, 2))


class Clusters(TaskStep):
    """Connected components of all bands' edges; writes the sorted ids of the near duplicates to drop."""

    name = "clusters"

    def __init__(self, job, bands: int):
        super().__init__(job)
        self.bands = bands

    def run_task(self, rank: int, world_size: int) -> dict:
        root = self.job.work_dir
        components = UnionFind()
        edges = 0
        for b in range(self.bands):
            path = root / "dedup" / f"edges-{b:04d}.npy"
            if path.is_file():
                for a, c in np.load(path).tolist():
                    components.union(a, c)
                    edges += 1
        drop = components.non_roots()
        save_npy(root / "dedup" / "near_drop.npy", drop)
        self.count("edges", edges)
        self.count("near_duplicates", len(drop))
        return {"docs_in": len(components.parent), "docs_out": len(drop), "edges": edges}

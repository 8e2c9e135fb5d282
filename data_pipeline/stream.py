"""Stage 5, the stream: a deterministic, resumable, language-mixed order of samples, split by rank and by
DataLoader worker.

The order. Mixture epoch e is a sequence of S = sum(counts) samples. It is cut into windows of about
`window` samples; window j holds, for each language i, the samples floor(j·window·c_i/S) ... of that
language's share c_i, shuffled together with a generator seeded by (seed, e, j). Language i's samples come
from its own endless stream: pass after pass over its N_i samples, each pass in a fresh order (shards in a
shuffled order, samples shuffled within each shard, so reads stay local to a few shards). Global position g
therefore maps to one (shard, sample) by arithmetic alone: no index of the whole order is ever built.

The split. Rank r of R reads global positions r, r+R, r+2R, ...; its k-th sample is g = r + R·k. The rank's
samples are grouped into batches (batch b: k in [b·B, (b+1)·B)) and the batches into chunks of K; DataLoader
worker w of W builds the chunks c ≡ w (mod W), counted from the resume point. A DataLoader returns its
workers' items round-robin, so the rank sees batches 0, 1, 2, ... in order for any W and K, and its state
is one number: the batches consumed. Within a mixture epoch no position repeats across ranks and workers and none is
skipped, for any R and W, including more consumers than shards.

Corrupt samples (on_error="skip": a bad sample, or every sample of a shard that is missing or whose size or
sha256 disagrees with the manifest) are replaced by the sample at the same slot of the next mixture epoch
(g + S, then g + 2S, ...) so batches keep their shape; every replacement is counted, per batch, and reported.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fuxi.data_pipeline.config import OnError
from fuxi.data_pipeline.errors import ShardError
from fuxi.data_pipeline.manifest import Manifest, ShardInfo
from fuxi.data_pipeline.mixing import MixturePlan
from fuxi.data_pipeline.shards import Block, ShardReader

log = logging.getLogger(__name__)
MAX_SUBSTITUTES = 64  # corrupt samples in a row before giving up


def default_transform(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw block (length seq_len + 1) -> model inputs (length seq_len): next-token labels; the language and
    document of each input token."""
    tokens = sample["tokens"]
    return {"input_ids": tokens[:-1], "labels": tokens[1:], "lang_ids": sample["lang_ids"][:-1],
            "doc_ids": sample["doc_ids"][:-1]}


def pack_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list, dict[str, torch.Tensor]]:
    """Integer tensors -> one flat int32 buffer (one shared-memory segment instead of one per key: worker ->
    main transfer is 3x faster); other tensors travel as they are. Inverse: `unpack_batch`."""
    layout, parts, others = [], [], {}
    offset = 0
    for key, value in batch.items():
        if value.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8) and value.numel() and \
                -2**31 <= int(value.min()) and int(value.max()) < 2**31:
            parts.append(value.reshape(-1).to(torch.int32))
            layout.append((key, tuple(value.shape), str(value.dtype).removeprefix("torch."), offset))
            offset += value.numel()
        else:
            others[key] = value
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)
    return flat, layout, others


def unpack_batch(flat: torch.Tensor, layout: list, others: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # numpy, not torch, widens: torch's intra-op threads would spin against the DataLoader workers.
    wide = torch.from_numpy(flat.numpy().astype(np.int64))
    out = {}
    for key, shape, dtype, offset in layout:
        n = int(np.prod(shape)) if shape else 1
        t = wide[offset:offset + n].view(shape)
        out[key] = t if dtype == "int64" else t.to(getattr(torch, dtype))
    out.update(others)
    return out


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class LanguageStream:
    """The endless sequence of one language's samples: pass p is a seeded permutation of all of them
    (shard order shuffled, then samples shuffled within each shard)."""

    def __init__(self, shard_ids: list[int], shard_sizes: list[int], seed: int, lang_index: int):
        self.shard_ids = np.asarray(shard_ids, dtype=np.int64)
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.size = int(self.shard_sizes.sum())
        self.seed = seed
        self.lang_index = lang_index
        self._passes: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._within: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _pass(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        if p not in self._passes:
            order = _rng(self.seed, 1, self.lang_index, p).permutation(len(self.shard_ids))
            starts = np.concatenate([[0], np.cumsum(self.shard_sizes[order])])
            self._passes[p] = (order, starts)
            if len(self._passes) > 4:
                self._passes.popitem(last=False)
        return self._passes[p]

    def locate(self, q: int) -> tuple[int, int]:
        """Stream position q -> (shard id, sample index within the shard)."""
        p, r = divmod(q, self.size)
        order, starts = self._pass(p)
        slot = int(np.searchsorted(starts, r, side="right")) - 1
        local = order[slot]
        key = (p, int(local))
        perm = self._within.get(key)
        if perm is None:
            perm = _rng(self.seed, 2, self.lang_index, p, local).permutation(int(self.shard_sizes[local]))
            self._within[key] = perm
            if len(self._within) > 64:
                self._within.popitem(last=False)
        return int(self.shard_ids[local]), int(perm[r - starts[slot]])


@dataclass
class _Window:
    epoch: int
    index: int
    start: int  # epoch-relative position of the window's first sample
    langs: np.ndarray  # language (index into plan.languages) of each position
    stream_pos: np.ndarray  # position in that language's stream


class MixtureOrder:
    """Global position g -> (language, shard id, sample in shard), by arithmetic on the plan."""

    def __init__(self, plan: MixturePlan, manifest: Manifest, seed: int, window: int):
        self.plan = plan
        self.seed = seed
        self.counts = np.asarray([plan.counts[lang] for lang in plan.languages], dtype=np.int64)
        self.epoch_size = int(self.counts.sum())
        num_windows = max(1, -(-self.epoch_size // window))
        bounds = np.minimum(np.arange(num_windows + 1, dtype=np.int64) * window, self.epoch_size)
        # cum[j, i]: samples of language i before window j (exact integer arithmetic).
        self.cum = (bounds[:, None] * self.counts[None, :]) // self.epoch_size
        self.cum[-1] = self.counts
        self.window_starts = self.cum.sum(axis=1)
        self.streams = []
        for i, lang in enumerate(plan.languages):
            ids = [k for k, s in enumerate(manifest.shards) if s.language == lang and s.samples > 0]
            lang_index = manifest.languages.index(lang)
            self.streams.append(LanguageStream(ids, [manifest.shards[k].samples for k in ids], seed, lang_index))
        self._window: _Window | None = None

    def _load_window(self, epoch: int, j: int) -> _Window:
        per_lang = self.cum[j + 1] - self.cum[j]
        langs = np.repeat(np.arange(len(per_lang)), per_lang)
        langs = langs[_rng(self.seed, 3, epoch, j).permutation(len(langs))]
        # occurrence number of each position among its language's positions in this window
        order = np.argsort(langs, kind="stable")
        first = np.concatenate([[0], np.cumsum(per_lang)[:-1]])
        occurrence = np.empty(len(langs), dtype=np.int64)
        occurrence[order] = np.arange(len(langs)) - np.repeat(first, per_lang)
        stream_pos = epoch * self.counts[langs] + self.cum[j][langs] + occurrence
        return _Window(epoch, j, int(self.window_starts[j]), langs, stream_pos)

    def locate(self, g: int) -> tuple[int, int, int]:
        """(language index into plan.languages, shard id, sample index in shard) of global position g."""
        epoch, offset = divmod(g, self.epoch_size)
        w = self._window
        if w is None or w.epoch != epoch or not (w.start <= offset < w.start + len(w.langs)):
            j = int(np.searchsorted(self.window_starts, offset, side="right")) - 1
            w = self._window = self._load_window(epoch, j)
        p = offset - w.start
        lang = int(w.langs[p])
        shard, sample = self.streams[lang].locate(int(w.stream_pos[p]))
        return lang, shard, sample


class MixtureDataset(IterableDataset):
    """Yields whole batches (dicts of [B, seq_len] int64 tensors) for one rank; see the module docstring.

    `start_batch` is the number of batches the rank has already consumed. Each batch dict also carries
    "_skipped": the number of corrupt samples replaced while building it (the loader pops it and sums).
    """

    def __init__(self, manifest: Manifest, plan: MixturePlan, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, window: int = 65536, start_batch: int = 0,
                 transform: Callable[[dict], dict] | None = None, verify_checksums: bool = True,
                 on_error: OnError = "raise"):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank} is not in [0, world_size={world_size})")
        self.manifest = manifest
        self.plan = plan
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.window = window
        self.start_batch = start_batch
        self.transform = transform or default_transform
        self.verify_checksums = verify_checksums
        self.on_error = on_error
        self.languages = manifest.languages
        self._order: MixtureOrder | None = None
        self._readers: dict[int, ShardReader] = {}
        self.skipped = 0
        # Set by the loader when batches cross a process boundary: several consecutive batches travel
        # together ([K, B, ...]) in one flat buffer, which amortises the per-transfer cost of DataLoader.
        self.pack_batches = False
        self.batches_per_chunk = 1

    @property
    def order(self) -> MixtureOrder:
        if self._order is None:
            self._order = MixtureOrder(self.plan, self.manifest, self.seed, self.window)
        return self._order

    def _reader(self, shard_id: int) -> ShardReader:
        reader = self._readers.get(shard_id)
        if reader is None:
            shard: ShardInfo = self.manifest.shards[shard_id]
            reader = ShardReader(self.manifest, shard, self.verify_checksums, self.on_error)
            self._readers[shard_id] = reader
        return reader

    def sample_at(self, g: int) -> dict[str, torch.Tensor]:
        """The transformed sample at global position g (substituting corrupt ones when skipping)."""
        order = self.order
        for attempt in range(MAX_SUBSTITUTES):
            _, shard_id, index = order.locate(g + attempt * order.epoch_size)
            block = self._reader(shard_id).read(index)
            if block is not None:
                if attempt:
                    self.skipped += attempt
                raw = self._as_tensors(block)
                raw["position"] = g  # for transforms that draw per sample (code-switching): resumes exactly
                return self.transform(raw)
        raise ShardError(f"{MAX_SUBSTITUTES} corrupt samples in a row at position {g}; giving up "
                         f"(on_error=skip); see the warnings above for the shards")

    @staticmethod
    def _as_tensors(block: Block) -> dict[str, torch.Tensor]:
        return {"tokens": torch.from_numpy(block.tokens.astype(np.int64)),
                "lang_ids": torch.from_numpy(block.lang_ids.astype(np.int64)),
                "doc_ids": torch.from_numpy(block.doc_ids.astype(np.int64))}

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        """Batch b of this rank: its samples k in [b·B, (b+1)·B), at global positions rank + world_size·k."""
        before = self.skipped
        samples = [self.sample_at(self.rank + self.world_size * k)
                   for k in range(b * self.batch_size, (b + 1) * self.batch_size)]
        out = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        out["_skipped"] = torch.tensor(self.skipped - before)
        return out

    def chunk_starts(self) -> Iterator[int]:
        """First batch of each chunk of `batches_per_chunk` batches this process builds: all chunks, or every
        W-th one in DataLoader worker w of W (chunks counted from `start_batch`)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start_batch + worker * self.batches_per_chunk
        while True:
            yield b
            b += workers * self.batches_per_chunk

    def __iter__(self) -> Iterator:
        for first in self.chunk_starts():
            if self.batches_per_chunk == 1 and not self.pack_batches:
                yield self.batch(first)
                continue
            batches = [self.batch(b) for b in range(first, first + self.batches_per_chunk)]
            chunk = {key: torch.stack([b[key] for b in batches]) for key in batches[0]}
            yield pack_batch(chunk) if self.pack_batches else chunk

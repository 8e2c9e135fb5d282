"""Stage 3, tokenize and pack: documents -> EOS-terminated token streams -> fixed blocks of seq_len + 1.

Per language, documents are shuffled (T5-style packing, FuxiTranyu §3.5), tokenized in parallel worker
processes, each followed by EOS (id 0), concatenated and cut into blocks of seq_len + 1 tokens. Every token
carries its language index (into the manifest's `languages`) and its document index (unique within the
language), which the trainer needs for per-language loss, document masking and the MoE-LPR language prior.
Blocks are monolingual, so the stream can mix languages by weight; the tail shorter than one block is dropped
and counted. Tokenization results come back in order, so the shards are identical for any process count.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import threading
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from data_pipeline.errors import DataConfigError, DataError
from data_pipeline.manifest import LANG_DTYPE, LanguageStats, Manifest
from data_pipeline.shards import Block, ShardWriter
from data_pipeline.encoders import FastEncoder
from data_pipeline.tokenizer import EOS_ID, load_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"


def language_files(corpus: str | Path) -> dict[str, Path]:
    """{language: file} of a cleaned split directory (`<lang>.jsonl`, as `fuxi data clean` writes)."""
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise DataError(f"{corpus}: expected a cleaned split directory of <lang>.jsonl files")
    files = {p.name[:-len(".jsonl")]: p for p in sorted(corpus.glob("*.jsonl"))}
    if not files:
        raise DataError(f"{corpus}: no <lang>.jsonl files (run `fuxi data clean` first)")
    return files


def line_offsets(path: Path) -> np.ndarray:
    """Byte offsets of the non-empty lines of a file (so documents can be read in a shuffled order)."""
    offsets = []
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


# --- worker side ------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, parallel: bool, fast: bool) -> None:
    if not parallel:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encoder"] = FastEncoder(tokenizer_dir, prefer_fast=fast)


def _encode_chunk(task: tuple[str, str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Read the documents at `offsets` of `path` and encode them: (tokens with EOS after each document,
    per-document token counts including the EOS, UTF-8 bytes of the text)."""
    lang, path, offsets = task
    texts = []
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(int(off))
            line = f.readline()
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}: bad JSON line at byte {int(off)}") from None
            if record.get("lang", lang) != lang:
                raise DataError(f"{path}: document at byte {int(off)} has lang {record.get('lang')!r}, "
                                f"but the file is for {lang!r}")
            texts.append(text)
    encodings = _WORKER["encoder"].encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encodings), dtype=np.int64, count=len(encodings))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    pos = 0
    for ids in encodings:
        n = len(ids)
        tokens[pos:pos + n] = ids
        tokens[pos + n] = EOS_ID
        pos += n + 1
    return tokens, lengths, sum(len(t.encode("utf-8")) for t in texts)


# --- parent side ------------------------------------------------------------------------------------------

class _BlockPacker:
    """Carries the unfinished tail between chunks and emits full blocks of one language."""

    def __init__(self, lang_index: int, block_len: int):
        self.block_len = block_len
        self.lang_ids = np.full(block_len, lang_index, dtype=LANG_DTYPE)
        self.tokens = np.empty(0, dtype=np.uint32)
        self.doc_ids = np.empty(0, dtype=np.uint32)
        self.next_doc = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> Iterator[Block]:
        docs = np.repeat(np.arange(self.next_doc, self.next_doc + len(lengths), dtype=np.uint32), lengths)
        self.next_doc += len(lengths)
        self.tokens = np.concatenate([self.tokens, tokens])
        self.doc_ids = np.concatenate([self.doc_ids, docs])
        full = len(self.tokens) // self.block_len
        for b in range(full):
            s = slice(b * self.block_len, (b + 1) * self.block_len)
            yield Block(self.tokens[s], self.lang_ids, self.doc_ids[s])
        self.tokens = self.tokens[full * self.block_len:]
        self.doc_ids = self.doc_ids[full * self.block_len:]


def pack(corpus: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *, split: str = "train",
         seq_len: int = 2048, languages: list[str] | None = None, shard_bytes: int = 128 << 20,
         num_proc: int | None = None, seed: int = 0, chunk_docs: int = 256, fast_encoder: bool = True,
         progress: bool = True) -> Path:
    """Tokenize and pack a cleaned split directory into webdataset shards plus `out_dir/manifest.json`.

    languages: the ordered language list the language ids index (give the same list for train and valid);
    default: the languages found, sorted. fast_encoder: encode with tiktoken/sentencepiece where they are
    checked equal to the HF tokenizer (encoders.py). Returns the manifest path.
    """
    if seq_len < 1:
        raise DataConfigError(f"seq_len: must be >= 1, got {seq_len}")
    if shard_bytes < 1:
        raise DataConfigError(f"shard_bytes: must be >= 1, got {shard_bytes}")
    files = language_files(corpus)
    languages = list(languages) if languages else sorted(files)
    if len(set(languages)) != len(languages):
        raise DataConfigError(f"languages: duplicates in {languages}")
    unknown = sorted(set(files) - set(languages))
    if unknown:
        log.warning("pack %s: ignoring %s (not in the language list)", corpus, unknown)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    block_len = seq_len + 1
    tok = load_tokenizer(tokenizer_dir)
    num_proc = max(1, num_proc or os.cpu_count() or 1)

    def tasks() -> Iterator[tuple[str, str, np.ndarray]]:
        for lang in languages:
            if lang not in files:
                continue
            offsets = line_offsets(files[lang])
            rng = np.random.default_rng([seed, zlib.crc32(lang.encode("utf-8"))])
            offsets = offsets[rng.permutation(len(offsets))]
            for i in range(0, len(offsets), chunk_docs):
                yield lang, str(files[lang]), offsets[i:i + chunk_docs]

    stats = {lang: LanguageStats() for lang in languages}
    writers = {lang: ShardWriter(out_dir, f"{split}-{lang}", lang, languages, shard_bytes) for lang in languages}
    packers = {lang: _BlockPacker(i, block_len) for i, lang in enumerate(languages)}
    pool = None
    if num_proc > 1:
        pool = mp.get_context("fork").Pool(num_proc, initializer=_init_worker,
                               initargs=(str(tokenizer_dir), False, fast_encoder))
        mapper = pool.imap
    else:
        _init_worker(str(tokenizer_dir), True, fast_encoder)
        mapper = map
    bar = tqdm(desc=f"pack {split}", unit="tok", unit_scale=True, disable=not progress)
    # At most a few chunks per process in flight: bounded memory, and the workers never wait for the parent.
    in_flight = threading.BoundedSemaphore(4 * num_proc)
    langs_in_flight: deque[str] = deque()

    def bounded_tasks() -> Iterator[tuple[str, str, np.ndarray]]:
        for task in tasks():
            in_flight.acquire()
            langs_in_flight.append(task[0])
            yield task

    try:
        for tokens, lengths, nbytes in mapper(_encode_chunk, bounded_tasks()):
            lang = langs_in_flight.popleft()
            in_flight.release()
            if True:
                s = stats[lang]
                s.documents += len(lengths)
                s.tokens += len(tokens)
                s.utf8_bytes += nbytes
                for block in packers[lang].add(tokens, lengths):
                    writers[lang].write(block)
                    s.samples += 1
                bar.update(len(tokens))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # every result has been consumed (or we are failing)
            pool.join()
    shards = []
    for lang in languages:
        stats[lang].dropped_tokens = len(packers[lang].tokens)
        shards += writers[lang].close()
        if stats[lang].samples == 0:
            log.warning("pack %s: language %s has %d tokens, fewer than one block of %d: no samples",
                        split, lang, stats[lang].tokens, block_len)
    manifest = Manifest(split=split, seq_len=seq_len, tokenizer_hash=tokenizer_hash(tokenizer_dir),
                        vocab_size=tok.get_vocab_size(), eos_id=EOS_ID, languages=languages,
                        language_stats=stats, shards=shards, seed=seed,
                        tokenizer_path=os.path.relpath(Path(tokenizer_dir).resolve(), out_dir.resolve()))
    path = manifest.save(out_dir / MANIFEST_NAME)
    keep = {s.path for s in shards}
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in keep:
            stale.unlink()
    return path

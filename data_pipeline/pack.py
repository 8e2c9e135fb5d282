"""Stage 3, tokenize and pack: documents -> EOS-terminated token streams -> fixed blocks of seq_len + 1.

Per language, documents are shuffled (T5-style packing, FuxiTranyu §3.5), each followed by EOS (id 0),
concatenated and cut into blocks of seq_len + 1 tokens. Every token carries its language index (into the
manifest's `languages`) and its document index (unique within the language), which the trainer needs for
per-language loss, document masking and the MoE-LPR language prior. Blocks are monolingual, so the stream can
mix languages by weight.

Parallelism: the shuffled documents of a language are cut into parts of `docs_per_part`; each (language,
part) is one job that a worker process runs from end to end (read, tokenize, pack, write its own shards), so
the parent only collects results. Each part drops its tail shorter than one block (counted in the
manifest). Jobs and their shards depend only on the data and the seed, never on the number of processes.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from data_pipeline.encoders import FastEncoder
from data_pipeline.errors import DataConfigError, DataError
from data_pipeline.io_utils import decode_utf8
from data_pipeline.manifest import LANG_DTYPE, LanguageStats, Manifest, ShardInfo
from data_pipeline.shards import Block, ShardWriter
from data_pipeline.staging import staged_folder
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


def line_offsets(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-empty lines of a file (so documents can be read in a
    shuffled order, and an error can name its line)."""
    offsets, lines = [], []
    pos = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                offsets.append(pos)
                lines.append(lineno)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int64)


@dataclass
class PackJob:
    lang: str
    lang_index: int
    path: str
    offsets: np.ndarray  # this part's documents, in the shuffled order
    first_doc: int  # document index of the first of them (document ids are unique per language)
    part: int
    lines: np.ndarray | None = None  # their line numbers, for error messages


@dataclass
class PackResult:
    lang: str
    part: int
    shards: list[ShardInfo]
    stats: LanguageStats


class BlockPacker:
    """Carries the unfinished tail between batches of documents and emits full blocks of one language."""

    def __init__(self, lang_index: int, block_len: int, first_doc: int = 0):
        self.block_len = block_len
        self.lang_ids = np.full(block_len, lang_index, dtype=LANG_DTYPE)
        self.tokens = np.empty(0, dtype=np.uint32)
        self.doc_ids = np.empty(0, dtype=np.uint32)
        self.next_doc = first_doc

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> Iterator[Block]:
        """Append documents (`tokens` with their EOS, `lengths` per document) and yield the full blocks."""
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


def read_documents(path: str, offsets: np.ndarray, lang: str, lines: np.ndarray | None = None) -> list[str]:
    """The documents at `offsets` (byte offsets of lines); an error names the file and line (`lines`, else
    the byte offset)."""
    texts = []
    with open(path, "rb") as f:
        for k, off in enumerate(offsets):
            f.seek(int(off))
            raw = f.readline()
            where = f"{path}:{int(lines[k])}" if lines is not None else f"{path} (byte {int(off)})"
            line = decode_utf8(raw, path, int(lines[k])) if lines is not None else decode_utf8(raw, where)
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{where}: not a JSON object with a \"text\" field") from None
            if record.get("lang", lang) != lang:
                raise DataError(f"{where}: document has lang {record.get('lang')!r}, but the file is for {lang!r}")
            texts.append(text)
    return texts


def encode_documents(encoder: FastEncoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens with EOS after each document, tokens per document including its EOS)."""
    encodings = encoder.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encodings), dtype=np.int64, count=len(encodings))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    pos = 0
    for ids in encodings:
        n = len(ids)
        tokens[pos:pos + n] = ids
        tokens[pos + n] = EOS_ID
        pos += n + 1
    return tokens, lengths


# --- worker side ------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, settings: dict, parallel: bool) -> None:
    if not parallel:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encoder"] = FastEncoder(tokenizer_dir, prefer_fast=settings["fast_encoder"])
    _WORKER.update(settings)


def run_job(job: PackJob) -> PackResult:
    """Read, tokenize, pack and write the shards of one (language, part)."""
    w = _WORKER
    prefix = f"{w['split']}-{job.lang}-{job.part:04d}"
    writer = ShardWriter(Path(w["out_dir"]), prefix, job.lang, w["languages"], w["shard_bytes"])
    packer = BlockPacker(job.lang_index, w["block_len"], job.first_doc)
    stats = LanguageStats()
    try:
        for i in range(0, len(job.offsets), w["chunk_docs"]):
            lines = None if job.lines is None else job.lines[i:i + w["chunk_docs"]]
            texts = read_documents(job.path, job.offsets[i:i + w["chunk_docs"]], job.lang, lines)
            tokens, lengths = encode_documents(w["encoder"], texts)
            stats.documents += len(texts)
            stats.tokens += len(tokens)
            stats.utf8_bytes += sum(len(t.encode("utf-8")) for t in texts)
            for block in packer.add(tokens, lengths):
                writer.write(block)
                stats.samples += 1
    except BaseException:
        writer.abort()
        raise
    stats.dropped_tokens = len(packer.tokens)
    return PackResult(job.lang, job.part, writer.close(), stats)


# --- parent side ------------------------------------------------------------------------------------------

def plan_jobs(files: dict[str, Path], languages: list[str], seed: int, docs_per_part: int) -> list[PackJob]:
    """Shuffle each language's documents (seeded by seed and language) and cut them into parts."""
    jobs = []
    for lang_index, lang in enumerate(languages):
        if lang not in files:
            continue
        offsets, lines = line_offsets(files[lang])
        order = np.random.default_rng([seed, zlib.crc32(lang.encode("utf-8"))]).permutation(len(offsets))
        offsets, lines = offsets[order], lines[order]
        for part, start in enumerate(range(0, len(offsets), docs_per_part)):
            end = start + docs_per_part
            jobs.append(PackJob(lang, lang_index, str(files[lang]), offsets[start:end], start, part,
                                lines[start:end]))
    return jobs


def pack(corpus: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *, split: str = "train",
         seq_len: int = 2048, languages: list[str] | None = None, shard_bytes: int = 128 << 20,
         num_proc: int | None = None, seed: int = 0, chunk_docs: int = 256, docs_per_part: int = 50_000,
         fast_encoder: bool = True, progress: bool = True) -> Path:
    """Tokenize and pack a cleaned split directory into webdataset shards plus `out_dir/manifest.json`.

    languages: the ordered language list the language ids index (give the same list for train and valid);
    default: the languages found, sorted. fast_encoder: encode with tiktoken/sentencepiece where they are
    checked equal to the HF tokenizer (encoders.py). Returns the manifest path.
    """
    if seq_len < 1:
        raise DataConfigError(f"seq_len: must be >= 1, got {seq_len}")
    if shard_bytes < 1:
        raise DataConfigError(f"shard_bytes: must be >= 1, got {shard_bytes}")
    if docs_per_part < 1 or chunk_docs < 1:
        raise DataConfigError(f"docs_per_part/chunk_docs: must be >= 1, got {docs_per_part}/{chunk_docs}")
    files = language_files(corpus)
    languages = list(languages) if languages else sorted(files)
    if len(set(languages)) != len(languages):
        raise DataConfigError(f"languages: duplicates in {languages}")
    unknown = sorted(set(files) - set(languages))
    if unknown:
        log.warning("pack %s: ignoring %s (not in the language list)", corpus, unknown)
    out_dir = Path(out_dir)
    vocab_size = load_tokenizer(tokenizer_dir).get_vocab_size()
    import webdataset  # noqa: F401 - imported once here, not in every worker (it imports torch)
    jobs = plan_jobs(files, languages, seed, docs_per_part)
    num_proc = max(1, min(num_proc or os.cpu_count() or 1, len(jobs) or 1))
    # Everything is written into a staging folder that replaces out_dir only once the manifest is complete:
    # a failure leaves a dataset already in out_dir exactly as it was (staging.py).
    with staged_folder(out_dir, owned=(MANIFEST_NAME, "*.tar")) as staging:
        settings = {"out_dir": str(staging), "split": split, "languages": languages, "block_len": seq_len + 1,
                    "shard_bytes": shard_bytes, "chunk_docs": chunk_docs, "fast_encoder": fast_encoder}
        results: list[PackResult] = []
        with tqdm(total=len(jobs), desc=f"pack {split}", unit="part", disable=not progress) as bar:
            if num_proc > 1:
                # Big jobs first keeps the processes busy to the end; results are re-ordered below.
                order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].offsets))
                with mp.get_context("fork").Pool(num_proc, initializer=_init_worker,
                                                 initargs=(str(tokenizer_dir), settings, False)) as pool:
                    for result in pool.imap_unordered(run_job, [jobs[i] for i in order]):
                        results.append(result)
                        bar.update()
            else:
                _init_worker(str(tokenizer_dir), settings, True)
                for job in jobs:
                    results.append(run_job(job))
                    bar.update()

        results.sort(key=lambda r: (languages.index(r.lang), r.part))
        stats = {lang: LanguageStats() for lang in languages}
        shards: list[ShardInfo] = []
        for r in results:
            s = stats[r.lang]
            for name in ("documents", "tokens", "utf8_bytes", "samples", "dropped_tokens"):
                setattr(s, name, getattr(s, name) + getattr(r.stats, name))
            shards += r.shards
        for lang in languages:
            if stats[lang].samples == 0:
                log.warning("pack %s: language %s has %d tokens, fewer than one block of %d: no samples",
                            split, lang, stats[lang].tokens, seq_len + 1)
        manifest = Manifest(split=split, seq_len=seq_len, tokenizer_hash=tokenizer_hash(tokenizer_dir),
                            vocab_size=vocab_size, eos_id=EOS_ID, languages=languages, language_stats=stats,
                            shards=shards, seed=seed,
                            tokenizer_path=os.path.relpath(Path(tokenizer_dir).resolve(), out_dir.resolve()))
        manifest.save(staging / MANIFEST_NAME)
    return out_dir / MANIFEST_NAME

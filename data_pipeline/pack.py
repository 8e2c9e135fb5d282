"""Stage 3, tokenize and pack: documents -> EOS-terminated token streams -> fixed blocks of seq_len + 1.

Per language, documents are shuffled (T5-style packing, FuxiTranyu §3.5), each followed by EOS (id 0),
concatenated and cut into blocks of seq_len + 1 tokens. Every token carries its language index (into the
manifest's `languages`) and its document index (unique within the language), which the trainer needs for
per-language loss, document masking and the MoE-LPR language prior. Blocks are monolingual, so the stream can
mix languages by weight.

Parallelism: the shuffled documents of a language are cut into parts of `docs_per_part`; each (language,
part) is one job, run from end to end (read, tokenize, pack, write its own shards) by the engine task it is
dealt to (`pack_stages.py`). Each part drops its tail shorter than one block (counted in the manifest). Jobs
and their shards depend only on the data and the seed, never on the number of tasks, processes or machines.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fuxi.common.errors import ConfigError, DataError
from fuxi.data_pipeline.encoders import FastEncoder
from fuxi.data_pipeline.io_utils import decode_utf8, input_stamp, line_number
from fuxi.data_pipeline.manifest import LANG_DTYPE, LanguageStats, ShardInfo
from fuxi.data_pipeline.shards import Block, ShardWriter
from fuxi.data_pipeline.tokenizer import EOS_ID, load_tokenizer

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
    """The documents at `offsets` (byte offsets of lines); an error names the file and line (from `lines`, else
    counted from the byte offset when there is an error to report)."""
    texts = []
    with open(path, "rb") as f:
        for k, off in enumerate(offsets):
            f.seek(int(off))
            raw = f.readline()

            def line_no() -> int:
                return int(lines[k]) if lines is not None else line_number(path, int(off))

            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                decode_utf8(raw, path, line_no())  # raises, naming the file, line and column
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{line_no()}: not a JSON object with a \"text\" field") from None
            if record.get("lang", lang) != lang:
                raise DataError(f"{path}:{line_no()}: document has lang {record.get('lang')!r}, but the file is "
                                f"for {lang!r}")
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


# --- one job -------------------------------------------------------------------------------------------------

@dataclass
class PackSettings:
    """What every pack task needs (picklable: it travels to Slurm and Ray workers)."""
    corpus: str
    tokenizer_dir: str
    out_dir: str
    work_dir: str
    split: str
    seq_len: int
    languages: list[str] | None
    shard_bytes: int
    seed: int
    chunk_docs: int
    docs_per_part: int
    fast_encoder: bool
    job: str = ""  # hash of the inputs and settings, recorded in pack_report.json

    @property
    def staging(self) -> Path:
        """Where the tasks write shards and task manifests; switched in place of out_dir at the end."""
        return Path(self.work_dir) / "staging"


def run_job(job: PackJob, s: PackSettings, languages: list[str], encoder: FastEncoder) -> PackResult:
    """Read, tokenize, pack and write the shards of one (language, part)."""
    prefix = f"{s.split}-{job.lang}-{job.part:04d}"
    writer = ShardWriter(s.staging, prefix, job.lang, languages, s.shard_bytes)
    packer = BlockPacker(job.lang_index, s.seq_len + 1, job.first_doc)
    stats = LanguageStats()
    try:
        for i in range(0, len(job.offsets), s.chunk_docs):
            lines = None if job.lines is None else job.lines[i:i + s.chunk_docs]
            texts = read_documents(job.path, job.offsets[i:i + s.chunk_docs], job.lang, lines)
            tokens, lengths = encode_documents(encoder, texts)
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


# --- the job of many tasks ------------------------------------------------------------------------------------

def pack(corpus: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *, split: str = "train",
         seq_len: int = 2048, languages: list[str] | None = None, shard_bytes: int = 128 << 20,
         num_proc: int | None = None, seed: int = 0, chunk_docs: int = 256, docs_per_part: int = 50_000,
         fast_encoder: bool = True, progress: bool = True, executor=None,
         work_dir: str | Path | None = None) -> Path | None:
    """Tokenize and pack a cleaned split directory into webdataset shards plus `out_dir/manifest.json`.

    Runs as tasks of the data engine (`engine.py`): `plan` (1 task) shuffles and cuts each language into parts,
    `pack` (--tasks tasks) runs the parts dealt to it, each task writing its shards and a task manifest,
    `merge` (1 task) checks and combines the task manifests and switches the new folder in place of the old
    one. languages: the ordered language list the language ids index (give the same list for train and
    valid); default: the languages found, sorted. fast_encoder: encode with tiktoken/sentencepiece where they
    are checked equal to the HF tokenizer (encoders.py). Returns the manifest path, or None when the job was
    submitted to a cluster or this machine ran only some tasks (then its folder holds their task manifests,
    for `fuxi data merge`).
    """
    from fuxi.common.staging import refuse_foreign
    from fuxi.data_pipeline.engine import ExecutorConfig, default_work_dir, prepare_work_dir, run_stages
    from fuxi.data_pipeline.pack_stages import pack_stages

    if seq_len < 1:
        raise ConfigError("seq_len", f"must be >= 1, got {seq_len}")
    if shard_bytes < 1:
        raise ConfigError("shard_bytes", f"must be >= 1, got {shard_bytes}")
    if docs_per_part < 1 or chunk_docs < 1:
        raise ConfigError("docs_per_part" if docs_per_part < 1 else "chunk_docs",
                          f"must be >= 1, got {docs_per_part}/{chunk_docs}")
    if languages is not None and len(set(languages)) != len(languages):
        raise ConfigError("languages", f"duplicates in {languages}")
    language_files(corpus)  # fail now on a bad corpus, not in a task
    load_tokenizer(tokenizer_dir)
    executor = executor or ExecutorConfig(workers=num_proc, progress=progress)
    executor.validate()
    out_dir = Path(out_dir).absolute()
    refuse_foreign(out_dir, OWNED)
    settings = PackSettings(
        corpus=str(Path(corpus).absolute()), tokenizer_dir=str(Path(tokenizer_dir).absolute()),
        out_dir=str(out_dir), work_dir=str(Path(work_dir).absolute() if work_dir else default_work_dir(out_dir)),
        split=split, seq_len=seq_len, languages=list(languages) if languages else None, shard_bytes=shard_bytes,
        seed=seed, chunk_docs=chunk_docs, docs_per_part=docs_per_part, fast_encoder=fast_encoder)
    identity = {k: v for k, v in asdict(settings).items() if k not in ("out_dir", "work_dir")}
    identity.update(stage="pack", inputs=input_stamp([settings.corpus,
                                                         Path(settings.tokenizer_dir) / "tokenizer.json"]))
    job = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    report = out_dir / "pack_report.json"
    if report.is_file() and (out_dir / MANIFEST_NAME).is_file() and \
            json.loads(report.read_text(encoding="utf-8")).get("job") == job:
        return out_dir / MANIFEST_NAME  # packed from the same inputs with the same settings
    settings.job = job
    identity["tasks"] = executor.num_tasks
    work = Path(settings.work_dir)
    prepare_work_dir(work, identity)
    import webdataset  # noqa: F401 - imported once here, not in every forked task (it imports torch)
    done = run_stages(pack_stages(settings, executor.num_tasks), work, executor)
    if executor.executor == "local" and executor.partial:
        from fuxi.common.staging import switch_folder
        switch_folder(settings.staging, out_dir)  # this machine's shards and task manifests
        print(f"pack: tasks {executor.rank_offset}-{executor.rank_offset + executor.local_tasks - 1} of "
              f"{executor.num_tasks} -> {out_dir}; combine all machines' folders with `fuxi data merge`")
        shutil.rmtree(work, ignore_errors=True)
        return None
    if not done:
        return None
    shutil.rmtree(work, ignore_errors=True)
    return out_dir / MANIFEST_NAME


OWNED = (MANIFEST_NAME, "*.tar", "task-*.manifest.json", "pack_report.json")


"""The pipeline steps of `fuxi data clean` (the stage list is in clean.py's docstring), and what the process
step does to each document. Each step reads the job's settings (`clean.CleanJob`) as `self.job`.

Work folder layout (every file written under a temp name and renamed; per chunk, `chunks/<stage>/<chunk>.json`
comes last and marks the chunk done, so a re-run of a killed task skips the chunks it had finished):

    plan.json                        the input chunks
    docs/<chunk>.jsonl               documents that passed the filters, as output lines
    docs/<chunk>.index.npy, .labels.json   per line: local id, split, language (indexes into the labels), chars
    shingles/<chunk>.{ids,offsets}.npy + .values.u32, sig/<chunk>.npy, exact/<chunk>.npy (dedup_stages.py)
    meta/<chunk>.json                per split and language: input, filters, language-ID fills
    dedup/{edges-<band>,exact_drop,near_drop}.npy, holdout.json
    written/<chunk>.json             per split and language: duplicates, kept, held out
    parts/<split>/<lang>/<chunk>.jsonl, final/<split>/<lang>.jsonl
    chunks/<stage>/<chunk>.json      documents in and out of a finished chunk (process, write)
    taskstats/<stage>/<task>.json    seconds, documents in and out; logs/<stage>/ is datatrove's
"""
from __future__ import annotations

import contextlib
import json
import shutil
from array import array
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from fuxi.common.atomic import atomic_write, write_json
from fuxi.common.errors import DataError, InputError
from fuxi.common.staging import switch_folder
from fuxi.data_pipeline.chunks import ID_BITS, Chunk, doc_id, load_plan, plan_chunks, read_chunk
from fuxi.data_pipeline.clean_report import REPORT_NAME, CleanReport, merge_counters, ordered_stats
from fuxi.data_pipeline.dedup import band_keys, exact_key_words, language_seed, minhash_signature, shingles
from fuxi.data_pipeline.dedup_stages import save_npy
from fuxi.data_pipeline.engine import TaskStep, deal
from fuxi.data_pipeline.errors import TaskError
from fuxi.data_pipeline.filters import DocumentFilter, FilterConfig
from fuxi.data_pipeline.job import FinishStep
from fuxi.data_pipeline.langid import LangIdConfig, identifier
from fuxi.data_pipeline.textstats import nfc


class DocumentProcessor:
    """NFC, language identification and the filters for one document: `(text, lang, filled, reason)`, reason
    None when the document is kept."""

    def __init__(self, filters: FilterConfig, langid: LangIdConfig):
        self.filter = DocumentFilter(filters)
        self.langid = langid

    def __call__(self, text: str, lang: str | None) -> tuple[str, str | None, bool, str | None]:
        text = nfc(text)
        if lang is None:
            if not self.langid.enabled:
                return text, None, False, "no_language"
            lang, confidence = identifier(self.langid.languages).classify(text)
            if confidence < self.langid.min_confidence:
                return text, lang, True, "langid_low_confidence"
            return text, lang, True, self.filter.reject_reason(text, lang)
        return text, lang, False, self.filter.reject_reason(text, lang)


def assign(chunks: list[Chunk], world_size: int) -> list[list[Chunk]]:
    """Chunks per task, balanced by bytes."""
    return [[chunks[i] for i in mine] for mine in deal([c.bytes for c in chunks], world_size)]


class _ChunkStep(TaskStep):
    """A step that works chunk by chunk. `chunks/<stage>/<chunk>.json` (the chunk's documents in and out),
    written once `process` has written everything else, marks a chunk done: a re-run of a killed task skips it,
    and its figures still count in the task's (so the report counts the whole job after a resume)."""

    def mine(self, rank: int, world_size: int) -> list[Chunk]:
        return assign(load_plan(self.job.work_dir), world_size)[rank]

    def _done(self, chunk: Chunk) -> Path:
        return self.job.work_dir / "chunks" / self.name / f"{chunk.index:06d}.json"

    def describe(self, rank: int, world_size: int) -> str:
        try:
            chunks = self.mine(rank, world_size)
        except (OSError, ValueError):
            return ""
        listed = "; ".join(c.describe() for c in chunks[:3])
        return f"{len(chunks)} chunks: {listed}{' ...' if len(chunks) > 3 else ''}"

    def workload(self, rank: int, world_size: int) -> tuple[int | None, int | None]:
        return None, sum(c.bytes for c in self.mine(rank, world_size) if not self._done(c).is_file())

    def run_task(self, rank: int, world_size: int) -> dict:
        figures = Counter()
        for chunk in self.mine(rank, world_size):
            done = self._done(chunk)
            if done.is_file():
                figures.update(json.loads(done.read_text(encoding="utf-8")))
                figures["chunks_skipped"] += 1
                continue
            try:
                docs_in, docs_out = self.process(chunk)
            except InputError:  # bad input names itself; anything else gets the task's name
                raise
            except Exception as err:
                raise TaskError(f"{self.name}: task {rank} of {world_size}, {chunk.describe()}: {err}") from err
            write_json(done, {"docs_in": docs_in, "docs_out": docs_out})
            figures["chunks"] += 1
            figures["docs_in"] += docs_in
            figures["docs_out"] += docs_out
            self.advance(docs_in, chunk.bytes)
        for k, v in figures.items():
            self.count(k, v)
        return dict(figures)

    def process(self, chunk: Chunk) -> tuple[int, int]:
        raise NotImplementedError


class PlanChunks(TaskStep):
    name = "plan"

    def run_task(self, rank: int, world_size: int) -> None:
        job = self.job
        chunks = plan_chunks(job.splits, job.chunk_bytes, job.max_docs_per_language, job.fields)
        write_json(job.work_dir / "plan.json", {"chunks": [c.to_dict() for c in chunks]})
        self.count("chunks", len(chunks))


class ProcessChunks(_ChunkStep):
    """NFC, language ID, filters; for documents that pass: the output line, exact key, MinHash band keys and
    shingle set."""

    name = "process"

    def process(self, chunk: Chunk) -> tuple[int, int]:
        job = self.job
        root = job.work_dir
        name = f"{chunk.index:06d}"
        processor = DocumentProcessor(job.filters, job.langid)
        keep = set(job.languages) if job.languages else None
        stats: dict = defaultdict(lambda: defaultdict(Counter))
        index = _ChunkIndex()
        exact_rows = array("Q")
        signatures = _SignatureBatches(job.dedup, chunk.index)
        docs_in = 0
        # Shingle values stream to disk; per document only a few small numbers stay in memory, so a task's
        # memory does not grow with the chunk size.
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(atomic_write(root / "docs" / f"{name}.jsonl"))
            values = stack.enter_context(atomic_write(root / "shingles" / f"{name}.values.u32", "wb")) \
                if job.dedup.near else None
            for local, doc in enumerate(read_chunk(chunk)):
                docs_in += 1
                text, lang, filled, reason = processor(doc.text, doc.lang)
                c = stats[chunk.split][lang or "unknown"]
                c["input"] += 1
                c["chars_in"] += len(text)
                c["langid_filled"] += int(filled)
                if reason is not None:
                    c[f"filter_{reason}"] += 1
                    continue
                if keep is not None and lang not in keep:
                    c["not_selected"] += 1
                    continue
                record = {"text": text, "lang": lang}
                if doc.source:
                    record["source"] = doc.source
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                index.add(local, chunk.split, lang, len(text))
                if job.dedup.exact:
                    exact_rows.extend((*exact_key_words(text), doc_id(chunk.index, local)))
                if values is not None:
                    sh = shingles(text, job.dedup.ngram)
                    values.write(sh.tobytes())
                    signatures.add(local, sh, lang)
        index.save(root / "docs" / name)
        if job.dedup.near:
            ids, offsets, runs = signatures.finish()
            save_npy(root / "shingles" / f"{name}.ids.npy", ids)
            save_npy(root / "shingles" / f"{name}.offsets.npy", offsets)
            save_npy(root / "sig" / f"{name}.npy", runs)
        rows = np.frombuffer(exact_rows, dtype=np.uint64).reshape(-1, 3)
        save_npy(root / "exact" / f"{name}.npy", rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))])
        write_json(root / "meta" / f"{name}.json", ordered_stats(stats))
        return docs_in, len(index)


class _ChunkIndex:
    """Per document line of a chunk: local id, split, language, characters, in flat arrays (a few bytes per
    document: a task's memory must not grow with the chunk)."""

    def __init__(self):
        self.rows = array("q")
        self.labels: dict[str, dict[str, int]] = {"splits": {}, "langs": {}}

    def add(self, local: int, split: str, lang: str, chars: int) -> None:
        splits, langs = self.labels["splits"], self.labels["langs"]
        self.rows.extend((local, splits.setdefault(split, len(splits)), langs.setdefault(lang, len(langs)), chars))

    def __len__(self) -> int:
        return len(self.rows) // 4

    def save(self, base: Path) -> None:
        write_json(Path(f"{base}.labels.json"), {k: list(v) for k, v in self.labels.items()})
        save_npy(Path(f"{base}.index.npy"), np.frombuffer(self.rows, dtype=np.int64).reshape(-1, 4))

    @staticmethod
    def load(base: Path) -> Iterator[tuple[int, str, str, int]]:
        labels = json.loads(Path(f"{base}.labels.json").read_text(encoding="utf-8"))
        rows = np.load(f"{base}.index.npy")
        for i in range(0, len(rows), 4096):
            for local, s, g, chars in rows[i:i + 4096].tolist():
                yield local, labels["splits"][s], labels["langs"][g], chars


class _SignatureBatches:
    """MinHash signatures turned into band keys a batch of documents at a time (a chunk's signatures are
    never all in memory), then each band's (key, id) rows sorted: the chunk's sorted runs."""

    BATCH = 512

    def __init__(self, config, chunk: int):
        self.config = config
        self.chunk = chunk
        self.ids = array("q")
        self.offsets = array("q", [0])
        self._sigs: list[np.ndarray] = []
        self._seeds: list[int] = []
        self._keys: list[np.ndarray] = []

    def add(self, local: int, sh: np.ndarray, lang: str) -> None:
        self.ids.append(local)
        self.offsets.append(self.offsets[-1] + len(sh))
        self._sigs.append(minhash_signature(sh, self.config))
        self._seeds.append(language_seed(lang))
        if len(self._sigs) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._sigs:
            self._keys.append(band_keys(np.stack(self._sigs), np.asarray(self._seeds, dtype=np.uint64),
                                        self.config))
            self._sigs, self._seeds = [], []

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._flush()
        n_bands = self.config.bands[0]
        runs = np.empty((n_bands, len(self.ids), 2), dtype=np.uint64)
        if self.ids:
            keys = np.concatenate(self._keys, axis=1)
            ids = (np.uint64(self.chunk) << np.uint64(ID_BITS)) | np.asarray(self.ids, dtype=np.uint64)
            for b in range(n_bands):
                order = np.lexsort((ids, keys[b]))
                runs[b, :, 0] = keys[b][order]
                runs[b, :, 1] = ids[order]
        return np.asarray(self.ids, dtype=np.int64), np.asarray(self.offsets, dtype=np.int64), runs


def _drops_in(drop: np.ndarray, chunk: int) -> set[int]:
    lo, hi = np.searchsorted(drop, [np.uint64(doc_id(chunk, 0)), np.uint64(doc_id(chunk + 1, 0))])
    return {int(x) & 0xFFFFFFFF for x in drop[lo:hi]}


def _load_drops(root: Path) -> tuple[np.ndarray, np.ndarray]:
    empty = np.empty(0, dtype=np.uint64)
    out = []
    for name in ("exact_drop", "near_drop"):
        path = root / "dedup" / f"{name}.npy"
        out.append(np.load(path, mmap_mode="r") if path.is_file() else empty)
    return out[0], out[1]


class HoldoutOffsets(TaskStep):
    """Kept training documents per language before each chunk, so the write tasks can hold out every k-th
    kept document of a language exactly as one sequential pass would."""

    name = "holdout"

    def run_task(self, rank: int, world_size: int) -> None:
        root = self.job.work_dir
        exact, near = _load_drops(root)
        counts: Counter = Counter()
        offsets = {}
        for chunk in load_plan(root):
            offsets[chunk.index] = dict(counts)
            dropped = _drops_in(exact, chunk.index) | _drops_in(near, chunk.index)
            for local, split, lang, _ in _ChunkIndex.load(root / "docs" / f"{chunk.index:06d}"):
                if split == "train" and local not in dropped:
                    counts[lang] += 1
        write_json(root / "dedup" / "holdout.json", offsets)


class WriteKept(_ChunkStep):
    """Drop the duplicates, hold out, and write the kept lines of a chunk per split and language."""

    name = "write"

    def run_task(self, rank: int, world_size: int) -> dict:
        # read once per task, not per chunk: the drop lists and the holdout offsets of every chunk
        self.drops = _load_drops(self.job.work_dir)
        path = self.job.work_dir / "dedup" / "holdout.json"
        self.holdout = json.loads(path.read_text(encoding="utf-8")) if self.job.holdout_every else {}
        return super().run_task(rank, world_size)

    def process(self, chunk: Chunk) -> tuple[int, int]:
        root = self.job.work_dir
        every = self.job.holdout_every
        name = f"{chunk.index:06d}"
        exact, near = (_drops_in(drop, chunk.index) for drop in self.drops)
        held = Counter(self.holdout[str(chunk.index)] if every else {})
        stats: dict = defaultdict(lambda: defaultdict(Counter))
        kept = docs = 0
        with contextlib.ExitStack() as stack, open(root / "docs" / f"{name}.jsonl", "rb") as lines:
            writers = {}
            for (local, split, lang, chars), line in zip(_ChunkIndex.load(root / "docs" / name), lines):
                docs += 1
                c = stats[split][lang]
                if local in exact:
                    c["exact_dup"] += 1
                    continue
                if local in near:
                    c["near_dup"] += 1
                    continue
                target = split
                if split == "train" and every:
                    if held[lang] % every == 0:
                        target = "valid"
                        c["held_out"] += 1
                    held[lang] += 1
                c["kept"] += 1
                c["chars_kept"] += chars
                if (target, lang) not in writers:
                    writers[target, lang] = stack.enter_context(
                        atomic_write(root / "parts" / target / lang / f"{name}.jsonl", "wb"))
                writers[target, lang].write(line)
                kept += 1
        write_json(root / "written" / f"{name}.json", ordered_stats(stats))
        return docs, kept


class Gather(TaskStep):
    """One file per split and language: the chunk parts concatenated in input order."""

    name = "gather"

    def _pairs(self) -> list[Path]:
        parts = self.job.work_dir / "parts"
        return sorted(p for p in parts.glob("*/*") if p.is_dir()) if parts.is_dir() else []

    def describe(self, rank: int, world_size: int) -> str:
        mine = self._pairs()[rank::world_size]
        return ", ".join(f"{p.parent.name}/{p.name}" for p in mine[:4]) + (" ..." if len(mine) > 4 else "")

    def run_task(self, rank: int, world_size: int) -> dict:
        for folder in self._pairs()[rank::world_size]:
            target = self.job.work_dir / "final" / folder.parent.name / f"{folder.name}.jsonl"
            with atomic_write(target, "wb") as out:
                for part in sorted(folder.glob("*.jsonl")):
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
            self.count("files")
        return {}


class Publish(FinishStep):
    """The report (per split and language, per stage and task), then the new output folder in place of the
    old one in one switch: a failed run leaves an existing output untouched."""

    name = "publish"

    def finish(self) -> None:
        root = self.job.work_dir
        stats: dict = {}
        for folder in ("meta", "written"):
            for path in sorted((root / folder).glob("*.json")):
                merge_counters(stats, json.loads(path.read_text(encoding="utf-8")))
        tasks = {}
        for stage_dir in sorted((root / "taskstats").iterdir()):
            tasks[stage_dir.name] = {p.stem: json.loads(p.read_text()) for p in sorted(stage_dir.glob("*.json"))}
        order = [s for s in ("plan", "process", "buckets", "clusters", "holdout", "write", "gather") if s in tasks]
        report = CleanReport(ordered_stats(stats), {s: tasks[s] for s in order}, self.job_hash)
        splits = list(self.job.splits)
        report.stats = {s: report.stats[s] for s in splits + sorted(set(report.stats) - set(splits))}
        if not any(c.get("kept") for langs in report.stats.values() for c in langs.values()):
            raise DataError(f"clean: no document survived cleaning of {list(self.job.splits.values())}; "
                            f"see the report:\n{report.table()}")
        final = root / "final"
        final.mkdir(exist_ok=True)
        write_json(final / REPORT_NAME, report.to_dict())
        switch_folder(final, self.job.out_dir)

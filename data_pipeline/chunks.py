"""Input chunks: the unit of work of the distributed stages.

The inputs (corpus.find_inputs; validation split first) are cut into chunks of about `chunk_bytes`: a plain
JSONL file at line boundaries, a parquet file at row-group boundaries, a `datasets` Arrow file at record-batch
boundaries (row ranges), so one large language spreads over many tasks; a compressed JSONL file (.gz, .zst)
is one chunk, and text files of one language are grouped. Chunks are numbered in input order, and a
document's id is (chunk index << 32 | its index in the chunk): ids order documents as a sequential reader
would see them, whatever the number of tasks, so "keep the first of a duplicate group" means the same thing on
one machine or a thousand.

Reading a chunk checks every record: bad JSON, a missing or non-string text field or invalid UTF-8 is a
`DataError` naming the file and line (or row).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping

from fuxi.data_pipeline.corpus import InputFile, check_splits_read, find_inputs
from fuxi.data_pipeline.jsonl import line_number
from fuxi.data_pipeline.readers import (Document, RecordFields, arrow_batches, iter_jsonl, iter_text_files,
                                        parquet_row_groups, parse_document, read_arrow, read_parquet)

ID_BITS = 32


@dataclass
class Chunk:
    index: int
    split: str
    # "jsonl" (bytes start-end), "jsonl.gz" / "jsonl.zst" (whole file), "parquet" (row groups start-end),
    # "arrow" (rows start-end) or "files" (one document per file)
    kind: str
    paths: list[str]
    start: int = 0
    end: int = 0
    lang: str | None = None  # the language its folder gives: for records without one, and for text files
    max_docs_per_language: int | None = None
    size: int = 0  # bytes of the chunk's input when planned (every kind but "jsonl")
    text_field: str = "text"
    lang_field: str | None = None  # None: "lang", else "language"

    @property
    def bytes(self) -> int:
        """What the chunk weighs when chunks are dealt to tasks (no file is read)."""
        return self.end - self.start if self.kind == "jsonl" else self.size

    @property
    def fields(self) -> RecordFields:
        return RecordFields(self.text_field, self.lang_field)

    def describe(self) -> str:
        if self.kind == "jsonl":
            return f"{self.paths[0]} bytes {self.start}-{self.end}"
        if self.kind == "parquet":
            return f"{self.paths[0]} row groups {self.start}-{self.end}"
        if self.kind == "arrow":
            return f"{self.paths[0]} rows {self.start}-{self.end}"
        if self.kind == "files":
            return f"{len(self.paths)} files from {self.paths[0]}"
        return self.paths[0]

    def to_dict(self) -> dict:
        return asdict(self)


def load_plan(work_dir: Path) -> list[Chunk]:
    """The chunks clean's plan stage wrote to `<work>/plan.json`."""
    return [Chunk(**c) for c in json.loads((work_dir / "plan.json").read_text(encoding="utf-8"))["chunks"]]


def doc_id(chunk: int, local: int) -> int:
    return (chunk << ID_BITS) | local


def _line_starts(path: Path, size: int, chunk_bytes: int) -> list[int]:
    """Offsets near multiples of chunk_bytes, moved forward to the next line start."""
    cuts = [0]
    with open(path, "rb") as f:
        pos = chunk_bytes
        while pos < size:
            f.seek(pos - 1)
            f.readline()  # finish the line that contains pos - 1
            cut = f.tell()
            if cut >= size:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
            pos = max(cut, pos) + chunk_bytes
    return cuts + [size]


def _cuts(sizes: list[int], chunk_bytes: int) -> list[tuple[int, int, int]]:
    """(first, end, bytes) of consecutive runs of `sizes` (row groups, record batches) of about chunk_bytes."""
    runs, first, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= chunk_bytes:
            runs.append((first, i + 1, total))
            first, total = i + 1, 0
    if first < len(sizes):
        runs.append((first, len(sizes), total))
    return runs


def plan_chunks(splits: Mapping[str, str | Path], chunk_bytes: int, max_docs_per_language: int | None = None,
                fields: RecordFields = RecordFields()) -> list[Chunk]:
    """Chunks of every input, in order: splits as given (validation first), then each split's inputs in the
    order `corpus.find_inputs` gives them."""
    check_splits_read(splits)
    chunks: list[Chunk] = []

    def add(**kw) -> None:
        chunks.append(Chunk(index=len(chunks), max_docs_per_language=max_docs_per_language,
                            text_field=fields.text, lang_field=fields.lang, **kw))

    for split, source in splits.items():
        group: list[InputFile] = []
        size = 0

        def flush() -> None:
            nonlocal group, size
            if group:
                add(split=split, kind="files", paths=[str(f.path) for f in group], lang=group[0].lang, size=size)
            group, size = [], 0

        for inp in find_inputs(source, split):
            path = str(inp.path)
            if inp.kind == "text":
                if group and group[0].lang != inp.lang:
                    flush()
                group.append(inp)
                size += inp.path.stat().st_size
                if size >= chunk_bytes:
                    flush()
                continue
            flush()
            if inp.kind == "jsonl":
                cuts = _line_starts(inp.path, inp.path.stat().st_size, chunk_bytes)
                for start, end in zip(cuts[:-1], cuts[1:]):
                    add(split=split, kind="jsonl", paths=[path], start=start, end=end, lang=inp.lang)
            elif inp.kind == "parquet":
                for first, end, total in _cuts(parquet_row_groups(inp.path), chunk_bytes):
                    add(split=split, kind="parquet", paths=[path], start=first, end=end, lang=inp.lang, size=total)
            elif inp.kind == "arrow":
                batches = arrow_batches(inp.path)
                rows = [0]
                for n, _ in batches:
                    rows.append(rows[-1] + n)
                for first, end, total in _cuts([b for _, b in batches], chunk_bytes):
                    add(split=split, kind="arrow", paths=[path], start=rows[first], end=rows[end], lang=inp.lang,
                        size=total)
            else:  # compressed JSON lines: read whole
                add(split=split, kind=inp.kind, paths=[path], lang=inp.lang, size=inp.path.stat().st_size)
        flush()
    return chunks


def _jsonl_range(chunk: Chunk) -> Iterator[Document]:
    path = chunk.paths[0]
    with open(path, "rb") as f:
        f.seek(chunk.start)
        pos = chunk.start
        while pos < chunk.end:
            line = f.readline()
            if not line:
                break
            start, pos = pos, pos + len(line)
            # the line number is counted only for an error (the chunk may start mid-file)
            doc = parse_document(line, path, lambda: line_number(path, start), origin=path, fields=chunk.fields,
                                 default_lang=chunk.lang)
            if doc is not None:
                yield doc


def read_chunk(chunk: Chunk) -> Iterator[Document]:
    """The chunk's documents in order (at most max_docs_per_language labelled ones per language)."""
    path = chunk.paths[0]
    if chunk.kind == "jsonl":
        reader = _jsonl_range(chunk)
    elif chunk.kind == "parquet":
        reader = read_parquet(path, range(chunk.start, chunk.end), chunk.fields, chunk.lang)
    elif chunk.kind == "arrow":
        reader = read_arrow(path, chunk.start, chunk.end, chunk.fields, chunk.lang)
    elif chunk.kind == "files":
        reader = iter_text_files(chunk.paths, chunk.lang)
    else:
        reader = iter_jsonl(path, chunk.fields, chunk.lang)
    cap = chunk.max_docs_per_language
    seen: dict[str, int] = {}
    for doc in reader:
        if cap is not None and doc.lang is not None:
            if seen.get(doc.lang, 0) >= cap:
                continue
            seen[doc.lang] = seen.get(doc.lang, 0) + 1
        yield doc

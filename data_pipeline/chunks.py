"""Input chunks: the unit of work of the distributed stages.

The inputs (JSONL files, `.jsonl.gz` files, folders of per-language text files; validation split first) are cut
into chunks of about `chunk_bytes`, a JSONL file at line boundaries, so one large language spreads over many
tasks. Chunks are numbered in input order, and a document's id is (chunk index << 32 | its index in the chunk):
ids order documents as a sequential reader would see them, whatever the number of tasks, so "keep the first of
a duplicate group" means the same thing on one machine or a thousand.

Reading a chunk checks every line: bad JSON, a missing "text" field or invalid UTF-8 is a `DataError` naming
the file and line.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from fuxi.data_pipeline.corpus import (GZ_JSONL_SUFFIXES, Document, find_inputs, iter_jsonl, iter_text_files,
                                  language_folder_files, normalize_language, parse_document)
from fuxi.data_pipeline.jsonl import line_number

ID_BITS = 32


@dataclass
class Chunk:
    index: int
    split: str
    kind: str  # "jsonl" (byte range), "jsonl.gz" (whole file) or "files" (one document per file, of `lang`)
    paths: list[str]
    start: int = 0
    end: int = 0
    lang: str | None = None
    max_docs_per_language: int | None = None
    size: int = 0  # bytes of `paths` when planned (kinds "jsonl.gz" and "files")

    @property
    def bytes(self) -> int:
        """What the chunk weighs when chunks are dealt to tasks (no file is read)."""
        return self.end - self.start if self.kind == "jsonl" else self.size

    def describe(self) -> str:
        if self.kind == "jsonl":
            return f"{self.paths[0]} bytes {self.start}-{self.end}"
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


def plan_chunks(splits: dict[str, str | Path], chunk_bytes: int,
                max_docs_per_language: int | None = None) -> list[Chunk]:
    """Chunks of every input, in order: splits as given (validation first), then the inputs `iter_documents`
    reads (`corpus.find_inputs`), in its order."""
    chunks: list[Chunk] = []

    def add(**kw) -> None:
        chunks.append(Chunk(index=len(chunks), max_docs_per_language=max_docs_per_language, **kw))

    for split, source in splits.items():
        files, folders = find_inputs(source)
        for path in files:
            if path.name.endswith(GZ_JSONL_SUFFIXES):
                add(split=split, kind="jsonl.gz", paths=[str(path)], size=path.stat().st_size)
            else:
                cuts = _line_starts(path, path.stat().st_size, chunk_bytes)
                for start, end in zip(cuts[:-1], cuts[1:]):
                    add(split=split, kind="jsonl", paths=[str(path)], start=start, end=end)
        for folder in folders:
            lang = normalize_language(folder.name)
            group: list[str] = []
            size = 0
            for path in language_folder_files(folder):
                group.append(str(path))
                size += path.stat().st_size
                if size >= chunk_bytes:
                    add(split=split, kind="files", paths=group, lang=lang, size=size)
                    group, size = [], 0
            if group:
                add(split=split, kind="files", paths=group, lang=lang, size=size)
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
            doc = parse_document(line, path, lambda: line_number(path, start), origin=path)
            if doc is not None:
                yield doc


def read_chunk(chunk: Chunk) -> Iterator[Document]:
    """The chunk's documents in order (at most max_docs_per_language labelled ones per language)."""
    if chunk.kind == "jsonl":
        reader = _jsonl_range(chunk)
    elif chunk.kind == "jsonl.gz":
        reader = iter_jsonl(chunk.paths[0])
    else:
        reader = iter_text_files(chunk.paths, chunk.lang)
    cap = chunk.max_docs_per_language
    seen: dict[str, int] = {}
    for doc in reader:
        if cap is not None and doc.lang is not None:
            if seen.get(doc.lang, 0) >= cap:
                continue
            seen[doc.lang] = seen.get(doc.lang, 0) + 1
        yield doc

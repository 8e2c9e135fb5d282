"""Documents from the file formats corpora ship in: JSON lines (plain, gzip, zstd), parquet, Arrow (a Hugging
Face `datasets` folder's data files) and text files, each read whole or by range (clean's chunks, chunks.py).

Every reader turns a record into the same `Document` (`make_document`): the text from the text field (default
"text"), the language from the language field (default "lang", else "language"; FineWeb-2's
"language_script" is joined to it), mapped to the project's codes (lang_codes.py) and kept as given; a record
without one takes its folder's language (`default_lang`), and only one without either is left to language ID.
A record whose text is missing or not a string is an error naming the file and line or row, never skipped.
(datatrove's readers skip such records, and lines they cannot parse, with a warning, and read a file whole
within one task: hence these.)
"""
from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import zstandard

from fuxi.common.errors import DataError
from fuxi.data_pipeline.jsonl import decode_utf8, parse_json_line
from fuxi.data_pipeline.lang_codes import normalize_language

# File kinds by name: JSON lines read from any byte range, JSON lines in a compressed stream (read whole),
# parquet (read by row groups), and text files (one document each, only inside a language folder).
PLAIN_JSONL_SUFFIXES = (".jsonl", ".ndjson")
GZ_JSONL_SUFFIXES = (".jsonl.gz", ".json.gz")
ZST_JSONL_SUFFIXES = (".jsonl.zst", ".json.zst")
JSONL_SUFFIXES = PLAIN_JSONL_SUFFIXES + GZ_JSONL_SUFFIXES + ZST_JSONL_SUFFIXES
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md")
DATA_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
# The language fields tried when none is configured, in order.
DEFAULT_LANG_FIELDS = ("lang", "language")
SCRIPT_FIELD = "language_script"  # FineWeb-2: the ISO 15924 script of "language"
SOURCE_FIELD = "source"


@dataclass
class Document:
    text: str
    lang: str | None  # None: unknown, to be identified
    origin: str  # "file:line", "file row N" or file path, for error messages and provenance
    source: str | None = None  # the corpus' own provenance tag, kept in the cleaned output


@dataclass(frozen=True)
class RecordFields:
    """Where a record keeps its text and its language."""

    text: str = "text"
    lang: str | None = None  # None: "lang", else "language"

    def lang_fields(self) -> tuple[str, ...]:
        return (self.lang,) if self.lang else DEFAULT_LANG_FIELDS


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def file_kind(path: str | Path) -> str | None:
    """"jsonl", "jsonl.gz", "jsonl.zst", "parquet" or "text" by the file's name; None for any other file."""
    name = Path(path).name.lower()
    for kind, suffixes in (("jsonl", PLAIN_JSONL_SUFFIXES), ("jsonl.gz", GZ_JSONL_SUFFIXES),
                           ("jsonl.zst", ZST_JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES),
                           ("text", TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def unknown_file(path: str | Path, text_allowed: bool = False) -> DataError:
    """The error for a file no reader reads."""
    kinds = ", ".join(DATA_SUFFIXES + (TEXT_SUFFIXES if text_allowed else ()))
    hint = "" if text_allowed else f" ({'/'.join(TEXT_SUFFIXES)} text files only inside a language folder)"
    return DataError(f"{path}: not a corpus file: expected one of {kinds}{hint}")


def record_language(record: dict, fields: RecordFields, default: str | None) -> str | None:
    """The record's language in the project's codes; `default` (its folder's) when it gives none."""
    for name in fields.lang_fields():
        label = record.get(name)
        script = record.get(SCRIPT_FIELD)
        if isinstance(label, str) and isinstance(script, str) and len(label) in (2, 3) and label.isalpha():
            label = f"{label}_{script}"
        lang = normalize_language(label)
        if lang is not None:
            return lang
    return default


def make_document(record: dict, fields: RecordFields, default_lang: str | None, origin: str,
                  where: Callable[[], str]) -> Document:
    """The document of one record; a record without a string text field is a DataError naming `where()`
    (called only then)."""
    text = record.get(fields.text)
    if not isinstance(text, str):
        raise DataError(f"{where()}: expected an object with a string field \"{fields.text}\"")
    source = record.get(SOURCE_FIELD)
    return Document(text, record_language(record, fields, default_lang), origin,
                    source if isinstance(source, str) else None)


def parse_document(raw: bytes, path: str | Path, line: int | Callable[[], int], origin: str | None = None,
                   fields: RecordFields = RecordFields(), default_lang: str | None = None) -> Document | None:
    """The document on one JSONL line (None for a blank line); anything but a JSON object with a string text
    field is a DataError naming the file and line (`line`: the number, or a function counting it, called only
    for an error). origin: default "file:line"."""
    record = parse_json_line(raw, path, line)
    if record is None:
        return None
    number = line if callable(line) else (lambda: line)
    return make_document(record, fields, default_lang, origin if origin is not None else f"{path}:{line}",
                         lambda: f"{path}:{number()}")


def open_jsonl(path: str | Path):
    """A binary file object of the JSON lines in `path`, decompressed by its name (.gz, .zst)."""
    kind = file_kind(path)
    if kind == "jsonl.gz":
        return gzip.open(path, "rb")
    if kind == "jsonl.zst":
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                                           closefd=True))
    return open(path, "rb")


def iter_jsonl(path: str | Path, fields: RecordFields = RecordFields(),
               default_lang: str | None = None) -> Iterator[Document]:
    """Documents of one JSONL file (gzip or zstd by its name); a bad line is an error naming file and line, a
    bad compressed stream one naming the file."""
    path = Path(path)
    try:
        with open_jsonl(path) as f:
            for lineno, raw in enumerate(f, 1):
                doc = parse_document(raw, path, lineno, fields=fields, default_lang=default_lang)
                if doc is not None:
                    yield doc
    except (OSError, EOFError) as err:
        if file_kind(path) != "jsonl.gz":
            raise
        raise DataError(f"{path}: unreadable gzip ({_one_line(err)})") from None
    except zstandard.ZstdError as err:
        raise DataError(f"{path}: unreadable zstd ({_one_line(err)})") from None


def iter_text_files(paths: Iterable[str | Path], lang: str | None) -> Iterator[Document]:
    """Each file is one document of language `lang`; invalid UTF-8 is an error naming the file."""
    for path in paths:
        yield Document(decode_utf8(Path(path).read_bytes(), path), lang, str(path))


def _columns(schema, path: str | Path, fields: RecordFields) -> list[str]:
    """The columns a columnar file's documents need: the text (required), the language (required only when
    its name is configured), the script (each a text column where present) and the source (if text)."""
    import pyarrow as pa

    def is_text(name: str) -> bool:
        t = schema.field(name).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)

    names = schema.names
    if fields.text not in names:
        raise DataError(f"{path}: no text column \"{fields.text}\" (columns: {', '.join(names)})")
    if fields.lang and fields.lang not in names:
        raise DataError(f"{path}: no language column \"{fields.lang}\" (columns: {', '.join(names)})")
    columns = list(dict.fromkeys(n for n in (fields.text, *fields.lang_fields(), SCRIPT_FIELD) if n in names))
    for name in columns:
        if not is_text(name):
            raise DataError(f"{path}: column \"{name}\" is {schema.field(name).type}, not text")
    return columns + [SOURCE_FIELD] if SOURCE_FIELD in names and is_text(SOURCE_FIELD) else columns


def _batch_documents(batch, path: str | Path, first_row: int, fields: RecordFields,
                     default_lang: str | None) -> Iterator[Document]:
    columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
    for i in range(batch.num_rows):
        row = first_row + i
        yield make_document({name: values[i] for name, values in columns.items()}, fields, default_lang,
                            f"{path} row {row}", lambda: f"{path}: row {row}")


def parquet_row_groups(path: str | Path) -> list[int]:
    """The compressed bytes of each row group of a parquet file (what a chunk weighs)."""
    import pyarrow.parquet as pq
    try:
        meta = pq.read_metadata(path)
    except Exception as err:  # pyarrow's errors are ArrowInvalid, OSError, ...
        raise DataError(f"{path}: unreadable parquet ({_one_line(err)})") from None
    return [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
            for g in range(meta.num_row_groups)]


def read_parquet(path: str | Path, groups: range | None = None, fields: RecordFields = RecordFields(),
                 default_lang: str | None = None) -> Iterator[Document]:
    """Documents of a parquet file's row groups `groups` (default: all), rows in order."""
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise DataError(f"{path}: unreadable parquet ({_one_line(err)})") from None
    with pf:
        groups = groups if groups is not None else range(pf.metadata.num_row_groups)
        columns = _columns(pf.schema_arrow, path, fields)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start)) if len(groups) else 0
        for batch in pf.iter_batches(batch_size=1024, row_groups=list(groups), columns=columns):
            yield from _batch_documents(batch, path, row, fields, default_lang)
            row += batch.num_rows


def _arrow_stream(path: str | Path):
    import pyarrow as pa
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except Exception as err:
        raise DataError(f"{path}: unreadable Arrow stream ({_one_line(err)})") from None


def arrow_batches(path: str | Path) -> list[tuple[int, int]]:
    """(rows, bytes) of each record batch of an Arrow stream file (a `datasets` data file), memory-mapped."""
    return [(b.num_rows, b.nbytes) for b in _arrow_stream(path)]


def read_arrow(path: str | Path, start: int = 0, end: int | None = None, fields: RecordFields = RecordFields(),
               default_lang: str | None = None) -> Iterator[Document]:
    """Documents of rows [start, end) of an Arrow stream file (memory-mapped: skipping rows reads nothing)."""
    reader = _arrow_stream(path)
    columns = _columns(reader.schema, path, fields)
    row = 0
    for batch in reader:
        lo, hi = max(start, row), min(end if end is not None else row + batch.num_rows, row + batch.num_rows)
        if lo < hi:
            part = batch.slice(lo - row, hi - lo).select(columns)
            yield from _batch_documents(part, path, lo, fields, default_lang)
        row += batch.num_rows
        if end is not None and row >= end:
            break

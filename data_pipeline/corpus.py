"""Reading raw documents: JSONL files of {"text", "lang"} or one folder of text files per language, and the
small multilingual corpus bundled with the repo (built by `data_pipeline/build_corpus.py`)."""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_pipeline.errors import DataError
from data_pipeline.io_utils import decode_utf8, iter_json_records

BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpus"
# Labels that mean "no language given": such documents are labelled by the language identifier.
UNKNOWN_LANGUAGES = frozenset({"", "unk", "und", "unknown", "xx", "none"})
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


@dataclass
class Document:
    text: str
    lang: str | None  # None: unknown, to be identified
    origin: str  # "file:line" or file path, for error messages and provenance
    source: str | None = None  # the corpus' own provenance tag, kept in the cleaned output


def normalize_language(label: object) -> str | None:
    if label is None:
        return None
    if not isinstance(label, str):
        return None
    label = label.strip()
    return None if label.lower() in UNKNOWN_LANGUAGES else label


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_jsonl(path: Path) -> Iterator[Document]:
    """Documents of one JSONL file; a bad line (not UTF-8, not a JSON object) is an error naming file and line."""
    for origin, record in iter_json_records(path, _open_bytes):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{origin}: expected an object with a string field \"text\"")
        yield Document(record["text"], normalize_language(record.get("lang")), origin, record.get("source"))


def iter_language_folder(folder: Path, lang: str | None) -> Iterator[Document]:
    """Every regular file under `folder` (sorted, recursive) is one document of language `lang`."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        yield Document(decode_utf8(path.read_bytes(), path), lang, str(path))


def _is_jsonl(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_JSONL_SUFFIXES)


def iter_documents(source: str | Path) -> Iterator[Document]:
    """Documents of a JSONL file, a folder of JSONL files, or a folder of per-language folders of text files
    (the folder name is the language; "unknown"/"und" means identify it)."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or directory")
    if source.is_file():
        if not _is_jsonl(source):
            raise DataError(f"{source}: expected a .jsonl(.gz) file or a directory")
        yield from iter_jsonl(source)
        return
    files = sorted(p for p in source.iterdir() if _is_jsonl(p))
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not files and not folders:
        raise DataError(f"{source}: contains no .jsonl files and no per-language folders")
    for path in files:
        yield from iter_jsonl(path)
    for folder in folders:
        yield from iter_language_folder(folder, normalize_language(folder.name))


def find_splits(source: str | Path) -> dict[str, Path]:
    """{"valid": ..., "train": ...} when `source` has train/ and valid/ sub-folders, else {"train": source}."""
    source = Path(source)
    if source.is_dir() and (source / "train").is_dir():
        splits = {"train": source / "train"}
        for name in ("valid", "validation", "val"):
            if (source / name).is_dir():
                return {"valid": source / name, **splits}
        return splits
    return {"train": source}


def bundled_corpus() -> Path:
    """The repo's own multilingual corpus (train/ and valid/ JSONL per language)."""
    if not (BUNDLED_CORPUS / "train").is_dir():
        raise DataError(f"{BUNDLED_CORPUS}: the bundled corpus is missing; rebuild it with "
                        "`python -m data_pipeline.build_corpus`")
    return BUNDLED_CORPUS

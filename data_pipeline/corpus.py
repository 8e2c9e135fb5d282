"""Reading raw documents: JSONL files of {"text", "lang"} or one folder of text files per language, and the
small multilingual corpus bundled with the repo (built by `data_pipeline/build_corpus.py`)."""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from fuxi.common.errors import DataError
from fuxi.data_pipeline.jsonl import decode_utf8, parse_json_line

BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpus"
# Labels that mean "no language given": such documents are labelled by the language identifier.
UNKNOWN_LANGUAGES = frozenset({"", "unk", "und", "unknown", "xx", "none"})
# The JSONL files a corpus folder may hold: plain ones (read from any byte range) and gzipped ones (read whole).
PLAIN_JSONL_SUFFIXES = (".jsonl", ".ndjson")
GZ_JSONL_SUFFIXES = (".jsonl.gz", ".json.gz")
JSONL_SUFFIXES = PLAIN_JSONL_SUFFIXES + GZ_JSONL_SUFFIXES


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


def parse_document(raw: bytes, path: str | Path, line: int | Callable[[], int],
                   origin: str | None = None) -> Document | None:
    """The document on one JSONL line (None for a blank line): a JSON object with a string "text" and optional
    "lang" and "source"; anything else is a DataError naming the file and line (`line`: the number, or a
    function counting it, called only for an error). origin: default "file:line"."""
    record = parse_json_line(raw, path, line)
    if record is None:
        return None
    if not isinstance(record.get("text"), str):
        raise DataError(f"{path}:{line() if callable(line) else line}: expected an object with a string field "
                        f"\"text\"")
    return Document(record["text"], normalize_language(record.get("lang")),
                    origin if origin is not None else f"{path}:{line}", record.get("source"))


def iter_jsonl(path: str | Path) -> Iterator[Document]:
    """Documents of one JSONL file (gzipped if its name ends in .gz); a bad line is an error naming file and line."""
    path = Path(path)
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                doc = parse_document(raw, path, lineno)
                if doc is not None:
                    yield doc
    except (OSError, EOFError) as err:
        if not path.name.endswith(".gz"):
            raise
        raise DataError(f"{path}: unreadable gzip ({err})") from None


def language_folder_files(folder: Path) -> list[Path]:
    """The documents of a per-language folder: every regular file under it (sorted, recursive; no hidden)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def iter_text_files(paths: Iterable[str | Path], lang: str | None) -> Iterator[Document]:
    """Each file is one document of language `lang`; invalid UTF-8 is an error naming the file."""
    for path in paths:
        yield Document(decode_utf8(Path(path).read_bytes(), path), lang, str(path))


def iter_language_folder(folder: Path, lang: str | None) -> Iterator[Document]:
    """Every regular file under `folder` (sorted, recursive) is one document of language `lang`."""
    yield from iter_text_files(language_folder_files(folder), lang)


def find_inputs(source: str | Path) -> tuple[list[Path], list[Path]]:
    """(JSONL files, per-language folders) of a JSONL file or a folder, sorted by name; what iter_documents
    reads and clean cuts into chunks. A missing source, a file that is not JSONL or a folder with neither is a
    DataError."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or directory")
    if source.is_file():
        if not source.name.endswith(JSONL_SUFFIXES):
            raise DataError(f"{source}: expected a .jsonl(.gz) file or a directory")
        return [source], []
    files = sorted(p for p in source.iterdir() if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not files and not folders:
        raise DataError(f"{source}: contains no .jsonl files and no per-language folders")
    return files, folders


def iter_documents(source: str | Path) -> Iterator[Document]:
    """Documents of a JSONL file, a folder of JSONL files, or a folder of per-language folders of text files
    (the folder name is the language; "unknown"/"und" means identify it)."""
    files, folders = find_inputs(source)
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
                        "`python -m fuxi.data_pipeline.build_corpus`")
    return BUNDLED_CORPUS

"""Where a corpus keeps its documents: the files to read, in which order, with the language their folder gives
and the split they belong to; and the small multilingual corpus bundled with the repo (built by
`data_pipeline/build_corpus.py`). What is inside each file is readers.py's.

A corpus is one of (docs/data.md, "Corpus formats"):

- a data file: JSON lines (`.jsonl`, `.ndjson`, `.jsonl.gz`, `.json.gz`, `.jsonl.zst`, `.json.zst`) or parquet;
- a folder of data files and language folders (`de/`, `deu_Latn/`, `unknown/`): every file under a language
  folder is a data file or a text file (`.txt`, `.md`: one document each), all in the folder's language unless
  a record gives its own;
- a Hugging Face `datasets` folder (`save_to_disk`): a Dataset (`state.json`) or a DatasetDict
  (`dataset_dict.json`, one Dataset folder per split), also as a language folder;
- a folder of splits: `train/` beside `valid/` (or `validation/`, `val/`, `dev/`, or else `test/`), or
  language folders that each hold such split folders (FineWeb-2: `deu_Latn/{train,test}/*.parquet`).

Any other file is an error naming it, never skipped; names starting with "." are not read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from fuxi.common.errors import DataError
from fuxi.data_pipeline.lang_codes import normalize_language
from fuxi.data_pipeline.readers import (Document, RecordFields, file_kind, iter_jsonl, iter_text_files, read_arrow,
                                        read_parquet, unknown_file)

BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpus"
# Split folder names: the validation split's (the first present), the training split's, and the test split's,
# which is the validation split when there is no other.
VALID_NAMES = ("valid", "validation", "val", "dev")
TRAIN_NAME, TEST_NAME = "train", "test"
SPLIT_NAMES = (*VALID_NAMES, TRAIN_NAME, TEST_NAME)
DATASET_STATE, DATASET_INFO, DATASET_DICT = "state.json", "dataset_info.json", "dataset_dict.json"


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # readers.file_kind, or "arrow" (a data file of a `datasets` folder)
    lang: str | None  # the language its folder gives (None: none, or "unknown")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def split_keys(names: Iterable[str], where: Path, keep_others: bool = False) -> dict[str, str]:
    """{split: folder name} for the split folders among `names`, validation first and train last: "valid"
    from the first of valid/validation/val/dev, else from test; "test" from test when valid is another.
    keep_others: other names are splits of their own name (a DatasetDict's); otherwise they are ignored."""
    names = list(names)
    valid = [n for n in VALID_NAMES if n in names]
    if len(valid) > 1:
        raise DataError(f"{where}: both {valid[0]}/ and {valid[1]}/ would be the validation split; keep one")
    keys = {"valid": valid[0]} if valid else {}
    if TEST_NAME in names:
        keys["test" if valid else "valid"] = TEST_NAME
    keys.update({n: n for n in sorted(names) if keep_others and n not in SPLIT_NAMES})
    if TRAIN_NAME in names:
        keys["train"] = TRAIN_NAME
    return keys


def _dataset_dict_splits(folder: Path) -> dict[str, str]:
    try:
        names = json.loads((folder / DATASET_DICT).read_text(encoding="utf-8"))["splits"]
        assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise DataError(f"{folder / DATASET_DICT}: expected {{\"splits\": [names]}} (a DatasetDict.save_to_disk "
                        f"folder)") from None
    extra = [p.name for p in _visible(folder) if p.name not in {*names, DATASET_DICT}]
    if extra:
        raise DataError(f"{folder / extra[0]}: not part of the DatasetDict (its splits: {', '.join(names)})")
    return split_keys(names, folder, keep_others=True)


def _dataset_files(folder: Path, lang: str | None) -> list[InputFile]:
    """The Arrow data files of a `Dataset.save_to_disk` folder, in its order (state.json)."""
    state_path = folder / DATASET_STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{state_path}: expected a Dataset.save_to_disk state with \"_data_files\"") from None
    if state.get("_indices_data_files"):
        raise DataError(f"{state_path}: an indices mapping is not read; save the dataset after "
                        f"flatten_indices()")
    known = {DATASET_STATE, DATASET_INFO, *(f.name for f in files)}
    for path in _visible(folder):
        if path.name not in known:
            raise DataError(f"{path}: not part of the dataset ({state_path} lists its data files)")
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: listed in {state_path} but missing")
    return [InputFile(p, "arrow", lang) for p in files]


def _folder_files(folder: Path, lang: str | None) -> list[InputFile]:
    """A language folder's inputs: a `datasets` folder's data files, or every file under it (sorted,
    recursive, nothing under a name starting with ".") by its kind."""
    if (folder / DATASET_STATE).is_file():
        return _dataset_files(folder, lang)
    inputs = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        kind = file_kind(path)
        if kind is None:
            raise unknown_file(path, text_allowed=True)
        inputs.append(InputFile(path, kind, lang))
    return inputs


def _split_language_folders(source: Path) -> dict[Path, dict[str, str]]:
    """{language folder: {split: folder name}} when the language folders of `source` hold split folders
    (FineWeb-2's layout), else {}; then every language folder must, and hold nothing else."""
    folders = [p for p in _visible(source) if p.is_dir()]
    names = {f: [p.name for p in _visible(f) if p.is_dir() and p.name in SPLIT_NAMES] for f in folders}
    split = [f for f in folders if names[f]]
    if not split:
        return {}
    for path in _visible(source):
        if not path.is_dir():
            raise DataError(f"{path}: a file beside language folders that hold split folders "
                            f"({split[0].name}/{names[split[0]][0]}/); move it into one")
        if not names[path]:
            raise DataError(f"{path}: holds no split folder while {split[0]} does "
                            f"({', '.join(names[split[0]])}); give every language folder the same layout")
        for entry in _visible(path):
            if entry.name not in names[path]:
                raise DataError(f"{entry}: beside the split folders of {path} ({', '.join(names[path])}); "
                                f"move it into one")
    return {f: split_keys(names[f], f) for f in folders}


def inner_splits(source: str | Path) -> list[str]:
    """The splits a source holds inside it (a DatasetDict, train/ and valid/ folders, language folders with
    split folders); [] when it is one split."""
    source = Path(source)
    if not source.is_dir():
        return []
    if (source / DATASET_DICT).is_file():
        return list(_dataset_dict_splits(source))
    if (source / TRAIN_NAME).is_dir():
        return list(split_keys([p.name for p in _visible(source) if p.is_dir()], source))
    keys: dict[str, None] = {}
    for folder_keys in _split_language_folders(source).values():
        keys.update(dict.fromkeys(folder_keys))
    return [k for k in ("valid", "test", "train") if k in keys]


def _no_such_split(source: Path, split: str, keys: Iterable[str]) -> DataError:
    return DataError(f"{source}: no {split} split (it holds {', '.join(keys)})")


def find_inputs(source: str | Path, split: str | None = None) -> list[InputFile]:
    """The files of a corpus (see the module docstring), in reading order: a folder's data files (sorted),
    then its language folders (sorted). `split`: of a source with splits inside (`inner_splits`), read only
    that one (None: all). A missing source, a file of an unknown kind or an empty folder is a DataError."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or directory")
    if source.is_file():
        kind = file_kind(source)
        if kind is None or kind == "text":
            raise unknown_file(source)
        return [InputFile(source, kind, None)]
    if (source / DATASET_STATE).is_file():
        return _dataset_files(source, None)
    top_splits = (_dataset_dict_splits(source) if (source / DATASET_DICT).is_file()
                  else split_keys([p.name for p in _visible(source) if p.is_dir()], source)
                  if (source / TRAIN_NAME).is_dir() else None)
    if top_splits is not None:
        if split is not None and split not in top_splits:
            raise _no_such_split(source, split, top_splits)
        chosen = [top_splits[split]] if split is not None else list(top_splits.values())
        return [f for name in chosen for f in find_inputs(source / name)]
    language_splits = _split_language_folders(source)
    if language_splits:
        if split is not None and not any(split in keys for keys in language_splits.values()):
            raise _no_such_split(source, split, inner_splits(source))
        return [f for folder, keys in language_splits.items() for key, name in keys.items()
                if split in (None, key) for f in _folder_files(folder / name, normalize_language(folder.name))]
    inputs = []
    for path in _visible(source):
        if path.is_file():
            kind = file_kind(path)
            if kind is None or kind == "text":
                raise unknown_file(path)
            inputs.append(InputFile(path, kind, None))
    for folder in (p for p in _visible(source) if p.is_dir()):
        inputs += _folder_files(folder, normalize_language(folder.name))
    if not inputs:
        raise DataError(f"{source}: holds no corpus files")
    return inputs


def read_input(inp: InputFile, fields: RecordFields = RecordFields()) -> Iterator[Document]:
    """All documents of one input file."""
    if inp.kind == "parquet":
        return read_parquet(inp.path, None, fields, inp.lang)
    if inp.kind == "arrow":
        return read_arrow(inp.path, fields=fields, default_lang=inp.lang)
    if inp.kind == "text":
        return iter_text_files([inp.path], inp.lang)
    return iter_jsonl(inp.path, fields, inp.lang)


def iter_documents(source: str | Path, split: str | None = None,
                   fields: RecordFields = RecordFields()) -> Iterator[Document]:
    """Documents of a corpus (`find_inputs`), in order; a language from the data is kept, one from the folder
    fills in, and a document with neither (or "unknown"/"und") is left for language ID."""
    for inp in find_inputs(source, split):
        yield from read_input(inp, fields)


def find_splits(source: str | Path) -> dict[str, Path]:
    """{split: input}, validation first: the splits a corpus holds inside it (a DatasetDict's, train/ beside
    valid/ or test/, language folders with split folders), else {"train": source}."""
    source = Path(source)
    if not source.is_dir():
        return {"train": source}
    if (source / DATASET_DICT).is_file():
        return {key: source / name for key, name in _dataset_dict_splits(source).items()}
    if (source / TRAIN_NAME).is_dir():
        return {key: source / name
                for key, name in split_keys([p.name for p in _visible(source) if p.is_dir()], source).items()}
    keys = inner_splits(source)
    return {key: source for key in keys} if keys else {"train": source}


def check_splits_read(splits: Mapping[str, str | Path]) -> None:
    """A source that holds splits inside it must have each read by a split of the job: {"train": a FineWeb-2
    folder} alone would leave its test folders unread."""
    for source in dict.fromkeys(str(s) for s in splits.values()):
        read = {split for split, s in splits.items() if str(s) == source}
        unread = [k for k in inner_splits(source) if k not in read]
        if unread:
            raise DataError(f"{source}: its {', '.join(unread)} split is read by no split of this job "
                            f"({', '.join(read)}); give the folder alone as the corpus to read all its splits")


def bundled_corpus() -> Path:
    """The repo's own multilingual corpus (train/ and valid/ JSONL per language)."""
    if not (BUNDLED_CORPUS / "train").is_dir():
        raise DataError(f"{BUNDLED_CORPUS}: the bundled corpus is missing; rebuild it with "
                        "`python -m fuxi.data_pipeline.build_corpus`")
    return BUNDLED_CORPUS

"""Documents -> EOS-terminated token streams -> fixed blocks of seq_len + 1 tokens: the pieces of a pack task.

A language's documents are shuffled (seeded by the seed and the language) and cut into parts of
`docs_per_part` (`plan_parts`). A part is read (`read_documents`, by byte offset, in the shuffled order),
encoded (`encode_documents`: EOS after each document) and cut into blocks (`BlockPacker`); every token carries
its language index and its document index, unique within the language. The tail of a part shorter than one
block is dropped (and counted).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fuxi.common.errors import DataError
from fuxi.data_pipeline.encoders import FastEncoder
from fuxi.data_pipeline.jsonl import line_number, parse_json_line
from fuxi.data_pipeline.manifest import LANG_DTYPE
from fuxi.data_pipeline.shards import Block
from fuxi.data_pipeline.tokenizer import EOS_ID


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
class PackPart:
    """Documents of one language, packed from end to end by one task into shards of their own."""
    lang: str
    lang_index: int
    path: str
    offsets: np.ndarray  # this part's documents, in the shuffled order
    first_doc: int  # document index of the first of them (document ids are unique per language)
    part: int
    lines: np.ndarray | None = None  # their line numbers, for error messages


def plan_parts(files: dict[str, Path], languages: list[str], seed: int, docs_per_part: int) -> list[PackPart]:
    """Shuffle each language's documents (seeded by seed and language) and cut them into parts."""
    parts = []
    for lang_index, lang in enumerate(languages):
        if lang not in files:
            continue
        offsets, lines = line_offsets(files[lang])
        order = np.random.default_rng([seed, zlib.crc32(lang.encode("utf-8"))]).permutation(len(offsets))
        offsets, lines = offsets[order], lines[order]
        for part, start in enumerate(range(0, len(offsets), docs_per_part)):
            end = start + docs_per_part
            parts.append(PackPart(lang, lang_index, str(files[lang]), offsets[start:end], start, part,
                                  lines[start:end]))
    return parts


def read_documents(path: str, offsets: np.ndarray, lang: str, lines: np.ndarray | None = None) -> list[str]:
    """The documents at `offsets` (byte offsets of lines); an error names the file and line (from `lines`, else
    counted from the byte offset when there is an error to report)."""
    texts = []
    with open(path, "rb") as f:
        for k, off in enumerate(offsets):
            f.seek(int(off))

            def line_no() -> int:
                return int(lines[k]) if lines is not None else line_number(path, int(off))

            record = parse_json_line(f.readline(), path, line_no)
            if record is None or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{line_no()}: not a JSON object with a \"text\" field")
            if record.get("lang", lang) != lang:
                raise DataError(f"{path}:{line_no()}: document has lang {record.get('lang')!r}, but the file is "
                                f"for {lang!r}")
            texts.append(record["text"])
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

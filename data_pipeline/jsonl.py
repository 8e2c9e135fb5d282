"""Reading JSON lines (and the UTF-8 under them) so that bad input is a DataError naming the file, the line and,
for invalid UTF-8, the column."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from fuxi.common.errors import DataError


def decode_utf8(raw: bytes, path: str | Path, line: int = 1) -> str:
    """bytes (starting at `line` of `path`) -> str; invalid UTF-8 is a DataError naming the file, the line and
    the column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad_line = line + raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{bad_line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column})") \
            from None


def line_number(path: str, offset: int) -> int:
    """1-based line number of the line starting at byte `offset` (counted only when reporting an error)."""
    count = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1


def parse_json_line(raw: bytes, path: str | Path, line: int | Callable[[], int]) -> dict | None:
    """The JSON object on one line of a JSONL file, None for a blank line; a line that is not UTF-8 or not a JSON
    object is a DataError naming the file and line. `line`: its 1-based number, or a function that counts it
    (called only for an error, so a reader starting mid-file need not count lines)."""
    number = line if callable(line) else (lambda: line)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        decode_utf8(raw, path, number())  # raises, naming the file, line and column
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        # the position in full (column, and the text there): err.msg alone stops before it
        near = text[max(0, err.pos - 20):err.pos + 20].strip()
        raise DataError(f"{path}:{number()}: not valid JSON ({err.msg} at column {err.colno}, near {near!r})") \
            from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number()}: expected a JSON object")
    return record


def iter_json_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(origin "file:line", record) for every non-empty line of a JSONL file (`parse_json_line`)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            record = parse_json_line(raw, path, lineno)
            if record is not None:
                yield f"{path}:{lineno}", record

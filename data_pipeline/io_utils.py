"""Atomic file writes and hashing: every file the pipeline produces appears whole or not at all."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from fuxi.data_pipeline.errors import DataError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", fsync: bool = False) -> Iterator[IO[Any]]:
    """Write to a temp file in the same directory, then os.replace it over `path`: readers see the old file
    or the whole new one, never a part. `fsync` also makes it durable across a power loss (slow; used for
    manifests, whose checksums then catch any shard a crash may have lost)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 under the usual 022, 0664 under a
    cluster group's 002)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):  # not Linux: read it the racy way
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def publish(tmp: str | Path, path: str | Path, mode: int | None = None) -> None:
    """Give a finished temp file (mkstemp makes them 0600) the mode a new file gets and rename it into place."""
    os.chmod(tmp, new_file_mode() if mode is None else mode)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any, fsync: bool = False) -> None:
    with atomic_write(path, fsync=fsync) as f:
        json.dump(data, f, ensure_ascii=False, indent=1, sort_keys=False)
        f.write("\n")


def input_stamp(paths) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file a job reads: each path that is a file, and every file under each
    path that is a folder (recursively, sorted). Equal stamps mean "the inputs have not changed", whatever
    layout (a single file, .jsonl.gz, per-language folders of text) the reader accepts."""
    stamp = []
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        stamp += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return stamp


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open_binary(path: str | Path):
    return open(path, "rb")


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
        raise DataError(f"{path}:{number()}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number()}: expected a JSON object")
    return record


def iter_json_records(path: str | Path, opener=_open_binary) -> Iterator[tuple[str, dict]]:
    """(origin "file:line", record) for every non-empty line of a JSONL file (`parse_json_line`). `opener`
    opens the file for reading bytes."""
    with opener(path) as f:
        for lineno, raw in enumerate(f, 1):
            record = parse_json_line(raw, path, lineno)
            if record is not None:
                yield f"{path}:{lineno}", record

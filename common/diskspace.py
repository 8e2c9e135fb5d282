"""Telling a full disk from other write errors, and the figures a one-line message about it needs.

Writers wrap the OSError of a full disk in errors of their own (torch.save through a Python file: an OSError
raised while handling its "unexpected pos"; safetensors: a SafetensorError whose text ends in "No space left on
device (os error 28)"; a data task: a TaskError from another process, its text), so the test looks through the
whole chain of an error, and at the text where the errno is lost. torch.save to a path loses even the text
("unexpected pos" while handling "iostream error"): write through a file (pretrain/checkpointing.py: save_torch).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = tuple(os.strerror(code) for code in DISK_FULL_ERRNOS)  # "No space left on device", ...
DISK_FULL = f"the disk is full ({DISK_FULL_TEXTS[0]}, or a quota reached)"  # how the one-line errors say it


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, an error it was raised from or one it was raised while handling, says the disk is full."""
    pending, seen = [err], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in DISK_FULL_TEXTS):
            return True
        pending += [current.__cause__, current.__context__]
    return False


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the filesystem that holds `path`, or would hold it (its nearest existing
    parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def tree_bytes(path: str | Path | None) -> int:
    """The bytes of the files under `path` (a file: its size; missing or None: 0)."""
    if path is None:
        return 0
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed meanwhile
                pass
    return total


def size_text(n: int) -> str:
    """Bytes for people: 950 B, 12.3 KB, 4.1 MB, 16.0 GB (powers of 1000, as `--shard-size 5GB` reads them)."""
    value, units = float(n), ["B", "KB", "MB", "GB", "TB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{int(value)} B" if units[0] == "B" else f"{value:.1f} {units[0]}"

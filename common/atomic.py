"""Files that appear whole or not at all: written to a temp file beside the target, then renamed over it. Every
file the project produces (data shards and manifests, checkpoint shards, exports, benchmark results) is written
this way, so a crash or a full disk never leaves a part of one, and an existing file survives a failed rewrite."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temp path beside `path` for a writer that wants a file name (torch.save, safetensors' save_file,
    matplotlib's savefig): on a clean exit it is renamed over `path` (readers see the old file or the whole new
    one, never a part), on an error it is removed. The temp name ends in `path`'s own suffix, so writers that
    pick a format from it (savefig) write the right one. `fsync` also makes it durable across a power loss
    (slow; used for manifests and checkpoint markers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", fsync: bool = False) -> Iterator[IO[Any]]:
    """An open file (text in UTF-8, or binary with mode "wb") that appears at `path` whole when the block exits
    cleanly (`atomic_path`), and not at all otherwise."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def write_text(path: str | Path, text: str, fsync: bool = False) -> None:
    with atomic_write(path, fsync=fsync) as f:
        f.write(text)


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


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure written as an image file atomically (its format from `path`'s suffix), then closed."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)


def write_json(path: str | Path, data: Any, fsync: bool = False, indent: int = 1, default=None) -> None:
    with atomic_write(path, fsync=fsync) as f:
        json.dump(data, f, ensure_ascii=False, indent=indent, sort_keys=False, default=default)
        f.write("\n")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

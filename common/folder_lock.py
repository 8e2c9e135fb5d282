"""One run at a time per folder: an exclusive `flock` on a lock file beside it, held by the process that works on
the folder. The kernel releases it when that process exits, however it exits (SIGKILL included), so a lock is never
stale and needs no cleaning up; the file names who holds it, for the message of whoever is refused."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fuxi.common.errors import BusyError

log = logging.getLogger(__name__)


def _holder(fd: int) -> str:
    """Who holds the lock, as its file records it ("pid 12 on host h since 13:05:02: fuxi data pack ...")."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']} since {since}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


def _lock(lock_path: Path) -> int | None:
    """An open descriptor of `lock_path` holding its exclusive lock; None where locks are not supported."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BusyError(str(lock_path), holder) from None
        except OSError as err:
            os.close(fd)
            log.warning("%s: this file system cannot lock files (%s); nothing stops a second run of the same "
                        "job from working in the same folder", lock_path, err)
            return None
        try:  # the holder just released may have removed the file: hold the file that is there now
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold `lock_path` exclusively for the block, or raise BusyError naming its holder at once (never waits).
    On a file system without locks (some network mounts) the block runs unlocked, with a warning. The file is
    removed when the block ends."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(lock_path)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}).encode("utf-8"))
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still held: a waiting locker then retries on a new file
        os.close(fd)

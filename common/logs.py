"""Logging for the command line: what a command did (a stage up to date, resumed, finished, with its time) goes to
stderr at INFO, one readable line each; `--quiet` keeps warnings and errors only."""
from __future__ import annotations

import logging
import sys

# Libraries that log routine chatter at INFO (credentials found, HTTP requests, file locks).
HANDLER_NAME = "fuxi-cli"  # the root handler setup_cli_logging installs
NOISY = ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "httpx", "filelock", "datasets", "huggingface_hub")


class _Format(logging.Formatter):
    """`HH:MM:SS message`; warnings and errors also name their level."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno >= logging.WARNING:
            time, _, message = line.partition(" ")
            return f"{time} {record.levelname.lower()}: {message}"
        return line


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a caller may redirect it after setup)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_cli_logging(quiet: bool = False) -> None:
    """Route log records to stderr (INFO, or WARNING with `quiet`); a second call replaces the first's handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    handler = _Stderr()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(_Format("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)

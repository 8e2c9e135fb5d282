"""A local S3 server for the tests of s3:// paths: moto's server mode on a free port, one bucket, and the AWS_*
variables that point fsspec (s3fs) at it."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from fuxi.data_pipeline import remote
from trainer_helpers import free_port

BUCKET = "fuxi-test"


def fresh_filesystems() -> None:
    """fsspec caches filesystem objects (s3fs's and datatrove's DataFolder over it); a changed endpoint needs
    new ones."""
    import s3fs
    from datatrove.io import DataFolder
    s3fs.S3FileSystem.clear_instance_cache()
    DataFolder.clear_instance_cache()


@contextmanager
def local_s3(cache: Path) -> Iterator:
    """A running S3 server with the bucket BUCKET, the environment pointing at it (subprocesses inherit it) and
    $FUXI_CACHE at `cache`; yields an fsspec S3 filesystem."""
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv(remote.CACHE_ENV, str(cache))
        fresh_filesystems()
        import fsspec
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            server.stop()
            fresh_filesystems()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def remote_files(fs, url: str) -> dict[str, bytes]:
    root = url.split("://", 1)[1]
    return {name[len(root) + 1:]: fs.cat_file(name) for name in sorted(fs.find(root))}

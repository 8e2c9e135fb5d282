"""Inputs and outputs at fsspec URLs (`s3://bucket/prefix`, or any protocol fsspec knows), through datatrove's
`DataFolder`; plain paths pass through untouched.

The stages work on local files (byte ranges, memory maps, renames into place), so a URL is mirrored in the local
cache (`$FUXI_CACHE`, default `~/.cache/fuxi`), in a folder named after the URL's hash:

    input    `local_input` downloads the files under the URL, only those whose size or version tag (ETag) changed
             since the last run: an unchanged input keeps its local copy, hence the job's input stamp, so a
             finished job stays up to date and a killed one resumes
    output   `local_output` names the local folder the job builds (with its work folder and resume as for any
             local output); `upload_folder` then copies it to the URL, the job's record file last, and removes
             the remote files of an earlier run that the new output no longer has
    shards   of a remote manifest are fetched on first read (manifest.py)

`hf://datasets/...` inputs are the exception: read in place from the local Hugging Face cache (hf_cache.py).

Credentials and endpoints are fsspec's (for S3: the AWS_* environment variables or ~/.aws). A missing path or an
unreachable store is a DataError of one line naming the URL.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import shutil
import time
from pathlib import Path
from typing import Iterator

from fuxi.common.atomic import atomic_path, write_json
from fuxi.common.errors import DataError, InputError
from fuxi.data_pipeline import hf_cache

log = logging.getLogger(__name__)
CACHE_ENV = "FUXI_CACHE"
_STATE = ".remote.json"  # beside a mirrored input: what was fetched, {relative path: [size, version tag]}


def is_url(path: object) -> bool:
    """Whether `path` names a remote location (`scheme://...`; `file://` is local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def cache_root() -> Path:
    """Where remote inputs, outputs and shards are mirrored: $FUXI_CACHE, else $XDG_CACHE_HOME/fuxi or
    ~/.cache/fuxi. On a cluster, point it at a folder every node sees."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).absolute()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fuxi"


def mirror_of(url: str, kind: str) -> Path:
    """The local folder that mirrors `url` (`kind`: inputs, outputs or shards), named after the URL's hash."""
    url = url.rstrip("/")
    return cache_root() / kind / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16] / posixpath.basename(url)


@contextlib.contextmanager
def _naming(url: str) -> Iterator[None]:
    """Any failure of the store as one DataError line naming `url`."""
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError:
        raise DataError(f"{url}: no such file or folder") from None
    except PermissionError as err:
        raise DataError(f"{url}: access denied ({_first_line(err)})") from None
    except ImportError as err:  # fsspec's "Install s3fs to access S3"
        raise DataError(f"{url}: {_first_line(err)} (pip install 'fuxi-pretrain[s3]' for s3://)") from None
    except Exception as err:  # the store's own errors (botocore's unreachable endpoint, HTTP errors, ...)
        raise DataError(f"{url}: cannot reach or read it ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _folder(url: str):
    from datatrove.io import get_datafolder
    with _naming(url):
        return get_datafolder(url)


def _version(info: dict) -> str:
    """What changes when the remote file is rewritten: its ETag (S3), else its modification time."""
    for key in ("ETag", "etag", "md5", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def list_files(url: str) -> dict[str, tuple[int, str]]:
    """{path relative to url: (size, version tag)} of the file at `url` ("" for itself) or of every file under
    the folder at `url`; missing or empty is a DataError naming it."""
    folder = _folder(url)
    fs, root = folder.fs, folder.path.rstrip("/")
    with _naming(url):
        info = fs.info(root)
        if info["type"] != "directory":
            return {"": (int(info["size"]), _version(info))}
        found = fs.find(root, detail=True)
    files = {posixpath.relpath(name, root): (int(i["size"]), _version(i)) for name, i in found.items()
             if i["type"] != "directory"}
    if not files:
        raise DataError(f"{url}: no such file or folder (nothing under it)")
    return files


def fetch_file(url: str, local: Path) -> Path:
    """Download one file to `local` (a temp name, renamed when complete)."""
    folder = _folder(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    with _naming(url), atomic_path(local) as tmp:
        folder.fs.get_file(folder.path, str(tmp))
    return local


def local_input(path: str | Path) -> Path:
    """A local path for an input: `path` itself, or the mirror of a URL brought up to date (see the module
    docstring)."""
    if not is_url(path):
        return Path(path)
    if hf_cache.is_hf_dataset(path):  # read in place from the Hugging Face cache, never downloaded here
        return hf_cache.local_path(str(path))
    url = str(path).rstrip("/")
    remote = list_files(url)
    local = mirror_of(url, "inputs")
    state_path = local.parent / _STATE
    try:
        state = {k: tuple(v) for k, v in json.loads(state_path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError):
        state = {}
    if "" not in remote and local.is_file():  # was a file, now a folder
        local.unlink()
    if "" in remote and local.is_dir():  # was a folder, now a file
        shutil.rmtree(local)
    started, fetched = time.time(), 0
    for rel, stamp in remote.items():
        target = local / rel if rel else local
        if state.get(rel) != stamp or not target.is_file() or target.stat().st_size != stamp[0]:
            fetch_file(f"{url}/{rel}" if rel else url, target)
            fetched += 1
    if local.is_dir():
        for stale in [p for p in local.rglob("*") if p.is_file() and p.relative_to(local).as_posix() not in remote]:
            stale.unlink()
    write_json(state_path, {k: list(v) for k, v in remote.items()})
    log.info("%s: %d of %d files fetched into %s (%.1fs; the rest were up to date)", url, fetched, len(remote),
             local, time.time() - started)
    return local


def local_output(path: str | Path) -> tuple[Path, str | None]:
    """(the local folder a job writes, the URL to upload it to or None): a local path as it is, a URL's mirror."""
    if not is_url(path):
        return Path(path), None
    if hf_cache.is_hf_dataset(path):
        raise DataError(f"{path}: hf:// paths are inputs only (read from the local Hugging Face cache); write the "
                        f"output to a local folder or an s3:// URL")
    url = str(path).rstrip("/")
    return mirror_of(url, "outputs"), url


def refuse_foreign(url: str, owned: tuple[str, ...]) -> None:
    """A DataError if the folder at `url` holds top-level entries a stage writing `owned` did not (the remote
    twin of common.staging.refuse_foreign: uploading replaces the folder's owned entries)."""
    folder = _folder(url)
    with _naming(url):
        if not folder.fs.exists(folder.path):
            return
        names = {posixpath.basename(p.rstrip("/")) for p in folder.fs.ls(folder.path, detail=False)}
    foreign = sorted(n for n in names if not n.startswith(".") and not any(fnmatch.fnmatch(n, pat) for pat in owned))
    if foreign:
        raise DataError(f"{url}: holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which this stage did "
                        f"not write; name a new or empty folder")


def read_json(url: str) -> dict | None:
    """The JSON object stored at `url`, or None when there is none."""
    folder = _folder(url)
    with _naming(url):
        if not folder.fs.exists(folder.path):
            return None
        data = folder.fs.cat_file(folder.path)
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def upload_folder(local: Path, url: str, record: str) -> None:
    """Copy every file of `local` to the folder at `url`, the `record` file last (so a remote record names a
    complete output), then delete the files under `url` that `local` does not have."""
    folder = _folder(url)
    fs, root = folder.fs, folder.path.rstrip("/")
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    started = time.time()
    with _naming(url):
        old = set(fs.find(root)) if fs.exists(root) else set()
        for rel in [f for f in files if f != record] + [f for f in files if f == record]:
            fs.put_file(str(local / rel), f"{root}/{rel}")
        stale = sorted(old - {f"{root}/{rel}" for rel in files})
        if stale:
            fs.rm(stale)
    log.info("uploaded %d files (%.1f MB) to %s in %.1fs", len(files),
             sum((local / f).stat().st_size for f in files) / 1e6, url, time.time() - started)


def relative_location(target: str | Path, base: str | Path) -> str:
    """`target` as seen from the folder `base` (a manifest records its tokenizer so): a relative path when both
    are local or both lie in the same bucket, else `target` itself."""
    if not is_url(target) and not is_url(base):
        return os.path.relpath(Path(target).absolute(), Path(base).absolute())
    if is_url(target) and is_url(base):
        (scheme_t, rest_t), (scheme_b, rest_b) = (str(x).rstrip("/").split("://", 1) for x in (target, base))
        if scheme_t == scheme_b and rest_t.split("/")[0] == rest_b.split("/")[0]:
            return posixpath.relpath(rest_t, rest_b)
    return str(target)

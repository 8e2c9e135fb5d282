"""`hf://datasets/<owner>/<name>[@<revision>]/<path>` inputs, read from the local Hugging Face hub cache only.

Nothing is downloaded while a job runs: the dataset (or the files of it the job reads) is fetched beforehand with
`huggingface-cli download --repo-type dataset <owner>/<name>` (or `hf download ...`), which fills the hub cache
($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub). The URL then resolves to the folder or file
inside the cached snapshot of that revision (default `main`), and the job reads it there, as any local input: a
new revision is another snapshot folder, hence another input stamp, so a finished job re-runs for it. A dataset,
revision or path that is not cached is a DataError of one line naming the URL and the command that fetches it.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from fuxi.common.errors import DataError

PREFIX = "hf://datasets/"


def is_hf_dataset(path: object) -> bool:
    return str(path).startswith(PREFIX)


def hub_cache() -> Path:
    """The hub cache as huggingface_hub finds it, read when called (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # the older name, still honoured by huggingface_hub
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "huggingface"
    return Path(home).expanduser() / "hub"


def parse(url: str) -> tuple[str, str | None, str]:
    """(repo id "owner/name", revision or None, path inside the repository ("" for all of it))."""
    parts = url[len(PREFIX):].strip("/").split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise DataError(f"{url}: expected hf://datasets/<owner>/<name>[@<revision>]/<path>")
    owner, name, path = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
    name, _, revision = name.partition("@")
    return f"{owner}/{name}", unquote(revision) or None, path


def local_path(url: str) -> Path:
    """The cached file or folder `url` names (see the module docstring)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, revision, path = parse(str(url).rstrip("/"))
    fetch = (f"huggingface-cli download --repo-type dataset {repo_id}"
             f"{f' --revision {revision}' if revision else ''}{f' --include {path!r}' if path else ''}")
    cache = hub_cache()
    try:
        snapshot = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache,
                                          local_files_only=True))
    except LocalEntryNotFoundError:
        raise DataError(f"{url}: not in the Hugging Face cache {cache} (nothing is downloaded while a job runs); "
                        f"fetch it first: {fetch}") from None
    target = snapshot / path
    if not target.exists():
        raise DataError(f"{url}: {path} is not in the cached snapshot {snapshot}; fetch it first: {fetch}")
    return target

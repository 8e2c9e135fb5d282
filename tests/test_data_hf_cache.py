"""`hf://datasets/<owner>/<name>[@rev]/<path>` inputs come from the local Hugging Face hub cache and nothing else
(issue #22): the test writes a hub cache as huggingface_hub lays it out (refs/main, snapshots/<commit>/... as links
into blobs/) holding a FineWeb-2-style parquet corpus; `fuxi data clean hf://datasets/...` gives exactly the
output of the same corpus as a local folder; what is not cached is a one-line error saying how to fetch it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fuxi.data_pipeline.cli import main
from fuxi.data_pipeline.corpus import BUNDLED_CORPUS

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FOLDERS = {"de": ("deu", "Latn"), "en": ("eng", "Latn"), "ru": ("rus", "Cyrl")}


def _texts(lang: str, n: int, skip: int = 0) -> list[str]:
    lines = (BUNDLED_CORPUS / "valid" / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[skip:skip + n]]


def _fineweb2(root: Path) -> Path:
    """FineWeb-2's layout: <iso639-3>_<Script>/{train,test}/000_00000.parquet with its language columns."""
    for lang, (code, script) in FOLDERS.items():
        for split, texts in (("train", _texts(lang, 6)), ("test", _texts(lang, 2, skip=6))):
            target = root / f"{code}_{script}" / split / "000_00000.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": texts, "language": [code] * len(texts),
                                     "language_script": [script] * len(texts)}), target)
    return root


def _hub_cache(cache: Path, repo: str, corpus: Path, under: str) -> None:
    """`corpus` as the snapshot of `repo` at COMMIT (main) in a hub cache, its files stored as blobs."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / COMMIT / under / path.relative_to(corpus)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def _output(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.jsonl"))}


@pytest.fixture
def cached(tmp_path, monkeypatch) -> Path:
    corpus = _fineweb2(tmp_path / "fineweb2")
    _hub_cache(tmp_path / "hf" / "hub", "owner/fineweb-mini", corpus, "data")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the cache is found through HF_HOME (…/hub)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return corpus


def test_a_cached_dataset_cleans_to_the_same_documents_as_the_local_folder(cached, tmp_path, capsys):
    assert main(["data", "clean", str(cached), str(tmp_path / "local"), "--quiet", "--workers", "1"]) == 0
    for url in ("hf://datasets/owner/fineweb-mini/data", f"hf://datasets/owner/fineweb-mini@{COMMIT}/data/"):
        out = tmp_path / url.split("@")[-1][:6]
        assert main(["data", "clean", url, str(out), "--quiet", "--workers", "1"]) == 0, capsys.readouterr().err
        assert _output(out) == _output(tmp_path / "local")
    assert sorted(_output(tmp_path / "local")) == [f"{split}/{lang}.jsonl" for split in ("train", "valid")
                                                   for lang in FOLDERS]


@pytest.mark.parametrize("url, says", [
    ("hf://datasets/owner/absent/data", "not in the Hugging Face cache {cache} (nothing is downloaded while a job "
                                        "runs); fetch it first: huggingface-cli download --repo-type dataset "
                                        "owner/absent --include 'data'"),
    ("hf://datasets/owner/fineweb-mini@v2/data", "not in the Hugging Face cache {cache} (nothing is downloaded "
                                                 "while a job runs); fetch it first: huggingface-cli download "
                                                 "--repo-type dataset owner/fineweb-mini --revision v2 --include "
                                                 "'data'"),
    ("hf://datasets/owner/fineweb-mini/other", "other is not in the cached snapshot {snapshot}; fetch it first: "
                                               "huggingface-cli download --repo-type dataset owner/fineweb-mini "
                                               "--include 'other'"),
    ("hf://datasets/fineweb-mini", "expected hf://datasets/<owner>/<name>[@<revision>]/<path>"),
])
def test_what_is_not_cached_is_one_line_saying_how_to_fetch_it(cached, tmp_path, capsys, url, says):
    cache = tmp_path / "hf" / "hub"
    snapshot = cache / "datasets--owner--fineweb-mini" / "snapshots" / COMMIT
    assert main(["data", "clean", url, str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {url}: {says.format(cache=cache, snapshot=snapshot)}"]
    assert not (tmp_path / "out").exists()


def test_an_hf_output_is_refused_in_one_line(cached, tmp_path, capsys):
    assert main(["data", "clean", str(cached), "hf://datasets/owner/out", "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: hf://datasets/owner/out: hf:// paths are inputs only (read from the local Hugging Face cache); "
        "write the output to a local folder or an s3:// URL"]

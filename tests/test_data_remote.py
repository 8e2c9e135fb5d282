"""Inputs and outputs at s3:// URLs (data_pipeline/remote.py), against a local S3 server (moto's server mode,
started here on a free port): clean -> tokenizer -> pack over s3:// give the same files as the same stages on
local folders, and the training stream reads the shards back from s3:// sample for sample; a missing or
unreachable URL is one line naming it."""
from __future__ import annotations

import json

import pytest

from fuxi.common.errors import ConfigError, DataError
from fuxi.data_pipeline import remote
from fuxi.data_pipeline.clean import clean
from fuxi.data_pipeline.config import DataConfig
from fuxi.data_pipeline.engine import ExecutorConfig
from fuxi.data_pipeline.job import watch_jobs
from fuxi.data_pipeline.loader import build_train_loader
from fuxi.data_pipeline.manifest import load_manifest
from fuxi.data_pipeline.pack import pack
from fuxi.data_pipeline.prepare import prepare_dataset
from fuxi.data_pipeline.tokenizer import TokenizerConfig
from fuxi.data_pipeline.tokenizer_stage import train_tokenizer_task

from data_helpers import small_corpus, take
from s3_helpers import BUCKET, fresh_filesystems, local_files, local_s3, remote_files
from trainer_helpers import free_port

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

ONE = dict(executor=ExecutorConfig(tasks=2, workers=1, progress=False))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with local_s3(tmp_path_factory.mktemp("fuxi_cache")) as fs:
        yield fs


def test_clean_tokenizer_pack_and_stream_over_s3(s3, tmp_path):
    local = small_corpus(tmp_path / "corpus", ("en", "de", "ru", "zh"), 24, 6, 2)
    s3.put(str(local) + "/", f"{BUCKET}/corpus/", recursive=True)
    url = f"s3://{BUCKET}"

    # clean: the uploaded folder holds exactly the files of the same clean on local folders
    clean(f"{url}/corpus", f"{url}/clean", chunk_mb=0.01, **ONE)
    clean(local, tmp_path / "clean", chunk_mb=0.01, **ONE)
    ours, theirs = remote_files(s3, f"{url}/clean"), local_files(tmp_path / "clean")
    report = "clean_report.json"  # its task seconds and input stamp (paths) differ
    assert json.loads(ours.pop(report))["stats"] == json.loads(theirs.pop(report))["stats"]
    assert ours == theirs and "train/en.jsonl" in ours

    # the tokenizer reads its s3 corpus through a local copy and uploads its files
    config = TokenizerConfig(vocab_size=400, max_docs_per_language=50)
    local_tok = train_tokenizer_task(f"{url}/clean/train", f"{url}/tokenizer", config, **ONE)
    assert set(remote_files(s3, f"{url}/tokenizer")) == set(local_files(local_tok))

    # pack: the same shards as packing the local clean output with the same tokenizer
    kw = dict(seq_len=32, docs_per_part=10, shard_bytes=20_000)
    pack(f"{url}/clean/train", f"{url}/tokenizer", f"{url}/train", **kw, **ONE)
    reference = load_manifest(pack(tmp_path / "clean" / "train", local_tok, tmp_path / "train", **kw, **ONE))
    manifest = load_manifest(f"{url}/train/manifest.json")
    assert manifest.remote == f"{url}/train" and manifest.tokenizer_path == "../tokenizer"
    assert [(s.path, s.sha256) for s in manifest.shards] == [(s.path, s.sha256) for s in reference.shards]
    assert len(manifest.shards) > 4 and not any(manifest.shard_path(s).exists() for s in manifest.shards)
    manifest.check_files()  # sizes from one listing, nothing downloaded

    # the training stream reads the shards back from s3: the same batches as from the local folder
    cfg = dict(seq_len=32, num_workers=0, tokenizer=f"{url}/tokenizer")
    from_s3 = take(build_train_loader(DataConfig(train_manifest=f"{url}/train", **cfg), batch_size=4), 12)
    from_disk = take(build_train_loader(DataConfig(train_manifest=str(reference.path), **cfg), batch_size=4), 12)
    for a, b in zip(from_s3, from_disk):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # a re-run finds the uploaded output up to date: nothing runs, nothing is uploaded again
    before = {p["name"]: p["LastModified"] for p in s3.find(f"{BUCKET}/clean", detail=True).values()}
    with watch_jobs() as outcomes:
        clean(f"{url}/corpus", f"{url}/clean", chunk_mb=0.01, **ONE)
    assert outcomes == [("clean", "up to date")]
    assert {p["name"]: p["LastModified"] for p in s3.find(f"{BUCKET}/clean", detail=True).values()} == before


def test_prepare_to_s3_uploads_the_local_dataset_and_streams_it_back(s3, tmp_path):
    """`fuxi data prepare s3://...`: built in the local mirror, uploaded whole (prepare.json last), file for file
    what a local prepare writes; its DataConfig streams the shards from s3; a re-run uploads nothing."""
    corpus = small_corpus(tmp_path / "corpus", ("en", "de", "zh"), 20, 6, 2)
    url = f"s3://{BUCKET}/prepared"
    kw = dict(vocab_size=400, seq_len=32, shard_bytes=20_000, executor=ExecutorConfig(tasks=2, workers=1,
                                                                                    progress=False))
    prepared = prepare_dataset(url, corpus, **kw)
    assert prepared.train_manifest == f"{url}/train/manifest.json"
    local = prepare_dataset(tmp_path / "local", corpus, **kw)
    ours, theirs = remote_files(s3, url), local_files(tmp_path / "local")
    assert sorted(ours) == sorted(theirs) and "train/manifest.json" in ours
    def same(name: str) -> bool:  # reports and records hold times and the input paths; shards are below
        return not name.endswith(("_report.json", "manifest.json", "prepare.json", "fuxi_tokenizer.json"))
    assert {k: v for k, v in ours.items() if same(k)} == {k: v for k, v in theirs.items() if same(k)}
    for split in ("train", "valid"):
        assert [(s.path, s.sha256) for s in load_manifest(f"{url}/{split}").shards] == \
            [(s.path, s.sha256) for s in load_manifest(tmp_path / "local" / split).shards]
    recorded = json.loads(ours["prepare.json"])["data_config"]
    assert recorded["train_manifest"] == f"{url}/train/manifest.json" and recorded["tokenizer"] == f"{url}/tokenizer"

    cfg = DataConfig(**{**recorded, "num_workers": 0})
    from_s3 = take(build_train_loader(cfg, batch_size=4), 6)
    from_disk = take(build_train_loader(local.data_config(num_workers=0), batch_size=4), 6)
    for a, b in zip(from_s3, from_disk):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    before = {p["name"]: p["LastModified"] for p in s3.find(f"{BUCKET}/prepared", detail=True).values()}
    with watch_jobs() as outcomes:
        assert prepare_dataset(url, corpus, **kw) == prepared
    assert outcomes == [("prepare", "up to date")]
    assert {p["name"]: p["LastModified"] for p in s3.find(f"{BUCKET}/prepared", detail=True).values()} == before


def test_a_rewritten_remote_input_is_fetched_again_and_the_job_reruns(s3, tmp_path):
    url = f"s3://{BUCKET}/small"
    local = small_corpus(tmp_path / "corpus", ("en", "de", "ru", "zh"), 24, 6, 2) / "train"
    s3.put(str(local) + "/", f"{BUCKET}/small/", recursive=True)
    first = remote.local_input(url)
    assert local_files(first) == local_files(local)
    stamp = [(p.name, p.stat().st_mtime_ns) for p in sorted(first.iterdir())]
    assert remote.local_input(url) == first
    assert [(p.name, p.stat().st_mtime_ns) for p in sorted(first.iterdir())] == stamp  # nothing fetched again
    s3.pipe_file(f"{BUCKET}/small/en.jsonl", (local / "de.jsonl").read_bytes())
    s3.rm_file(f"{BUCKET}/small/zh.jsonl")
    again = remote.local_input(url)
    assert (again / "en.jsonl").read_bytes() == (local / "de.jsonl").read_bytes()
    assert not (again / "zh.jsonl").exists() and (again / "ru.jsonl").read_bytes() == (local / "ru.jsonl").read_bytes()


def test_missing_foreign_and_unreachable_urls_are_one_line_naming_them(s3, tmp_path, monkeypatch, capsys):
    from fuxi.launch.cli import main

    with pytest.raises(DataError, match=rf"^s3://{BUCKET}/nothing-here: no such file or folder$"):
        clean(f"s3://{BUCKET}/nothing-here", tmp_path / "out", **ONE)
    with pytest.raises(DataError, match=r"^s3://no-such-bucket/corpus: no such file or folder$"):
        clean("s3://no-such-bucket/corpus", tmp_path / "out", **ONE)
    with pytest.raises(DataError, match=r"^s3://no-such-bucket/train/manifest.json: no such file or folder$"):
        load_manifest("s3://no-such-bucket/train")

    with pytest.raises(ConfigError, match=rf"^out_dir: s3://{BUCKET}/prepared: with --executor ray prepare "):
        prepare_dataset(f"s3://{BUCKET}/prepared", executor=ExecutorConfig(executor="ray"))
    with pytest.raises(ConfigError, match=r"^tokenizer_dir: .*would name a tokenizer outside the upload"):
        prepare_dataset(f"s3://{BUCKET}/prepared", tokenizer_dir=tmp_path / "tok")

    s3.pipe_file(f"{BUCKET}/theirs/notes.txt", b"not ours")
    corpus = small_corpus(tmp_path / "corpus", ("en", "de", "ru", "zh"), 24, 6, 2)
    with pytest.raises(DataError, match=rf"^s3://{BUCKET}/theirs: holds \['notes.txt'\], which this stage did not"):
        clean(corpus, f"s3://{BUCKET}/theirs", **ONE)

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fresh_filesystems()
    try:
        assert main(["data", "clean", f"s3://{BUCKET}/corpus", str(tmp_path / "out"), "--quiet"]) == 2
    finally:
        fresh_filesystems()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"fuxi data: error: s3://{BUCKET}/corpus: cannot reach or read it "
                          f"(EndpointConnectionError: Could not connect to the endpoint URL")

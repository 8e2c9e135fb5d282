"""Bad input: clear errors naming the shard, language or field; on_error="skip" counts what it skips."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from fuxi.common.errors import ConfigError, DataError
from fuxi.data_pipeline.align_table import AlignmentTable, Concept, write_alignment_table
from fuxi.data_pipeline.config import DataConfig
from fuxi.data_pipeline.engine import ExecutorConfig
from fuxi.data_pipeline.errors import ManifestError, ShardError
from fuxi.data_pipeline.loader import build_train_loader, build_val_batches
from fuxi.data_pipeline.manifest import load_manifest
from fuxi.data_pipeline.pack import pack
from fuxi.data_pipeline.stream import MixtureOrder
from fuxi.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer
from data_helpers import rewrite_shard, tiny_dataset

LANGS = ["hi", "th"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture
def small(data, tmp_path):
    """A private copy: two languages, several shards each, that a test may damage."""
    clean_train = data.train_manifest.parent.parent / "clean" / "train"
    path = pack(clean_train, data.tokenizer_dir, tmp_path / "shards", seq_len=64, languages=LANGS,
                shard_bytes=40_000, num_proc=1, progress=False)
    return path, data.data_config(train_manifest=str(path), val_manifest=None, num_workers=0)


def _first_shard(manifest_path):
    m = load_manifest(manifest_path)
    return m, m.shard_path(m.shards[0])


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_truncated_shard(small, caplog):
    path, cfg = small
    manifest, shard = _first_shard(path)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ShardError, match=f"{shard.name}.*bytes on disk"):
        build_train_loader(cfg, batch_size=4)
    cfg.on_error = "skip"
    loader = build_train_loader(cfg, batch_size=4)
    with caplog.at_level(logging.WARNING):
        batches = _take(loader, loader.plan.epoch_samples // 4)  # a whole epoch touches every shard
    assert all(b["input_ids"].shape == (4, 64) for b in batches)
    assert loader.skipped >= manifest.shards[0].samples // 2 - 1  # the lost half of the shard, replaced
    assert loader.state_dict()["skipped"] == loader.skipped
    assert shard.name in caplog.text and "skip" in caplog.text


def test_corrupt_shard_checksum_and_sample(small):
    path, cfg = small
    manifest, shard = _first_shard(path)
    data = bytearray(shard.read_bytes())
    start = data.index(b"\x93NUMPY")  # the first member's npy header: corrupt it in place
    data[start + 10:start + 20] = b"#" * 10
    shard.write_bytes(bytes(data))
    loader = build_train_loader(cfg, batch_size=4)  # sizes agree: the sha256 is checked when read
    with pytest.raises(ShardError, match=f"{shard.name}: sha256"):
        _take(loader, loader.plan.epoch_samples // 4)
    cfg.verify_checksums = False
    with pytest.raises(ShardError, match=f"{shard.name}: sample .* is corrupt"):
        _take(build_train_loader(cfg, batch_size=4), loader.plan.epoch_samples // 4)
    cfg.on_error = "skip"
    loader = build_train_loader(cfg, batch_size=4)
    _take(loader, loader.plan.epoch_samples // 4)
    assert loader.skipped >= 1


def test_manifest_disagreements(small, data, tmp_path):
    path, cfg = small
    raw = json.loads(path.read_text())
    raw["shards"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=f"{raw['shards'][0]['path']}: sha256"):
        load_manifest(path).check_files(checksums=True)
    # a sequence length other than the manifest's
    cfg.seq_len = 128
    with pytest.raises(ConfigError, match="^seq_len: .*64") as err:
        build_train_loader(cfg, batch_size=2)
    assert err.value.key == "seq_len"  # the config key at fault, as a field (the trainer prefixes it with data.)
    cfg.seq_len = 64
    # a tokenizer other than the one the shards were packed with
    other = train_tokenizer(data.train_manifest.parent.parent / "clean" / "train", tmp_path / "other_tok",
                            TokenizerConfig(vocab_size=600, max_docs_per_language=2))
    cfg.tokenizer = str(other)
    with pytest.raises(ConfigError, match="^tokenizer: .*hash"):
        build_train_loader(cfg, batch_size=2)
    # broken manifests name the field
    raw.pop("seq_len")
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="seq_len: missing"):
        load_manifest(path)
    path.write_text("{oops")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nowhere.json")


def test_language_without_data(small, data):
    path, cfg = small
    cfg.languages = ["hi", "xx"]
    with pytest.raises(ConfigError, match="languages: \\['xx'\\] have no data"):
        build_train_loader(cfg, batch_size=2)
    cfg.languages = None
    cfg.mixing, cfg.weights = "weights", {"hi": 1.0, "yy": 1.0}
    with pytest.raises(ConfigError, match="yy"):
        build_train_loader(cfg, batch_size=2)
    val_cfg = data.data_config(languages=["hi", "zz"])
    with pytest.raises(DataError, match="zz"):
        build_val_batches(val_cfg, batch_size=2)


def test_missing_shard_is_named(small):
    path, cfg = small
    _, shard = _first_shard(path)
    os.remove(shard)
    with pytest.raises(ShardError, match=f"{shard.name}: missing"):
        build_train_loader(cfg, batch_size=2)


def expected_replacements(loader, batches: int, corrupt: set[int]) -> int:
    """What `loader.skipped` must be after `batches` batches of rank 0 of 1: for each position consumed, the
    corrupt samples met before a good one (the same slot of the following epochs), found by walking the
    mixture order directly."""
    order = MixtureOrder(loader.plan, loader.manifest, loader.cfg.seed, loader.cfg.mixing_window)
    count = 0
    for g in range(batches * loader.batch_size):
        while order.locate(g)[1] in corrupt:
            count += 1
            g += order.epoch_size
    return count


def test_skip_counts_every_sample_of_a_shard_with_a_wrong_sha_missing_or_of_the_wrong_dtype(small, caplog):
    """on_error: skip treats a shard whose sha256 disagrees with the manifest, a missing shard and a shard whose
    samples have the wrong dtype as corrupt in every sample, and counts each replacement exactly (per batch,
    so the count resumes exactly), with workers or without."""
    import numpy as np

    path, cfg = small
    manifest = load_manifest(path)
    hi = [i for i, s in enumerate(manifest.shards) if s.language == "hi"]
    th = [i for i, s in enumerate(manifest.shards) if s.language == "th"]
    assert len(hi) >= 2 and len(th) >= 2
    bad_sha, missing, bad_dtype = hi[0], hi[1], th[0]
    shard = manifest.shard_path(manifest.shards[bad_sha])
    data = bytearray(shard.read_bytes())
    data[data.index(b"\x93NUMPY") + 200] ^= 0xFF  # a token inside the first sample: decodes, sha256 differs
    shard.write_bytes(bytes(data))
    os.remove(manifest.shard_path(manifest.shards[missing]))
    rewrite_shard(path, bad_dtype, lambda t, lang, doc: (t.astype(np.int16), lang, doc))  # sizes/sha updated

    with pytest.raises(ShardError, match="missing"):  # raise stays the default
        build_train_loader(cfg, batch_size=4)
    cfg.on_error = "skip"
    corrupt = {bad_sha, missing, bad_dtype}
    batches = 2 * load_manifest(path).samples_per_language()["hi"] // 4
    for workers in (0, 2):
        cfg.num_workers = workers
        loader = build_train_loader(cfg, batch_size=4)
        with caplog.at_level(logging.WARNING):
            _take(loader, batches)
        expected = expected_replacements(loader, batches, corrupt)
        assert expected > manifest.shards[bad_sha].samples  # every fault was met
        assert loader.skipped == expected, (workers, loader.skipped, expected)
        assert loader.state_dict()["skipped"] == expected
    for index in corrupt:
        assert manifest.shards[index].path in caplog.text
    # resuming half way continues the count exactly
    cfg.num_workers = 0
    first = build_train_loader(cfg, batch_size=4)
    _take(first, batches // 2)
    resumed = build_train_loader(cfg, batch_size=4)
    resumed.load_state_dict(first.state_dict())
    _take(resumed, batches - batches // 2)
    assert resumed.skipped == expected


@pytest.mark.parametrize("config, field", [
    (DataConfig(train_manifest="m"), "mixing"), (DataConfig(train_manifest="m"), "on_error"),
    (DataConfig(train_manifest="m"), "codeswitch_direction"), (TokenizerConfig(), "backend"),
    (ExecutorConfig(), "executor")])
def test_choice_fields_are_checked_when_a_config_is_built_in_code(config, field):
    config.validate()
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(config, **{field: "nonsense"}).validate()
    assert err.value.key == field and err.value.reason.startswith("'nonsense' is not one of")


def test_a_choice_argument_is_checked(tmp_path):
    table = AlignmentTable([Concept(0, ["water", "eau"], ["en", "fr"])])
    with pytest.raises(ConfigError) as err:
        write_alignment_table(table, tmp_path / "t.jsonl", form="triples")
    assert err.value.key == "form" and not (tmp_path / "t.jsonl").exists()

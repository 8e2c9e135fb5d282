"""Stage 5: the mixed stream: coverage, rank/worker split, determinism, exact resume, mixing, transform, val."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from fuxi.common.errors import ConfigError
from fuxi.data_pipeline.config import DataConfig
from fuxi.data_pipeline.loader import build_plan, build_train_loader, build_val_batches
from fuxi.data_pipeline.manifest import load_manifest
from fuxi.data_pipeline.shards import ShardReader
from fuxi.data_pipeline.stream import MixtureOrder, default_transform
from data_helpers import take, tiny_dataset

SMALL = ["hi", "th"]  # 8 shards in all: fewer than the 5 ranks x 2 workers below


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_an_epoch_visits_every_sample_once(data):
    cfg = data.data_config(mixing="natural", languages=SMALL)
    manifest = load_manifest(cfg.train_manifest)
    plan = build_plan(manifest, cfg)
    order = MixtureOrder(plan, manifest, seed=0, window=16)  # small windows: many window boundaries
    everything = Counter((k, i) for k, s in enumerate(manifest.shards) if s.language in SMALL
                         for i in range(s.samples))
    assert order.epoch_size == sum(everything.values())
    epochs = []
    for e in range(2):
        seen = Counter(order.locate(g)[1:] for g in range(e * order.epoch_size, (e + 1) * order.epoch_size))
        assert seen == everything  # each sample exactly once, none lost
        epochs.append([order.locate(g)[1:] for g in range(e * order.epoch_size, (e + 1) * order.epoch_size)])
    assert epochs[0] != epochs[1]  # re-mixed every epoch


@pytest.mark.parametrize("world_size, workers", [(1, 2), (5, 2), (2, 0)])
def test_ranks_and_workers_split_the_stream(data, world_size, workers):
    cfg = data.data_config(mixing="natural", languages=SMALL, num_workers=workers)
    manifest = load_manifest(cfg.train_manifest)
    if world_size == 5:  # more consumers (ranks x workers) than shards
        assert len([s for s in manifest.shards if s.language in SMALL]) < world_size * workers
    batch_size = 4
    loaders = [build_train_loader(cfg, batch_size, rank=r, world_size=world_size) for r in range(world_size)]
    epoch = loaders[0].plan.epoch_samples
    per_rank = -(-epoch // (world_size * batch_size))  # batches per rank to cover an epoch
    reference = loaders[0]._dataset()
    positions = Counter()
    for rank, loader in enumerate(loaders):
        batches = take(loader, per_rank)
        for b, batch in enumerate(batches):
            for j in range(batch_size):
                g = rank + world_size * (b * batch_size + j)
                expected = reference.sample_at(g)  # what global position g holds, read in-process
                assert torch.equal(batch["input_ids"][j], expected["input_ids"])
                if g < epoch:
                    positions[reference.order.locate(g)[1:]] += 1
    assert sum(positions.values()) == epoch and set(positions.values()) == {1}  # the epoch, once, split


@pytest.mark.parametrize("workers_before, workers_after", [(0, 0), (2, 2), (2, 0)])
def test_resume_is_exact(data, workers_before, workers_after):
    cfg = data.data_config(num_workers=workers_before, seed=7)
    uninterrupted = take(build_train_loader(cfg, batch_size=3), 11)
    first = build_train_loader(cfg, batch_size=3)
    assert_same(take(first, 4), uninterrupted[:4])
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    resumed = build_train_loader(data.data_config(num_workers=workers_after, seed=7), batch_size=3)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 7), uninterrupted[4:])
    assert resumed.state_dict()["batches"] == 11


def test_resume_rejects_a_different_order(data):
    state = build_train_loader(data.data_config(seed=1), batch_size=2).state_dict()
    other = build_train_loader(data.data_config(seed=2), batch_size=2)
    with pytest.raises(ConfigError, match="^seed"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="^batch_size"):
        build_train_loader(data.data_config(seed=1), batch_size=3).load_state_dict(state)


def test_resume_accepts_a_state_saved_before_codeswitch_direction_existed(data):
    """States written before `codeswitch_direction` existed hold [ratio, table]: with code-switching off the
    samples do not depend on the direction, so they resume; with it on, the old semantics (all-to-all) differ
    from the current direction, so they are refused."""
    cfg = data.data_config(seed=3)
    uninterrupted = take(build_train_loader(cfg, batch_size=2), 3)
    first = build_train_loader(cfg, batch_size=2)
    take(first, 1)
    state = json.loads(json.dumps(first.state_dict()))
    state["fingerprint"]["codeswitch"] = [0.0, None]  # the old two-element form
    resumed = build_train_loader(cfg, batch_size=2)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 2), uninterrupted[1:])
    state["fingerprint"]["codeswitch"] = [0.5, None]
    switching = build_train_loader(data.data_config(seed=3, codeswitch_ratio=0.5), batch_size=2)
    with pytest.raises(ConfigError, match="^codeswitch"):
        switching.load_state_dict(state)


def test_deterministic_for_a_seed(data):
    a = take(build_train_loader(data.data_config(seed=3), batch_size=2), 3)
    b = take(build_train_loader(data.data_config(seed=3), batch_size=2), 3)
    c = take(build_train_loader(data.data_config(seed=4), batch_size=2), 3)
    assert_same(a, b)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_batches_are_shifted_blocks_with_language_and_document_ids(data):
    cfg = data.data_config()
    loader = build_train_loader(cfg, batch_size=2)
    batch = take(loader, 1)[0]
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == \
        {k: ((2, 64), torch.int64) for k in ("input_ids", "labels", "lang_ids", "doc_ids")}
    dataset = loader._dataset()
    lang, shard, index = dataset.order.locate(0)
    block = ShardReader(loader.manifest, loader.manifest.shards[shard]).read(index)
    assert batch["input_ids"][0].tolist() == block.tokens[:-1].tolist()
    assert batch["labels"][0].tolist() == block.tokens[1:].tolist()
    assert batch["doc_ids"][0].tolist() == block.doc_ids[:-1].tolist()
    assert set(batch["lang_ids"][0].tolist()) == {loader.languages.index(loader.plan.languages[lang])}
    assert loader.languages == loader.manifest.languages
    assert loader.bytes_per_token["en"] > 1


def test_realised_shares_equal_the_plan_over_an_epoch(data):
    cfg = data.data_config(mixing="temperature", alpha=0.3, max_epochs_per_language=2.0,
                           languages=["de", "en", "hi", "th"])
    loader = build_train_loader(cfg, batch_size=1)
    plan = loader.plan
    counts = Counter()
    for batch in take(loader, plan.epoch_samples):
        counts[loader.languages[int(batch["lang_ids"][0, 0])]] += 1
    assert dict(counts) == plan.counts
    assert max(plan.epochs.values()) <= 2.0
    assert loader.realised_shares() == pytest.approx(plan.planned)
    assert "realised share" in loader.mixture_report()


def _mask_even_positions(sample):
    out = default_transform(sample)
    out["labels"] = out["labels"].clone()
    out["labels"][::2] = -100
    out["loss_mask"] = (out["labels"] != -100).to(torch.float32)
    return out


def test_transform_hook_runs_in_workers(data):
    loader = build_train_loader(data.data_config(num_workers=2), batch_size=2, transform=_mask_even_positions)
    batch = take(loader, 2)[1]
    assert (batch["labels"][:, ::2] == -100).all() and (batch["labels"][:, 1::2] >= 0).all()
    assert batch["loss_mask"].dtype == torch.float32 and batch["loss_mask"].sum() == 2 * 32


def test_validation_batches(data):
    cfg = data.data_config()
    val = build_val_batches(cfg, batch_size=4, max_batches_per_language=2)
    again = build_val_batches(cfg, batch_size=4, max_batches_per_language=2)
    languages = load_manifest(cfg.train_manifest).languages
    assert list(val) == languages
    for lang, batches in val.items():
        assert 1 <= len(batches) <= 2
        assert_same(batches, again[lang])
        for b in batches:
            assert b["input_ids"].shape[1] == 64 and b["input_ids"].shape[0] <= 4
            assert (b["lang_ids"] == languages.index(lang)).all()


def test_data_config_through_the_typed_loader(data):
    from fuxi.common.errors import ConfigError
    from fuxi.common.typed_config import from_dict
    cfg = from_dict(DataConfig, {"train_manifest": str(data.train_manifest), "seq_len": 64,
                                 "weights": {"en": 1, "de": 0.5}, "mixing": "weights", "languages": None})
    assert cfg.weights == {"en": 1.0, "de": 0.5}
    with pytest.raises(ConfigError, match="alpha"):
        from_dict(DataConfig, {"train_manifest": "x", "alpha": "hot"})
    with pytest.raises(ValueError, match="^mixing"):
        DataConfig(train_manifest="x", mixing="random").validate()
    with pytest.raises(ValueError, match="^on_error"):
        DataConfig(train_manifest="x", on_error="ignore").validate()

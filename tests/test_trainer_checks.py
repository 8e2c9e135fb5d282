"""What the trainer refuses and what it guarantees, in-process on the tiny model: config errors found before any
data is loaded (exit 2, one line naming key and file), a tokenizer that does not match the shards, checkpoints
that would run code when loaded, the NaN guard's stop (exit 3, `latest` before the bad streak), MFU independent
of ZeRO-3 partitioning, counted sample replacements, and Python/NumPy RNGs seeded and resumed."""
from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from fuxi.checkpoints import CheckpointError
from fuxi.launch.cli import main as fuxi
from fuxi.pretrain.config import load_train_config
from fuxi.pretrain.metrics import read_metrics
from trainer_helpers import run_config, tiny_training_dataset, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def fuxi_pretrain(config, capsys, *overrides) -> tuple[int, str]:
    """`fuxi pretrain` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = fuxi(["pretrain", "--config", str(config), *[f"--set={o}" for o in overrides]])
    return code, capsys.readouterr().err.strip()


def swap_two_ids(tokenizer_dir, out_dir):
    """A copy of a BPE tokenizer whose tokens with ids 300 and 301 trade ids: same vocabulary, other ids."""
    shutil.copytree(tokenizer_dir, out_dir)
    raw = json.loads((out_dir / "tokenizer.json").read_text())
    vocab = raw["model"]["vocab"]
    a, b = (token for token, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out_dir / "tokenizer.json").write_text(json.dumps(raw))
    return out_dir


@pytest.mark.parametrize("overrides, message", [
    (["data.train_manifest=/nowhere/manifest.json"], "data.train_manifest: /nowhere/manifest.json not found"),
    (["data.val_manifest=/nowhere/valid"], "data.val_manifest: /nowhere/valid not found"),
    (["run.tokenizer=/nowhere/tokenizer"], "run.tokenizer: /nowhere/tokenizer not found"),
    (["data.tokenizer=/tmp"], "data.tokenizer: /tmp is not a tokenizer folder (no tokenizer.json)"),
    (["checkpoint.init_from=/nowhere/ckpt"], "checkpoint.init_from: /nowhere/ckpt not found"),
    (["schedule.global_batch=5"], "schedule.global_batch: 5 is not a multiple of micro_batch x world size = 2 x 1"),
    (["schedule.batch_ramp=[{step: 3, global_batch: 8}, {step: 5, global_batch: 9}]"],
     "schedule.batch_ramp[1].global_batch: 9 is not a multiple of micro_batch x world size = 2 x 1"),
    (["model.vocab_size=300"], "model.vocab_size: 300 is smaller than the data.tokenizer"),
])
def test_config_errors_are_one_line_naming_key_and_file_before_anything_loads(data, tmp_path, capsys, overrides,
                                                                                message):
    out = tmp_path / "run"
    config = write_config(run_config(data, out), tmp_path / "run.yaml")
    code, err = fuxi_pretrain(config, capsys, *overrides)
    assert code == 2
    assert err.startswith(f"fuxi pretrain: error: {message}") and str(config) in err and "\n" not in err, err
    assert not out.exists()  # found before the output folder, the data or the engine


def test_a_missing_model_file_names_the_key(data, tmp_path, capsys):
    cfg = run_config(data, tmp_path / "run", model="configs/model/nope.yaml")
    config = write_config(cfg, tmp_path / "run.yaml")
    assert fuxi_pretrain(config, capsys) == (2, f"fuxi pretrain: error: model: configs/model/nope.yaml not found "
                                                f"(in {config})")


def test_a_tokenizer_other_than_the_shards_is_refused_whichever_key_names_it(data, tmp_path, capsys):
    """run.tokenizer names a tokenizer whose ids of two tokens are swapped (data.tokenizer unset, as in the
    quickstart config): the shards' ids would mean other tokens. Both hashes are in the message."""
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.tokenizer import tokenizer_hash

    swapped = swap_two_ids(data.tokenizer_dir, tmp_path / "swapped")
    cfg = run_config(data, tmp_path / "run", run={"output_dir": str(tmp_path / "run"), "tokenizer": str(swapped)})
    cfg["data"].pop("tokenizer")
    config = write_config(cfg, tmp_path / "run.yaml")
    code, err = fuxi_pretrain(config, capsys)
    assert code == 2
    ours, shards = tokenizer_hash(swapped), load_manifest(data.train_manifest).tokenizer_hash
    assert ours != shards
    assert err.startswith(f"fuxi pretrain: error: run.tokenizer: {swapped} has tokenizer hash {ours}, but "
                          f"data.train_manifest {data.train_manifest} was packed with tokenizer hash {shards}")
    assert str(config) in err and not (tmp_path / "run").exists()


def poison_losses(monkeypatch, steps, micro_batches=2):
    """From now on the stage's loss is NaN at the given steps (counted from 1; `micro_batches` per step)."""
    from fuxi.pretrain.stages.pretrain import PretrainStage

    original = PretrainStage.compute_loss
    calls = {"n": 0}

    def poisoned(self, engine, batch):
        calls["n"] += 1
        result = original(self, engine, batch)
        if (calls["n"] - 1) // micro_batches + 1 in steps:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(PretrainStage, "compute_loss", poisoned)


def test_manifest_checks_name_the_data_key_and_the_manifest(data, tmp_path, capsys):
    """The loader's own manifest checks (data_pipeline.loader.open_manifest) run before anything loads, as one
    line naming the data key, the manifest and the config: another seq_len, data.tokenizer with another hash,
    an unreadable manifest."""
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.tokenizer import tokenizer_hash

    out = tmp_path / "run"
    config = write_config(run_config(data, out), tmp_path / "run.yaml")
    train = load_manifest(data.train_manifest)
    code, err = fuxi_pretrain(config, capsys, "data.seq_len=16")
    assert code == 2 and err.startswith(f"fuxi pretrain: error: data.seq_len: the config asks for 16 but "
                                        f"data.train_manifest {train.path} was packed with seq_len 32; repack or "
                                        f"change seq_len (in {config}")
    swapped = swap_two_ids(data.tokenizer_dir, tmp_path / "swapped")
    code, err = fuxi_pretrain(config, capsys, f"data.tokenizer={swapped}")
    assert code == 2 and err.startswith(f"fuxi pretrain: error: data.tokenizer: {swapped} has hash "
                                        f"{tokenizer_hash(swapped)[:16]}... but data.train_manifest {train.path} "
                                        f"was packed with tokenizer hash {train.tokenizer_hash[:16]}...")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    code, err = fuxi_pretrain(config, capsys, f"data.val_manifest={broken}")
    assert code == 2 and err.startswith(f"fuxi pretrain: error: data.val_manifest: {broken}: not valid JSON")
    assert f"(in {config}" in err and "\n" not in err
    assert not out.exists()


def test_nan_guard_stops_with_exit_3_and_latest_before_the_streak(data, tmp_path, capsys, monkeypatch):
    """Checkpoints every step; from step 3 every loss is NaN; 3 bad steps in a row stop the run. Without ZeRO
    DeepSpeed applies such a step (the weights become NaN), so no checkpoint is written during the streak and
    `latest` stays at step 2; the stop is one line and exit code 3."""
    poison_losses(monkeypatch, steps=range(3, 100))
    out = tmp_path / "nan"
    config = write_config(run_config(data, out, checkpoint={"every_steps": 1, "keep_last": 10},
                                     parallelism={"zero_stage": 0, "micro_batch": 2, "precision": "fp32"},
                                     run={"output_dir": str(out), "max_consecutive_bad_steps": 3}),
                          tmp_path / "nan.yaml")
    code, err = fuxi_pretrain(config, capsys)
    assert code == 3
    assert err.splitlines()[-1] == (
                   f"fuxi pretrain: stopped at step 5: 3 consecutive steps (from step 3) had a non-finite loss or "
                   f"gradient (run.max_consecutive_bad_steps = 3); the last checkpoint with intact weights is "
                   f"{out / 'checkpoints' / 'step_00000002'}: restart from it with a lower optimizer.lr or "
                   f"schedule.peak_cut")
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000001", "step_00000002"]
    losses = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(losses[s]) for s in (1, 2))
    assert [r["skipped_steps"] for r in read_metrics(out / "metrics.jsonl", "train")] == [0, 0, 1, 2]


def test_steps_deepspeed_skipped_are_counted_but_still_checkpointed(data, tmp_path, capsys, monkeypatch):
    """The same NaN losses under ZeRO-1: DeepSpeed finds the gradient non-finite and skips the step, so the
    weights stay intact and the checkpoints due during the streak are written; the guard still stops at step 5."""
    poison_losses(monkeypatch, steps=range(3, 100))
    out = tmp_path / "skipped"
    config = write_config(run_config(data, out, checkpoint={"every_steps": 1, "keep_last": 10},
                                     run={"output_dir": str(out), "max_consecutive_bad_steps": 3}),
                          tmp_path / "skipped.yaml")
    code, err = fuxi_pretrain(config, capsys)
    assert code == 3 and err.splitlines()[-1].startswith("fuxi pretrain: stopped at step 5: 3 consecutive steps")
    assert err.splitlines()[-1].endswith(f"intact weights is {out / 'checkpoints' / 'step_00000004'}: restart from "
                                         f"it with a lower optimizer.lr or schedule.peak_cut")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert [r["skipped_steps"] for r in read_metrics(out / "metrics.jsonl", "train")] == [0, 0, 1, 2]


def test_a_damaging_last_step_is_exit_3_not_success(data, tmp_path, capsys, monkeypatch):
    """Only step 8, the last, has a NaN loss, and without ZeRO it is applied: the final weights are suspect, so
    the run must neither save nor export them nor report success; `latest` stays at step 4."""
    poison_losses(monkeypatch, steps={8})
    out = tmp_path / "last"
    config = write_config(run_config(data, out, parallelism={"zero_stage": 0, "micro_batch": 2, "precision": "fp32"},
                                     run={"output_dir": str(out), "export_final": True}), tmp_path / "last.yaml")
    code, err = fuxi_pretrain(config, capsys)
    assert code == 3, err
    assert err.splitlines()[-1] == (
        f"fuxi pretrain: reached schedule.total_steps = 8 inside a streak of bad steps (from step 8: non-finite "
        f"loss or gradient) that damaged the weights, so they were not saved; the last checkpoint with intact "
        f"weights is {out / 'checkpoints' / 'step_00000004'}: restart from it with a lower optimizer.lr or "
        f"schedule.peak_cut")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004"]
    assert not (out / "final").exists()


def plant_payload(path, marker):
    """Replace a checkpoint file with one whose unpickling would create `marker` (what an attacker's file does)."""

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"module": Payload(), "optimizer_state_dict": Payload()}, path)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_resume_refuses_a_checkpoint_file_that_would_run_code(data, tmp_path, zero_stage):
    """A pickle payload in each .pt of a training checkpoint in turn (DeepSpeed's model states and ZeRO optimizer
    partition, our per-rank state): resuming refuses the file, naming it, and the payload never runs."""
    from fuxi.pretrain.trainer import train

    out = tmp_path / "run"
    cfg = load_train_config(None, data=run_config(data, out, schedule={"total_steps": 1, "warmup_steps": 0},
                                                  checkpoint={"every_steps": 1},
                                                  parallelism={"zero_stage": zero_stage, "micro_batch": 2,
                                                               "precision": "fp32"}))
    train(cfg)
    tag_dir = out / "checkpoints" / "step_00000001"
    files = sorted(tag_dir.glob("*.pt"))
    assert {p.name for p in files} >= {"rank_00000.pt"} and any("optim_states" in p.name for p in files) and \
        any("model_states" in p.name for p in files)
    marker = tmp_path / "payload_ran"
    for target in files:
        original = target.read_bytes()
        plant_payload(target, marker)
        with pytest.raises(CheckpointError) as err:
            train(cfg)
        assert str(target) in str(err.value) and "refused" in str(err.value)
        assert not marker.exists(), f"the payload in {target.name} ran"
        target.write_bytes(original)
    cfg.schedule.total_steps = 2
    train(cfg)
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl", "train")) == 2  # the genuine files load


def test_mfu_and_flops_per_token_do_not_depend_on_zero_stage(data, tmp_path):
    """FLOPs per token from the config, 6N + 12·L·h·s with N counted here from the architecture: the same under
    ZeRO-1 and ZeRO-3 (which leaves each rank's parameters empty); every MFU and TFLOP/s logged follows from it."""
    from fuxi.pretrain.trainer import train

    model = run_config(data, "unused")["model"]
    h, layers, ffn, vocab, seq = model["hidden_size"], model["num_layers"], model["ffn_hidden_size"], \
        model["vocab_size"], 32
    per_layer = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * h  # q,k,v,o + biased MLP + 2 norms
    n = layers * per_layer + h + vocab * h  # + final norm + lm_head (the input embedding is not counted)
    expected = 6 * n + 12 * layers * h * seq
    ratios = {}
    for zero_stage in (1, 3):
        out = tmp_path / f"zero{zero_stage}"
        train(load_train_config(None, data=run_config(
            data, out, schedule={"total_steps": 2, "warmup_steps": 0}, checkpoint={"every_steps": 100},
            parallelism={"zero_stage": zero_stage, "micro_batch": 2, "precision": "fp32"},
            logging={"every_steps": 1, "val_every_steps": 1000, "val_batches_per_language": 0,
                     "tensorboard": False, "peak_tflops": 1.0})))
        (run,) = read_metrics(out / "metrics.jsonl", "run")
        assert run["flops_per_token"] == expected and run["zero_stage"] == zero_stage
        for record in read_metrics(out / "metrics.jsonl", "train"):
            # mfu = tokens/s x FLOPs per token / peak; tflops per device likewise (1 device)
            assert record["mfu"] * 1e12 / record["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
            assert record["tflops_per_device"] == pytest.approx(record["mfu"], rel=1e-12)
            ratios.setdefault(zero_stage, []).append(record["mfu"] / record["tokens_per_s"])
    assert ratios[1] == pytest.approx(ratios[3], rel=1e-12)


def test_replaced_samples_are_counted_in_metrics_tensorboard_and_console(data, tmp_path, caplog):
    """on_error: skip with every shard of the largest language missing: the replacements the stream makes reach
    metrics.jsonl, TensorBoard and the console line, equal to what a loader reading the same batches counts."""
    import logging
    import os

    from fuxi.data_pipeline.loader import build_train_loader
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.pretrain.trainer import train

    shards = tmp_path / "shards"
    shutil.copytree(data.train_manifest.parent, shards)
    manifest = load_manifest(shards / "manifest.json")
    for shard in manifest.shards:
        if shard.language == "code_python":
            os.remove(manifest.shard_path(shard))
    out = tmp_path / "run"
    cfg = load_train_config(None, data=run_config(
        data, out, data={"train_manifest": str(shards / "manifest.json"), "on_error": "skip"},
        schedule={"total_steps": 3, "warmup_steps": 0},
        logging={"every_steps": 1, "val_every_steps": 1000, "val_batches_per_language": 1, "tensorboard": True}))
    with caplog.at_level(logging.INFO, logger="fuxi.train"):
        train(cfg)
    records = read_metrics(out / "metrics.jsonl", "train")
    reference = build_train_loader(cfg.data, batch_size=2)
    counts = []
    for _, _ in zip(range(2 * 3), reference):  # 3 steps of 2 micro-batches
        counts.append(reference.skipped)
    assert [r["skipped_samples"] for r in records] == counts[1::2]
    assert counts[-1] > 0
    assert f"bad samples {counts[-1]}" in caplog.text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/skipped_samples")] == counts[1::2]


def test_python_and_numpy_rngs_are_seeded_from_run_seed_and_resume(data, tmp_path, monkeypatch):
    """A stage that draws from `random` and NumPy each micro-batch: two fresh runs draw the same numbers whatever
    the global state before them (seeded from run.seed), and a run resumed from step 2 draws what the
    uninterrupted run drew at steps 3-4 (the states are checkpointed per rank)."""
    from fuxi.pretrain.stages.pretrain import PretrainStage
    from fuxi.pretrain.trainer import train

    original = PretrainStage.compute_loss
    draws = []

    def drawing(self, engine, batch):
        draws.append((random.random(), float(np.random.rand())))
        return original(self, engine, batch)

    monkeypatch.setattr(PretrainStage, "compute_loss", drawing)

    def run(out, total_steps, global_seed):
        random.seed(global_seed)
        np.random.seed(global_seed)
        draws.clear()
        train(load_train_config(None, data=run_config(data, out, schedule={"total_steps": total_steps},
                                                      checkpoint={"every_steps": 2, "keep_last": 5})))
        return list(draws)

    full = run(tmp_path / "full", 4, global_seed=1)
    assert len(full) == 8 and len(set(full)) == 8
    assert run(tmp_path / "short", 2, global_seed=2) == full[:4]
    checkpoints = tmp_path / "full" / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000002\n")
    assert run(tmp_path / "full", 4, global_seed=3) == full[4:]

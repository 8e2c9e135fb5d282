"""The DeepSpeed trainer end to end on CPU: exact resume after SIGKILL, ZeRO 1/2/3 with two gloo ranks equal to
one process, per-language metrics and config errors. Preemption: test_trainer_preemption.py; refusals, the NaN
guard, MFU, skip counts and RNG seeding: test_trainer_checks.py."""
import math
import signal
import subprocess
import time

import pytest
import torch

from fuxi.common.errors import ConfigError
from fuxi.pretrain.config import load_train_config
from fuxi.pretrain.metrics import LanguageLoss, per_language_report
from trainer_helpers import (REPO, pretrain_command, run_config, run_pretrain, subprocess_env,
                                   tiny_training_dataset,
                                   train_losses, write_config)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def wait_for(predicate, process, timeout=240):
    start = time.time()
    while not predicate():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"training exited early ({process.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_and_resume_gives_bitwise_identical_losses(data, tmp_path):
    """Train, SIGKILL right after the first checkpoint (step 4), resume to the end: every loss equals the
    uninterrupted run's, bitwise. The run is long (48 steps) so the kill always lands mid-training."""
    total = 48
    schedule = {"total_steps": total, "warmup_steps": 2, "global_batch": 4}
    full = write_config(run_config(data, tmp_path / "full", schedule=schedule), tmp_path / "full.yaml")
    run_pretrain(full)
    reference = train_losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, total + 1))

    resumed_dir = tmp_path / "resumed"
    config = write_config(run_config(data, resumed_dir, schedule=schedule, data={"num_workers": 2},
                                     checkpoint={"every_steps": 4, "keep_last": 100}), tmp_path / "resumed.yaml")
    process = subprocess.Popen(pretrain_command(config), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    first = resumed_dir / "checkpoints" / "step_00000004" / "COMPLETE"
    wait_for(first.is_file, process)
    process.send_signal(signal.SIGKILL)  # no chance to clean up or save
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = (resumed_dir / "checkpoints" / "latest").read_text().strip()
    assert killed_at != f"step_{total:08d}", "the run finished before it could be killed"
    run_pretrain(config)
    resumed = train_losses(resumed_dir)
    for step in range(1, total + 1):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    assert resumed[total] < resumed[1]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_ranks_match_one_process(data, tmp_path, zero_stage):
    """Same global batch (4 sequences): 1 process x micro 2 x accumulation 2 == 2 ranks x micro 2."""
    schedule = {"total_steps": 3, "warmup_steps": 1, "global_batch": 4}
    parallel = {"zero_stage": zero_stage, "micro_batch": 2, "precision": "fp32"}
    one = write_config(run_config(data, tmp_path / "one", schedule=schedule, parallelism=parallel,
                                  checkpoint={"every_steps": 100}), tmp_path / "one.yaml")
    two = write_config(run_config(data, tmp_path / "two", schedule=schedule, parallelism=parallel,
                                  checkpoint={"every_steps": 100}), tmp_path / "two.yaml")
    run_pretrain(one)
    run_pretrain(two, nproc=2)
    single, double = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(single) == sorted(double) == [1, 2, 3]
    for step in single:  # fp32; only the order of the gradient reduction differs
        assert abs(single[step] - double[step]) <= 1e-5, (step, single[step], double[step])
    assert single[3] != single[1]  # the model did train


def test_ranks_read_disjoint_samples_covering_the_single_process_order(data):
    from fuxi.data_pipeline.loader import build_train_loader

    cfg = load_train_config(None, data=run_config(data, "unused")).data

    def fingerprints(loader, batches):
        it = iter(loader)
        return [tuple(row.tolist()) for _ in range(batches) for row in next(it)["input_ids"]]

    rank0 = fingerprints(build_train_loader(cfg, 2, rank=0, world_size=2), 3)
    rank1 = fingerprints(build_train_loader(cfg, 2, rank=1, world_size=2), 3)
    single = fingerprints(build_train_loader(cfg, 2, rank=0, world_size=1), 6)
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(single)


def test_language_loss_meter_and_bits_per_byte():
    meter = LanguageLoss(3, torch.device("cpu"))
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    langs = torch.tensor([[0, 0, 2, -1]])  # an ignored position may carry no language (-1)
    labels = torch.tensor([[5, 5, 5, -100]])
    meter.add(losses, langs, labels)
    report = per_language_report(*meter.reduce_and_reset(), ["en", "zh", "ru"], {"en": 4.0, "ru": 2.0})
    assert report["en"]["loss"] == pytest.approx(1.5) and report["en"]["tokens"] == 2
    assert report["en"]["bpb"] == pytest.approx(1.5 / math.log(2) / 4.0)
    assert report["ru"]["loss"] == pytest.approx(3.0) and report["ru"]["tokens"] == 1
    assert "zh" not in report


@pytest.mark.parametrize("overrides, fragment", [
    (["data.seq_len=64"], "data.seq_len: 64 exceeds model.max_seq_len 32"),
    (["stage=finetune"], "stage: 'finetune' is not one of"),
    (["parallelism.zero_stage=4"], "parallelism.zero_stage: 4 is not one of [0, 1, 2, 3]"),
    (["optimizer.betas=[0.9]"], "optimizer.betas"),
    (["schedule.warmup_stepz=3"], "schedule.warmup_stepz"),
    (["data.mixing=random"], "data.mixing: 'random' is not one of"),
])
def test_run_config_errors_name_the_key(data, tmp_path, overrides, fragment):
    path = write_config(run_config(data, tmp_path / "x"), tmp_path / "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_train_config(path, overrides)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_shipped_run_configs_load():
    for path in ("configs/train/quickstart.yaml", "configs/train/fuxitranyu-8b.yaml"):
        cfg = load_train_config(path)
        assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert load_train_config("configs/train/fuxitranyu-8b.yaml").model.num_layers == 30


def test_ghostrnn_lm_trains_checkpoints_and_resumes_exactly_through_the_trainer(data, tmp_path):
    """model.type ghostrnn_lm on the same stream, checkpointed and resumed the same way (in-process)."""
    import shutil

    from fuxi.pretrain.trainer import train

    model = {"type": "ghostrnn_lm", "vocab_size": 512, "hidden_size": 32, "num_layers": 2, "max_seq_len": 32,
             "kernels": "torch", "ghostrnn": {"ratio": 2, "feed_ghost_back": True}}
    out = tmp_path / "ghost"
    cfg = load_train_config(None, data=run_config(data, out, model=model, schedule={"total_steps": 4},
                                                  checkpoint={"every_steps": 2}, run={"output_dir": str(out)}))
    assert train(cfg).step == 4
    reference = train_losses(out)
    checkpoints = out / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000002\n")
    (out / "metrics.jsonl").unlink()
    train(cfg)
    resumed = train_losses(out)
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == reference[s] for s in (3, 4))
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()

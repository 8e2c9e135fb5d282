"""Preemption as clusters deliver it: the signal reaches every process of the job (DataLoader workers included),
through torchrun, or through the shipped Slurm script. Each run must end with a complete checkpoint of the last
finished step and a clean exit, and the resumed run must continue bitwise as an uninterrupted one."""
from __future__ import annotations

import os
import signal
import time

import pytest

from trainer_helpers import (pretrain_command, run_config, run_pretrain, start_in_session, tiny_training_dataset,
                             train_losses, wait_for_steps, write_config)

# A constant LR (no warmup, floor = peak), so a run's losses do not depend on schedule.total_steps and an
# interrupted run can be compared with a shorter uninterrupted one.
SCHEDULE = {"total_steps": 400, "warmup_steps": 0, "min_lr_ratio": 1.0, "global_batch": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def preemptible_config(data, out, zero_stage):
    return run_config(data, out, schedule=SCHEDULE, data={"num_workers": 2}, checkpoint={"every_steps": 1000},
                      parallelism={"zero_stage": zero_stage, "micro_batch": 2, "precision": "fp32"})


def checkpointed_step(out_dir, stdout):
    """The step of `latest`, which must be complete, the last step logged, and what rank 0 reported."""
    tag = (out_dir / "checkpoints" / "latest").read_text().strip()
    step = int(tag.split("_")[1])
    assert (out_dir / "checkpoints" / tag / "COMPLETE").is_file()
    assert max(train_losses(out_dir)) == step  # the last finished step, nothing after it
    assert f"preempted, checkpoint written at step {step}" in stdout
    return step


def resume_matches_uninterrupted(config, out_dir, step, tmp_path, nproc):
    run_pretrain(config, nproc=nproc, overrides=(f"schedule.total_steps={step + 2}",))
    resumed = train_losses(out_dir)
    reference_dir = tmp_path / "reference"
    reference = write_config({**config_dict(config), "run": {"output_dir": str(reference_dir), "seed": 7}},
                             tmp_path / "reference.yaml")
    run_pretrain(reference, nproc=nproc, overrides=(f"schedule.total_steps={step + 2}",))
    uninterrupted = train_losses(reference_dir)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, step + 3))
    for s in uninterrupted:
        assert resumed[s] == uninterrupted[s], (s, resumed[s], uninterrupted[s])


def config_dict(path):
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_dataloader_workers(data, tmp_path):
    """One process, ZeRO-1, 2 DataLoader workers; SIGTERM to the whole process group (what a terminal, a
    container runtime or Slurm's srun delivers): the workers must not die and fail the step."""
    out = tmp_path / "run"
    config = write_config(preemptible_config(data, out, zero_stage=1), tmp_path / "run.yaml")
    process = start_in_session(pretrain_command(config))
    wait_for_steps(process, out / "metrics.jsonl", 3)
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    step = checkpointed_step(out, stdout)
    resume_matches_uninterrupted(config, out, step, tmp_path, nproc=1)


@pytest.mark.slow
def test_sigint_to_torchrun_two_ranks_zero3(data, tmp_path):
    """2 gloo ranks under torchrun (launch.torchrun), ZeRO-3, 2 workers each. torchrun passes the signal to each
    rank's process group; the ranks agree on the step and save it. The signal is sent twice, as Slurm does
    (to srun and to its tasks): torchrun must still wait for the checkpoint before it exits."""
    out = tmp_path / "run"
    config = write_config(preemptible_config(data, out, zero_stage=3), tmp_path / "run.yaml")
    process = start_in_session(pretrain_command(config, nproc=2))
    wait_for_steps(process, out / "metrics.jsonl", 3)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=180)
    # the moment torchrun exits, the checkpoint is complete (under Slurm the step is torn down then)
    step = checkpointed_step(out, stdout)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "torchrun: stopped by SIGINT" in stderr and "Traceback" not in stderr
    resume_matches_uninterrupted(config, out, step, tmp_path, nproc=2)


# ---- in-process: where in the run the signal lands ---------------------------------------------------------

def fuxi_pretrain_in_process(config, capsys) -> tuple[int, str]:
    """`fuxi pretrain` in this process: (exit code, its last stdout line)."""
    from fuxi.launch.cli import main as fuxi

    capsys.readouterr()
    code = fuxi(["pretrain", "--config", str(config)])
    return code, capsys.readouterr().out.strip().splitlines()[-1]


def test_sigterm_on_a_step_deepspeed_skipped_writes_that_step_and_skips_validation(data, tmp_path, capsys,
                                                                                   monkeypatch):
    """Step 3 has a NaN loss, which DeepSpeed (ZeRO-1) skips, leaving the weights intact, and SIGTERM arrives
    during it: the checkpoint of step 3 is written, and the validation due at step 3 does not run."""
    from fuxi.pretrain.stages.pretrain import PretrainStage

    from fuxi.pretrain.metrics import read_metrics

    original = PretrainStage.compute_loss
    calls = {"n": 0}

    def nan_and_signal_at_step_3(self, engine, batch):
        calls["n"] += 1
        result = original(self, engine, batch)
        if calls["n"] in (5, 6):  # step 3's two micro-batches
            result.loss = result.loss * float("nan")
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(PretrainStage, "compute_loss", nan_and_signal_at_step_3)
    out = tmp_path / "run"
    config = write_config(run_config(data, out, checkpoint={"every_steps": 1000},
                                     logging={"every_steps": 1, "val_every_steps": 3, "val_batches_per_language": 1,
                                              "tensorboard": False}), tmp_path / "run.yaml")
    code, line = fuxi_pretrain_in_process(config, capsys)
    assert code == 0
    assert line == (f"fuxi pretrain: preempted, checkpoint written at step 3; checkpoint "
                    f"{out / 'checkpoints' / 'step_00000003'}")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert [r["skipped_steps"] for r in read_metrics(out / "metrics.jsonl", "train")] == [0, 0, 1]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "val")] == [0]  # the initial one only


def test_sigterm_during_setup_trains_and_writes_nothing(data, tmp_path, capsys, monkeypatch):
    """A run resumed from step 2 gets SIGTERM while its engine is built: it exits 0 once setup is done, before
    validating or training a step, and leaves `latest` (the resume point) and the metrics as they were."""
    import fuxi.pretrain.trainer as trainer

    out = tmp_path / "run"
    cfg = run_config(data, out, schedule={"total_steps": 2, "warmup_steps": 0}, checkpoint={"every_steps": 2})
    code, _ = fuxi_pretrain_in_process(write_config(cfg, tmp_path / "run.yaml"), capsys)
    assert code == 0
    metrics_before = (out / "metrics.jsonl").read_text()

    build_engine = trainer.build_engine

    def signalled_during_setup(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return engine

    monkeypatch.setattr(trainer, "build_engine", signalled_during_setup)
    cfg["schedule"]["total_steps"] = 4
    code, line = fuxi_pretrain_in_process(write_config(cfg, tmp_path / "run.yaml"), capsys)
    assert code == 0
    assert line == (f"fuxi pretrain: preempted during setup, before step 3: nothing trained or written; checkpoint "
                    f"{out / 'checkpoints' / 'step_00000002'}")
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    new_records = (out / "metrics.jsonl").read_text()[len(metrics_before):]
    assert '"kind": "train"' not in new_records and '"kind": "val"' not in new_records

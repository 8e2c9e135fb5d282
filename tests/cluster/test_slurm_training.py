"""launch/slurm_pretrain.sbatch on a real Slurm, unmodified but for resource flags (no GPUs: 2 gloo ranks on the
node's CPUs). Each way a cluster stops a job (the time-limit warning, scancel, preemption by a job of a higher
partition, a second signal during the save) must end with a checkpoint of the last finished step; the run
then continues from it (requeued by the script or by Slurm, or submitted again) and finishes with every step's
loss equal to an uninterrupted run, each step trained once."""
from __future__ import annotations

import json
import sys
import time

import pytest

from slurm_helpers import FINISHED, job, sbatch, slurm, start_when_eligible, wait_for, wait_until_finished
from trainer_helpers import (REPO, free_port, run_config, run_pretrain, tiny_training_dataset, train_losses,
                             write_config)

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "launch" / "slurm_pretrain.sbatch"
# A constant LR, so losses do not depend on the schedule's length; enough steps that the run is still going
# when the test signals it (a step takes a few tens of ms here).
TOTAL_STEPS = 300
SCHEDULE = {"total_steps": TOTAL_STEPS, "warmup_steps": 0, "min_lr_ratio": 1.0, "global_batch": 4}
FIRST_RUN_TIMEOUT = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def training_config(data, tmp_path, name="run"):
    cfg = run_config(data, tmp_path / name, schedule=SCHEDULE, data={"num_workers": 2},
                     checkpoint={"every_steps": 1000, "keep_last": 2},
                     parallelism={"zero_stage": 1, "micro_batch": 2, "precision": "fp32"})
    return write_config(cfg, tmp_path / f"{name}.yaml"), tmp_path / name


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """step -> loss of the same run on 2 torchrun ranks, never stopped."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config, out = training_config(data, tmp)
    run_pretrain(config, nproc=2, timeout=600)
    return train_losses(out)


def submit(config, tmp_path, *flags):
    """The project's script, as a user submits it, with this machine's resources; its log is appended to across
    restarts (the script's --open-mode=append)."""
    log = tmp_path / "job.out"
    exports = ",".join(["ALL", "GPUS_PER_NODE=2", f"RDZV_PORT={free_port()}", f"PYTHON={sys.executable}",
                        "OMP_NUM_THREADS=1"])
    job_id = sbatch("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=20", f"--output={log}",
                    f"--chdir={tmp_path}", f"--export={exports}", *flags, str(SCRIPT), str(config))
    return job_id, log


def train_records(out) -> list[int]:
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]


def wait_for_training(job_id, out, log, steps=3):
    """Until the run has trained `steps` steps; a job that ends before fails the test at once, with its log."""
    wait_for(lambda: len(train_records(out)) >= steps or job(job_id)["JobState"] in FINISHED,
             f"{steps} training steps", FIRST_RUN_TIMEOUT, log)
    assert len(train_records(out)) >= steps, f"job {job_id} ended early:\n{log.read_text()[-4000:]}"


def checkpoint_of_last_step(out, log) -> int:
    """`latest` is complete and names the last step trained, which the ranks reported saving."""
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert (out / "checkpoints" / latest / "COMPLETE").is_file()
    assert max(train_records(out)) == step
    assert f"preempted, checkpoint written at step {step}" in log.read_text()
    return step


def finished_like_uninterrupted(out, log, uninterrupted, resumed_at):
    text = log.read_text()
    assert f"resumed from {out / 'checkpoints' / f'step_{resumed_at:08d}'} at step {resumed_at}" in text, text[-3000:]
    assert f"finished at step {TOTAL_STEPS}" in text
    steps = train_records(out)
    assert steps == list(range(1, TOTAL_STEPS + 1)), "each step trained exactly once"
    losses = train_losses(out)
    assert sorted(uninterrupted) == sorted(losses)
    for s in uninterrupted:
        assert losses[s] == uninterrupted[s], (s, losses[s], uninterrupted[s])
    assert "Traceback" not in text, text[-4000:]


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, data, uninterrupted, tmp_path):
    """`--signal=B:USR1@300` delivers USR1 to the batch shell before the time limit (scancel --batch sends it
    the same way). A second SIGTERM to the step arrives while the ranks save. The script must get a checkpoint
    of the step reached, requeue the job, and the restarted job resume from it."""
    config, out = training_config(data, tmp_path)
    job_id, log = submit(config, tmp_path)
    wait_for_training(job_id, out, log)
    slurm("scancel", "--batch", "--signal=USR1", job_id)
    time.sleep(0.3)
    slurm("scancel", "--signal=TERM", job_id)  # a second signal during the save: acted on once
    wait_for(lambda: job(job_id)["Restarts"] == "1", "the script to requeue the job", 180, log)
    step = checkpoint_of_last_step(out, log)
    assert step < TOTAL_STEPS
    assert "slurm_pretrain: exit 143" in log.read_text()  # torchrun's status after the signal it passed on
    start_when_eligible(job_id)
    final = wait_until_finished(job_id, FIRST_RUN_TIMEOUT, log)
    assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), final
    finished_like_uninterrupted(out, log, uninterrupted, resumed_at=step)


def test_scancel_checkpoints_and_a_resubmission_resumes(slurm_cluster, data, uninterrupted, tmp_path):
    """scancel: Slurm's SIGTERM to every process of the job, sent twice (an impatient user); the job is
    cancelled, not requeued. Submitting the same command again resumes."""
    config, out = training_config(data, tmp_path)
    job_id, log = submit(config, tmp_path)
    wait_for_training(job_id, out, log)
    slurm("scancel", job_id)
    time.sleep(0.3)
    slurm("scancel", job_id, check=False)
    state = wait_until_finished(job_id, 180, log)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", state
    step = checkpoint_of_last_step(out, log)
    again, _ = submit(config, tmp_path)
    final = wait_until_finished(again, FIRST_RUN_TIMEOUT, log)
    assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), final
    finished_like_uninterrupted(out, log, uninterrupted, resumed_at=step)


@pytest.mark.parametrize("partition", ["debug", "lowgrace"])
def test_preemption_by_a_higher_partition_requeues_and_resumes(slurm_cluster, data, uninterrupted, tmp_path,
                                                               partition):
    """The training job runs in a partition with PreemptMode=REQUEUE; a job in `urgent` (a higher PriorityTier)
    needs the node. `debug` has GraceTime=120: Slurm signals the ranks, which checkpoint and end within it (the
    script then requeues the job, which Slurm would leave FAILED); `lowgrace` has none: Slurm requeues at once,
    and KillWait covers the checkpoint. Either way the urgent job runs, then the training job resumes from the
    step it had reached."""
    config, out = training_config(data, tmp_path)
    job_id, log = submit(config, tmp_path, f"--partition={partition}")
    wait_for_training(job_id, out, log)
    urgent = sbatch("--partition=urgent", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path / 'urgent.out'}",
                    "--wrap", "echo urgent ran")
    wait_until_finished(urgent, 300, log)
    assert job(urgent)["JobState"] == "COMPLETED"
    wait_for(lambda: job(job_id)["Restarts"] == "1", "the preempted job to be requeued", 60, log)
    step = checkpoint_of_last_step(out, log)
    start_when_eligible(job_id)
    final = wait_until_finished(job_id, FIRST_RUN_TIMEOUT, log)
    assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), final
    finished_like_uninterrupted(out, log, uninterrupted, resumed_at=step)

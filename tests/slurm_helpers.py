"""Submitting to and watching the real test Slurm (tests/cluster/): sbatch, job states, waiting."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def slurm(*args: str, check: bool = True) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def sbatch(*args: str) -> str:
    """Submit; returns the job id."""
    return slurm("sbatch", "--parsable", *args).split(";")[0]


def job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    fields = {}
    for item in slurm("scontrol", "show", "job", "--oneliner", job_id).split():
        key, _, value = item.partition("=")
        fields[key] = value
    return fields


def wait_for(predicate, what: str, timeout: float, log: Path | None = None, poll: float = 0.2):
    """Poll until `predicate()` is truthy; on timeout fail with `what` and the job log's tail."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    tail = log.read_text()[-4000:] if log is not None and log.is_file() else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def wait_until_finished(job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    return wait_for(lambda: (j := job(job_id))["JobState"] in FINISHED and j, f"job {job_id} to finish", timeout,
                    log)


def start_when_eligible(job_id: str) -> None:
    """A requeued job waits about two minutes (its BeginTime) before Slurm starts it again; make it eligible as
    soon as the node has let go of its previous run. Only the wait is shortened: the job restarts as it would
    have. (Started within the second its old credential was revoked, slurmd refuses it: "Job credential
    revoked", and the job fails; hence the idle node and the pause.)"""
    wait_for(lambda: slurm("sinfo", "-h", "-n", "localhost", "-o", "%T") == "idle", "the node to be idle", 180)
    time.sleep(2)
    if job(job_id)["JobState"] == "PENDING":
        slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)


def queue_empty(job_ids: list[str]) -> bool:
    return not slurm("squeue", "-h", "-j", ",".join(job_ids), check=False)

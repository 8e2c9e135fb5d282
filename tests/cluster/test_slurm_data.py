"""`fuxi data prepare --executor slurm` on a real Slurm: datatrove's job arrays, chained with afterok, submitted
stage by stage (the command is run again when the jobs of a stage have finished, as the CLI says). The result
must be the dataset `--executor local` builds, byte for byte; a job cancelled mid-run resumes when the same
command is run again."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_helpers import queue_empty, slurm, wait_for
from trainer_helpers import REPO, subprocess_env

pytestmark = pytest.mark.slurm

ARGS = ["--vocab-size", "512", "--seq-len", "32", "--max-docs-per-language", "6", "--shard-mb", "0.05",
        "--tasks", "2", "--quiet"]
SLURM = ["--executor", "slurm", "--partition", "debug", "--time", "10:00", "--mem-per-cpu-gb", "2"]
MAX_SUBMISSIONS = 8  # clean, tokenizer, pack: a handful of rounds


def prepare(out: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "fuxi.launch.cli", "data", "prepare", str(out), *ARGS, *extra],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def submitted_jobs(out: Path) -> list[str]:
    """Every job of the latest submission: the stages' arrays and their stats-merging jobs."""
    records = sorted(out.rglob("slurm_jobs.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(records[-1].read_text())["jobs"] if records else []


def prepare_on_slurm(out: Path) -> int:
    """Run the command, wait for its jobs, run it again, until the dataset is there; -> submissions."""
    for round_ in range(1, MAX_SUBMISSIONS + 1):
        result = prepare(out, *SLURM)
        if (out / "prepare.json").is_file():
            assert "submitted" not in result.stdout
            return round_
        jobs = submitted_jobs(out)
        assert jobs and "submitted" in result.stdout, result.stdout
        wait_for(lambda: queue_empty(jobs), f"jobs {jobs}", 600)
    raise AssertionError(f"no dataset after {MAX_SUBMISSIONS} submissions")


def dataset_files(out: Path) -> dict[str, str]:
    """relative path -> sha256 (shards, from the manifests) or text (languages, tokenizer, clean documents)."""
    files = {}
    for split in ("train", "valid"):
        manifest = json.loads((out / split / "manifest.json").read_text())
        for shard in manifest["shards"]:
            files[f"{split}/{shard['path']}"] = shard["sha256"]
        files[f"{split}/languages"] = json.dumps(manifest.get("languages"), sort_keys=True)
    for path in sorted((out / "tokenizer").iterdir()):
        text = path.read_text()
        if path.name == "fuxi_tokenizer.json":  # its "job": the hash of the inputs' paths and times, provenance
            text = json.dumps({k: v for k, v in json.loads(text).items() if k != "job"}, sort_keys=True)
        files[f"tokenizer/{path.name}"] = text
    for path in sorted((out / "clean").rglob("*.jsonl")):
        files[str(path.relative_to(out))] = path.read_text()
    return files


def test_prepare_on_slurm_equals_local_and_resumes_after_scancel(slurm_cluster, tmp_path):
    prepare(tmp_path / "local", "--executor", "local", "--workers", "2")
    local = dataset_files(tmp_path / "local")
    assert any(k.endswith(".tar") for k in local)

    rounds = prepare_on_slurm(tmp_path / "slurm")
    assert rounds >= 3  # clean, then the tokenizer, then pack: each submitted when the one before had finished
    assert dataset_files(tmp_path / "slurm") == local

    # scancel a running task of clean's processing stage: the jobs after it (afterok) can never start and wait
    # in the queue; the same command refuses to submit a second chain while they do, and names them; once they
    # are cancelled it resumes (the finished tasks are not run again) and builds the same dataset.
    out = tmp_path / "cancelled"
    result = prepare(out, *SLURM)
    assert "submitted" in result.stdout
    jobs = submitted_jobs(out)
    running = wait_for(lambda: slurm("squeue", "-h", "-t", "RUNNING", "-n", "fuxi-process", "-o", "%i",
                                     check=False), "a running task of the process stage", 300)
    slurm("scancel", running.split()[0])
    wait_for(lambda: stalled(queued(jobs)), "the chain to stall", 300)
    refused = prepare(out, *SLURM, expect=2)
    assert "still queued" in refused.stderr and "DependencyNeverSatisfied" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    slurm("scancel", *jobs)
    wait_for(lambda: queue_empty(jobs), "the cancelled jobs to leave the queue", 180)
    assert not (out / "prepare.json").exists()
    prepare_on_slurm(out)
    assert dataset_files(out) == local


def queued(jobs: list[str]) -> list[str]:
    return slurm("squeue", "-h", "-o", "%i %T %r", "-j", ",".join(jobs), check=False).splitlines()


def stalled(lines: list[str]) -> bool:
    """Nothing runs or can start: the jobs after the cancelled one wait for a dependency never satisfied."""
    return bool(lines) and all(" PENDING " in line for line in lines) \
        and any("DependencyNeverSatisfied" in line for line in lines)

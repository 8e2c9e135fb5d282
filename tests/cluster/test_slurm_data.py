"""`fuxi data prepare --executor slurm` on a real Slurm: datatrove's job arrays, chained with afterok, submitted
stage by stage (the command is run again when the jobs of a stage have finished, as the CLI says). The result
must be the dataset `--executor local` builds, byte for byte; a job cancelled mid-run resumes when the same
command is run again."""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from fuxi.data_pipeline.corpus import bundled_corpus, iter_jsonl
from data_helpers import small_corpus
from s3_helpers import BUCKET, local_files, local_s3, remote_files
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


@contextmanager
def partition_down(name: str):
    """Jobs submitted to the partition queue but do not start until the block ends."""
    slurm("scontrol", "update", f"PartitionName={name}", "State=DOWN")
    try:
        yield
    finally:
        slurm("scontrol", "update", f"PartitionName={name}", "State=UP")


def latest_record(out: Path) -> tuple[Path | None, dict]:
    """(the work folder, its record) of the latest submission: {"stages": {name: array job}, "jobs": [...]}."""
    records = sorted(out.rglob("slurm_jobs.json"), key=lambda p: p.stat().st_mtime)
    return (records[-1].parent, json.loads(records[-1].read_text())) if records else (None, {})


def status(out: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "fuxi.launch.cli", "data", "status", str(out)], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def submitted_jobs(out: Path) -> list[str]:
    """Every job of the latest submission: the stages' arrays and their stats-merging jobs."""
    return latest_record(out)[1].get("jobs", [])


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

    assert not list((tmp_path / "slurm").rglob("*.work")), "work folders are removed after success"

    # A re-run while the jobs are queued is refused, naming them (a second chain would write the same folders).
    # The chain is submitted while the partition is down (jobs queue, none starts), so the test controls when it
    # runs: on this tiny corpus a whole clean chain can finish within the seconds one CLI call takes.
    # scancel one task of clean's processing stage, then let the chain run: the jobs after that stage are
    # cancelled (--kill-on-invalid-dep), so the chain ends; the same command names the unfinished task and
    # resubmits it alone (the finished one is not run again), building the same dataset.
    out = tmp_path / "cancelled"
    with partition_down("debug"):
        assert "submitted" in prepare(out, *SLURM).stdout
        jobs = submitted_jobs(out)
        refused = prepare(out, *SLURM, expect=2)
        assert "still queued" in refused.stderr and jobs[-1] in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        queued = status(out)  # `fuxi data status`: nothing done yet, every job named as queued
        assert queued.startswith(f"clean: 0 of 11 tasks done ({out / '.clean.work'}, started "), queued
        assert f"{len(jobs)} Slurm jobs of the last submission still queued: {jobs[0]}_[0] PENDING" in queued
        slurm("scancel", f"{latest_record(out)[1]['stages']['process']}_0")
    wait_for(lambda: queue_empty(jobs), "the chain to end", 300)
    ended = status(out)
    assert ended.startswith("clean: 2 of 11 tasks done") and "still queued" not in ended, ended
    assert ["process", "1", "2", "0"] in [line.split() for line in ended.splitlines()], ended
    resumed = prepare(out, *SLURM)
    assert "process: 1 of 2 tasks did not finish in the last submission" in resumed.stderr, resumed.stderr
    jobs = submitted_jobs(out)
    wait_for(lambda: queue_empty(jobs), f"jobs {jobs}", 600)
    # Only the cancelled task ran again: datatrove was told to run rank 0 alone, and Slurm ran one element of
    # the resubmitted process array (one log per element).
    work, record = latest_record(out)
    assert json.loads((work / "logs" / "process" / "ranks_to_run.json").read_text()) == [0]
    reran = list((work / "slurm_logs" / "process").glob(f"{record['stages']['process']}_*.out"))
    assert len(reran) == 1, reran
    assert prepare_on_slurm(out) >= 2
    assert dataset_files(out) == local
    assert not list(out.rglob("*.work"))


def test_failed_task_ends_the_chain_and_is_named_with_its_log(slurm_cluster, tmp_path):
    """A document that is not valid JSON makes a task of `fuxi data clean` fail on its node. The jobs after it
    are cancelled (no chain left pending); running the command again names the task, its error and its log, and
    once the file is fixed the same command resumes and finishes."""
    corpus = tmp_path / "corpus" / "train"
    corpus.mkdir(parents=True)
    texts = [doc.text for doc in iter_jsonl(bundled_corpus() / "train" / "en.jsonl")][:40]
    good = [json.dumps({"text": text, "lang": "en"}) for text in texts]
    (corpus / "a.jsonl").write_text("\n".join(good[:20]) + "\n")
    (corpus / "b.jsonl").write_text("\n".join(good[20:] + ['{"text": broken']) + "\n")
    command = [sys.executable, "-m", "fuxi.launch.cli", "data", "clean", str(corpus.parent), str(tmp_path / "out"),
               "--tasks", "2", *SLURM]

    def clean() -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)

    first = clean()
    assert first.returncode == 0 and "submitted" in first.stdout, first.stderr[-3000:]
    jobs = submitted_jobs(tmp_path)
    wait_for(lambda: queue_empty(jobs), "the failed chain to end", 300)
    again = clean()
    assert "did not finish in the last submission" in again.stderr, again.stderr[-3000:]
    assert f"{corpus / 'b.jsonl'}:21: not valid JSON" in again.stderr and "task_0000" in again.stderr
    wait_for(lambda: queue_empty(submitted_jobs(tmp_path)), "the second chain to end", 300)
    (corpus / "b.jsonl").write_text("\n".join(good[20:]) + "\n")
    for _ in range(MAX_SUBMISSIONS):
        result = clean()
        assert result.returncode == 0, result.stderr[-3000:]
        if "submitted" not in result.stdout:
            break
        wait_for(lambda: queue_empty(submitted_jobs(tmp_path)), "the chain to end", 300)
    local = subprocess.run([*command[:5], str(corpus.parent), str(tmp_path / "local"), "--tasks", "2"], cwd=REPO,
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    assert (tmp_path / "out" / "train" / "en.jsonl").read_text() == \
        (tmp_path / "local" / "train" / "en.jsonl").read_text()
    assert not list(tmp_path.glob(".*.work")), "the work folder is removed after success"


def test_clean_from_and_to_s3_on_slurm(slurm_cluster, tmp_path):
    """s3:// input and output on a cluster: the command mirrors the corpus into $FUXI_CACHE (a folder every node
    sees; here the one node's), the Slurm tasks read the mirror, and the run after the jobs have finished uploads
    the output (its report last). The upload equals a local clean of the same corpus, file for file."""
    pytest.importorskip("moto.server")
    corpus = small_corpus(tmp_path / "corpus", ("en", "de", "zh"), 24, 6, 2)
    local = subprocess.run([sys.executable, "-m", "fuxi.launch.cli", "data", "clean", str(corpus),
                            str(tmp_path / "local"), "--tasks", "2"], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    with local_s3(tmp_path / "cache") as fs:
        fs.put(str(corpus) + "/", f"{BUCKET}/corpus/", recursive=True)
        url = f"s3://{BUCKET}/clean"
        command = [sys.executable, "-m", "fuxi.launch.cli", "data", "clean", f"s3://{BUCKET}/corpus", url,
                   "--tasks", "2", *SLURM]
        outputs = []
        for _ in range(MAX_SUBMISSIONS):
            result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                                    timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            outputs.append(result.stdout + result.stderr)
            if "submitted" not in result.stdout:
                break
            wait_for(lambda: queue_empty(submitted_jobs(tmp_path / "cache")), "the chain to end", 300)
        assert len(outputs) >= 2 and "uploaded" in outputs[-1], outputs[-1][-3000:]
        ours, theirs = remote_files(fs, url), local_files(tmp_path / "local")
    report = "clean_report.json"  # its task seconds and input stamp (paths) differ
    assert json.loads(ours.pop(report))["stats"] == json.loads(theirs.pop(report))["stats"]
    assert ours == theirs and "train/en.jsonl" in ours

"""`fuxi data pack` and `fuxi data clean` with `--executor ray` as a user runs them, on a real Ray cluster (issue
#22): a local cluster of 2 CPUs started once for the module (`ray.init`), which each `fuxi` command joins through
RAY_ADDRESS. Checked against the same job run with `--executor local`, byte for byte:

    a failed task fails the job in one line naming the task and its log, and leaves no worker running;
    the same command after the fix runs only the unfinished tasks and ends byte-identical to the local pack;
    the driver's process group killed (SIGKILL) with tasks done: the same command runs only the rest, identical
    (pack, and clean's eight stages);
    a second run while one runs is refused in one line naming the first.

Tasks re-run are counted from the task logs datatrove (re)writes for every task it runs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from fuxi.data_pipeline.corpus import bundled_corpus
from fuxi.data_pipeline.engine import ExecutorConfig
from fuxi.data_pipeline.pack import pack

from data_helpers import tiny_dataset

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one cluster: the tests run on one worker

LANGUAGES = ["ar", "en", "ja", "ru", "th", "zh"]
TASKS = 4  # pack tasks; the job has 1 + TASKS + 1 (plan, pack, merge)
PACK = ["--seq-len", "64", "--docs-per-part", "6", "--shard-mb", "0.04", "--tasks", str(TASKS)]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs: (its address, the pid of its raylet, whose workers carry it)."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False)
    raylet = ray.get(ray.remote(lambda: os.environ["RAY_RAYLET_PID"]).remote())
    yield ray.get_runtime_context().gcs_address, raylet
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a cleaned split of 6 languages, its tokenizer, the shards of a local pack of it)."""
    data = tiny_dataset(tmp_path_factory)
    root = tmp_path_factory.mktemp("ray_corpus")
    clean = root / "clean"
    clean.mkdir()
    for lang in LANGUAGES:
        shutil.copy2(data.train_manifest.parent.parent / "clean" / "train" / f"{lang}.jsonl", clean)
    reference = root / "reference"
    pack(clean, data.tokenizer_dir, reference, seq_len=64, docs_per_part=6, shard_bytes=int(0.04 * (1 << 20)),
         executor=ExecutorConfig(tasks=TASKS, workers=1, progress=False))
    return clean, data.tokenizer_dir, reference


def _sha256s(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "pack_report.json"}


def _command(corpus, out: Path) -> list[str]:
    clean, tokenizer, _ = corpus
    return [sys.executable, "-m", "fuxi.launch.cli", "data", "pack", str(clean), str(tokenizer), str(out), *PACK,
            "--executor", "ray"]


def _env(cluster) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": cluster[0], "PYTHONSAFEPATH": "1"}


def _task_logs(work: Path) -> dict[str, int]:
    """{stage/task log: its mtime_ns}: a task's log is written whenever the task runs."""
    return {p.relative_to(work / "logs").as_posix(): p.stat().st_mtime_ns for p in (work / "logs").glob("*/logs/*")}


def _rerun(before: dict[str, int], work: Path) -> list[str]:
    return sorted(name for name, mtime in _task_logs(work).items() if before.get(name) != mtime)


def _task_processes(raylet: str) -> list[str]:
    """The task processes (datatrove's RankWorker actors and the processes they fork) of the cluster's raylet."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or "RankWorker" not in (proc / "cmdline").read_text(errors="replace"):
                continue
            if f"RAY_RAYLET_PID={raylet}\0" in (proc / "environ").read_text(errors="replace") and \
                    "Z" not in (proc / "stat").read_text().split(")")[-1].split()[0]:
                found.append(proc.name)
        except OSError:
            continue
    return found


def _kill_once_a_task_is_done(command: list[str], env: dict, completions: Path) -> None:
    """Start `command` in its own process group and SIGKILL the group as soon as a completion marker appears in
    `completions` (a task of that stage has finished)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (completions.is_dir() and any(completions.iterdir())) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _lock_holder(lock: Path) -> int | None:
    """The pid the job's lock file names (None while there is none)."""
    try:
        return json.loads(lock.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _no_task_processes(raylet: str, within: float = 15.0) -> list[str]:
    deadline = time.time() + within
    while (left := _task_processes(raylet)) and time.time() < deadline:
        time.sleep(0.2)
    return left


def test_failed_task_names_its_log_then_the_fixed_run_resumes_identical(cluster, corpus, tmp_path):
    """A language file whose first line is broken in place (same size and mtime: the job's input stamp is
    unchanged, as after a fix outside it, e.g. a re-synced file) fails the pack task that reads it on its Ray
    worker: the job fails in one line naming the task and its log, and no task process is left. With the line
    restored, the same command runs only that task and the merge, and the shards equal the local pack's."""
    clean, _, reference = corpus
    target = clean / "en.jsonl"
    good, stat = target.read_bytes(), target.stat()
    out, work = tmp_path / "out", tmp_path / ".out.work"
    try:
        target.write_bytes(b"x" + good[1:])
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        failed = subprocess.run(_command(corpus, out), env=_env(cluster), capture_output=True, text=True,
                                timeout=300)
    finally:
        target.write_bytes(good)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert failed.returncode == 2, failed.stderr
    error = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(error) == 1, failed.stderr
    log = next(p for p in (work / "logs" / "pack" / "logs").iterdir() if "en.jsonl:1" in p.read_text())
    rank = int(log.stem.split("_")[1])
    assert f"pack: 1 of {TASKS} tasks failed on Ray (task {rank}: " in error[0]
    assert "en.jsonl:1: " in error[0] and f"(log {log})" in error[0]
    assert not out.exists() and _no_task_processes(cluster[1]) == []

    before = _task_logs(work)
    fixed = subprocess.run([*_command(corpus, out), "--keep-work"], env=_env(cluster), capture_output=True,
                           text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stderr
    assert f"pack: resuming: {TASKS} of {TASKS + 2} tasks done (plan 1/1, pack {TASKS - 1}/{TASKS}, merge 0/1)" \
        in fixed.stderr
    assert _rerun(before, work) == ["merge/logs/task_00000.log", f"pack/logs/task_{rank:05d}.log"]
    assert _sha256s(out) == _sha256s(reference) and len(_sha256s(out)) > TASKS
    assert not work.with_name(".out.work.lock").exists()


def test_killed_driver_resumes_and_a_second_run_is_refused(cluster, corpus, tmp_path):
    """A pack on Ray whose driver's process group is killed (SIGKILL) once a pack task has finished: Ray stops
    its workers, and the same command runs only the unfinished tasks and ends with the local pack's shards.
    While that re-run holds the job (held still by SIGSTOP, so the check does not race it), the same command is
    refused in one line naming it."""
    out, work = tmp_path / "out", tmp_path / ".out.work"
    lock = work.with_name(".out.work.lock")
    completions = work / "logs" / "pack" / "completions"
    _kill_once_a_task_is_done(_command(corpus, out), _env(cluster), completions)
    assert _no_task_processes(cluster[1]) == []
    finished = {int(p.name) for p in completions.iterdir()}
    done = len(finished)
    assert 1 <= done < TASKS and not out.exists()

    before = _task_logs(work)
    again = subprocess.Popen([*_command(corpus, out), "--keep-work"], env=_env(cluster), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while _lock_holder(lock) != again.pid and time.time() < deadline:
            assert again.poll() is None, again.stderr.read()
            time.sleep(0.05)
        os.killpg(again.pid, signal.SIGSTOP)
        second = subprocess.run(_command(corpus, out), env=_env(cluster), capture_output=True, text=True,
                                timeout=120)
    finally:
        os.killpg(again.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and second.stderr.startswith(
        f"fuxi data: error: pack {out}: another run of this job is working in {work} (pid {again.pid} on host "), \
        second.stderr
    assert "then run the same command again (it resumes)" in second.stderr
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert f"pack: resuming: {1 + done} of {TASKS + 2} tasks done (plan 1/1, pack {done}/{TASKS}, merge 0/1)" \
        in stderr
    assert _rerun(before, work) == ["merge/logs/task_00000.log",
                                    *(f"pack/logs/task_{rank:05d}.log" for rank in range(TASKS)
                                      if rank not in finished)]
    assert _sha256s(out) == _sha256s(corpus[2])

    # once more, as a user would without --keep-work: up to date, nothing runs, the work folder is removed
    clean, tokenizer, _ = corpus
    assert pack(clean, tokenizer, out, seq_len=64, docs_per_part=6, shard_bytes=int(0.04 * (1 << 20)),
                executor=ExecutorConfig(executor="ray", tasks=TASKS)) == out / "manifest.json"
    assert not work.exists() and not work.with_name(".out.work.lock").exists()


def test_clean_killed_at_half_resumes_identical(cluster, tmp_path):
    """`fuxi data clean --executor ray` (plan, process, near-duplicate buckets and clusters, write, gather,
    publish) killed once its processing stage has finished a task: the same command resumes, runs only the
    tasks not done, and writes exactly the documents a local clean writes."""
    corpus = tmp_path / "corpus" / "train"
    corpus.mkdir(parents=True)
    for lang in ("en", "de", "zh"):
        lines = (bundled_corpus() / "train" / f"{lang}.jsonl").read_text().splitlines()[:40]
        (corpus / f"{lang}.jsonl").write_text("\n".join(lines) + "\n")

    def clean(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "fuxi.launch.cli", "data", "clean", str(corpus.parent), str(out),
                "--tasks", "2", *extra]

    local = subprocess.run(clean(tmp_path / "local"), env=_env(cluster), capture_output=True, text=True,
                           timeout=300)
    assert local.returncode == 0, local.stderr
    out, work = tmp_path / "out", tmp_path / ".out.work"
    _kill_once_a_task_is_done(clean(out, "--executor", "ray"), _env(cluster), work / "logs" / "process" / "completions")
    assert _no_task_processes(cluster[1]) == [] and not (out / "train").exists()
    done = len(list(work.glob("logs/*/completions/*")))

    before = _task_logs(work)
    again = subprocess.run(clean(out, "--executor", "ray", "--keep-work"), env=_env(cluster), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    resumed = re.search(r"clean: resuming: (\d+) of (\d+) tasks done", again.stderr)
    assert resumed and int(resumed[1]) == done >= 2, again.stderr
    assert len(_rerun(before, work)) == int(resumed[2]) - done  # each task not done ran once, no other
    assert _sha256s(out / "train") == _sha256s(tmp_path / "local" / "train")
    assert sorted(p.name for p in (out / "train").iterdir()) == ["de.jsonl", "en.jsonl", "zh.jsonl"]

"""The job driver (data_pipeline/job.py) on a job of its own: words counted per input file by parallel tasks,
then summed and published. Its result is checked against counting the files directly; the driver's rules
(refuse a foreign output folder, return an up-to-date output without running, resume the same job's work
folder, start another job's afresh) are checked by counting the tasks that ran."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from fuxi.common.atomic import write_json
from fuxi.common.errors import ConfigError, DataError
from fuxi.common.staging import switch_folder
from fuxi.data_pipeline.engine import ExecutorConfig, Stage, TaskStep
from fuxi.data_pipeline.errors import TaskError
from fuxi.data_pipeline.job import FinishStep, Job, run_job

RAN: Counter = Counter()  # tasks run per stage (one worker: the tasks run in this process)


class CountWords(TaskStep):
    name = "count"

    def run_task(self, rank: int, world_size: int) -> None:
        RAN[self.name] += 1
        counts = {str(p): len(p.read_text().split()) for p in self.job.files()[rank::world_size]}
        write_json(self.job.work_dir / "counts" / f"{rank}.json", counts)


class Publish(FinishStep):
    name = "publish"

    def finish(self) -> None:
        RAN[self.name] += 1
        counts = {}
        for path in sorted((self.job.work_dir / "counts").glob("*.json")):
            counts.update(json.loads(path.read_text()))
        final = self.job.work_dir / "final"
        write_json(final / self.job.record, {"job": self.job_hash, "counts": counts})
        switch_folder(final, self.job.out_dir)


@dataclass
class WordCountJob(Job):
    name: ClassVar[str] = "wordcount"
    record: ClassVar[str] = "counts.json"

    corpus: str

    def files(self) -> list[Path]:
        return sorted(Path(self.corpus).glob("*.txt"))

    def inputs(self) -> list[str]:
        return [self.corpus]

    def owned(self) -> tuple[str, ...]:
        return (self.record,)

    def stages(self, job_hash: str, tasks: int) -> list[Stage]:
        return [Stage("count", CountWords(self), tasks), Stage("publish", Publish(self, job_hash), 1, parallel=False)]

    def result(self) -> dict[str, int]:
        return json.loads((self.out_dir / self.record).read_text())["counts"]


def _corpus(tmp_path: Path, files: int = 5) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(files):
        (corpus / f"{i}.txt").write_text(" ".join(f"w{k}" for k in range(3 * i + 1)))
    return corpus


def _direct_counts(corpus: Path) -> dict[str, int]:
    return {str(p): len(p.read_text().split()) for p in sorted(corpus.glob("*.txt"))}


def _run(corpus: Path, out: Path, tasks: int = 3, **executor) -> dict | None:
    job = WordCountJob(out_dir=out, work_dir=None, corpus=str(corpus))
    return run_job(job, ExecutorConfig(tasks=tasks, workers=1, progress=False, **executor))


@pytest.fixture(autouse=True)
def _reset_counts():
    RAN.clear()


@pytest.mark.parametrize("tasks", [1, 3, 7])
def test_result_equals_counting_directly_for_any_task_count(tmp_path, tasks):
    corpus = _corpus(tmp_path)
    assert _run(corpus, tmp_path / "out", tasks) == _direct_counts(corpus)
    assert RAN == {"count": tasks, "publish": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # the work folder is removed


def test_an_up_to_date_output_is_returned_without_running_and_changed_inputs_run_again(tmp_path):
    corpus = _corpus(tmp_path)
    first = _run(corpus, tmp_path / "out")
    RAN.clear()
    assert _run(corpus, tmp_path / "out", tasks=2) == first  # the task count is not part of what it depends on
    assert RAN == {}
    (corpus / "0.txt").write_text("one two three four")
    assert _run(corpus, tmp_path / "out") == _direct_counts(corpus) != first
    assert RAN == {"count": 3, "publish": 1}


def test_a_foreign_output_folder_is_refused_before_any_work(tmp_path):
    corpus = _corpus(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds \['notes.txt'\], which this stage did not write"):
        _run(corpus, tmp_path / "out")
    assert RAN == {} and not (tmp_path / ".out.work").exists()


def _killed_publish(monkeypatch, corpus: Path, out: Path, tasks: int = 3) -> None:
    """Run the job with its publish task killed: the count tasks finish, nothing is published."""
    with monkeypatch.context() as patch:
        patch.setattr(Publish, "finish", lambda self: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(TaskError, match="publish: task 0 of 1: killed"):
            _run(corpus, out, tasks)
    assert not out.exists() and (out.parent / f".{out.name}.work").is_dir()
    RAN.clear()


def test_the_same_job_resumes_its_work_folder(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    _killed_publish(monkeypatch, corpus, tmp_path / "out")
    assert _run(corpus, tmp_path / "out") == _direct_counts(corpus)
    assert RAN == {"publish": 1}  # the count tasks had finished


def test_a_finish_step_run_again_after_its_switch_leaves_the_output_alone(tmp_path):
    """A finish task that switched the output in and died before its completion marker is run again (Slurm
    requeues it) with its work folder gone: it must not publish again."""
    corpus = _corpus(tmp_path)
    job = WordCountJob(out_dir=tmp_path / "out", work_dir=None, corpus=str(corpus))
    published = run_job(job, ExecutorConfig(tasks=2, workers=1, progress=False))
    RAN.clear()
    Publish(job, job.job_hash()).run_task(0, 1)
    assert RAN == {} and job.result() == published == _direct_counts(corpus)


@pytest.mark.parametrize("change", ["inputs", "tasks"])
def test_another_job_starts_the_work_folder_afresh(tmp_path, monkeypatch, change):
    """Changed inputs, or another task count (task r of 2 is not task r of 3), make another job: its completion
    markers would lie, so the count tasks run again (resumed, they would publish the old counts)."""
    corpus = _corpus(tmp_path)
    _killed_publish(monkeypatch, corpus, tmp_path / "out")
    tasks = 2 if change == "tasks" else 3
    if change == "inputs":
        (corpus / "0.txt").write_text("one two three four five")
    assert _run(corpus, tmp_path / "out", tasks) == _direct_counts(corpus)
    assert RAN == {"count": tasks, "publish": 1}


def test_running_only_some_tasks_here_needs_a_job_that_publishes_shares(tmp_path):
    with pytest.raises(ConfigError) as err:
        _run(_corpus(tmp_path), tmp_path / "out", tasks=4, local_tasks=2)
    assert err.value.key == "local_tasks"


def test_a_second_run_of_a_running_job_is_refused_naming_the_first(tmp_path):
    """While a run holds the job's lock (`.<out>.work.lock`, the kernel's flock: any other open of the file is
    refused, whichever process), the same job is refused in one line naming the holder, before any work; once
    the first run has ended (its lock released, the file removed) the same command runs."""
    import os
    import socket

    from fuxi.common import folder_lock

    corpus = _corpus(tmp_path)
    with folder_lock.exclusive(tmp_path / ".out.work.lock"):
        with pytest.raises(TaskError) as refused:
            _run(corpus, tmp_path / "out")
    message = str(refused.value)
    assert message.startswith(f"wordcount {tmp_path / 'out'}: another run of this job is working in "
                              f"{tmp_path / '.out.work'} (pid {os.getpid()} on host {socket.gethostname()} since ")
    assert message.endswith("then run the same command again (it resumes)") and "\n" not in message
    assert RAN == {} and not (tmp_path / "out").exists() and not (tmp_path / ".out.work.lock").exists()
    assert _run(corpus, tmp_path / "out") == _direct_counts(corpus)

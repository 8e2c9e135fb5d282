"""The driver of every data stage that runs on the engine (clean, pack, the tokenizer), written once.

A stage module describes its run as a `Job`, a dataclass of its settings: the files it reads (`inputs`), what
it writes into its output folder (`owned`), its engine stages, and what the caller gets back (`result`).
`run_job` does the rest the same way for each:

    1. refuse an output folder that holds anything the job did not write (`refuse_foreign`)
    2. hash what the output depends on (the stage, its settings, the `input_stamp` of its inputs); an output
       whose record file (`record`) holds the same hash under "job" is up to date and is returned as it is
    3. keep the work folder of an interrupted run of the same job, whose completion markers then mean what
       they say, or start it afresh (`prepare_work_dir`)
    4. run the stages on the chosen executor (engine.py: local processes, Slurm job arrays, Ray); the last one
       (a `FinishStep`) writes the record into the new output folder and switches that folder into place
    5. read the result and remove the work folder; an output at a URL (remote.py) is built in its local mirror
       and then uploaded

A full disk ends the job with one line (DiskFullError) that names the work folder it keeps for the resume.

What happened is logged at INFO ("up to date (nothing to do)", "resuming: N of M tasks done", each stage's time)
and recorded for callers that ask (`watch_jobs`: the CLI prints no report for a job that had nothing to do).
The job travels inside its steps (`TaskStep.job`) to Slurm and Ray workers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

from fuxi.common.atomic import write_json
from fuxi.common.diskspace import DISK_FULL, free_bytes, is_disk_full, size_text, tree_bytes
from fuxi.common import folder_lock
from fuxi.common.errors import BusyError, ConfigError, DiskFullError
from fuxi.common.staging import refuse_foreign
from fuxi.data_pipeline import remote
from fuxi.data_pipeline.engine import ExecutorConfig, Stage, TaskStep, run_stages, still_queued
from fuxi.data_pipeline.errors import TaskError

log = logging.getLogger(__name__)


def input_stamp(paths: Iterable[str | Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file a job reads: each path that is a file, and every file under each
    path that is a folder (recursively, sorted). Equal stamps mean "the inputs have not changed", whatever
    layout (a single file, .jsonl.gz, per-language folders of text) the reader accepts."""
    stamp = []
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        stamp += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return stamp


def default_work_dir(out_dir: str | Path) -> Path:
    """`.<out>.work` beside the output: on the same filesystem, and outside the folder the job replaces."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.work"


def prepare_work_dir(work_dir: Path, stamp: dict) -> bool:
    """Keep a work folder only if it belongs to the same job (`stamp`: its hash and its stages' task counts):
    its completion markers then mean what they say. Otherwise start it afresh. True when it was kept."""
    path = work_dir / "job.json"
    if work_dir.exists():
        try:
            same = json.loads(path.read_text(encoding="utf-8")) == stamp
        except (OSError, ValueError):
            same = False
        if same:
            return True
        log.info("%s belongs to another job (other inputs, settings or task counts); starting afresh", work_dir)
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    write_json(path, stamp)
    return False


def finished_ranks(work_dir: Path, stage: str, tasks: int) -> set[int]:
    """The tasks of `stage` whose completion marker (datatrove's, written after the task's outputs) exists."""
    markers = work_dir / "logs" / stage / "completions"
    return {int(p.name) for p in markers.iterdir() if p.name.isdigit() and int(p.name) < tasks} \
        if markers.is_dir() else set()


def finished_tasks(work_dir: Path, counts: dict[str, int]) -> dict[str, int]:
    """{stage: tasks finished} for `counts` ({stage: tasks}, as job.json records them)."""
    return {name: len(finished_ranks(work_dir, name, tasks)) for name, tasks in counts.items()}


_OUTCOMES: ContextVar[list | None] = ContextVar("job_outcomes", default=None)


@contextmanager
def watch_jobs() -> Iterator[list[tuple[str, str]]]:
    """Collect (stage, outcome) for each job run inside the block; outcome is "up to date" (nothing ran),
    "done", "submitted" (to a cluster) or "partial" (this machine ran only some tasks)."""
    outcomes: list[tuple[str, str]] = []
    token = _OUTCOMES.set(outcomes)
    try:
        yield outcomes
    finally:
        _OUTCOMES.reset(token)


def record_outcome(stage: str, outcome: str) -> None:
    outcomes = _OUTCOMES.get()
    if outcomes is not None:
        outcomes.append((stage, outcome))


def recorded_job(record: Path) -> str | None:
    """The hash of the job that wrote the output whose record file (a JSON object) is `record`; None when
    there is none."""
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("job")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class Job(ABC):
    """One run of a data stage on the engine (see the module docstring); subclasses add their settings."""

    name: ClassVar[str]  # the stage, as logs and errors name it
    record: ClassVar[str]  # the JSON file in out_dir that records the hash of the job that wrote it ("job")
    # Whether this machine may run only some tasks of the parallel stages (ExecutorConfig.local_tasks: several
    # machines without a scheduler); `publish_share` then publishes this machine's part of the output.
    shares: ClassVar[bool] = False

    out_dir: Path
    work_dir: Path | None  # None: `.<out>.work` beside the output

    def __post_init__(self):
        # absolute: the job is pickled to workers that may start elsewhere
        self.out_dir = Path(self.out_dir).absolute()
        self.work_dir = Path(self.work_dir).absolute() if self.work_dir else default_work_dir(self.out_dir)

    @abstractmethod
    def inputs(self) -> list[str | Path]:
        """The files and folders the job reads."""

    @abstractmethod
    def owned(self) -> tuple[str, ...]:
        """The entries (glob patterns) the job writes into out_dir; an out_dir holding others is refused."""

    @abstractmethod
    def stages(self, job_hash: str, tasks: int) -> list[Stage]:
        """The engine stages, in order; parallel ones run as `tasks` tasks. The last one is a `FinishStep`."""

    @abstractmethod
    def result(self) -> Any:
        """What the caller gets once out_dir holds the output."""

    def parallelism(self) -> int:
        """How many tasks the parallel stages can keep busy: the default --tasks on a cluster. Here: the number
        of input files."""
        return len(input_stamp(self.inputs()))

    def publish_share(self, executor: ExecutorConfig) -> None:
        """Publish the output of the tasks this machine ran (a job with `shares` only)."""
        raise NotImplementedError

    def job_hash(self) -> str:
        """The hash of what the output depends on: the stage, its settings (not where it writes) and the
        `input_stamp` of its inputs."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("out_dir", "work_dir")}
        identity = {"stage": self.name, "settings": settings, "inputs": input_stamp(self.inputs())}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()

    def up_to_date(self, job_hash: str) -> bool:
        """Whether out_dir holds the output of the job with this hash."""
        return recorded_job(self.out_dir / self.record) == job_hash


class FinishStep(TaskStep):
    """The last step of a job: `finish()` writes the job's `record` (with its hash under "job") into the new
    output folder and switches that folder into place. It does nothing when out_dir already holds this job's
    output: an earlier attempt switched it in and died before datatrove wrote its completion marker."""

    def __init__(self, job: Job, job_hash: str):
        super().__init__(job)
        self.job_hash = job_hash

    def run_task(self, rank: int, world_size: int) -> None:
        if not self.job.up_to_date(self.job_hash):
            self.finish()

    def finish(self) -> None:
        raise NotImplementedError


def disk_full_message(job: Job) -> str:
    """A full disk during a job, in one line. The work folder is kept: it is the job's resume state (finished
    tasks are skipped when the same command runs again), often most of the work; the message names it and its
    size, so whoever needs the space can delete it knowingly."""
    work = job.work_dir
    return (f"{job.name} {job.out_dir}: {DISK_FULL}, {size_text(free_bytes(work))} free; {job.out_dir} is as it "
            f"was. The work done so far is kept in "
            f"{work} ({size_text(tree_bytes(work))}), the state the same command resumes from: free space and run "
            f"it again (what finished is skipped), or delete {work} to start afresh")


def run_job(job: Job, executor: ExecutorConfig, keep_work: bool = False, upload_to: str | None = None) -> Any:
    """Run `job` on `executor` (see the module docstring): its result, or None when its stages were submitted
    to a cluster or this machine ran only some of its tasks. keep_work: keep the work folder after success.
    upload_to: the URL the output goes to (job.out_dir is then its local mirror, remote.local_output)."""
    executor.validate()
    if executor.partial and not job.shares:
        raise ConfigError("local_tasks", f"{job.name}'s stages exchange files through one work folder; run its "
                                         f"tasks on one machine, or on many with --executor slurm/ray and a "
                                         f"shared work folder")
    if upload_to is not None and executor.partial:
        raise ConfigError("local_tasks", f"{upload_to}: a machine's share of the tasks is written to a local "
                                         f"folder (then `fuxi data merge`); upload the merged output")
    refuse_foreign(job.out_dir, job.owned())
    if upload_to is not None:
        remote.refuse_foreign(upload_to, job.owned())
    with one_run_at_a_time(job, executor):
        return _run_job(job, executor, keep_work, upload_to)


@contextmanager
def one_run_at_a_time(job: Job, executor: ExecutorConfig) -> Iterator[None]:
    """A second run of the same job (the same work folder) while one runs, locally or on Ray, is refused in one
    line naming the first: both would run the same unfinished tasks into the same files. The lock
    (`<work folder>.lock`) lives as long as the first run's process; a killed run's Ray workers are stopped by
    Ray with it. Slurm submissions are guarded by the queue instead (engine.refuse_while_queued); machines that
    each run some tasks (`local_tasks`) work in folders of their own."""
    if executor.executor == "slurm" or executor.partial:
        yield
        return
    lock = job.work_dir.with_name(job.work_dir.name + ".lock")
    try:
        with folder_lock.exclusive(lock):
            yield
    except BusyError as err:
        raise TaskError(f"{job.name} {job.out_dir}: another run of this job is working in {job.work_dir} "
                        f"({err.holder}); wait for it to finish, or stop it, then run the same command again "
                        f"(it resumes)") from None


def _run_job(job: Job, executor: ExecutorConfig, keep_work: bool, upload_to: str | None) -> Any:
    job_hash = job.job_hash()
    where = upload_to or job.out_dir
    if job.up_to_date(job_hash):
        if upload_to is None or (remote.read_json(f"{upload_to}/{job.record}") or {}).get("job") == job_hash:
            log.info("%s: up to date (nothing to do): %s holds the output of these inputs and settings", job.name,
                     where)
            record_outcome(job.name, "up to date")
            # a cluster run's work folder (its last job switched the output in): removed once nothing of it is
            # queued (its stats-merging jobs may still write there)
            if job.work_dir.exists() and not keep_work and not still_queued(job.work_dir):
                shutil.rmtree(job.work_dir, ignore_errors=True)
                log.info("%s: removed the work folder %s", job.name, job.work_dir)
            return job.result()
        log.info("%s: %s is built (in %s) but not uploaded; uploading", job.name, upload_to, job.out_dir)
    else:
        if not _run(job, job_hash, executor):
            return None
    if upload_to is not None:
        remote.upload_folder(job.out_dir, upload_to, job.record)
    result = job.result()
    if not keep_work:
        shutil.rmtree(job.work_dir, ignore_errors=True)
    record_outcome(job.name, "done")
    return result


def _run(job: Job, job_hash: str, executor: ExecutorConfig) -> bool:
    """Run (or resume, or submit) the job's stages; True when they all ran here to the end."""
    tasks = executor.tasks_for(job.parallelism())
    stages = job.stages(job_hash, tasks)
    counts = {stage.name: stage.tasks for stage in stages}
    started = time.time()
    if prepare_work_dir(job.work_dir, {"job": job_hash, "tasks": counts}):
        done = finished_tasks(job.work_dir, counts)
        log.info("%s: resuming: %d of %d tasks done (%s) in %s", job.name, sum(done.values()), sum(counts.values()),
                 ", ".join(f"{name} {done[name]}/{n}" for name, n in counts.items()), job.work_dir)
    else:
        log.info("%s: %d stages (%s) -> %s", job.name, len(stages),
                 ", ".join(f"{name} {n} task{'s' if n > 1 else ''}" for name, n in counts.items()), job.out_dir)
    try:
        finished = run_stages(stages, job.work_dir, executor)
    except Exception as err:
        if is_disk_full(err):
            raise DiskFullError(disk_full_message(job)) from None
        raise
    if executor.executor == "local" and executor.partial:
        job.publish_share(executor)
        shutil.rmtree(job.work_dir, ignore_errors=True)
        record_outcome(job.name, "partial")
        return False
    if not finished:
        record_outcome(job.name, "submitted")
        return False
    log.info("%s: done in %.1fs -> %s", job.name, time.time() - started, job.out_dir)
    return True

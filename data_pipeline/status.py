"""`fuxi data status OUT`: how far a data job has got (clean, tokenizer, pack or prepare, on any executor), read
from its work folders alone. On Slurm and Ray the tasks run elsewhere and the command that submitted them has
returned, so the progress bar of a local run has no counterpart; this is it: per stage the tasks done of all,
the tasks that started and have not finished (running, failed or cancelled) with the last line of their log,
and the jobs of the last Slurm submission still queued. Read-only: run it any time, from any machine that sees
the folders."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fuxi.common.tables import format_table
from fuxi.data_pipeline import remote
from fuxi.data_pipeline.engine import SLURM_JOBS, last_line, still_queued
from fuxi.data_pipeline.errors import TaskError
from fuxi.data_pipeline.job import default_work_dir, finished_ranks

# the job a work folder belongs to, from a stage only it has (job.json records the stages, not the job's name)
JOB_OF_STAGE = {"process": "clean", "pack": "pack", "tokenizer": "tokenizer"}


@dataclass
class StageStatus:
    name: str
    tasks: int
    done: int
    unfinished: list[tuple[int, str, Path]] = field(default_factory=list)  # (rank, last log line, log)


@dataclass
class JobStatus:
    job: str
    work_dir: Path
    started: float                 # when the work folder was made (its job.json)
    stages: list[StageStatus]
    queued: list[str]              # "id STATE (reason)" of the last Slurm submission's jobs still queued

    @property
    def done(self) -> int:
        return sum(s.done for s in self.stages)

    @property
    def tasks(self) -> int:
        return sum(s.tasks for s in self.stages)


def work_folders(out: str | Path) -> list[Path]:
    """The work folders of the jobs writing `out`: its own (`.<out>.work` beside it) and, for prepare, those of
    its stages (inside it on a cluster, inside its work folder locally)."""
    out = remote.local_output(out)[0].absolute()
    own = default_work_dir(out)
    folders = [own] + sorted(out.glob(".*.work")) + sorted(own.glob(".*.work"))
    return [f for f in folders if (f / "job.json").is_file()]


def job_status(work_dir: Path) -> JobStatus:
    record = work_dir / "job.json"
    counts = json.loads(record.read_text(encoding="utf-8")).get("tasks", {})
    stages = []
    for name, tasks in counts.items():
        done = finished_ranks(work_dir, name, tasks)
        logs = sorted((work_dir / "logs" / name / "logs").glob("task_*.log"))
        unfinished = [(rank, last_line(log), log) for rank, log in ((int(p.stem.split("_")[1]), p) for p in logs)
                      if rank not in done and rank < tasks]
        stages.append(StageStatus(name, tasks, len(done), unfinished))
    job = next((JOB_OF_STAGE[s.name] for s in stages if s.name in JOB_OF_STAGE), "job")
    queued = still_queued(work_dir) if (work_dir / SLURM_JOBS).is_file() else []
    return JobStatus(job, work_dir, record.stat().st_mtime, stages, queued)


def status_report(out: str | Path) -> str:
    """The status of every job writing `out`, as text; a TaskError when there is no work folder to read."""
    folders = work_folders(out)
    if not folders:
        own = default_work_dir(remote.local_output(out)[0])
        raise TaskError(f"{out}: no work folder of a data job (looked for {own} and .*.work inside it and {out}): "
                        f"the job has not started, or it finished and removed "
                        f"it (run the same command again: it says 'up to date')")
    parts = []
    for status in map(job_status, folders):
        minutes = (time.time() - status.started) / 60
        head = (f"{status.job}: {status.done} of {status.tasks} tasks done ({status.work_dir}, started "
                f"{minutes:.0f} min ago)")
        rows = [[stage.name, stage.done, stage.tasks, len(stage.unfinished)] for stage in status.stages]
        text = [head, format_table(["stage", "done", "tasks", "started, not done"], rows)]
        for stage in status.stages:
            text += [f"  {stage.name} task {rank}: {line} (log {log})" for rank, line, log in stage.unfinished[:3]]
            if len(stage.unfinished) > 3:
                text.append(f"  {stage.name}: {len(stage.unfinished) - 3} more tasks started and not done")
        if status.queued:
            text.append(f"{len(status.queued)} Slurm jobs of the last submission still queued: "
                        + "; ".join(status.queued[:6]) + ("; ..." if len(status.queued) > 6 else ""))
        parts.append("\n".join(text))
    return "\n\n".join(parts)

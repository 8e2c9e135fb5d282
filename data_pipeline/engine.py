"""The distributed engine under the data stages: datatrove's executors, one pipeline definition everywhere.

The job of a data stage (clean, tokenizer, pack; job.py drives them) is a list of `Stage`s, each one datatrove
`PipelineStep` run as `tasks` independent tasks (task `rank` of `world_size` picks its share of the work).
`run_stages` hands them to datatrove's executors, chained so a stage starts when the previous one has finished:

    local   LocalExecutor (local_executor.py): `workers` processes on this machine; `local_tasks`/`rank_offset`
            run only some tasks here (several machines without a scheduler, each writing its own folder)
    slurm   datatrove's SlurmPipelineExecutor: one sbatch job array per stage, `afterok` dependencies
    ray     datatrove's RayPipelineExecutor (pip install "fuxi-pretrain[ray]"), on the cluster at $RAY_ADDRESS or
            one started for the run; the stages run one after the other, and the run waits for them

What datatrove gives every executor: a completion marker `<work>/logs/<stage>/completions/<rank>` written after
the task's outputs and stats, so a re-run skips finished tasks; per-task logs and stats (`stats.json`). Our
steps write every output to a temp name and rename it, so a task killed anywhere leaves nothing that looks
complete, and its re-run starts it over.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from datatrove.pipeline.base import PipelineStep

from fuxi.common.atomic import write_json
from fuxi.common.errors import ConfigError, InputError
from fuxi.common.typed_config import check_choices, require_at_least
from fuxi.data_pipeline import progress
from fuxi.data_pipeline.errors import TaskError

log = logging.getLogger(__name__)
Executor = Literal["local", "slurm", "ray"]
EXECUTORS = get_args(Executor)
MAX_DEFAULT_TASKS = 256  # the default --tasks on a cluster, at most (Slurm's MaxArraySize is often 1001)


@dataclass
class ExecutorConfig:
    executor: Executor = "local"
    # Tasks of the parallel stages (default: `workers`). The result does not depend on it.
    tasks: int | None = None
    # Tasks running at once on this machine (local) or in the whole job (slurm/ray; default: no limit).
    workers: int | None = None
    # local: run tasks [rank_offset, rank_offset + local_tasks) of the parallel stages here (-1: all).
    local_tasks: int = -1
    rank_offset: int = 0
    # slurm
    partition: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 4
    qos: str | None = None
    env_command: str | None = None  # e.g. "source /path/venv/bin/activate" (default: this interpreter's venv)
    sbatch_args: dict = field(default_factory=dict)
    progress: bool = True
    # slurm: write the job scripts (and print them) instead of calling sbatch
    dry_run: bool = False

    def validate(self) -> None:
        check_choices(self)
        require_at_least(self, 1, "tasks", "workers")
        require_at_least(self, 0, "rank_offset")
        if self.local_tasks != -1 and self.local_tasks < 1:
            raise ConfigError("local_tasks", f"must be -1 (all tasks) or >= 1, got {self.local_tasks}")
        if self.executor == "slurm" and not self.partition:
            raise ConfigError("partition", "the slurm executor needs --partition")

    @property
    def num_workers(self) -> int:
        if self.workers:
            return self.workers
        return (os.cpu_count() or 1) if self.executor == "local" else -1

    @property
    def num_tasks(self) -> int:
        return self.tasks or max(1, self.num_workers)

    def tasks_for(self, parallelism: int) -> int:
        """Tasks of the parallel stages of a job whose inputs can keep `parallelism` tasks busy: --tasks when
        given; else locally one per worker; on a cluster `parallelism` (e.g. one per input chunk or file), at
        most MAX_DEFAULT_TASKS (a Slurm array, a Ray job)."""
        if self.tasks:
            return self.tasks
        if self.executor == "local":
            return self.num_tasks
        return max(1, min(parallelism, MAX_DEFAULT_TASKS))

    @property
    def partial(self) -> bool:
        """True when this machine runs only some of the tasks (the rest run elsewhere)."""
        return self.local_tasks != -1 and self.local_tasks < self.num_tasks


@dataclass
class Stage:
    name: str
    step: PipelineStep
    tasks: int
    # Parallel stages follow --tasks and may be split across machines; the others run whole, everywhere.
    parallel: bool = True


class TaskStep(PipelineStep):
    """Base of our pipeline steps: `run_task(rank, world_size)` does task rank's share of the work and returns
    its figures for the job's report (or None): they are saved with the task's seconds in
    `<work>/taskstats/<stage>/<rank>.json`. Bad input (a DataError, which names its file and line) is raised as
    it is; any other error is re-raised naming the task and `describe(rank, world_size)` (its inputs). `job`:
    the settings of the job the step belongs to (job.py; `job.work_dir` is its work folder), pickled with the
    step for Slurm and Ray workers."""

    type = "fuxi"

    def __init__(self, job):
        super().__init__()
        self.job = job

    def run_task(self, rank: int, world_size: int) -> dict | None:
        raise NotImplementedError

    def describe(self, rank: int, world_size: int) -> str:
        return ""

    def workload(self, rank: int, world_size: int) -> tuple[int | None, int | None]:
        """(documents, bytes) task `rank` will work through, each None when not known without doing the work:
        the total of the stage's progress bar (tasks report what they did with `advance`)."""
        return None, None

    def advance(self, documents: int, nbytes: int = 0) -> None:
        """Report work done to the stage's progress bar (documents and bytes, rate and ETA)."""
        progress.advance(documents, nbytes)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        started = time.time()
        try:
            figures = self.run_task(rank, world_size)
        except InputError:  # bad input names itself; anything else gets the task's name
            raise
        except Exception as err:
            where = self.describe(rank, world_size)
            raise TaskError(f"{self.name}: task {rank} of {world_size}{f' ({where})' if where else ''}: "
                            f"{err}") from err
        if figures is not None:
            write_json(Path(self.job.work_dir) / "taskstats" / self.name / f"{rank:05d}.json",
                       {"seconds": round(time.time() - started, 3), **figures})
        yield from ()

    def count(self, name: str, value: int = 1) -> None:
        """A counter in datatrove's per-task stats (`<work>/logs/<stage>/stats/`)."""
        self.stat_update(name, value=value, unit="task")


def deal(weights: list[int], world_size: int) -> list[list[int]]:
    """Item indices per task: the heaviest item first, to the least loaded task (deterministic; the results
    of our stages never depend on it, only the balance does)."""
    tasks: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        t = min(range(world_size), key=lambda k: (load[k], k))
        tasks[t].append(i)
        load[t] += weights[i]
    return [sorted(t) for t in tasks]


# --- building and running executors ---------------------------------------------------------------------------

def _slurm_env_command(cfg: ExecutorConfig) -> str:
    if cfg.env_command:
        return cfg.env_command
    activate = Path(sys.prefix) / "bin" / "activate"
    return f"source {activate}" if activate.is_file() else ""


def build_executors(stages: list[Stage], work_dir: str | Path, cfg: ExecutorConfig) -> list:
    """One datatrove executor per stage, each depending on the one before."""
    cfg.validate()
    work_dir = Path(work_dir)
    executors = []
    for stage in stages:
        logging_dir = str(work_dir / "logs" / stage.name)
        prev = executors[-1] if executors else None
        if cfg.executor == "local":
            # imported when used, like the slurm and ray executors: datatrove's executors import
            # huggingface_hub (0.3 s), which the CLI's start-up need not pay
            from fuxi.data_pipeline.local_executor import LocalExecutor
            local_tasks, offset = (cfg.local_tasks, cfg.rank_offset) if stage.parallel and cfg.partial \
                else (-1, 0)
            workers = min(cfg.num_workers, stage.tasks)
            step = stage.step
            executors.append(LocalExecutor(
                [step], tasks=stage.tasks, workers=workers, logging_dir=logging_dir, local_tasks=local_tasks,
                local_rank_offset=offset, progress=cfg.progress, stage=stage.name,
                describe=lambda rank, step=step, n=stage.tasks: step.describe(rank, n),
                workload=lambda rank, step=step, n=stage.tasks: step.workload(rank, n)))
        elif cfg.executor == "slurm":
            from datatrove.executor.slurm import SlurmPipelineExecutor
            executors.append(SlurmPipelineExecutor(
                [stage.step], tasks=stage.tasks, workers=cfg.num_workers, time=cfg.time, partition=cfg.partition,
                cpus_per_task=cfg.cpus_per_task, mem_per_cpu_gb=cfg.mem_per_cpu_gb, qos=cfg.qos,
                job_name=f"fuxi-{stage.name}", env_command=_slurm_env_command(cfg), logging_dir=logging_dir,
                slurm_logs_folder=str(work_dir / "slurm_logs" / stage.name),
                # a failed task cancels the jobs after it instead of leaving them pending forever
                # (DependencyNeverSatisfied), so the chain ends and a re-run can resume it
                sbatch_args={"kill-on-invalid-dep": "yes", **cfg.sbatch_args},
                depends=prev, mail_user=None))
        else:
            try:
                from datatrove.executor.ray import RayPipelineExecutor
                import ray  # noqa: F401
            except ImportError:
                raise ConfigError("executor", "ray is not installed; pip install 'fuxi-pretrain[ray]'") from None
            # no `depends`: run_stages runs the stages one after the other and stops at a failed one (datatrove
            # would wait for a failed dependency forever, polling every 2 minutes)
            executors.append(RayPipelineExecutor(
                [stage.step], tasks=stage.tasks, workers=cfg.num_workers, logging_dir=logging_dir,
                cpus_per_task=cfg.cpus_per_task, mem_per_cpu_gb=cfg.mem_per_cpu_gb))
    return executors


@contextmanager
def _slurm_launches(submit: bool):
    """Every sbatch call datatrove makes inside the block (the stages' job arrays and their stats-merging jobs),
    as (script, sbatch arguments, job id); with submit=False nothing reaches sbatch (ids DRYRUN-<n>)."""
    import datatrove.executor.slurm as slurm
    calls: list[tuple[str, tuple, str]] = []
    original = slurm.launch_slurm_job

    def launch(contents: str, retriever, *args) -> str:
        job_id = original(contents, retriever, *args) if submit else f"DRYRUN-{len(calls) + 1}"
        calls.append((contents, args, str(job_id)))
        return job_id

    slurm.launch_slurm_job = launch
    try:
        yield calls
    finally:
        slurm.launch_slurm_job = original


def render_slurm_scripts(executors: list) -> list[dict]:
    """What `sbatch` would be given for each stage, without submitting: datatrove's own launch path runs with its
    sbatch call replaced by a recorder (job ids DRYRUN-<n>). Each entry: the script, the sbatch arguments
    (dependencies) and where datatrove saved the script."""
    with _slurm_launches(submit=False) as calls:
        executors[-1].run()
    arrays = [(c, a) for c, a, _ in calls if "launch_pickled_pipeline" in c]  # the stats-merging jobs aside
    return [{"script": c, "sbatch_args": list(a), "job_id": e.job_id,
             "path": e.logging_dir.resolve_paths("launch_script.slurm")} for (c, a), e in zip(arrays, executors)]


SLURM_JOBS = "slurm_jobs.json"  # in the work folder: the jobs of the last submission


def queued_slurm_jobs(job_ids: list[str]) -> list[str]:
    """Those of `job_ids` still in Slurm's queue, as "id STATE (reason)"."""
    if not job_ids:
        return []
    result = subprocess.run(["squeue", "-h", "-o", "%i %T (%r)", "-j", ",".join(job_ids)], capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        raise TaskError(f"squeue -j {','.join(job_ids)} failed: {result.stderr.strip()}")
    return result.stdout.splitlines()


def still_queued(work_dir: Path) -> list[str]:
    """The jobs of the last Slurm submission from `work_dir` still in the queue (none without a submission)."""
    record = work_dir / SLURM_JOBS
    if not record.is_file():
        return []
    return queued_slurm_jobs(json.loads(record.read_text(encoding="utf-8")).get("jobs", []))


def refuse_while_queued(work_dir: Path) -> None:
    """A re-run while the last submission's jobs are still queued would submit a second chain writing the same
    folders: refuse, naming them. (A chain whose task failed or was cancelled ends by itself: its later jobs are
    submitted with --kill-on-invalid-dep=yes.)"""
    queued = still_queued(work_dir)
    if queued:
        ids = " ".join(q.split()[0].split("_")[0] for q in queued)
        raise TaskError(f"{work_dir}: {len(queued)} jobs of the last submission are still queued "
                        f"({'; '.join(queued[:4])}{'; ...' if len(queued) > 4 else ''}): wait for them to finish, "
                        f"or cancel them (scancel {' '.join(dict.fromkeys(ids.split()))}), then run the same "
                        f"command again")


def unfinished_tasks(stage: Stage, executor) -> tuple[list[int], str]:
    """The tasks of `stage` without a completion marker, and what their logs say: "task 3: <the log's last
    line> (log <path>)" for up to three of those that ran (a task that failed, or was killed, or never started
    because a stage before it failed has none)."""
    missing = executor.get_incomplete_ranks()
    logs = [Path(executor.logging_dir.resolve_paths(f"logs/task_{rank:05d}.log")) for rank in missing]
    ran = [(rank, p) for rank, p in zip(missing, logs) if p.is_file()]
    detail = "; ".join(f"task {rank}: {last_line(p)} (log {p})" for rank, p in ran[:3])
    return missing, detail + ("; ..." if len(ran) > 3 else "")


def report_unfinished(stages: list[Stage], executors: list, work_dir: Path) -> None:
    """Before a re-submission: name the tasks of the last one that did not finish, with their logs (a task that
    failed, was cancelled, or never started because one before it failed)."""
    if not (work_dir / SLURM_JOBS).is_file():
        return
    for stage, executor in zip(stages, executors):
        missing, detail = unfinished_tasks(stage, executor)
        if missing:
            log.warning("%s: %d of %d tasks did not finish in the last submission%s; submitting them again",
                        stage.name, len(missing), stage.tasks, f" ({detail})" if detail else "")


def last_line(path: Path) -> str:
    """The last non-empty line of a task's log: its error when the task failed."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "empty log"


def connect_ray() -> None:
    """Join the Ray cluster at $RAY_ADDRESS (`ray start --head` prints it), else start one on this machine for
    this run. Task output stays in the task logs (`<work>/logs/<stage>/logs/`), not on this terminal."""
    import ray
    from loguru import logger
    # datatrove's chatter on the driver (a warning per stage that a local logging folder must be shared by every
    # node, stats banners, each failed task's traceback at DEBUG) off this terminal: a failed task is reported in
    # one line naming its log (run_ray_stages), the stages' times at INFO
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("ray: joining the cluster at %s (RAY_ADDRESS)", address)
    else:
        log.info("ray: no RAY_ADDRESS; starting a Ray cluster on this machine for this run")
    ray.init(address=address or None, log_to_driver=False, logging_level=logging.WARNING)


def run_ray_stages(stages: list[Stage], executors: list) -> None:
    """Run the stages on Ray one after the other; a stage with a task that did not finish (its error is in its
    log) ends the job with a TaskError naming the task and its log. datatrove has by then run the stage's other
    tasks and stopped every worker of the stage; a re-run of the same command runs only the unfinished tasks."""
    connect_ray()
    for stage, executor in zip(stages, executors):
        started = time.time()
        executor.run()
        missing, detail = unfinished_tasks(stage, executor)
        if missing:
            raise TaskError(f"{stage.name}: {len(missing)} of {stage.tasks} tasks failed on Ray "
                            f"({detail or 'no task log: the workers died before writing one'}); fix the cause and "
                            f"run the same command again: it runs only the unfinished tasks")
        log.info("%s: %d task%s in %.1fs", stage.name, stage.tasks, "s" if stage.tasks > 1 else "",
                 time.time() - started)


def run_stages(stages: list[Stage], work_dir: str | Path, cfg: ExecutorConfig) -> bool:
    """Run (local) or submit (slurm, ray) the stages in order. True when they all ran here to the end; False
    when they were submitted to a cluster or only some tasks ran on this machine."""
    executors = build_executors(stages, work_dir, cfg)
    if cfg.executor == "local":
        for stage, executor in zip(stages, executors):
            started = time.time()
            executor.run()
            if stage.parallel and cfg.partial:
                # a later stage needs every task's output; the other machines run theirs
                log.info("%s: tasks %d-%d of %d done on this machine", stage.name, cfg.rank_offset,
                         cfg.rank_offset + cfg.local_tasks - 1, stage.tasks)
                return False
            log.info("%s: %d task%s in %.1fs", stage.name, stage.tasks, "s" if stage.tasks > 1 else "",
                     time.time() - started)
        return True
    if cfg.executor == "slurm":
        if cfg.dry_run:
            scripts = render_slurm_scripts(executors)
            for stage, script in zip(stages, scripts):
                print(f"# --- {stage.name}: sbatch {' '.join(script['sbatch_args'])} {script['path']}\n"
                      f"{script['script']}")
            return False
        refuse_while_queued(Path(work_dir))
        report_unfinished(stages, executors, Path(work_dir))
        with _slurm_launches(submit=True) as calls:
            executors[-1].run()  # launches the whole chain through `depends`
        ids = [str(e.job_id) for e in executors]  # -1: the stage had finished, nothing submitted for it
        write_json(Path(work_dir) / SLURM_JOBS, {"stages": {s.name: i for s, i in zip(stages, ids)},
                                                 "jobs": [job_id for _, _, job_id in calls]})
        submitted = [i for i in ids if i != "-1"]
        print(f"submitted {len(submitted)} slurm job arrays ({', '.join(submitted)}); run the same command again "
              f"when they have finished (or if one fails) to go on or resume")
        return False
    run_ray_stages(stages, executors)
    return True

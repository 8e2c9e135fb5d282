"""The local executor of the engine: datatrove's LocalPipelineExecutor with a standard-library process pool.

When a worker dies (out-of-memory kill, segfault) the stage fails naming the task and its inputs, where
multiprocessing's Pool would wait forever for the lost result. datatrove's per-task logging goes to its log
files only (`<work>/logs/<stage>/logs/`); a progress bar (progress.py) shows the stage's documents and bytes,
with rate and ETA, instead.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from copy import deepcopy

from datatrove.executor.local import LocalPipelineExecutor
from datatrove.utils.stats import PipelineStats
from fuxi.data_pipeline.errors import TaskError
from fuxi.data_pipeline.progress import StageProgress

log = logging.getLogger(__name__)


_FORKED: dict = {}  # the executor a forked worker runs tasks of (set before the pool forks)


def _run_forked(rank: int) -> PipelineStats:
    return _FORKED["executor"]._run_for_rank(rank)


def _quiet_datatrove() -> None:
    """datatrove logs warnings and errors only, on one line each (its console output is per task otherwise)."""
    from loguru import logger
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{level}: {message}")


def _file_only_task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    """datatrove's per-task log file (logs/task_<rank>.log, everything) without its console copy: a failed
    task is reported once, by the executor, as one line naming the task or the bad input."""
    from loguru import logger
    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(logfile, colorize=False, level="DEBUG",
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}")
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


class LocalExecutor(LocalPipelineExecutor):
    """LocalPipelineExecutor with a fork-based standard-library pool (see the module docstring)."""

    def __init__(self, *args, progress: bool = True, stage: str = "", describe=None, workload=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.stage = stage
        self.describe = describe or (lambda rank: "")
        self.workload = workload or (lambda rank: (None, None))

    def _totals(self, ranks: list[int]) -> tuple[int | None, int | None]:
        """(documents, bytes) the tasks `ranks` will work through; each None unless known for every task."""
        loads = [self.workload(rank) for rank in ranks] if self.progress else []
        return tuple(sum(x[i] for x in loads) if loads and all(x[i] is not None for x in loads) else None
                     for i in range(2))

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> PipelineStats:
        marker = f"running/{rank:05d}"
        with self.logging_dir.open(marker, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "started": time.time()}))
        import datatrove.executor.base as base
        original, base.add_task_logger = base.add_task_logger, _file_only_task_logger
        try:
            return super()._run_for_rank(rank, local_rank=local_rank, node_rank=node_rank)
        finally:
            base.add_task_logger = original
            _quiet_datatrove()

    def _dead_tasks(self, ranks: list[int]) -> list[int]:
        return [r for r in ranks if self.logging_dir.isfile(f"running/{r:05d}") and not self.is_rank_completed(r)]

    def _run_forked(self, ranks: list[int], workers: int, bar: StageProgress) -> list[PipelineStats]:
        """The tasks on a pool of forked workers; the bar is refreshed while they run."""
        stats = []
        _FORKED["executor"] = self
        try:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                futures = {pool.submit(_run_forked, rank): rank for rank in ranks}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        err = fut.exception()
                        if isinstance(err, BrokenProcessPool):
                            dead = self._dead_tasks(ranks) or [futures[fut]]
                            what = "; ".join(f"task {r} of {self.world_size} ({self.describe(r)})" for r in dead)
                            raise TaskError(f"{self.stage}: a worker process died (killed, or out of memory?) "
                                            f"while running {what}; run the same command again to resume "
                                            f"(finished tasks are skipped)") from None
                        if err is not None:
                            for other in futures:
                                other.cancel()
                            raise err
                        stats.append(fut.result())
                        bar.task_done()
                    bar.refresh()
        finally:
            _FORKED.clear()
        return stats

    def run(self) -> PipelineStats:
        _quiet_datatrove()
        self._launched = True
        ranks = self.get_incomplete_ranks(range(self.local_rank_offset, self.local_rank_offset + self.local_tasks))
        if not ranks:
            log.info("%s: all %d tasks already complete", self.stage, self.local_tasks)
            return PipelineStats()
        if len(ranks) < self.local_tasks:
            log.info("%s: skipping %d finished tasks", self.stage, self.local_tasks - len(ranks))
        self.save_executor_as_json()
        stats = []
        workers = min(self.workers, len(ranks))
        with StageProgress(self.stage, len(ranks), self._totals(ranks), enabled=self.progress) as bar:
            if workers <= 1:
                pipeline = self.pipeline
                for rank in ranks:
                    self.pipeline = deepcopy(pipeline)
                    stats.append(self._run_for_rank(rank))
                    bar.task_done()
                self.pipeline = pipeline
            else:
                stats = self._run_forked(ranks, workers, bar)
        merged = sum(stats, start=PipelineStats())
        with self.logging_dir.open("stats.json", "wt") as f:
            merged.save_to_disk(f)
        return merged

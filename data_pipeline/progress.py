"""The progress of the running local stage in documents and bytes, with rate and ETA.

Tasks run in forked worker processes (local_executor.py); each reports what it has done through `advance`
(engine.TaskStep.advance) into two counters in shared memory, which the parent reads into a tqdm bar. The bar
counts bytes when every task's workload in bytes is known (clean: its chunks' input bytes), else documents
(pack: its parts' documents), else tasks; the other measure and its rate show beside it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time

from tqdm import tqdm

_CURRENT: list["StageProgress"] = []  # the bar of the stage running now (inherited by forked workers)


def advance(documents: int, nbytes: int) -> None:
    """Count work a task has done (a no-op outside a stage with a bar)."""
    if _CURRENT:
        _CURRENT[0].add(documents, nbytes)


class StageProgress:
    """One stage's bar: `totals` is (documents, bytes) of the tasks to run, each None when not known."""

    def __init__(self, stage: str, tasks: int, totals: tuple[int | None, int | None], enabled: bool = True):
        self.counts = mp.Array("q", 2)  # documents, bytes: shared with the forked workers
        self.owner = os.getpid()
        self.tasks = tasks
        self.tasks_done = 0
        self.started = time.time()
        docs, nbytes = totals
        self.measure = "bytes" if nbytes else "documents" if docs else "tasks"
        total = {"bytes": nbytes, "documents": docs, "tasks": tasks}[self.measure]
        unit = {"bytes": dict(unit="B", unit_scale=True, unit_divisor=1024), "documents": dict(unit="doc"),
                "tasks": dict(unit="task")}[self.measure]
        self.bar = tqdm(total=total, desc=stage, disable=not enabled, leave=False, mininterval=0.5, **unit)
        self.shown = 0.0

    def __enter__(self) -> "StageProgress":
        _CURRENT[:] = [self]
        return self

    def __exit__(self, *exc) -> None:
        _CURRENT.clear()
        self.bar.close()

    def add(self, documents: int, nbytes: int) -> None:
        with self.counts.get_lock():
            self.counts[0] += documents
            self.counts[1] += nbytes
        if os.getpid() == self.owner:  # tasks run in this process (one worker): show it now
            self.refresh()

    def task_done(self) -> None:
        self.tasks_done += 1
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Show the counters (at most twice a second unless forced)."""
        now = time.time()
        if self.bar.disable or (not force and now - self.shown < 0.5):
            return
        self.shown = now
        docs, nbytes = self.counts[0], self.counts[1]
        self.bar.n = {"bytes": nbytes, "documents": docs, "tasks": self.tasks_done}[self.measure]
        seconds = max(now - self.started, 1e-9)
        shown = []  # what the bar itself does not count (stages that count nothing show tasks only)
        if docs and self.measure != "documents":
            shown.append(f"{docs:,} docs ({docs / seconds:,.0f}/s)")
        if nbytes and self.measure != "bytes":
            shown.append(f"{nbytes / 1e6:,.1f} MB ({nbytes / 1e6 / seconds:,.1f} MB/s)")
        self.bar.set_postfix_str(", ".join(shown + [f"tasks {self.tasks_done}/{self.tasks}"]), refresh=True)

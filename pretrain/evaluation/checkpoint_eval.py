"""Evaluate one checkpoint: what `fuxi eval --checkpoint` runs, and what the trajectory runs per checkpoint."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

from fuxi.common.typed_config import check_choices
from fuxi.pretrain.evaluation.benchmarks import DEFAULT_TASKS, EvalTask, resolve_tasks
from fuxi.pretrain.evaluation.harness import build_report, evaluate, harness_task_names
from fuxi.pretrain.evaluation.local_tasks import tasks_digest
from fuxi.pretrain.evaluation.model_source import (Dtype, build_harness_lm, inspect_checkpoint, resolve_device,
                                                   resolve_dtype)


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    languages: list[str] | None = None
    # None: each benchmark's own shot count (the report's).
    num_fewshot: int | None = None
    # Documents per task (None: all).
    limit: int | None = None
    tokenizer: str | None = None
    device: str = "auto"
    dtype: Dtype = "auto"
    batch_size: int | str = 8
    trust_remote_code: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_choices(self)

    def resolve(self) -> list[EvalTask]:
        return resolve_tasks(self.tasks, self.languages, self.num_fewshot, harness_task_names=harness_task_names)

    def fingerprint(self, tasks: list[EvalTask]) -> str:
        """What decides the scores (the dtype actually used, not the device or batch size): results cached under
        another fingerprint are not reused."""
        import lm_eval

        dtype = str(resolve_dtype(self.dtype, resolve_device(self.device))).replace("torch.", "")
        key = {"tasks": [asdict(t) for t in tasks], "limit": self.limit, "dtype": dtype,
               "tokenizer": self.tokenizer, "lm_eval": lm_eval.__version__,
               "local_tasks": tasks_digest() if any(t.local for t in tasks) else None}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def evaluate_checkpoint(path: str, settings: EvalSettings, tasks: list[EvalTask] | None = None) -> tuple[dict, dict]:
    """-> (our report: rows per task and language, summary; the harness's own results dict)."""
    tasks = tasks if tasks is not None else settings.resolve()
    source = inspect_checkpoint(path, settings.tokenizer)
    started = time.time()
    lm = build_harness_lm(source, settings.device, settings.dtype, settings.batch_size, settings.trust_remote_code)
    results = evaluate(lm, tasks, settings.limit, environment_info=True)
    report = build_report(results, tasks, {
        "checkpoint": str(path), "source": source.kind, "model_type": source.model_type,
        "dtype": str(lm.model.dtype).replace("torch.", "") if hasattr(lm.model, "dtype") else settings.dtype,
        "limit": settings.limit, "seconds": round(time.time() - started, 1)})
    return report, results

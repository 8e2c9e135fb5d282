"""Run lm-evaluation-harness through its Python API and turn its results into one row per task and language.

`evaluate(lm, tasks)` loads the tasks with the harness's TaskManager (the shipped local tasks through
`include_path`; the harness's own task index only when a task needs it, since indexing it takes ~20 s), sets each
task's shot count, and runs `lm_eval.simple_evaluate` (or, for in-loop evaluation, the lower-level
`lm_eval.evaluator.evaluate`, which skips collecting the environment description, a `pip list` per call, on
tasks loaded once per run).
"""
from __future__ import annotations

import functools
import logging
import math
import statistics

from fuxi.common.tables import format_table
from fuxi.pretrain.evaluation.benchmarks import BENCHMARKS, EvalTask
from fuxi.pretrain.evaluation.errors import EvalError
from fuxi.pretrain.evaluation.local_tasks import TASKS_DIR
from fuxi.pretrain.evaluation.model_adapter import HarnessModel

FEWSHOT_SEED = 1234  # the harness's default fewshot_random_seed
SHOWN_METRICS = ("acc", "acc_norm", "bits_per_byte", "byte_perplexity")


class _LocalDatasetNotice(logging.Filter):
    """The harness warns once per task that uses `custom_dataset` (as the shipped local tasks do) that kwargs
    could be passed through --metadata: true and irrelevant here, and 53 lines long for `fuxi_local`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _quiet_harness() -> None:
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _LocalDatasetNotice) for f in task_logger.filters):
        task_logger.addFilter(_LocalDatasetNotice())


@functools.lru_cache(maxsize=2)
def task_manager(with_harness_tasks: bool):
    """The harness's TaskManager over the local tasks, and the harness's own when asked; built once per process
    (indexing the harness's ~15,000 task files takes about 20 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=with_harness_tasks)


def harness_task_names() -> list[str]:
    return task_manager(with_harness_tasks=True).all_tasks


def load_tasks(tasks: list[EvalTask]) -> tuple[object, list]:
    """-> (TaskManager, the harness's Task objects with their shot counts and few-shot seed set)."""
    _quiet_harness()
    manager = task_manager(with_harness_tasks=any(not t.local for t in tasks))
    try:
        loaded = manager.load([t.name for t in tasks])
    except KeyError as err:
        raise EvalError(f"--tasks: {err.args[0] if err.args else err}") from None
    shots = {t.name: t.num_fewshot for t in tasks}
    task_objects = []
    for name, task in loaded["tasks"].items():
        wanted = shots.get(name)
        if wanted is not None:
            task.set_config(key="num_fewshot", value=wanted)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
        task_objects.append(task)
    return manager, task_objects


def refuse_generation(tasks: list[EvalTask]) -> None:
    """Our checkpoints score log-likelihoods through HarnessModel but do not generate text: a task (or a member
    of a group or tag) whose YAML says `output_type: generate_until` is refused from the task index, before any
    dataset is built or model loaded (pretrain/preflight.py checks in-loop tasks with it)."""
    manager = task_manager(with_harness_tasks=any(not t.local for t in tasks))
    for task in tasks:
        generating = _generating_task(manager.task_index, task.name, set())
        if generating is not None:
            raise EvalError(f"--tasks: {generating} generates text, which our checkpoints do not through the "
                            "harness; export with `fuxi convert to-hf` and evaluate the export")


def _generating_task(index: dict, name: str, seen: set) -> str | None:
    """The first task under `name` (a task, group or tag of the harness's index) that generates text."""
    entry = index.get(name)
    if entry is None or name in seen:
        return None
    seen.add(name)
    cfg = entry.cfg or {}
    if entry.kind.name == "TAG":
        members = sorted(entry.tags)
    elif entry.kind.name == "GROUP":
        members = cfg.get("task") or []
        members = members if isinstance(members, list) else [members]
    else:
        return name if cfg.get("output_type") == "generate_until" else None
    for member in members:
        if isinstance(member, dict):  # an inline task or group config
            if member.get("output_type") == "generate_until":
                return str(member.get("task"))
            member = member.get("task") if isinstance(member.get("task"), str) else member.get("group")
        if isinstance(member, str) and (found := _generating_task(index, member, seen)) is not None:
            return found
    return None


def evaluate(lm, tasks: list[EvalTask], limit: int | None = None, environment_info: bool = True,
             loaded: tuple[object, list] | None = None) -> dict:
    """Run the harness on `tasks`; returns its results dict (without per-sample logs). `loaded`: what
    `load_tasks(tasks)` returned, to reuse tasks built before (in-loop evaluation builds them once)."""
    import lm_eval
    from lm_eval.evaluator import evaluate as harness_evaluate

    if isinstance(getattr(lm, "model", None), HarnessModel):
        refuse_generation(tasks)
    manager, task_objects = loaded if loaded is not None else load_tasks(tasks)
    for task in task_objects:  # reused tasks: the same few-shot examples at every evaluation
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    if environment_info:
        return lm_eval.simple_evaluate(model=lm, tasks=task_objects, task_manager=manager, limit=limit,
                                       log_samples=False, fewshot_random_seed=FEWSHOT_SEED)
    return harness_evaluate(lm=lm, task_dict=manager.load(task_objects), limit=limit, log_samples=False)


def _metrics(task_result: dict) -> dict:
    """{"acc,none": x, "acc_stderr,none": s, ...} -> {"acc": x, "acc_stderr": s}: the unfiltered values."""
    out = {}
    for key, value in task_result.items():
        metric, _, filter_name = key.partition(",")
        if filter_name == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric] = float(value)
    return out


def build_report(results: dict, tasks: list[EvalTask], extra: dict | None = None) -> dict:
    """Rows per task (benchmark, language, shots, samples, metrics) and a per-benchmark mean of its metric."""
    by_name = {t.name: t for t in tasks}
    rows = []
    for name, task_result in sorted(results["results"].items()):
        if name in results.get("groups", {}):
            continue
        task = by_name.get(name) or EvalTask(name, name, "-", None, None, False)
        samples = results.get("n-samples", {}).get(name, {})
        rows.append({"task": name, "benchmark": task.benchmark, "language": task.language,
                     "num_fewshot": results.get("n-shot", {}).get(name, task.num_fewshot),
                     "samples": samples.get("effective"), "metric": task.metric,
                     "metrics": _metrics(task_result)})
    rows.sort(key=lambda r: (r["benchmark"], r["language"], r["task"]))
    summary = {}
    for benchmark in dict.fromkeys(r["benchmark"] for r in rows):
        metric = BENCHMARKS[benchmark].metric if benchmark in BENCHMARKS else None
        values = [r["metrics"][metric] for r in rows if r["benchmark"] == benchmark and metric in r["metrics"]]
        values = [v for v in values if math.isfinite(v)]
        if metric and values:
            summary[benchmark] = {"metric": metric, "mean": statistics.fmean(values), "languages": len(values)}
    return {**(extra or {}), "lm_eval_version": results.get("lm_eval_version") or _lm_eval_version(),
            "rows": rows, "summary": summary}


def _lm_eval_version() -> str:
    import lm_eval

    return lm_eval.__version__


def format_report(report: dict) -> str:
    """Table by benchmark and language, then the per-benchmark means."""
    shown = [m for m in SHOWN_METRICS if any(m in r["metrics"] for r in report["rows"])]
    table_rows = [[r["benchmark"], r["language"], r["num_fewshot"] if r["num_fewshot"] is not None else "-",
                   r["samples"] if r["samples"] is not None else "-",
                   *[r["metrics"].get(m, "-") for m in shown]] for r in report["rows"]]
    text = format_table(["benchmark", "lang", "shots", "n", *shown], table_rows)
    if report["summary"]:
        summary_rows = [[name, s["metric"], s["languages"], s["mean"]] for name, s in report["summary"].items()]
        text += "\n\n" + format_table(["benchmark", "metric", "languages", "mean"], summary_rows)
    return text

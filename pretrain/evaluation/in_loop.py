"""Downstream evaluation during training (`logging.eval_every_steps`), as OLMo-core runs in-loop evaluators: the
live model, handed to lm-evaluation-harness through HarnessModel, on the shipped local tasks by default.

Who runs it: under ZeRO 0-2 every rank holds the full parameters, so rank 0 evaluates and the others wait at a
barrier. Under ZeRO-3 each rank holds a shard and the forward gathers every layer collectively, so every rank
runs the same evaluation in lockstep (the harness's batching is deterministic, so the forwards match) and rank 0
reports; gathering the whole model on rank 0 instead would need its full size in memory. The evaluation leaves
training exactly as it was: RNG states are restored and the model is put back in training mode, so a run with
in-loop evaluation trains bit-identically to one without.
"""
from __future__ import annotations

import logging

from fuxi.pretrain.checkpointing import capture_rng_state, restore_rng_state
from fuxi.pretrain.distributed import barrier
from fuxi.pretrain.evaluation.benchmarks import resolve_tasks
from fuxi.pretrain.evaluation.errors import EvalError
from fuxi.pretrain.evaluation.harness import build_report, evaluate, harness_task_names, load_tasks, refuse_generation

log = logging.getLogger("fuxi.train")


def check_eval_config(cfg) -> None:
    """For pretrain/preflight.py, before anything is loaded: lm-eval is installed, every task name resolves and
    none generates text (TrainConfig itself checks that run.tokenizer is set)."""
    from fuxi.common.errors import ConfigError

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("logging.eval_every_steps", "in-loop evaluation needs lm-evaluation-harness; install it "
                          "with `pip install -e .[eval]`", cfg.source) from None
    try:
        refuse_generation(resolve_tasks(cfg.logging.eval_tasks, cfg.logging.eval_languages,
                                        harness_task_names=harness_task_names))
    except EvalError as err:
        raise ConfigError("logging.eval_tasks", str(err), cfg.source) from None


class InLoopEvaluator:
    def __init__(self, cfg, engine, ctx):
        self.cfg, self.engine, self.ctx = cfg, engine, ctx
        self.every_rank = cfg.parallelism.zero_stage == 3
        self.tasks = resolve_tasks(cfg.logging.eval_tasks, cfg.logging.eval_languages,
                                   harness_task_names=harness_task_names)
        self._lm = None
        self._loaded = None  # the harness's tasks, built on first use (local ones read their data from disk)

    def due(self, step: int) -> bool:
        return step % self.cfg.logging.eval_every_steps == 0 or step == self.cfg.schedule.total_steps

    def _harness_lm(self):
        if self._lm is None:
            from fuxi.pretrain.evaluation.model_source import our_model_lm

            self._lm = our_model_lm(self.engine.module, self.cfg.model, self.cfg.run.tokenizer, self.ctx.device,
                                    self.cfg.logging.eval_batch_size, name=self.cfg.run.output_dir)
        return self._lm

    def run(self, step: int) -> dict | None:
        """Collective. Returns the report on rank 0 (None elsewhere)."""
        report = None
        if self.every_rank or self.ctx.is_main:
            module = self.engine.module
            was_training = module.training
            rng = capture_rng_state()
            try:
                module.eval()
                self._loaded = self._loaded or load_tasks(self.tasks)
                results = evaluate(self._harness_lm(), self.tasks, self.cfg.logging.eval_limit,
                                   environment_info=False, loaded=self._loaded)
                report = build_report(results, self.tasks)
            finally:
                module.train(was_training)
                restore_rng_state(rng)
        barrier()
        if not self.ctx.is_main:
            return None
        log.info("eval @ %d: %s", step, "  ".join(f"{name} {s['metric']} {s['mean']:.4f}"
                                                   for name, s in report["summary"].items()))
        return report


def eval_metrics(report: dict) -> dict:
    """The report as metrics.jsonl / TensorBoard fields: {benchmark: {"<metric>": mean, "<lang>": {metric: v}}}."""
    out: dict = {}
    for name, summary in report["summary"].items():
        out.setdefault(name, {})[summary["metric"]] = summary["mean"]
    for row in report["rows"]:
        out.setdefault(row["benchmark"], {})[row["language"]] = {
            k: v for k, v in row["metrics"].items() if not k.endswith("_stderr")}
    return out

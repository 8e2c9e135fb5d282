"""The training loop, in the manner of torchtitan's Trainer: `Trainer.__init__` sets a run up (process group,
data, model, stage, engine, resume), `train_step` is one optimizer step, `run` loops over steps (logging,
checkpoints, validation, evaluation) and `finish` ends the run (final validation, the stage's report, export).

DeepSpeed owns the parallelism (ZeRO 0-3, gradient accumulation, clipping, mixed precision); the loop owns the
schedule, data, metrics, checkpoints and resume; the stage (pretrain/stages/) owns the data, what trains and
the loss. The loop knows no stage by name.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fuxi.model import build_model
from fuxi.pretrain.checkpointing import CheckpointManager, capture_rng_state, restore_rng_state
from fuxi.pretrain.config import TrainConfig
from fuxi.pretrain.data import TrainData
from fuxi.pretrain.distributed import all_reduce_sum, any_rank, barrier, build_engine, init_distributed
from fuxi.pretrain.estimates import device_peak_tflops
from fuxi.pretrain.estimates import flops_per_token as estimated_flops_per_token
from fuxi.pretrain.metrics import (LanguageLoss, MetricsLogger, SpeedMonitor, console_line, memory_stats,
                                   per_language_report, plot_loss_per_language)
from fuxi.pretrain.preflight import check_run_config
from fuxi.pretrain.schedule import global_batch_at, lr_at
from fuxi.pretrain.stages import build_stage
from fuxi.pretrain.validation import evaluate_per_language

log = logging.getLogger("fuxi.train")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient (`fuxi pretrain` exits with code 3)."""


class PreemptionSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step and exits.

    Installed for the whole run: a signal during setup (engine init, data loading) ends the run as soon as setup
    is done, before validation or any step, with nothing written (`latest` is the resume point). Schedulers
    deliver the signal to every process of the job: the DataLoader workers ignore it (data_pipeline/loader.py)
    and leave shutdown to this process; ranks agree on the flag once per step (one all-reduce), so all of them
    save the same step."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    step: int
    preempted: bool
    checkpoint: str | None  # the newest checkpoint (`latest`), whether or not this run wrote it
    final_val: dict = field(default_factory=dict)
    start_val: dict = field(default_factory=dict)
    skipped_steps: int = 0
    saved_at_exit: bool = False  # a checkpoint of `step` was written as the run ended
    stopped_in_setup: bool = False  # preempted before the first step of this run: nothing trained or written


def load_initial_weights(model: torch.nn.Module, path: str) -> None:
    """Copy a checkpoint's weights into `model`; its model type was checked by pretrain/preflight.py."""
    from fuxi.checkpoints.model_checkpoint import check_tensor_names
    from fuxi.checkpoints.sharded_safetensors import iter_tensors, tensor_shapes

    check_tensor_names({k: tuple(v.shape) for k, v in model.state_dict().items()}, tensor_shapes(path), path)
    with torch.no_grad():
        state = model.state_dict()
        for name, tensor in iter_tensors(path):
            state[name].copy_(tensor)


def seed_everything(seed: int, rank: int) -> None:
    """torch: `seed` on every rank, so every rank builds the same initial weights. Python's `random` and NumPy
    (host-side draws of a transform or stage): `seed + rank`, so ranks do not draw the same numbers. Their
    states are saved per rank in each checkpoint and restored on resume."""
    torch.manual_seed(seed)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def train(cfg: TrainConfig) -> TrainResult:
    # Config errors first: they need only the config and the files it names (pretrain/preflight.py).
    check_run_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    with PreemptionSignal() as preemption:
        return Trainer(cfg, preemption).run()


@dataclass
class TrainState:
    """The loop's counters: saved in each checkpoint, restored on resume."""

    step: int = 0
    skipped_steps: int = 0  # bad steps (non-finite loss or gradient) so far
    start_val: dict = field(default_factory=dict)  # validation of the initial weights


@dataclass
class BadStreak:
    """Consecutive bad steps. DeepSpeed skips a step whose gradient overflowed (`was_step_applied()` is False) and
    leaves the weights as they were, so a checkpoint is still safe. A bad step it applied (a non-finite loss it
    did not catch) may have damaged the weights: from it until the next good step no checkpoint is written, so
    `latest` always holds intact weights, and a save that falls due meanwhile is made at the first good step."""

    length: int = 0
    start: int = 0  # the streak's first step
    damaged: bool = False  # a step of the streak was applied with a non-finite loss


@dataclass
class StepOutcome:
    loss: float  # next-token loss of this rank, mean over the micro-batches
    lr: float
    global_batch: int
    bad: bool  # on any rank: a non-finite loss or gradient
    damaging: bool  # on any rank: bad, and applied by DeepSpeed all the same
    preempted: bool  # on any rank: a signal arrived


class Trainer:
    def __init__(self, cfg: TrainConfig, preemption: PreemptionSignal):
        """Setup: everything before the first step, resuming from `latest` when there is one."""
        self.cfg, self.preemption = cfg, preemption
        self.ctx = ctx = init_distributed(cfg.parallelism.backend)
        self.out_dir = Path(cfg.run.output_dir)
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.run.seed, ctx.rank)

        self.data = TrainData(cfg, ctx.rank, ctx.world_size)
        model = build_model(cfg.model)
        if cfg.checkpoint.init_from:
            load_initial_weights(model, cfg.checkpoint.init_from)
        self.stage = build_stage(cfg, self.data.languages)
        self.stage.configure(model)
        self.engine = build_engine(model, cfg, ctx, global_batch_at(0, cfg.schedule))

        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", cfg.checkpoint.keep_last, ctx.rank,
                                             ctx.device)
        self.state = TrainState()
        self.last_checkpoint = self.resume()  # the newest checkpoint (`latest`), whether or not this run wrote it
        self.streak = BadStreak()
        self.save_due = False  # a checkpoint fell due during a damaging streak
        self.saved_at_exit = False  # a checkpoint of the current step was written

        flops_per_token = estimated_flops_per_token(cfg.model, cfg.data.seq_len)  # from the config: ZeRO-3 safe
        peak_tflops = device_peak_tflops(cfg.logging.peak_tflops)
        self.speed = SpeedMonitor(flops_per_token, peak_tflops, ctx.world_size)
        self.metrics = MetricsLogger(self.out_dir, ctx.is_main, cfg.logging.tensorboard)
        self.metrics.log("run", self.state.step, {"flops_per_token": flops_per_token, "peak_tflops": peak_tflops,
                                                  "world_size": ctx.world_size,
                                                  "zero_stage": cfg.parallelism.zero_stage})
        self.lang_loss = LanguageLoss(len(self.data.languages), ctx.device)
        self.val_batches = self.data.validation_batches(cfg.logging.val_batches_per_language,
                                                        cfg.parallelism.micro_batch)
        self.evaluator = None
        if cfg.logging.eval_every_steps:
            from fuxi.pretrain.evaluation.in_loop import InLoopEvaluator

            self.evaluator = InLoopEvaluator(cfg, self.engine, ctx)

    def resume(self) -> str | None:
        """Collective. Load `latest` (with checkpoint.resume): the engine, the counters, this rank's data position
        and RNG states. -> the checkpoint's path, None for a fresh run."""
        tag = self.checkpoints.latest_tag() if self.cfg.checkpoint.resume else None
        if tag is None:
            return None
        trainer_state, rank_state = self.checkpoints.load(self.engine, tag)
        self.state = TrainState(trainer_state["step"], trainer_state["skipped_steps"], trainer_state["start_val"])
        self.data.loader.load_state_dict(rank_state["data"])
        restore_rng_state(rank_state["rng"])
        if self.ctx.is_main:
            log.info("resumed from %s at step %d", self.checkpoints.root / tag, self.state.step)
        return str(self.checkpoints.root / tag)

    def run(self) -> TrainResult:
        """Train to schedule.total_steps, or until a signal (then checkpoint the last step and stop)."""
        cfg, state, total = self.cfg, self.state, self.cfg.schedule.total_steps
        # A signal during setup: stop before validating or training, writing nothing (`latest` is the resume
        # point). The ranks agree first, so none of them starts a collective (validation, a step) the others skip.
        (preempted,) = any_rank([self.preemption.received is not None], self.ctx.device)
        if preempted:
            return self.stop_after_setup()
        if state.step == 0 and self.val_batches:
            state.start_val = self.validate()

        self.engine.train()
        batches = iter(self.data.loader)
        preempted = False
        try:
            while state.step < total:
                outcome = self.train_step(batches)
                self.count_bad_step(outcome)
                if state.step % cfg.logging.every_steps == 0 or state.step == total:
                    self.log_train(outcome)
                # The checkpoint first: a validation or evaluation that fails after it cannot lose it.
                self.save_if_due(outcome.preempted)
                if outcome.preempted:
                    if self.ctx.is_main:
                        log.warning("preemption signal received: exiting; latest checkpoint %s",
                                    self.last_checkpoint)
                    preempted = True
                    break
                if self.val_batches and state.step % cfg.logging.val_every_steps == 0 and state.step < total:
                    self.validate()
                    self.engine.train()
                if self.evaluator is not None and self.evaluator.due(state.step):
                    self.evaluate_downstream()
        finally:
            # On every way out (the end, a signal, an error in a step, a save or a collective whose peer died) the
            # loader's DataLoader workers end here (data_pipeline/loader.py): they ignore SIGTERM, and an exit
            # that left them running would wait for them forever.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        return self.finish(preempted=preempted)

    def train_step(self, batches) -> StepOutcome:
        """One optimizer step: the schedule's batch size and lr, the micro-batches of gradient accumulation, then
        one all-reduce in which the ranks agree whether the step was bad and whether a signal arrived."""
        cfg, ctx, engine = self.cfg, self.ctx, self.engine
        global_batch = global_batch_at(self.state.step, cfg.schedule)
        if engine.train_batch_size() != global_batch:
            engine.set_train_batch_size(global_batch)
        lr = lr_at(self.state.step, cfg.optimizer.lr, cfg.schedule)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

        # Summed on the device: one host sync per step, not per micro-batch.
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        lm_loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for _ in range(engine.gradient_accumulation_steps()):
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(batches).items()}
            result = self.stage.compute_loss(engine, batch)
            engine.backward(result.loss)
            engine.step()
            self.lang_loss.add(result.token_losses, batch["lang_ids"], batch["labels"])
            self.speed.add_tokens(batch["input_ids"].numel())
            loss_sum += result.loss.detach().double()
            lm_loss_sum += result.lm_loss.double()

        step_loss = float(lm_loss_sum) / engine.gradient_accumulation_steps()
        finite, applied = math.isfinite(float(loss_sum)), engine.was_step_applied()
        bad, damaging, preempted = any_rank(
            [not finite or not applied, applied and not finite, self.preemption.received is not None], ctx.device)
        self.state.step += 1
        return StepOutcome(step_loss, lr, global_batch, bad, damaging, preempted)

    def count_bad_step(self, outcome: StepOutcome) -> None:
        """The NaN guard: stop with NonFiniteLossError after run.max_consecutive_bad_steps bad steps in a row."""
        state, streak = self.state, self.streak
        if not outcome.bad:
            streak.length, streak.damaged = 0, False
            return
        state.skipped_steps += 1
        streak.length += 1
        streak.start = state.step if streak.length == 1 else streak.start
        streak.damaged = streak.damaged or outcome.damaging
        if self.ctx.is_main:
            log.warning("step %d: non-finite loss or gradient (%d in a row); %s", state.step, streak.length,
                        "applied: the weights may be damaged" if outcome.damaging else "skipped by DeepSpeed")
        limit = self.cfg.run.max_consecutive_bad_steps
        if streak.length >= limit:
            self.metrics.close()
            raise NonFiniteLossError(
                f"stopped at step {state.step}: {streak.length} consecutive steps (from step {streak.start}) had a "
                f"non-finite loss or gradient (run.max_consecutive_bad_steps = {limit}); "
                f"{_last_intact(self.last_checkpoint)}")

    def log_train(self, outcome: StepOutcome) -> None:
        """Collective: the "train" record of the window since the last one (metrics.jsonl, TensorBoard, console)."""
        ctx, engine, data = self.ctx, self.engine, self.data
        sums, counts = self.lang_loss.reduce_and_reset()
        grad_norm = engine.get_global_grad_norm()
        loss_and_skips = all_reduce_sum(torch.tensor([outcome.loss, getattr(data.loader, "skipped", 0)],
                                                     dtype=torch.float64, device=ctx.device)).tolist()
        record = {"loss": loss_and_skips[0] / ctx.world_size, "lr": outcome.lr,
                  "grad_norm": _finite_or_none(grad_norm), "tokens_per_language": self.tokens_per_language(),
                  "loss_scale": float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0),
                  "skipped_steps": self.state.skipped_steps, "skipped_samples": int(loss_and_skips[1]),
                  "global_batch": outcome.global_batch,
                  "per_language": per_language_report(sums, counts, data.languages, data.bytes_per_token),
                  **self.speed.read_and_reset(), **memory_stats(ctx.device), **self.stage.log_metrics()}
        self.metrics.log("train", self.state.step, record)
        if ctx.is_main:
            log.info(console_line(self.state.step, self.cfg.schedule.total_steps, record))

    def save_if_due(self, preempted: bool) -> None:
        """Checkpoint at checkpoint.every_steps, at the last step and on a signal, unless the weights may be
        damaged (then at the first good step after the streak)."""
        step, total = self.state.step, self.cfg.schedule.total_steps
        self.save_due = self.save_due or step % self.cfg.checkpoint.every_steps == 0 or preempted or step == total
        self.saved_at_exit = False
        if self.save_due and not self.streak.damaged:
            self.last_checkpoint, self.save_due, self.saved_at_exit = self.save(), False, True
        elif self.save_due and self.ctx.is_main:
            log.warning("step %d: checkpoint postponed until a step is good again (a step of the bad streak since "
                        "step %d was applied with a non-finite loss)", step, self.streak.start)

    def save(self) -> str:
        """Collective: a checkpoint of the current step."""
        state = self.state
        trainer_state = {"step": state.step, "skipped_steps": state.skipped_steps, "start_val": state.start_val,
                         "world_size": self.ctx.world_size, "tokens_per_language": self.tokens_per_language()}
        rank_state = {"data": self.data.loader.state_dict(), "rng": capture_rng_state()}
        return str(self.checkpoints.save(self.engine, state.step, trainer_state, rank_state, self.cfg.model,
                                         self.cfg.run.tokenizer))

    def tokens_per_language(self) -> dict:
        """Input tokens consumed per language, summed over ranks (the loader counts its own)."""
        totals = all_reduce_sum(self.data.loader.tokens_seen.double().to(self.ctx.device)).cpu()
        return {lang: int(totals[i]) for i, lang in enumerate(self.data.languages)}

    def validate(self) -> dict:
        """Collective: held-out loss per language, logged as a "val" record."""
        report = evaluate_per_language(self.engine, self.val_batches, self.data.languages, self.data.bytes_per_token,
                                       self.ctx)
        self.metrics.log("val", self.state.step, {"per_language": report})
        if self.ctx.is_main:
            log.info("validation @ %d: %s", self.state.step,
                     "  ".join(f"{k} {v['loss']:.3f}" for k, v in report.items()))
        return report

    def evaluate_downstream(self) -> None:
        """Collective: in-loop lm-evaluation-harness tasks, logged as an "eval" record."""
        from fuxi.pretrain.evaluation.in_loop import eval_metrics

        report = self.evaluator.run(self.state.step)
        if report is not None:
            self.metrics.log("eval", self.state.step, eval_metrics(report))

    def finish(self, preempted: bool) -> TrainResult:
        """After the last step: refuse weights a bad streak damaged (NonFiniteLossError); unless preempted, the
        final validation, the stage's end-of-run report, the loss plot and the export."""
        cfg, ctx, state = self.cfg, self.ctx, self.state
        if self.streak.damaged and not preempted:  # the schedule ended inside a damaging streak
            self.metrics.close()
            raise NonFiniteLossError(
                f"reached schedule.total_steps = {state.step} inside a streak of bad steps (from step "
                f"{self.streak.start}: non-finite loss or gradient) that damaged the weights, so they were not "
                f"saved; {_last_intact(self.last_checkpoint)}")

        if ctx.is_main and hasattr(self.data.loader, "mixture_report"):  # a stage's own data may lack it
            log.info("language mix on rank 0, target vs realised:\n%s", self.data.loader.mixture_report())
        final_val = {}
        if not preempted and self.val_batches:
            final_val = self.validate()
        if not preempted:
            stage_report = self.stage.end_of_run(self.engine, self.val_batches, self.out_dir, ctx)
            if stage_report:
                self.metrics.log("stage", state.step, {"stage": cfg.stage, **stage_report})
        self.metrics.close()
        if ctx.is_main and not preempted:
            if self.val_batches:
                plot_loss_per_language(self.out_dir / "metrics.jsonl", self.out_dir / "loss_per_language.png")
            if (cfg.run.export_hf or cfg.run.export_final) and self.last_checkpoint:
                export_final(self.last_checkpoint, self.out_dir, cfg.run.tokenizer, hf=cfg.run.export_hf)
        barrier()
        return TrainResult(state.step, preempted, self.last_checkpoint, final_val, state.start_val,
                           state.skipped_steps, self.saved_at_exit)

    def stop_after_setup(self) -> TrainResult:
        """A signal arrived during setup: nothing trained or written."""
        if self.ctx.is_main:
            log.warning("preemption signal received during setup: exiting before step %d; latest checkpoint %s",
                        self.state.step + 1, self.last_checkpoint)
        self.metrics.close()
        barrier()
        return TrainResult(self.state.step, True, self.last_checkpoint, start_val=self.state.start_val,
                           skipped_steps=self.state.skipped_steps, stopped_in_setup=True)


def export_final(checkpoint: str, out_dir: Path, tokenizer: str | None, hf: bool = True) -> Path:
    """The last training checkpoint -> <out_dir>/final (our plain format) -> <out_dir>/hf (Hugging Face)."""
    from fuxi.checkpoints import export_to_hf
    from fuxi.checkpoints.deepspeed_checkpoint import consolidate_deepspeed_checkpoint

    plain = consolidate_deepspeed_checkpoint(checkpoint, out_dir / "final")
    if not hf:
        log.info("exported %s -> %s (ours)", checkpoint, plain)
        return plain
    hf_dir = export_to_hf(plain, out_dir / "hf", dtype="float32", tokenizer_dir=tokenizer)
    log.info("exported %s -> %s (ours) -> %s (Hugging Face)", checkpoint, plain, hf_dir)
    return hf_dir


def _last_intact(checkpoint: str | None) -> str:
    return (f"the last checkpoint with intact weights is {checkpoint or 'none'}: restart from it with a lower "
            "optimizer.lr or schedule.peak_cut")


def _finite_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None

"""The training loop: one function, plain like torchtitan's. DeepSpeed owns the parallelism (ZeRO 0-3, gradient
accumulation, clipping, mixed precision); the loop owns the schedule, data, metrics, checkpoints and resume.
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
        return _train(cfg, preemption)


def _train(cfg: TrainConfig, preemption: PreemptionSignal) -> TrainResult:
    ctx = init_distributed(cfg.parallelism.backend)
    out_dir = Path(cfg.run.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.run.seed, ctx.rank)

    data = TrainData(cfg, ctx.rank, ctx.world_size)
    model = build_model(cfg.model)
    if cfg.checkpoint.init_from:
        load_initial_weights(model, cfg.checkpoint.init_from)
    stage = build_stage(cfg, data.languages)
    stage.configure(model)
    engine = build_engine(model, cfg, ctx, global_batch_at(0, cfg.schedule))

    ckpt = CheckpointManager(out_dir / "checkpoints", cfg.checkpoint.keep_last, ctx.rank)
    step, skipped = 0, 0
    start_val: dict = {}
    tag = ckpt.latest_tag() if cfg.checkpoint.resume else None
    last_checkpoint = str(ckpt.root / tag) if tag else None
    if tag is not None:
        trainer_state, rank_state = ckpt.load(engine, tag)
        step, skipped, start_val = trainer_state["step"], trainer_state["skipped_steps"], trainer_state["start_val"]
        data.loader.load_state_dict(rank_state["data"])
        restore_rng_state(rank_state["rng"])
        if ctx.is_main:
            log.info("resumed from %s at step %d", ckpt.root / tag, step)

    flops_per_token = estimated_flops_per_token(cfg.model, cfg.data.seq_len)  # from the config: ZeRO-3 safe
    peak_tflops = device_peak_tflops(cfg.logging.peak_tflops)
    speed = SpeedMonitor(flops_per_token, peak_tflops, ctx.world_size)
    metrics = MetricsLogger(out_dir, ctx.is_main, cfg.logging.tensorboard)
    metrics.log("run", step, {"flops_per_token": flops_per_token, "peak_tflops": peak_tflops,
                              "world_size": ctx.world_size, "zero_stage": cfg.parallelism.zero_stage})
    lang_loss = LanguageLoss(len(data.languages), ctx.device)
    val_batches = data.validation_batches(cfg.logging.val_batches_per_language, cfg.parallelism.micro_batch)
    evaluator = None
    if cfg.logging.eval_every_steps:
        from fuxi.pretrain.evaluation.in_loop import InLoopEvaluator

        evaluator = InLoopEvaluator(cfg, engine, ctx)

    def validate() -> dict:
        report = evaluate_per_language(engine, val_batches, data.languages, data.bytes_per_token, ctx)
        metrics.log("val", step, {"per_language": report})
        if ctx.is_main:
            log.info("validation @ %d: %s", step, "  ".join(f"{k} {v['loss']:.3f}" for k, v in report.items()))
        return report

    def downstream_eval() -> None:
        from fuxi.pretrain.evaluation.in_loop import eval_metrics

        report = evaluator.run(step)
        if report is not None:
            metrics.log("eval", step, eval_metrics(report))

    def save() -> str:
        trainer_state = {"step": step, "skipped_steps": skipped, "start_val": start_val,
                         "world_size": ctx.world_size, "tokens_per_language": tokens_per_language()}
        rank_state = {"data": data.loader.state_dict(), "rng": capture_rng_state()}
        return str(ckpt.save(engine, step, trainer_state, rank_state, cfg.model, cfg.run.tokenizer))

    def tokens_per_language() -> dict:
        """Input tokens consumed per language, summed over ranks (the loader counts its own)."""
        totals = all_reduce_sum(data.loader.tokens_seen.double().to(ctx.device)).cpu()
        return {lang: int(totals[i]) for i, lang in enumerate(data.languages)}

    # A signal during setup: stop before validating or training, writing nothing (`latest` is the resume point).
    # The ranks agree first, so none of them starts a collective (validation, a step) the others skip.
    (preempted,) = any_rank([preemption.received is not None], ctx.device)
    if preempted:
        if ctx.is_main:
            log.warning("preemption signal received during setup: exiting before step %d; latest checkpoint %s",
                        step + 1, last_checkpoint)
        metrics.close()
        barrier()
        return TrainResult(step, True, last_checkpoint, start_val=start_val, skipped_steps=skipped,
                           stopped_in_setup=True)

    if step == 0 and val_batches:
        start_val = validate()

    engine.train()
    batches = iter(data.loader)
    # A bad step has a non-finite loss or gradient; a bad streak is consecutive bad steps. DeepSpeed skips a step
    # whose gradient overflowed (`was_step_applied()` is False) and leaves the weights as they were, so a
    # checkpoint is still safe. A bad step it applied (a non-finite loss it did not catch) may have damaged the
    # weights: from it until the next good step no checkpoint is written, so `latest` always holds intact
    # weights, and a save that falls due meanwhile is made at the first good step.
    consecutive_bad, streak_start, damaged, save_due, preempted, saved_at_exit = 0, 0, False, False, False, False
    while step < cfg.schedule.total_steps:
        global_batch = global_batch_at(step, cfg.schedule)
        if engine.train_batch_size() != global_batch:
            engine.set_train_batch_size(global_batch)
        lr = lr_at(step, cfg.optimizer.lr, cfg.schedule)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

        # Summed on the device: one host sync per step, not per micro-batch.
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        lm_loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for _ in range(engine.gradient_accumulation_steps()):
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(batches).items()}
            result = stage.compute_loss(engine, batch)
            engine.backward(result.loss)
            engine.step()
            lang_loss.add(result.token_losses, batch["lang_ids"], batch["labels"])
            speed.add_tokens(batch["input_ids"].numel())
            loss_sum += result.loss.detach().double()
            lm_loss_sum += result.lm_loss.double()

        step_loss = float(lm_loss_sum) / engine.gradient_accumulation_steps()
        finite, applied = math.isfinite(float(loss_sum)), engine.was_step_applied()
        step_bad, step_damaging, preempted = any_rank(
            [not finite or not applied, applied and not finite, preemption.received is not None], ctx.device)
        step += 1
        if step_bad:
            skipped += 1
            consecutive_bad += 1
            streak_start = step if consecutive_bad == 1 else streak_start
            damaged = damaged or step_damaging
            if ctx.is_main:
                log.warning("step %d: non-finite loss or gradient (%d in a row); %s", step, consecutive_bad,
                            "applied: the weights may be damaged" if step_damaging else "skipped by DeepSpeed")
            if consecutive_bad >= cfg.run.max_consecutive_bad_steps:
                metrics.close()
                raise NonFiniteLossError(
                    f"stopped at step {step}: {consecutive_bad} consecutive steps (from step {streak_start}) had a "
                    f"non-finite loss or gradient (run.max_consecutive_bad_steps = "
                    f"{cfg.run.max_consecutive_bad_steps}); {_last_intact(last_checkpoint)}")
        else:
            consecutive_bad, damaged = 0, False

        if step % cfg.logging.every_steps == 0 or step == cfg.schedule.total_steps:
            sums, counts = lang_loss.reduce_and_reset()
            grad_norm = engine.get_global_grad_norm()
            loss_and_skips = all_reduce_sum(torch.tensor([step_loss, getattr(data.loader, "skipped", 0)],
                                                         dtype=torch.float64, device=ctx.device)).tolist()
            record = {"loss": loss_and_skips[0] / ctx.world_size, "lr": lr, "grad_norm": _finite_or_none(grad_norm),
                      "tokens_per_language": tokens_per_language(),
                      "loss_scale": float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0),
                      "skipped_steps": skipped, "skipped_samples": int(loss_and_skips[1]),
                      "global_batch": global_batch,
                      "per_language": per_language_report(sums, counts, data.languages, data.bytes_per_token),
                      **speed.read_and_reset(), **memory_stats(ctx.device), **stage.log_metrics()}
            metrics.log("train", step, record)
            if ctx.is_main:
                log.info(console_line(step, cfg.schedule.total_steps, record))

        # The checkpoint first: a validation or evaluation that fails after it cannot lose it.
        save_due = save_due or step % cfg.checkpoint.every_steps == 0 or preempted or \
            step == cfg.schedule.total_steps
        saved_at_exit = False
        if save_due and not damaged:
            last_checkpoint, save_due, saved_at_exit = save(), False, True
        elif save_due and ctx.is_main:
            log.warning("step %d: checkpoint postponed until a step is good again (a step of the bad streak since "
                        "step %d was applied with a non-finite loss)", step, streak_start)
        if preempted:
            if ctx.is_main:
                log.warning("preemption signal received: exiting; latest checkpoint %s", last_checkpoint)
            break
        if val_batches and step % cfg.logging.val_every_steps == 0 and step < cfg.schedule.total_steps:
            validate()
            engine.train()
        if evaluator is not None and evaluator.due(step):
            downstream_eval()

    if damaged and not preempted:  # the schedule ended inside a damaging streak: the final weights are suspect
        metrics.close()
        raise NonFiniteLossError(
            f"reached schedule.total_steps = {step} inside a streak of bad steps (from step {streak_start}: "
            f"non-finite loss or gradient) that damaged the weights, so they were not saved; "
            f"{_last_intact(last_checkpoint)}")

    if ctx.is_main and hasattr(data.loader, "mixture_report"):  # stream loaders; a stage's own data may lack it
        log.info("language mix on rank 0, target vs realised:\n%s", data.loader.mixture_report())
    final_val = {}
    if not preempted and val_batches:
        final_val = validate()
    if not preempted:
        stage_report = stage.end_of_run(engine, val_batches, out_dir, ctx)  # e.g. MoE router statistics
        if stage_report:
            metrics.log("stage", step, {"stage": cfg.stage, **stage_report})
    metrics.close()
    if ctx.is_main and not preempted:
        if val_batches:
            plot_loss_per_language(out_dir / "metrics.jsonl", out_dir / "loss_per_language.png")
        if (cfg.run.export_hf or cfg.run.export_final) and last_checkpoint:
            export_final(last_checkpoint, out_dir, cfg.run.tokenizer, hf=cfg.run.export_hf)
    barrier()
    return TrainResult(step, preempted, last_checkpoint, final_val, start_val, skipped, saved_at_exit)


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

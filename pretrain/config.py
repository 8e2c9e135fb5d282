"""The run config: model, data, optimizer, schedule, parallelism, checkpointing, logging, run, and the stage
(pretrain/stages/) with its own section if it has one. One YAML file, `--set a.b=value` overrides, strict types
(common/typed_config.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import (apply_overrides, check_choices, from_dict, parse_override, read_yaml,
                                      require_at_least)
from fuxi.data_pipeline.config import DataConfig
from fuxi.model import ModelConfig
from fuxi.pretrain.stages import stage_named

# "bf16", "fp16" (GPU only, dynamic loss scaling) or "fp32".
Precision = Literal["bf16", "fp16", "fp32"]
ZeroStage = Literal[0, 1, 2, 3]


@dataclass
class OptimizerConfig:
    """AdamW as FuxiTranyu trained: betas (0.9, 0.95), eps 1e-8, clipping at 1.0."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Optional z-loss on the lm_head logsumexp (PaLM); 0 disables it.
    z_loss: float = 0.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"expected two values in [0, 1), got {self.betas}")
        require_at_least(self, 0, "weight_decay", "grad_clip", "z_loss")
        if self.eps <= 0:
            raise ConfigError("eps", f"must be > 0, got {self.eps}")


@dataclass
class PeakCut:
    """Lower the peak LR from `step` on (FuxiTranyu cut 3e-4 to 1e-4 after a divergence at ~241B tokens).

    mode "rescale": the same cosine continues between the new peak and its 10% floor;
    mode "restart": a fresh warmup + cosine over the remaining steps."""

    step: int
    peak_lr: float
    mode: Literal["rescale", "restart"] = "rescale"

    def validate(self) -> None:
        check_choices(self)
        require_at_least(self, 0, "step")
        if self.peak_lr <= 0:
            raise ConfigError("peak_lr", f"must be > 0, got {self.peak_lr}")


@dataclass
class BatchStage:
    """From optimizer step `step` on, the global batch is `global_batch` sequences (the 2M -> 4M token ramp)."""

    step: int
    global_batch: int


@dataclass
class ScheduleConfig:
    total_steps: int = 1000
    warmup_steps: int = 100
    # Cosine decays to min_lr_ratio * peak (FuxiTranyu: 10%).
    min_lr_ratio: float = 0.1
    peak_cut: PeakCut | None = None
    # Global batch in sequences; a ramp lists later (step, global_batch) stages.
    global_batch: int = 8
    batch_ramp: list[BatchStage] = field(default_factory=list)

    def validate(self) -> None:
        require_at_least(self, 1, "total_steps", "global_batch")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError("warmup_steps", f"must be in [0, total_steps], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        steps = [stage.step for stage in self.batch_ramp]
        if steps != sorted(set(steps)) or any(s.global_batch < 1 for s in self.batch_ramp):
            raise ConfigError("batch_ramp", "steps must increase and every global_batch must be >= 1")


@dataclass
class ParallelismConfig:
    zero_stage: ZeroStage = 2
    micro_batch: int = 1
    precision: Precision = "bf16"
    # Overlap and bucket sizes passed through to DeepSpeed's zero_optimization.
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    # Collective backend: default nccl on CUDA, gloo on CPU.
    backend: str | None = None

    def validate(self) -> None:
        check_choices(self)
        require_at_least(self, 1, "micro_batch")


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    # Resume from `<run.output_dir>/checkpoints/latest` when it exists.
    resume: bool = True
    # Start from these weights (our plain checkpoint dir) instead of a random init; optimizer state is fresh.
    init_from: str | None = None

    def validate(self) -> None:
        require_at_least(self, 1, "every_steps", "keep_last")


@dataclass
class LoggingConfig:
    every_steps: int = 10
    val_every_steps: int = 200
    val_batches_per_language: int = 4
    tensorboard: bool = True
    # Device peak TFLOP/s for MFU; default: looked up from the device name.
    peak_tflops: float | None = None
    # In-loop downstream evaluation with lm-evaluation-harness (pretrain/evaluation/in_loop.py) every N steps
    # and at the end; null disables it. Needs the `eval` extra and run.tokenizer.
    eval_every_steps: int | None = None
    # `fuxi eval --tasks` names: groups, benchmarks or harness tasks (default: the shipped local tasks).
    eval_tasks: list[str] = field(default_factory=lambda: ["fuxi_local"])
    # Only these languages of each benchmark (default: all).
    eval_languages: list[str] | None = None
    # Documents per task (null: all); keeps each evaluation within the process group's timeout on big runs.
    eval_limit: int | None = None
    eval_batch_size: int = 8

    def validate(self) -> None:
        require_at_least(self, 1, "every_steps", "val_every_steps", "eval_every_steps", "eval_limit",
                         "eval_batch_size")
        if not self.eval_tasks:
            raise ConfigError("eval_tasks", "name at least one task (default: [fuxi_local])")


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 1234
    # Stop with an error after this many consecutive steps with a non-finite loss or gradient.
    max_consecutive_bad_steps: int = 5
    # Export to Hugging Face format at the end of training (into <output_dir>/hf).
    export_hf: bool = False
    # Write the last checkpoint's consolidated weights to <output_dir>/final (our plain format, what
    # `checkpoint.init_from` reads; e.g. MoE-LPR stage 2 starts from stage 1's). export_hf implies it.
    export_final: bool = False
    # The tokenizer the data was built with (copied into checkpoints and the HF export).
    tokenizer: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # A name of pretrain/stages/ (what trains on what, with which loss).
    stage: str = "pretrain"
    # The stage's own section (`prealign:` for prealign_init), typed by the stage; None for a stage without one.
    # load_train_config fills it from the YAML key the stage names; not a YAML key itself.
    stage_config: Any = field(default=None, init=False)
    # Where the config came from ("run.yaml with --set ..."), for errors found after loading; not a YAML key.
    source: str = field(default="<dict>", init=False, compare=False, repr=False)

    def validate(self) -> None:
        if self.logging.eval_every_steps and not self.run.tokenizer:
            raise ConfigError("logging.eval_every_steps", "in-loop evaluation needs run.tokenizer (the harness "
                              "tokenizes the task text)")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len "
                              f"{self.model.max_seq_len}")


def load_train_config(path: str | Path | None, overrides: list[str] | None = None,
                      data: dict | None = None) -> TrainConfig:
    """`model:` may name a model YAML (`model: configs/model/fuxitranyu-tiny.yaml`) or a checkpoint's config.yaml
    (`--set model=ckpt/moe/config.yaml`, applied before the other overrides), or hold the fields inline.
    The stage types its own section and checks the whole config (pretrain/stages/base.py)."""
    raw = read_yaml(path) if path is not None else dict(data or {})
    source = (str(path) if path is not None else "<dict>") + (" with --set " + " ".join(overrides)
                                                              if overrides else "")
    # `--set model=<file>` first, so that `--set model.moe.x=...` after it edits the file's fields.
    whole_model = [item for item in overrides or [] if parse_override(item)[0] == ["model"]]
    raw = apply_overrides(raw, whole_model)
    if isinstance(raw.get("model"), str):
        model_path = Path(raw["model"])
        if not model_path.is_file() and path is not None:
            model_path = Path(path).parent / raw["model"]
        if not model_path.is_file():
            raise ConfigError("model", f"{raw['model']} not found", source)
        model = read_yaml(model_path)
        # A checkpoint's config.yaml holds its model under `model:` (e.g. `fuxi upcycle`'s output for stage 1).
        raw["model"] = model["model"] if set(model) == {"model"} and isinstance(model["model"], dict) else model
    raw = apply_overrides(raw, [item for item in overrides or [] if item not in whole_model])
    try:
        stage = stage_named(raw.get("stage", TrainConfig.stage))
    except ConfigError as err:
        raise err.within(source) from None
    section = raw.pop(stage.config_key, None) if stage.config_key else None
    cfg = from_dict(TrainConfig, raw, source=source)
    cfg.source = source
    if stage.config_class is not None:
        cfg.stage_config = from_dict(stage.config_class, section or {}, source=source, prefix=f"{stage.config_key}.")
    try:
        stage.check_config(cfg)
    except ConfigError as err:
        raise err.within(source) from None
    return cfg


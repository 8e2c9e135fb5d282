"""What a training stage declares, with the defaults of plain pretraining: the packed text stream, every parameter
trains, nothing extra to check or log. A stage overrides what it changes; `compute_loss` it must write.

When each part is used:
    config_key, config_class   loading the run config: the stage's own section (`prealign:`), typed by it and
                               kept as `TrainConfig.stage_config`
    check_config               loading the run config, after its sections are typed
    config_paths               pretrain/preflight.py, before anything loads: each path must exist
    check_manifests            pretrain/preflight.py, with the manifests the run reads opened
    train_loader               the trainer's setup (pretrain/data.py: TrainData)
    __init__, configure        the trainer's setup, once the data's language table is known and the model is built
    compute_loss               every micro-batch
    log_metrics                every logging step (collective)
    end_of_run                 after the final validation (collective)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

import torch

from fuxi.pretrain.config import TrainConfig
from fuxi.pretrain.data import text_stream_loader


class ConfigPath(NamedTuple):
    key: str  # the dotted config key, as errors name it
    path: str | None  # None: not set, nothing to check
    kind: Literal["manifest", "tokenizer", "file", "folder"]


@dataclass
class StepLoss:
    loss: torch.Tensor                 # what is backpropagated
    lm_loss: torch.Tensor              # next-token loss alone, for logging
    token_losses: torch.Tensor         # [batch, seq] for per-language metrics
    extras: dict = field(default_factory=dict)  # other scalars to log (aux losses, router stats)


class Stage(ABC):
    name: ClassVar[str]  # the `stage:` value
    config_key: ClassVar[str | None] = None  # the stage's own section of the run config, if it has one
    config_class: ClassVar[type | None] = None  # its dataclass (strict like every section: pretrain/config.py)

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """The stage's checks of the whole run config: raise ConfigError(dotted key, reason)."""

    @classmethod
    def config_paths(cls, cfg: TrainConfig) -> list[ConfigPath]:
        """The paths the stage's data reads (preflight checks the shared ones: validation manifest, tokenizers,
        checkpoint.init_from)."""
        return [ConfigPath("data.train_manifest", cfg.data.train_manifest, "manifest"),
                ConfigPath("data.codeswitch_table", cfg.data.codeswitch_table, "file")]

    @classmethod
    def check_manifests(cls, cfg: TrainConfig, manifests: dict) -> None:
        """The stage's checks against the data, before anything loads: `manifests` maps "data.train_manifest"
        and "data.val_manifest" to the Manifest read from each that exists. Raise ConfigError(dotted key, reason)."""

    @classmethod
    def train_loader(cls, cfg: TrainConfig, rank: int, world_size: int):
        """This rank's endless, resumable training batches. The trainer reads `languages`, `bytes_per_token`,
        `tokens_seen` (per language), `state_dict()` / `load_state_dict()` and, when present, `skipped` and
        `mixture_report()`; each batch has input_ids, labels and lang_ids [micro_batch, seq] (data_pipeline's
        TrainLoader is the reference)."""
        return text_stream_loader(cfg, rank, world_size)

    def __init__(self, cfg: TrainConfig, languages: list[str]):
        self.cfg, self.languages = cfg, languages

    def configure(self, model: torch.nn.Module) -> None:
        """Choose the trainable parameters (set requires_grad); by default all of them train."""

    @abstractmethod
    def compute_loss(self, engine, batch: dict) -> StepLoss:
        """The loss of one micro-batch; `engine` is the DeepSpeed engine (or, in tests, the bare model)."""

    def log_metrics(self) -> dict:
        """Stage-specific metrics for the current logging window, merged into the "train" record. Collective:
        every rank calls it at each log step."""
        return {}

    def end_of_run(self, engine, val_batches: dict, out_dir, ctx) -> dict:
        """Collective, after the final validation: stage-specific end-of-run metrics (logged as a "stage"
        record); rank 0 may write files into out_dir."""
        return {}

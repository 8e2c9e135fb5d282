"""`stage: prealign_init`, PreAlign's alignment initialisation (docs/methods.md §3.3): from a random model, train
on dictionary entries (dictionary.py) with the LM + contrastive alignment loss (loss.py), and measure per-space
alignment before and after (report.py). Its section of the run config is `prealign:` (config.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from fuxi.common.atomic import write_text
from fuxi.common.errors import ConfigError
from fuxi.pretrain.config import TrainConfig
from fuxi.pretrain.stages.base import ConfigPath, Stage, StepLoss
from fuxi.pretrain.stages.prealign.config import PreAlignConfig
from fuxi.pretrain.stages.prealign.dictionary import DictionaryBatches, DictionaryEntries, DictionaryLoader
from fuxi.pretrain.stages.prealign.loss import prealign_loss
from fuxi.pretrain.stages.prealign.report import (alignment_report, format_alignment_report,
                                                  plot_alignment_report, space_names)

log = logging.getLogger("fuxi.train")


class PreAlignInitStage(Stage):
    name = "prealign_init"
    config_key, config_class = "prealign", PreAlignConfig

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        if cfg.model.type != "fuxitranyu":
            raise ConfigError("model.type", f"prealign_init aligns a dense 'fuxitranyu' model, got {cfg.model.type!r}")
        if cfg.parallelism.zero_stage == 3:
            raise ConfigError("parallelism.zero_stage", "prealign_init reads the output-embedding rows outside the "
                              "module's forward, which ZeRO-3 partitions; use zero_stage 0, 1 or 2")
        if not (cfg.data.tokenizer or cfg.run.tokenizer):
            raise ConfigError("data.tokenizer", "the prealign_init stage tokenises the alignment table; name the "
                              "tokenizer directory (data.tokenizer or run.tokenizer)")
        if cfg.model.max_seq_len < cfg.stage_config.max_word_tokens + 1:
            raise ConfigError("prealign.max_word_tokens", f"{cfg.stage_config.max_word_tokens} + BOS exceeds "
                              f"model.max_seq_len {cfg.model.max_seq_len}")

    @classmethod
    def config_paths(cls, cfg: TrainConfig) -> list[ConfigPath]:
        """The table; the train manifest, when it exists, only gives the language list (no packed text is read)."""
        return [ConfigPath("prealign.table", cfg.stage_config.table, "file")]

    @classmethod
    def train_loader(cls, cfg: TrainConfig, rank: int, world_size: int) -> DictionaryLoader:
        """The alignment table, tokenised with the run's tokenizer, its languages in the order of the train
        manifest's language list (so held-out per-language validation keeps its language ids)."""
        from fuxi.data_pipeline.manifest import load_manifest
        from fuxi.data_pipeline.tokenizer import EOS_ID

        settings: PreAlignConfig = cfg.stage_config
        languages, bytes_per_token = [], {}
        if cfg.data.train_manifest and Path(cfg.data.train_manifest).is_file():
            manifest = load_manifest(cfg.data.train_manifest)
            languages, bytes_per_token = list(manifest.languages), dict(manifest.bytes_per_token)
        entries = table_entries(cfg, languages)
        batches = DictionaryBatches(entries, settings.words_per_entry, cfg.data.seed, bos_id=EOS_ID,
                                    width=settings.max_word_tokens)
        return DictionaryLoader(batches, cfg.parallelism.micro_batch, rank, world_size, bytes_per_token)

    def __init__(self, cfg: TrainConfig, languages: list[str]):
        super().__init__(cfg, languages)
        if cfg.checkpoint.init_from:
            log.warning("prealign_init: checkpoint.init_from is set; PreAlign starts from a random init")
        self.settings: PreAlignConfig = cfg.stage_config
        self._window: list[torch.Tensor] = []
        self._entries: DictionaryEntries | None = None
        self._before: dict | None = None  # alignment of the initial weights (not measured on a resumed run)
        self._measured_initial = False

    def _report(self, model, output_embedding: torch.Tensor, device) -> dict:
        if self._entries is None:
            self._entries = table_entries(self.cfg, self.languages)
        return alignment_report(model, output_embedding, self._entries, self.cfg.model.num_layers,
                                max_concepts=self.settings.report_concepts, seed=self.cfg.run.seed, device=device)

    def output_embedding(self, engine) -> torch.Tensor:
        module = getattr(engine, "module", engine)
        return module.lm_head.weight

    def compute_loss(self, engine, batch: dict) -> StepLoss:
        if not self._measured_initial:  # the first micro-batch of a fresh run sees the initial weights
            self._measured_initial = True
            if getattr(engine, "global_steps", 0) == 0:
                self._before = self._report(engine, self.output_embedding(engine), batch["input_ids"].device)
        out = prealign_loss(engine, batch, self.output_embedding(engine), self.settings.words_per_entry,
                            self.settings.temperature, self.settings.alpha, self.settings.alpha_weights)
        self._window.append(out.align.per_space)
        return StepLoss(out.loss, out.lm_loss, out.token_losses, {"align": out.align.per_space})

    def log_metrics(self) -> dict:
        if not self._window:
            return {}
        per_space = torch.stack(self._window).mean(0)  # already global (all-reduced in the loss)
        self._window = []
        names = space_names(self.cfg.model.num_layers)
        return {"align/loss": float(per_space.mean()),
                **{f"align/loss/{name}": float(v) for name, v in zip(names, per_space)}}

    def end_of_run(self, engine, val_batches: dict, out_dir, ctx) -> dict:
        """Per-space alignment of the initial and the final weights: alignment_report.json (+ PNG)."""
        after = self._report(engine, self.output_embedding(engine), ctx.device)
        if ctx.is_main:
            out_dir = Path(out_dir)
            write_text(out_dir / "alignment_report.json", json.dumps({"before": self._before, "after": after},
                                                                        indent=1))
            reports = {"initial weights": self._before, "after prealign_init": after}
            plot_alignment_report({k: v for k, v in reports.items() if v}, out_dir / "alignment_per_layer.png",
                                  "Word alignment per representation space")
            log.info("prealign_init: alignment per space, after the stage\n%s", format_alignment_report(after))
        record = {f"align/gap/{name}": gap for name, gap in zip(after["spaces"], after["gap"])}
        if self._before:
            record.update({f"align/gap_initial/{name}": gap
                           for name, gap in zip(self._before["spaces"], self._before["gap"])})
        return record


def table_entries(cfg: TrainConfig, languages: list[str]) -> DictionaryEntries:
    """The run's alignment table (default: the shipped one), tokenised with the run's tokenizer."""
    from fuxi.data_pipeline.align_table import SHIPPED_TABLE

    settings: PreAlignConfig = cfg.stage_config
    return DictionaryEntries.from_table(settings.table or SHIPPED_TABLE, cfg.data.tokenizer or cfg.run.tokenizer,
                                        languages, settings.max_word_tokens, settings.languages)

"""The trainer's view of data_pipeline/: the resumable per-rank loader, the language list, bytes per token
(for bits-per-byte) and the held-out batches per language."""
from __future__ import annotations

from fuxi.pretrain.config import TrainConfig


class TrainData:
    def __init__(self, cfg: TrainConfig, rank: int, world_size: int):
        from fuxi.data_pipeline.loader import build_train_loader

        self.cfg = cfg
        if cfg.stage == "prealign_init":  # dictionary entries, not the text stream (pretrain/prealign_stage.py)
            from fuxi.pretrain.prealign_stage import build_dictionary_loader

            self.loader = build_dictionary_loader(cfg, cfg.parallelism.micro_batch, rank, world_size)
        else:
            self.loader = build_train_loader(cfg.data, batch_size=cfg.parallelism.micro_batch, rank=rank,
                                             world_size=world_size, transform=self.train_transform(cfg))
        self.languages: list[str] = list(self.loader.languages)
        self.bytes_per_token: dict[str, float] = dict(self.loader.bytes_per_token)

    @staticmethod
    def train_transform(cfg: TrainConfig):
        """PreAlign's input-only code-switching when data.codeswitch_ratio > 0 (validation stays plain)."""
        if cfg.data.codeswitch_ratio <= 0:
            return None
        from fuxi.data_pipeline.align_table import SHIPPED_TABLE
        from fuxi.data_pipeline.codeswitch import build_codeswitch_transform

        return build_codeswitch_transform(cfg.data.codeswitch_table or str(SHIPPED_TABLE),
                                          cfg.data.tokenizer or cfg.run.tokenizer, cfg.data.codeswitch_ratio,
                                          cfg.data.seed, direction=cfg.data.codeswitch_direction)

    def validation_batches(self, max_batches_per_language: int, batch_size: int) -> dict[str, list[dict]]:
        if not self.cfg.data.val_manifest or max_batches_per_language <= 0:
            return {}
        from fuxi.data_pipeline.loader import build_val_batches

        return build_val_batches(self.cfg.data, batch_size=batch_size,
                                 max_batches_per_language=max_batches_per_language)

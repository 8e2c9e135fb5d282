"""The trainer's view of its data: the stage's resumable per-rank training loader (the packed text stream unless
the stage brings its own, pretrain/stages/), the language list, bytes per token (for bits-per-byte) and the
held-out batches per language."""
from __future__ import annotations

from fuxi.pretrain.config import TrainConfig
from fuxi.pretrain.stages import stage_named


class TrainData:
    def __init__(self, cfg: TrainConfig, rank: int, world_size: int):
        self.cfg = cfg
        self.loader = stage_named(cfg.stage).train_loader(cfg, rank, world_size)
        self.languages: list[str] = list(self.loader.languages)
        self.bytes_per_token: dict[str, float] = dict(self.loader.bytes_per_token)

    def validation_batches(self, max_batches_per_language: int, batch_size: int) -> dict[str, list[dict]]:
        if not self.cfg.data.val_manifest or max_batches_per_language <= 0:
            return {}
        from fuxi.data_pipeline.loader import build_val_batches

        return build_val_batches(self.cfg.data, batch_size=batch_size,
                                 max_batches_per_language=max_batches_per_language)


def text_stream_loader(cfg: TrainConfig, rank: int, world_size: int):
    """The packed text stream (data_pipeline/loader.py), the training data of every stage that brings none."""
    from fuxi.data_pipeline.loader import build_train_loader

    return build_train_loader(cfg.data, batch_size=cfg.parallelism.micro_batch, rank=rank, world_size=world_size,
                              transform=codeswitch_transform(cfg))


def codeswitch_transform(cfg: TrainConfig):
    """PreAlign's input-only code-switching when data.codeswitch_ratio > 0 (validation stays plain)."""
    if cfg.data.codeswitch_ratio <= 0:
        return None
    from fuxi.data_pipeline.align_table import SHIPPED_TABLE
    from fuxi.data_pipeline.codeswitch import build_codeswitch_transform

    return build_codeswitch_transform(cfg.data.codeswitch_table or str(SHIPPED_TABLE),
                                      cfg.data.tokenizer or cfg.run.tokenizer, cfg.data.codeswitch_ratio,
                                      cfg.data.seed, direction=cfg.data.codeswitch_direction)

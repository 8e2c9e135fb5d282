"""The trainer's view of data_pipeline/: the resumable per-rank loader, the language list, bytes per token
(for bits-per-byte) and the held-out batches per language."""
from __future__ import annotations

from pretrain.config import TrainConfig


class TrainData:
    def __init__(self, cfg: TrainConfig, rank: int, world_size: int):
        from data_pipeline.loader import build_train_loader

        self.cfg = cfg
        self.loader = build_train_loader(cfg.data, batch_size=cfg.parallelism.micro_batch, rank=rank,
                                         world_size=world_size)
        self.languages: list[str] = list(self.loader.languages)
        self.bytes_per_token: dict[str, float] = dict(self.loader.bytes_per_token)

    def validation_batches(self, max_batches_per_language: int, batch_size: int) -> dict[str, list[dict]]:
        if not self.cfg.data.val_manifest or max_batches_per_language <= 0:
            return {}
        from data_pipeline.loader import build_val_batches

        return build_val_batches(self.cfg.data, batch_size=batch_size,
                                 max_batches_per_language=max_batches_per_language)

    @staticmethod
    def tokenizer_vocab_size(tokenizer_dir: str) -> int:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))

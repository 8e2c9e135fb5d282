"""Held-out loss per language. Batches are split across ranks; every rank runs the same number of forwards
(short ranks repeat a batch with weight 0), which ZeRO-3's parameter gathering requires."""
from __future__ import annotations

import math

import torch

from fuxi.pretrain.metrics import LanguageLoss, per_language_report


@torch.no_grad()
def evaluate_per_language(engine, val_batches: dict[str, list[dict]], languages: list[str],
                          bytes_per_token: dict[str, float] | None, ctx) -> dict:
    was_training = engine.training if hasattr(engine, "training") else True
    engine.eval()
    meter = LanguageLoss(len(languages), ctx.device)
    for lang in sorted(val_batches):
        batches = val_batches[lang]
        if not batches:
            continue
        per_rank = math.ceil(len(batches) / ctx.world_size)
        for i in range(per_rank):
            index = ctx.rank + i * ctx.world_size
            batch = {k: v.to(ctx.device) for k, v in batches[index % len(batches)].items()}
            out = engine(batch["input_ids"], labels=batch["labels"], doc_ids=batch.get("doc_ids"))
            if index < len(batches):
                meter.add(out.token_losses.float(), batch["lang_ids"], batch["labels"])
    sums, counts = meter.reduce_and_reset()
    if was_training:
        engine.train()
    return per_language_report(sums, counts, languages, bytes_per_token)

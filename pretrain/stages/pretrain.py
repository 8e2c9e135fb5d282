"""`stage: pretrain`: next-token prediction on the packed text stream, every parameter trains (FuxiTranyu,
GhostRNN, PreAlign's second stage). With `optimizer.z_loss` > 0 the loss adds PaLM's z-loss."""
from __future__ import annotations

from fuxi.pretrain.stages.base import Stage, StepLoss


class PretrainStage(Stage):
    name = "pretrain"

    def compute_loss(self, engine, batch: dict) -> StepLoss:
        out = engine(batch["input_ids"], labels=batch["labels"], doc_ids=batch.get("doc_ids"),
                     z_loss=self.cfg.optimizer.z_loss)
        return StepLoss(out.loss, out.loss.detach(), out.token_losses)

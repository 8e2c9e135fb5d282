"""MoE-LPR's two training stages for the trainer (docs/methods.md §2.3, §2.4): what trains, the loss, router logs.

moe_lpr_stage1  post-pretraining: the routers and experts 1..N-1 train, on the expansion languages (select them
                with `data.languages`); loss = LM + moe.balance_loss_coef * balance (alpha = 0.01).
moe_lpr_stage2  review: only the routers train, on a replay mix of original and expansion languages
                (`data.mixing: weights`); loss = LM + moe.lpr_loss_coef * LPR (gamma = 0.1), where the LPR term
                sees only the tokens of `moe.original_languages` (each token's language is its document's).

Both start from weights given by `checkpoint.init_from` (the output of `fuxi upcycle` for stage 1, the stage-1
run's `<output_dir>/final` for stage 2). The coefficients live in `model.moe`, whose validation already makes
balance and LPR mutually exclusive; stage 2 also refuses a balance loss (the paper removes it there). A stage 1
with LPR is the paper's one-stage ablation (Table 3) and is allowed.

Logged per window (metrics.jsonl "train" records): `aux/balance` and `aux/lpr` (unweighted), and per language
the mean router probability of expert 0 and the expert shares (`router/g0/<lang>`, `router/share/<lang>/e<j>`).
At the end of a run the same statistics on the held-out batches go to a "stage" record, `router_stats.json`
and `router_shares.png` (MoE-LPR Fig. 3: G_0 high on original languages, low on expansion languages).
"""
from __future__ import annotations

import json
import logging
import math
from abc import abstractmethod
from pathlib import Path

import torch

from fuxi.common.atomic import write_text
from fuxi.common.errors import ConfigError
from fuxi.model.moe import original_language_mask
from fuxi.model.moe_stats import RouterStats, plot_router_shares, router_statistics
from fuxi.model.upcycle import stage1_trainable, stage2_trainable
from fuxi.pretrain.config import TrainConfig
from fuxi.pretrain.distributed import all_reduce_sum
from fuxi.pretrain.stages.base import Stage, StepLoss

log = logging.getLogger("fuxi.train")


class RouterStatsMeter:
    """Token-weighted sums of the per-language router statistics and of the aux losses, kept on the device and
    reduced over ranks only when read (like pretrain.metrics.LanguageLoss)."""

    def __init__(self, num_languages: int):
        self.num_languages = num_languages
        self.g0_sum = self.share_sum = self.counts = None  # allocated on the first add (shape, device)
        self.aux_sum: dict[str, torch.Tensor] = {}
        self.aux_count = 0

    def add(self, stats: RouterStats, aux: dict[str, torch.Tensor] | None = None) -> None:
        counts = stats.token_counts.to(stats.mean_g0.device, torch.float64)
        if self.g0_sum is None:
            self.g0_sum = torch.zeros(stats.mean_g0.shape, dtype=torch.float64, device=counts.device)
            self.share_sum = torch.zeros(stats.expert_share.shape, dtype=torch.float64, device=counts.device)
            self.counts = torch.zeros_like(counts)
        self.g0_sum += stats.mean_g0.double().nan_to_num() * counts
        self.share_sum += stats.expert_share.double().nan_to_num() * counts[None, :, None]
        self.counts += counts
        for name, value in (aux or {}).items():
            self.aux_sum[name] = self.aux_sum.get(name, 0.0) + value.detach().double()
        self.aux_count += 1 if aux else 0

    def reduce_and_reset(self) -> tuple[RouterStats | None, dict[str, float]]:
        """Collective (every rank calls it): the statistics over all ranks and micro-batches since the last
        read, and the mean of each aux loss over micro-batches and ranks."""
        if self.g0_sum is None:
            return None, {}
        g0, share, counts = (all_reduce_sum(t.clone()) for t in (self.g0_sum, self.share_sum, self.counts))
        aux_names = sorted(self.aux_sum)
        aux = {}
        if aux_names:
            sums = all_reduce_sum(torch.stack([self.aux_sum[n] for n in aux_names] +
                                              [torch.tensor(float(self.aux_count), dtype=torch.float64,
                                                            device=counts.device)]))
            aux = {name: float(sums[i] / sums[-1].clamp(min=1)) for i, name in enumerate(aux_names)}
        denom = counts.clamp(min=1)
        stats = RouterStats(mean_g0=(g0 / denom).masked_fill(counts == 0, math.nan).float().cpu(),
                            expert_share=(share / denom[None, :, None]).float().cpu(),
                            token_counts=counts.long().cpu())
        self.g0_sum.zero_()
        self.share_sum.zero_()
        self.counts.zero_()
        self.aux_sum, self.aux_count = {}, 0
        return stats, aux


class MoELPRStage(Stage):
    """Shared by both stages: the config checks, the engine call with the LPR mask, the weighted loss, the router
    logs. A stage says which parameters train (`trainable`)."""

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        moe = cfg.model.moe
        if cfg.model.type != "fuxitranyu_moe" or moe is None:
            raise ConfigError("model.type", f"stage {cls.name!r} needs an upcycled 'fuxitranyu_moe' model "
                              f"(`fuxi upcycle`), got {cfg.model.type!r}")
        if moe.lpr_loss_coef > 0 and not moe.original_languages:
            raise ConfigError("model.moe.original_languages", f"empty, but lpr_loss_coef={moe.lpr_loss_coef} needs "
                              f"the original languages whose tokens LPR routes to expert 0")

    @classmethod
    def check_manifests(cls, cfg: TrainConfig, manifests: dict) -> None:
        """LPR finds the original languages by name in the stream's language table, the train manifest's."""
        train = manifests.get("data.train_manifest")
        unknown = [lang for lang in cfg.model.moe.original_languages if train and lang not in train.languages]
        if unknown:
            raise ConfigError("model.moe.original_languages", f"{unknown} are not in the language table of "
                              f"data.train_manifest {train.path}: {list(train.languages)}")

    def __init__(self, cfg: TrainConfig, languages: list[str]):
        super().__init__(cfg, languages)
        self.moe = cfg.model.moe
        self.window = RouterStatsMeter(len(languages))
        self.run_total = RouterStatsMeter(len(languages))
        self.warn_about_data()

    def warn_about_data(self) -> None:
        """Stage-specific warnings about the training languages."""

    @abstractmethod
    def trainable(self, model: torch.nn.Module) -> list[str]:
        """Set requires_grad on the parameters that train; -> their names."""

    def configure(self, model: torch.nn.Module) -> None:
        names = self.trainable(model)
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("%s: %d of %d parameters train (%.1f%%) in %d tensors", self.name, trained, total,
                 100.0 * trained / total, len(names))
        if not self.cfg.checkpoint.init_from:
            log.warning("%s: checkpoint.init_from is not set, so training starts from a random init rather than "
                        "an upcycled dense model", self.name)

    def original_mask(self, lang_ids: torch.Tensor) -> torch.Tensor | None:
        if not self.moe.original_languages:
            return None
        return original_language_mask(lang_ids, self.languages, self.moe.original_languages)

    def compute_loss(self, engine, batch: dict) -> StepLoss:
        lang_ids = batch["lang_ids"]
        real = lang_ids >= 0  # packed blocks have no padding; a padded position would carry lang id -1
        out = engine(batch["input_ids"], labels=batch["labels"], doc_ids=batch.get("doc_ids"),
                     original_mask=self.original_mask(lang_ids), loss_mask=real, z_loss=self.cfg.optimizer.z_loss)
        balance, lpr = out.aux_losses["balance"], out.aux_losses["lpr"]
        loss = out.loss
        if self.moe.balance_loss_coef > 0:
            loss = loss + self.moe.balance_loss_coef * balance
        if self.moe.lpr_loss_coef > 0:
            loss = loss + self.moe.lpr_loss_coef * lpr
        stats = router_statistics(out, lang_ids, len(self.languages), real)
        aux = {"balance": balance.detach(), "lpr": lpr.detach()}
        self.window.add(stats, aux)
        self.run_total.add(stats)
        return StepLoss(loss, out.loss.detach(), out.token_losses, {**aux, "router": stats})

    def log_metrics(self) -> dict:
        stats, aux = self.window.reduce_and_reset()
        record = {f"aux/{name}": value for name, value in aux.items()}
        if stats is not None:
            record.update(stats.as_log(self.languages))
        return record

    @torch.no_grad()
    def end_of_run(self, engine, val_batches: dict, out_dir: Path, ctx) -> dict:
        """Router statistics of the final model on the held-out batches (or, without them, over this run's
        training tokens): logged, written to router_stats.json and drawn to router_shares.png."""
        source = "validation"
        if val_batches:
            stats = router_stats_on_batches(engine, val_batches, len(self.languages), ctx)
        else:
            stats, _ = self.run_total.reduce_and_reset()
            source = "training"
        if stats is None or int(stats.token_counts.sum()) == 0:
            return {}
        record = {"router_source": source, **stats.as_log(self.languages)}
        if ctx.is_main:
            write_text(out_dir / "router_stats.json", json.dumps({
                "stage": self.name, "source": source, "languages": self.languages,
                "original_languages": list(self.moe.original_languages),
                "token_counts": stats.token_counts.tolist(),
                "mean_g0": [[None if math.isnan(v) else v for v in row] for row in stats.mean_g0.tolist()],
                "expert_share": stats.expert_share.tolist()}, indent=1))
            plot_router_shares(stats, out_dir / "router_shares.png", self.languages,
                               title=f"{self.name}: router on {source} tokens (mean over MoE layers)")
        return record


def training_languages(cfg: TrainConfig, languages: list[str]) -> list[str]:
    """The languages the loader will sample (as data_pipeline.loader.select_languages decides)."""
    data = cfg.data
    if data.languages is not None:
        return list(data.languages)
    if data.mixing == "weights" and data.weights:
        return [lang for lang, weight in data.weights.items() if weight > 0]
    return list(languages)


def router_stats_on_batches(engine, batches: dict[str, list[dict]], num_languages: int, ctx) -> RouterStats:
    """Per-language router statistics over held-out batches, split across ranks the way validation splits
    them (every rank runs the same number of forwards, which ZeRO-3's parameter gathering needs)."""
    was_training = engine.training if hasattr(engine, "training") else True
    engine.eval()
    meter = RouterStatsMeter(num_languages)
    for lang in sorted(batches):
        lang_batches = batches[lang]
        per_rank = math.ceil(len(lang_batches) / ctx.world_size)
        for i in range(per_rank):
            index = ctx.rank + i * ctx.world_size
            batch = {k: v.to(ctx.device) for k, v in lang_batches[index % len(lang_batches)].items()}
            out = engine(batch["input_ids"])
            # A repeated batch counts no token, but is still added: every rank then holds the meter's tensors
            # and joins the all-reduce below.
            counted = (batch["lang_ids"] >= 0) & (index < len(lang_batches))
            meter.add(router_statistics(out, batch["lang_ids"], num_languages, counted))
    if was_training:
        engine.train()
    stats, _ = meter.reduce_and_reset()
    return stats


class MoELPRStage1(MoELPRStage):
    """Post-pretraining: routers + experts 1..N-1; LM + alpha * balance."""

    name = "moe_lpr_stage1"

    def warn_about_data(self) -> None:
        data_languages = training_languages(self.cfg, self.languages)
        overlap = sorted(set(self.moe.original_languages) & set(data_languages))
        if overlap and self.moe.lpr_loss_coef == 0:
            log.warning("moe_lpr_stage1: the data includes original languages %s; MoE-LPR's stage 1 trains on "
                        "the expansion languages only (select them with data.languages)", overlap)

    def trainable(self, model: torch.nn.Module) -> list[str]:
        return stage1_trainable(model)


class MoELPRStage2(MoELPRStage):
    """Review: routers only; LM + gamma * LPR on original-language tokens."""

    name = "moe_lpr_stage2"

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        super().check_config(cfg)
        if cfg.model.moe.balance_loss_coef > 0:
            raise ConfigError("model.moe.balance_loss_coef", f"{cfg.model.moe.balance_loss_coef}, but stage "
                              f"moe_lpr_stage2 has no balance loss; set it to 0 and lpr_loss_coef to 0.1")

    def warn_about_data(self) -> None:
        if self.moe.lpr_loss_coef == 0:
            log.warning("moe_lpr_stage2: lpr_loss_coef is 0, so this review trains the routers on the LM loss "
                        "alone (the paper's 'w/o LPR' ablation)")
        data_languages = training_languages(self.cfg, self.languages)
        if not set(self.moe.original_languages) & set(data_languages):
            log.warning("moe_lpr_stage2: none of the original languages %s is in the training data %s, so the "
                        "LPR term is always 0", self.moe.original_languages, data_languages)

    def trainable(self, model: torch.nn.Module) -> list[str]:
        return stage2_trainable(model)


"""A run config checked against the files it names and the world it runs in, before anything is loaded: in a
second, not after the minutes that data loading and engine setup take. Every problem is a ConfigError (exit 2)
naming the key at fault and the config file.

- every path the config names exists: those the stage's data reads (`Stage.config_paths`: by default
  `data.train_manifest` and `data.codeswitch_table`), `data.val_manifest`, `data.tokenizer`, `run.tokenizer`,
  `checkpoint.init_from` (a checkpoint of the model type the run builds);
- each manifest's sequence length is `data.seq_len`, and it has what the stage needs (`Stage.check_manifests`,
  e.g. MoE-LPR's original languages);
- each tokenizer the run names (whichever key names it) is the one the shards were packed with (equal hash),
  and fits the model's vocabulary;
- every global batch of the schedule (`schedule.global_batch`, each `schedule.batch_ramp[i]`) is a whole
  number of micro-batches on every rank;
- with in-loop evaluation (`logging.eval_every_steps`), lm-eval is installed and every `logging.eval_tasks` name
  resolves to tasks that do not generate text (`output_type: generate_until` in their YAML).
"""
from __future__ import annotations

from pathlib import Path

from fuxi.common.errors import ConfigError
from fuxi.pretrain.config import TrainConfig
from fuxi.pretrain.schedule import check_batch_divisibility
from fuxi.pretrain.stages import stage_named
from fuxi.pretrain.stages.base import ConfigPath, Stage


def check_run_config(cfg: TrainConfig, world_size: int) -> None:
    check_batch_divisibility(cfg.schedule, cfg.parallelism.micro_batch, world_size, cfg.source)
    try:
        stage = stage_named(cfg.stage)
    except ConfigError as err:
        raise err.within(cfg.source) from None
    for key, path, kind in _named_paths(cfg, stage):
        _require(cfg, key, path, kind)
    if cfg.checkpoint.init_from:
        _check_initial_weights(cfg)
    manifests = _manifests(cfg)
    try:
        stage.check_manifests(cfg, manifests)
    except ConfigError as err:
        raise err.within(cfg.source) from None
    for key in ("data.tokenizer", "run.tokenizer"):
        tokenizer = _value(cfg, key)
        if tokenizer:
            _check_tokenizer(cfg, key, tokenizer, manifests)
    if cfg.logging.eval_every_steps:
        from fuxi.pretrain.evaluation.in_loop import check_eval_config

        check_eval_config(cfg)


def _value(cfg: TrainConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _named_paths(cfg: TrainConfig, stage: type[Stage]) -> list[ConfigPath]:
    """Every path the config sets: the stage's, then those every run may read."""
    shared = [ConfigPath(key, _value(cfg, key), kind) for key, kind in (
        ("data.val_manifest", "manifest"), ("data.tokenizer", "tokenizer"), ("run.tokenizer", "tokenizer"),
        ("checkpoint.init_from", "folder"))]
    return [named for named in [*stage.config_paths(cfg), *shared] if named.path]


def _require(cfg: TrainConfig, key: str, path: str, kind: str) -> None:
    p = Path(path)
    problem = None
    if not p.exists():
        problem = "not found"
    elif kind == "manifest" and not (p.is_file() or (p / "manifest.json").is_file()):
        problem = "is a folder without a manifest.json"
    elif kind == "tokenizer" and not (p / "tokenizer.json").is_file():
        problem = "is not a tokenizer folder (no tokenizer.json)"
    elif kind == "file" and not p.is_file():
        problem = "is not a file"
    elif kind == "folder" and not p.is_dir():
        problem = "is not a folder"
    if problem:
        raise ConfigError(key, f"{path} {problem}", cfg.source)


def _manifests(cfg: TrainConfig) -> dict:
    """{key: Manifest} of the manifests the run reads, checked as the loader checks them (`open_manifest`:
    data.seq_len, and data.tokenizer's hash when it is set)."""
    from fuxi.common.errors import DataError
    from fuxi.data_pipeline.loader import open_manifest

    out = {}
    for key in ("data.train_manifest", "data.val_manifest"):
        path = _value(cfg, key)
        if not path or not Path(path).exists():
            continue  # a stage that reads no packed train split
        try:
            out[key] = open_manifest(path, cfg.data, key)
        except ConfigError as err:  # a data field the manifest contradicts (seq_len, tokenizer)
            raise err.under("data.").within(cfg.source) from None
        except DataError as err:  # the manifest itself
            raise ConfigError(key, str(err), cfg.source) from None
    return out


def _check_tokenizer(cfg: TrainConfig, key: str, tokenizer: str, manifests: dict) -> None:
    """The tokenizer fits model.vocab_size; run.tokenizer also has the shards' hash (open_manifest checked
    data.tokenizer's)."""
    from fuxi.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash

    if key == "run.tokenizer":
        digest = tokenizer_hash(tokenizer)
        for manifest_key, manifest in manifests.items():
            if digest != manifest.tokenizer_hash:
                raise ConfigError(key, f"{tokenizer} has tokenizer hash {digest}, but {manifest_key} "
                                  f"{manifest.path} was packed with tokenizer hash {manifest.tokenizer_hash}: the "
                                  f"token ids would mean other tokens", cfg.source)
    try:
        cfg.model.check_tokenizer(load_tokenizer(tokenizer).get_vocab_size(), f"{key} {tokenizer}")
    except ConfigError as err:
        raise err.under("model.").within(cfg.source) from None


def _check_initial_weights(cfg: TrainConfig) -> None:
    from fuxi.checkpoints import CheckpointError, read_model_config

    try:
        saved = read_model_config(cfg.checkpoint.init_from)
    except CheckpointError as err:
        raise ConfigError("checkpoint.init_from", f"{err}", cfg.source) from None
    if saved.type != cfg.model.type:
        raise ConfigError("checkpoint.init_from", f"{cfg.checkpoint.init_from} holds a {saved.type!r} model, the run "
                          f"builds {cfg.model.type!r}", cfg.source)

"""From raw multilingual text to the token stream a trainer consumes.

Stages (each a library function and a `fuxi data ...` command):
  clean.clean             ingest, NFC, language ID, heuristic filters, exact + MinHash near-dedup
  tokenizer.train_tokenizer   byte-level BPE (or sentencepiece BPE), saved as HF tokenizer files
  fertility.fertility     tokens per word and bytes per token, per language
  pack.pack               tokenize in parallel, pack into seq_len+1 blocks with language and document ids,
                          write webdataset shards and a manifest
  loader.build_train_loader / build_val_batches   the mixed, resumable stream for the trainer
  prepare.prepare_dataset all of the above in one call

Import the stage functions from their modules (`from data_pipeline.clean import clean`); the names below are
re-exported for convenience. This package imports nothing else from the project. Heavy dependencies (torch, webdataset, tokenizers) load
only when the function that needs them is used.
"""
from __future__ import annotations

import importlib

from fuxi.common.errors import ConfigError, DataError
from fuxi.data_pipeline.config import DataConfig
from fuxi.data_pipeline.errors import ManifestError, ShardError

_LAZY = {
    "CleanReport": "data_pipeline.clean",
    "LangIdConfig": "data_pipeline.clean",
    "FilterConfig": "data_pipeline.filters",
    "DedupConfig": "data_pipeline.dedup",
    "TokenizerConfig": "data_pipeline.tokenizer",
    "train_tokenizer": "data_pipeline.tokenizer",
    "tokenizer_hash": "data_pipeline.tokenizer",
    "EOS_ID": "data_pipeline.tokenizer",
    "EOS_TOKEN": "data_pipeline.tokenizer",
    "Manifest": "data_pipeline.manifest",
    "load_manifest": "data_pipeline.manifest",
    "plan_mixture": "data_pipeline.mixing",
    "MixturePlan": "data_pipeline.mixing",
    "MixtureDataset": "data_pipeline.stream",
    "default_transform": "data_pipeline.stream",
    "TrainLoader": "data_pipeline.loader",
    "build_train_loader": "data_pipeline.loader",
    "build_val_batches": "data_pipeline.loader",
    "prepare_dataset": "data_pipeline.prepare",
    "PreparedData": "data_pipeline.prepare",
    "bundled_corpus": "data_pipeline.corpus",
}

__all__ = ["DataConfig", "ConfigError", "DataError", "ManifestError", "ShardError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")

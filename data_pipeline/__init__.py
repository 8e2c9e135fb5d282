"""From raw multilingual text to the token stream a trainer consumes.

Stages (each a library function and a `fuxi data ...` command):
  clean.clean             ingest, NFC, language ID, heuristic filters, exact + MinHash near-dedup
  tokenizer.train_tokenizer   byte-level BPE (or sentencepiece BPE), saved as HF tokenizer files
  fertility.fertility     tokens per word and bytes per token, per language
  pack.pack               tokenize in parallel, pack into seq_len+1 blocks with language and document ids,
                          write webdataset shards and a manifest
  loader.build_train_loader / build_val_batches   the mixed, resumable stream for the trainer
  prepare.prepare_dataset all of the above in one call

Import the stage functions from their modules (`from fuxi.data_pipeline.clean import clean`); the names below
are re-exported for convenience. This package imports only fuxi.common from the project. Heavy dependencies
(torch, webdataset, tokenizers) load only when the function that needs them is used.
"""
from __future__ import annotations

import importlib

from fuxi.common.errors import ConfigError, DataError
from fuxi.data_pipeline.config import DataConfig
from fuxi.data_pipeline.errors import ManifestError, ShardError

_LAZY = {
    "CleanReport": "fuxi.data_pipeline.clean_report",
    "LangIdConfig": "fuxi.data_pipeline.langid",
    "FilterConfig": "fuxi.data_pipeline.filters",
    "DedupConfig": "fuxi.data_pipeline.dedup",
    "TokenizerConfig": "fuxi.data_pipeline.tokenizer",
    "train_tokenizer": "fuxi.data_pipeline.tokenizer",
    "tokenizer_hash": "fuxi.data_pipeline.tokenizer",
    "EOS_ID": "fuxi.data_pipeline.tokenizer",
    "EOS_TOKEN": "fuxi.data_pipeline.tokenizer",
    "Manifest": "fuxi.data_pipeline.manifest",
    "load_manifest": "fuxi.data_pipeline.manifest",
    "plan_mixture": "fuxi.data_pipeline.mixing",
    "MixturePlan": "fuxi.data_pipeline.mixing",
    "MixtureDataset": "fuxi.data_pipeline.stream",
    "default_transform": "fuxi.data_pipeline.stream",
    "TrainLoader": "fuxi.data_pipeline.loader",
    "build_train_loader": "fuxi.data_pipeline.loader",
    "build_val_batches": "fuxi.data_pipeline.loader",
    "prepare_dataset": "fuxi.data_pipeline.prepare",
    "PreparedData": "fuxi.data_pipeline.prepare",
    "bundled_corpus": "fuxi.data_pipeline.corpus",
}

__all__ = ["DataConfig", "ConfigError", "DataError", "ManifestError", "ShardError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fuxi.data_pipeline' has no attribute {name!r}")

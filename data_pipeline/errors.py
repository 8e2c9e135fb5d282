"""Errors the data pipeline raises on bad input. Each message names the file, shard, language or field at fault.

They subclass ValueError so a caller that composes our configs (the trainer's strict YAML loader) can catch them
as plain value errors.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad data-pipeline input: a corrupt shard, an inconsistent manifest, a language with no data, ..."""


class DataConfigError(DataError):
    """A DataConfig (or stage option) value is impossible. The message starts with the field name."""


class ShardError(DataError):
    """A shard is missing, truncated or corrupt, or disagrees with its manifest entry. Names the shard."""


class ManifestError(DataError):
    """A manifest is unreadable or disagrees with the config / tokenizer. Names the manifest and field."""

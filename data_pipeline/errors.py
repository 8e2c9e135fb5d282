"""The data pipeline's own kinds of error, below the roots in fuxi.common.errors (DataError for bad data,
ConfigError for an impossible config or stage option). Each message names the file, shard, field or task at
fault."""
from __future__ import annotations

from fuxi.common.errors import DataError


class ShardError(DataError):
    """A shard is missing, truncated or corrupt, or disagrees with its manifest entry. Names the shard."""


class ManifestError(DataError):
    """A manifest is unreadable or disagrees with the config / tokenizer. Names the manifest and field."""


class TaskError(DataError):
    """A task of the engine failed or its worker died; names the stage, the task and its inputs."""

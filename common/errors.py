"""The error roots every room raises. Each is an InputError: bad input from the user (a config, a data file, a
checkpoint), never a bug of ours; the CLI prints it as one line and exits with status 2."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user. The message names the file, key or value at fault, in one line."""


class ConfigError(InputError):
    """A config value is missing, unknown, mistyped or impossible.

    `key`: the dotted key at fault ("model.num_heads"; "" when the file as a whole is, e.g. not found),
    `reason`: what is wrong with it, `source`: the file it came from (with any `--set` overrides), when known.
    Printed as "key: reason (in source)"."""

    def __init__(self, key: str, reason: str, source: str | None = None):
        super().__init__(key, reason, source)
        self.key, self.reason, self.source = key, reason, source

    def __str__(self) -> str:
        head = f"{self.key}: {self.reason}" if self.key else self.reason
        return f"{head} (in {self.source})" if self.source else head

    def under(self, prefix: str) -> ConfigError:
        """The same error seen from the enclosing config: key `seq_len` under `data.` is `data.seq_len`."""
        if not prefix or self.key.startswith(prefix):
            return self
        return ConfigError(prefix + self.key if self.key else prefix.rstrip("."), self.reason, self.source)

    def within(self, source: str | None) -> ConfigError:
        """The same error naming `source` as its file (an error that names one already keeps it)."""
        return self if self.source or not source else ConfigError(self.key, self.reason, source)


class DataError(InputError):
    """Bad input data: a corrupt shard, an inconsistent manifest, a language with no data, a folder that holds
    what a stage did not write, ... The message names the file, shard, language or field at fault."""


class DiskFullError(InputError):
    """A write failed because its filesystem is full (or a quota is reached): the run's data is fine, the disk is
    not. The message names the path, the space the write needs where it can be told, and what was kept."""


class BusyError(InputError):
    """Another run is working in the same folder (common/folder_lock.py). `lock`: the lock file, `holder`: who
    holds it (pid, host, since when, its command)."""

    def __init__(self, lock: str, holder: str):
        super().__init__(lock, holder)
        self.lock, self.holder = lock, holder

    def __str__(self) -> str:
        return f"{self.lock}: held by {self.holder}"

"""Sharded safetensors reading and writing, one tensor at a time.

Converting an 8B model must never hold two copies of it: the reader opens tensors lazily, the writer keeps at
most one shard's worth of tensors before flushing it. Shards and the index are written to temp files and
renamed, so an interrupted conversion never leaves a half-written file under a final name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fuxi.common.atomic import new_file_mode, publish, write_text
from fuxi.common.errors import InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(InputError):
    """A checkpoint is missing, malformed or does not match the model. The message names file and keys."""


class ShardedSafetensorsWriter:
    """Collects tensors in order and flushes a shard whenever the next tensor would exceed `max_shard_bytes`.

    Names follow the Hugging Face convention: `model.safetensors` for one shard, else
    `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # temp shard path, tensor names
        self.total_bytes = 0
        self._file_mode = new_file_mode()  # safetensors creates 0600: unreadable for the rest of a cluster group

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise CheckpointError(f"tensor {name!r} added twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp = self.out_dir / f".shard-{len(self._written):05d}.safetensors.tmp-{os.getpid()}"
        save_file(self._pending, str(tmp), metadata=self.metadata)  # renamed into place by finish()
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Flush, give shards their final names and write the index. Returns the shard paths."""
        self._flush()
        if not self._written:
            raise CheckpointError("no tensors were written")
        n = len(self._written)
        final_paths = []
        weight_map = {}
        for i, (tmp, names) in enumerate(self._written):
            final = self.out_dir / (SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            publish(tmp, final, self._file_mode)
            final_paths.append(final)
            weight_map.update({name: final.name for name in names})
        index_path = self.out_dir / INDEX_FILE
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n", fsync=True)
        elif index_path.exists():
            index_path.unlink()
        return final_paths


def shard_files(ckpt_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when sharded."""
    ckpt_dir = Path(ckpt_dir)
    index_path = ckpt_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index_path}: not a safetensors index ({err})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (ckpt_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: lists shard(s) that do not exist: {missing}")
        return [ckpt_dir / f for f in files]
    if (ckpt_dir / SINGLE_FILE).is_file():
        return [ckpt_dir / SINGLE_FILE]
    raise CheckpointError(f"{ckpt_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def iter_tensors(ckpt_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, shard by shard, each tensor read only when reached."""
    for path in shard_files(ckpt_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from None


def tensor_shapes(ckpt_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the headers only (no tensor data is read)."""
    shapes = {}
    for path in shard_files(ckpt_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors header ({err})") from None
    return shapes

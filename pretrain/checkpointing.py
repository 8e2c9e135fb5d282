"""Training checkpoints: DeepSpeed's (model, optimizer, ZeRO partitions) plus our per-rank state.

Layout under `<output_dir>/checkpoints/`:
    step_00000100/            DeepSpeed tag dir (mp_rank_*, zero shards ...)
        model_config.yaml      the ModelConfig, so conversion needs no run config
        trainer_state.json     step, tokens per language, skipped steps (written by rank 0)
        rank_00000.pt          per-rank RNG states and data-stream state (torch.save of plain data/tensors)
                               (every .pt is read back with torch.load(weights_only=True): never code)
        COMPLETE               written last: a tag without it is an interrupted save and is never loaded
    latest                    the newest complete tag, replaced atomically
    .retired-step_00000050/   an old checkpoint being deleted (renamed first, so it is gone from the step
                              folders in one step); a leftover of an interrupted deletion goes at the next start
                              or save

A crash during a save leaves an incomplete tag dir next to an untouched `latest`; a save that fails (a full
disk) removes its tag dir and raises on every rank, `latest` untouched. A COMPLETE marker always means a
complete checkpoint: files are written whole (temp file, then rename) and a folder is deleted only after it
was renamed out of the step folders.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml

from fuxi.checkpoints.deepspeed_checkpoint import load_weights_only
from fuxi.checkpoints.sharded_safetensors import CheckpointError
from fuxi.common.atomic import atomic_path, write_text
from fuxi.common.diskspace import DISK_FULL, is_disk_full, size_text, tree_bytes
from fuxi.common.errors import DiskFullError
from fuxi.common.typed_config import to_dict
from fuxi.pretrain.distributed import any_rank, barrier

log = logging.getLogger(__name__)
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
RETIRED = ".retired-"  # prefix of a checkpoint folder being deleted; TAG_PATTERN does not match it
# Bytes per trainable parameter of the optimizer state over all ranks: the fp32 master copy and Adam's moments.
OPTIMIZER_BYTES_PER_PARAM = 12


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_torch(obj, path: str | Path, zipfile_serialization: bool = True) -> None:
    """torch.save to a temp file renamed into place. Through a Python file, so a full disk raises OSError
    ENOSPC (torch.save to a path raises "unexpected pos" and loses the errno); a failed write leaves nothing."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f, _use_new_zipfile_serialization=zipfile_serialization)


@contextlib.contextmanager
def deferred_write_errors(engine) -> Iterator[list[BaseException]]:
    """Within the block DeepSpeed's file writes (its checkpoint engine's `save`, the recovery scripts rank 0
    copies beside the checkpoints) go through `save_torch`, and one that fails is recorded in the yielded list
    instead of raised (later writes are skipped): the rank goes on through save_checkpoint's collectives (its
    barriers, the tag check) with the others, so no rank waits for a peer that left. The caller decides after
    the ranks agree. (DeepSpeed 0.19's save_checkpoint: barrier, tag all-reduces, the writes, barrier.)"""
    errors: list[BaseException] = []
    checkpoint_engine = engine.checkpoint_engine
    serialization = getattr(checkpoint_engine, "zipfile_serialization", True)
    copy_scripts = engine._copy_recovery_script

    def save(state_dict, path):
        if not errors:
            try:
                save_torch(state_dict, path, serialization)
            except Exception as err:
                errors.append(err)

    def copy_recovery_script(save_path):
        if not errors:
            try:
                copy_scripts(save_path)
            except Exception as err:
                errors.append(err)

    checkpoint_engine.save = save
    engine._copy_recovery_script = copy_recovery_script
    try:
        yield errors
    finally:
        del checkpoint_engine.save, engine._copy_recovery_script


def estimated_checkpoint_bytes(module: torch.nn.Module) -> int:
    """The bytes of a checkpoint over all ranks, from the model: its weights (ZeRO-1/2 save them whole in the
    model states) and the optimizer state of the trainable ones. ZeRO-3 parameters count at their full size."""
    weights = trainable = 0
    for param in module.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        weights += numel * param.element_size()
        trainable += numel if param.requires_grad else 0
    return weights + OPTIMIZER_BYTES_PER_PARAM * trainable


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, rank: int, device: torch.device | None = None):
        self.root, self.keep_last, self.rank = Path(root), keep_last, rank
        self.device = device or torch.device("cpu")  # where the ranks' collectives run (gloo: cpu)
        self.root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            self.remove_retired()

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:08d}"

    def latest_tag(self) -> str | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not (self.root / tag / COMPLETE).is_file():
            raise FileNotFoundError(f"{pointer} names {tag!r}, which is not a complete checkpoint")
        return tag

    def save(self, engine, step: int, trainer_state: dict, rank_state: dict, model_config,
             tokenizer_dir: str | None = None) -> Path:
        """Collective: every rank calls it. Each rank catches its own write errors; an all-reduce then says
        whether every part was written, only then does rank 0 mark the checkpoint complete and name it in
        `latest`, and a second all-reduce says whether it could. A failed save removes its folder and raises on
        every rank (DiskFullError when a disk is full), `latest` untouched."""
        tag = self.tag_for(step)
        tag_dir = self.root / tag
        if self.rank == 0:
            self.remove_retired()
            if tag_dir.exists():  # a leftover of an interrupted save of the same step
                self.retire(tag_dir)
        barrier()
        with deferred_write_errors(engine) as errors:
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        failure = errors[0] if errors else None
        if failure is None:
            try:
                save_torch(rank_state, tag_dir / f"rank_{self.rank:05d}.pt")
                if self.rank == 0:
                    write_text(tag_dir / "model_config.yaml",
                               yaml.safe_dump({"model": to_dict(model_config)}, sort_keys=False), fsync=True)
                    write_text(tag_dir / "trainer_state.json", json.dumps(trainer_state, indent=2), fsync=True)
                    if tokenizer_dir:
                        shutil.copytree(tokenizer_dir, tag_dir / "tokenizer", dirs_exist_ok=True)
            except Exception as err:
                failure = err
        self._agree(failure, tag_dir, engine)
        failure = None
        if self.rank == 0:
            try:
                write_text(tag_dir / COMPLETE, tag + "\n", fsync=True)
                write_text(self.root / "latest", tag + "\n", fsync=True)
            except Exception as err:
                failure = err
        self._agree(failure, tag_dir, engine)
        if self.rank == 0:
            self._prune(keep=tag)
        return tag_dir

    def _agree(self, failure: BaseException | None, tag_dir: Path, engine) -> None:
        """Collective (one all-reduce): whether a rank failed to write its part. If one did, rank 0 removes the
        folder and every rank raises: DiskFullError when a disk was full, else the failing rank its own error
        and the others a CheckpointError naming it."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        mine = [r == self.rank and failure is not None for r in range(world)]
        full = [r == self.rank and is_disk_full(failure) for r in range(world)]
        flags = any_rank(mine + full, self.device)
        failed = [r for r in range(world) if flags[r]]
        full_ranks = [r for r in range(world) if flags[world + r]]
        if not failed:
            return
        latest = self.latest_tag_or_none()
        if self.rank == 0 and tag_dir.exists():
            self.retire(tag_dir)  # it may hold COMPLETE (when `latest` could not be written)
        barrier()
        kept = "the partial checkpoint was removed and " + \
               (f"`latest` still names {latest}" if latest else "there is no `latest` yet")
        if full_ranks:
            raise DiskFullError(self._disk_full_message(tag_dir, full_ranks, latest, engine, kept)) from None
        if failure is not None:
            raise failure
        raise CheckpointError(f"checkpoint {tag_dir}: rank(s) {failed} could not write their part (their own "
                              f"error is in their output); {kept}")

    def _disk_full_message(self, tag_dir: Path, ranks: list[int], latest: str | None, engine, kept: str) -> str:
        """The space a checkpoint needs: the size of the last complete one, else estimated from the model."""
        if latest is not None:
            need, basis = tree_bytes(self.root / latest), f"the size of {latest}"
        else:
            need, basis = estimated_checkpoint_bytes(engine.module), "estimated from the parameters and the " \
                                                                     "optimizer state"
        copies = self.keep_last + 1
        return (f"checkpoint {tag_dir}: {DISK_FULL} on rank(s) {ranks}; a checkpoint needs about "
                f"{size_text(need)} ({basis}) and checkpoint.keep_last + 1 = {copies} of them must fit "
                f"({size_text(copies * need)}), since the oldest is deleted only after the new one is complete; "
                f"{kept}: free space or lower checkpoint.keep_last, then run the same command to resume")

    def latest_tag_or_none(self) -> str | None:
        try:
            return self.latest_tag()
        except OSError:  # `latest` names an incomplete checkpoint, or cannot be read
            return None

    def _prune(self, keep: str) -> None:
        """Retire the complete checkpoints beyond keep_last and the incomplete ones older than `keep`."""
        tags = sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
        complete = [t for t in tags if (self.root / t / COMPLETE).is_file()]
        doomed = set(complete[: -self.keep_last]) | {t for t in tags if t not in complete and t < keep}
        for tag in sorted(doomed - {keep}):
            self.retire(self.root / tag)

    def retire(self, tag_dir: Path) -> None:
        """Delete a checkpoint folder atomically as the step folders go: rename it to `.retired-<tag>` (one
        step: it is whole under its name or gone), then delete that. A deletion cut short (a SIGKILL, an I/O
        error) leaves only a `.retired-` folder, which `remove_retired` deletes later; a COMPLETE marker under
        a step name always means a complete checkpoint."""
        aside = self.root / f"{RETIRED}{tag_dir.name}"
        shutil.rmtree(aside, ignore_errors=True)  # an earlier retirement of the same step, cut short
        try:
            os.rename(tag_dir, aside)
        except OSError as err:
            log.warning("could not retire checkpoint %s (%s); it stays, whole", tag_dir, err)
            return
        shutil.rmtree(aside, ignore_errors=True)

    def remove_retired(self) -> None:
        """Delete what interrupted retirements left (rank 0, at the start and at each save)."""
        for aside in self.root.glob(f"{RETIRED}*"):
            shutil.rmtree(aside, ignore_errors=True)

    def load(self, engine, tag: str) -> tuple[dict, dict]:
        """Collective. Returns (trainer_state, this rank's state)."""
        tag_dir = self.root / tag
        load_path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {tag_dir}")
        trainer_state = json.loads((tag_dir / "trainer_state.json").read_text())
        rank_file = tag_dir / f"rank_{self.rank:05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(f"{rank_file} is missing: was the checkpoint written with a different "
                                    f"world size ({trainer_state.get('world_size')})?")
        rank_state = load_weights_only(rank_file)
        return trainer_state, rank_state

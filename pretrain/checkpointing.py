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

A crash during a save leaves an incomplete tag dir next to an untouched `latest`. A COMPLETE marker always
means a complete checkpoint: a folder is deleted only after it was renamed out of the step folders.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from fuxi.checkpoints.deepspeed_checkpoint import load_weights_only
from fuxi.common.atomic import atomic_path, write_text
from fuxi.common.typed_config import to_dict
from fuxi.pretrain.distributed import barrier

log = logging.getLogger(__name__)
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
RETIRED = ".retired-"  # prefix of a checkpoint folder being deleted; TAG_PATTERN does not match it


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


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, rank: int):
        self.root, self.keep_last, self.rank = Path(root), keep_last, rank
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
        """Collective: every rank calls it."""
        tag = self.tag_for(step)
        tag_dir = self.root / tag
        if self.rank == 0:
            self.remove_retired()
            if tag_dir.exists():  # a leftover of an interrupted save of the same step
                self.retire(tag_dir)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        rank_file = tag_dir / f"rank_{self.rank:05d}.pt"
        with atomic_path(rank_file) as tmp:
            torch.save(rank_state, tmp)
        barrier()
        if self.rank == 0:
            write_text(tag_dir / "model_config.yaml", yaml.safe_dump({"model": to_dict(model_config)}, sort_keys=False),
                       fsync=True)
            write_text(tag_dir / "trainer_state.json", json.dumps(trainer_state, indent=2), fsync=True)
            if tokenizer_dir:
                shutil.copytree(tokenizer_dir, tag_dir / "tokenizer", dirs_exist_ok=True)
            write_text(tag_dir / COMPLETE, tag + "\n", fsync=True)
            write_text(self.root / "latest", tag + "\n", fsync=True)
            self._prune(keep=tag)
        barrier()
        return tag_dir

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

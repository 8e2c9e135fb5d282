"""What the trainer calls: a resumable, infinite, language-mixed train loader per rank, and deterministic
per-language validation batches.

    loader = build_train_loader(cfg, batch_size=8, rank=rank, world_size=world)
    for batch in loader:            # {"input_ids", "labels", "lang_ids", "doc_ids"}: [8, seq_len] int64
        ...
        state = loader.state_dict()  # plain data; a new loader + load_state_dict(state) continues exactly

Manifests and tokenizers may be URLs (`s3://...`): shards are fetched into the local cache as they are first
read (manifest.py, remote.py).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from fuxi.common.errors import ConfigError, DataError, InputError
from fuxi.common.tables import format_table
from fuxi.data_pipeline import remote
from fuxi.data_pipeline.config import DataConfig
from fuxi.data_pipeline.errors import ManifestError
from fuxi.data_pipeline.manifest import Manifest, load_manifest
from fuxi.data_pipeline.mixing import MixturePlan, plan_mixture
from fuxi.data_pipeline.shards import ShardReader
from fuxi.data_pipeline.stream import MixtureDataset, default_transform, unpack_batch
from fuxi.data_pipeline.tokenizer import tokenizer_hash

log = logging.getLogger(__name__)
STATE_VERSION = 1
# Tokens that travel from a DataLoader worker in one transfer (several batches stacked).
TRANSFER_TOKENS = 1 << 18


def open_manifest(path: str, cfg: DataConfig, field: str) -> Manifest:
    """Load a manifest and check it against the config: sequence length and tokenizer hash."""
    manifest = load_manifest(path)
    if manifest.seq_len != cfg.seq_len:
        raise ConfigError("seq_len", f"the config asks for {cfg.seq_len} but {field} {manifest.path} was packed "
                                     f"with seq_len {manifest.seq_len}; repack or change seq_len")
    if cfg.tokenizer is not None:
        expected = tokenizer_hash(remote.local_input(cfg.tokenizer))
        if expected != manifest.tokenizer_hash:
            raise ConfigError("tokenizer", f"{cfg.tokenizer} has hash {expected[:16]}... but {field} "
                                           f"{manifest.path} was packed with tokenizer hash "
                                           f"{manifest.tokenizer_hash[:16]}...")
    return manifest


def select_languages(manifest: Manifest, cfg: DataConfig) -> list[str]:
    """The languages to train on, in manifest order; naming one the manifest lacks is an error."""
    if cfg.languages is not None:
        wanted = cfg.languages
    elif cfg.mixing == "weights" and cfg.weights:
        wanted = [lang for lang, w in cfg.weights.items() if w > 0]
    else:
        wanted = [lang for lang in manifest.languages]
    unknown = [lang for lang in wanted if lang not in manifest.languages]
    if unknown:
        raise ConfigError("languages", f"{unknown} have no data in {manifest.path} (it has {manifest.languages})")
    if cfg.weights:
        extra = [lang for lang in cfg.weights if lang not in manifest.languages]
        if extra:
            raise ConfigError("weights", f"{extra} have no data in {manifest.path} (it has {manifest.languages})")
    return [lang for lang in manifest.languages if lang in wanted]


def build_plan(manifest: Manifest, cfg: DataConfig) -> MixturePlan:
    languages = select_languages(manifest, cfg)
    per_lang = manifest.samples_per_language()
    available = {lang: per_lang[lang] for lang in languages}
    if cfg.languages is None and cfg.mixing != "weights":
        empty = [lang for lang, n in available.items() if n == 0]
        if empty:
            raise DataError(f"languages: {empty} have no training samples in {manifest.path}; drop them with "
                            f"`languages: [...]` or pack more text")
    epoch_samples = None if cfg.epoch_tokens is None else max(1, cfg.epoch_tokens // manifest.block_len)
    return plan_mixture(available, manifest.block_len, cfg.mixing, cfg.alpha, cfg.weights,
                        cfg.max_epochs_per_language, epoch_samples)


SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def leave_shutdown_to_parent(worker_id: int, parent: int | None = None) -> None:
    """DataLoader worker init: ignore SIGTERM and SIGINT. Schedulers (Slurm, torchrun, a terminal) signal a
    whole process group; a worker that died of it would fail the step the trainer is finishing before it saves.
    The parent decides when to stop and ends its workers (`end_workers`); they die with it (`die_with_parent`).
    `parent`: the pid of the process that started the workers."""
    for sig in SHUTDOWN_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)  # a signal held since the fork is dropped
    if parent is not None:
        die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process the moment its parent dies (Linux's PR_SET_PDEATHSIG; elsewhere torch's watchdog
    ends a worker within 5 s). A worker holds copies of its rank's sockets: while it lives, the other ranks'
    collectives do not see that a rank SIGKILLed (by the OOM killer, a scheduler) is gone. The signal comes
    when the parent's thread that forked ends: iterate the loader from the thread that lives as long as the
    run (the trainer's main thread)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the call
        os._exit(0)


# The DataLoader iterators whose workers may still run, with the pid of the process that started them, for
# `_end_workers_at_exit` (a process forked from that one inherits the table and the hook, not the workers).
_RUNNING: dict[int, tuple[int, object]] = {}
_exit_hook_registered = False


def end_workers(iterator) -> None:
    """End a DataLoader iterator's workers now, whatever the state of the run: SIGKILL, since they ignore SIGTERM
    (`leave_shutdown_to_parent`) and hold nothing to save. torch's own shutdown sends them a sentinel, waits 5 s
    each, then sends SIGTERM, which they ignore; Python's exit (multiprocessing's atexit) joins them forever.
    Their pids leave torch's SIGCHLD watch first, so their deaths are not reported as a worker failure."""
    _RUNNING.pop(id(iterator), None)
    if getattr(iterator, "_worker_pids_set", False):
        from torch.utils.data._utils.signal_handling import _remove_worker_pids

        _remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    workers = list(getattr(iterator, "_workers", []))
    for worker in workers:
        if worker.is_alive():  # not yet reaped, so its pid is still its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
    for worker in workers:
        worker.join()
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # closes the queues; the joins in it return at once


def _end_workers_at_exit() -> None:
    for owner, iterator in list(_RUNNING.values()):
        if owner == os.getpid():
            with contextlib.suppress(Exception):
                end_workers(iterator)


def _track_workers(iterator) -> None:
    """Remember an iterator with workers until `end_workers`. At the first one, register the exit hook: atexit
    runs hooks last-registered first, so it runs before multiprocessing's (registered when it was imported),
    whose join would otherwise wait for workers that ignore its SIGTERM."""
    global _exit_hook_registered
    _RUNNING[id(iterator)] = (os.getpid(), iterator)
    if not _exit_hook_registered:
        atexit.register(_end_workers_at_exit)
        _exit_hook_registered = True


class _InputErrorsAsItems(IterableDataset):
    """A worker's bad-input error (a corrupt shard, ...) travels to the training process as an item and is raised
    there as it is, one line naming the shard. Raised in the worker, DataLoader would re-raise it as a new error
    whose message is the worker's whole traceback."""

    def __init__(self, dataset: IterableDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator:
        try:
            yield from self.dataset
        except InputError as err:
            yield err


@contextlib.contextmanager
def shutdown_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT while DataLoader workers fork: a child inherits the mask, so a signal arriving
    before its init ran stays pending (then ignored) instead of killing it; the parent gets its own signal
    when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class TrainLoader:
    """An endless iterable of batches for one rank, with exact state_dict()/load_state_dict()."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, plan: MixturePlan, batch_size: int, rank: int,
                 world_size: int, transform: Callable[[dict], dict] | None = None):
        self.cfg = cfg
        self.manifest = manifest
        self.plan = plan
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.transform = transform or default_transform
        self.languages = manifest.languages  # lang_ids index this list
        self.bytes_per_token = manifest.bytes_per_token
        self.batches = 0  # consumed by the caller
        self.skipped = 0  # corrupt or missing samples replaced (on_error="skip"), in the batches consumed
        self.tokens_seen = torch.zeros(len(self.languages), dtype=torch.int64)  # input tokens per language

    # --- state ----------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What the sample order depends on; a state from a different order cannot be resumed."""
        shards = hashlib.sha256("".join(s.sha256 for s in self.manifest.shards).encode()).hexdigest()
        return {"seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.cfg.seq_len, "mixing_window": self.cfg.mixing_window,
                "plan": {lang: self.plan.counts[lang] for lang in self.plan.languages}, "shards": shards,
                # the code-switching transform changes the samples, so it is part of what must match; its
                # direction only when it switches anything, so states saved before the direction existed (two
                # entries) still resume with code-switching off
                "codeswitch": [self.cfg.codeswitch_ratio, self.cfg.codeswitch_table] +
                              ([self.cfg.codeswitch_direction] if self.cfg.codeswitch_ratio > 0 else [])}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "batches": self.batches, "skipped": self.skipped,
                "tokens_seen": self.tokens_seen.tolist(), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError("state.version", f"expected {STATE_VERSION}, got {state.get('version')!r}")
        ours = self.fingerprint()
        for key, value in state["fingerprint"].items():
            if ours.get(key) != value:
                raise ConfigError(key, f"the saved data state has {json.dumps(value)[:200]}, this loader "
                                      f"has {json.dumps(ours.get(key))[:200]}; the sample order would differ")
        self.batches = int(state["batches"])
        self.skipped = int(state.get("skipped", 0))
        self.tokens_seen = torch.tensor(state["tokens_seen"], dtype=torch.int64)

    # --- iteration ------------------------------------------------------------------------------------------
    def _dataset(self) -> MixtureDataset:
        return MixtureDataset(self.manifest, self.plan, batch_size=self.batch_size, rank=self.rank,
                              world_size=self.world_size, seed=self.cfg.seed, window=self.cfg.mixing_window,
                              start_batch=self.batches, transform=self.transform,
                              verify_checksums=self.cfg.verify_checksums, on_error=self.cfg.on_error)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = self._dataset()
        workers = self.cfg.num_workers
        if workers > 0:
            dataset.pack_batches = True
            dataset.batches_per_chunk = max(1, min(32, TRANSFER_TOKENS // (self.batch_size * self.cfg.seq_len)))
        # The loader's own generator: creating the worker iterator must not draw from the global torch RNG,
        # whose state the trainer saves and restores (a resumed run would otherwise draw at another step).
        loader = DataLoader(_InputErrorsAsItems(dataset) if workers else dataset, batch_size=None,
                            num_workers=workers, prefetch_factor=self.cfg.prefetch_factor if workers else None,
                            persistent_workers=False,
                            worker_init_fn=functools.partial(leave_shutdown_to_parent, parent=os.getpid()),
                            generator=torch.Generator().manual_seed(self.cfg.seed + self.rank))
        with shutdown_signals_blocked():  # the workers fork here, inheriting the blocked mask
            chunks = iter(loader)
        if workers:
            _track_workers(chunks)
        try:
            yield from self._batches(chunks, dataset.batches_per_chunk, workers)
        finally:  # an error here or in the caller, or the caller closing this generator: the workers end now
            if workers:
                end_workers(chunks)

    def _batches(self, chunks, batches_per_chunk: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
        warn_at = 1
        for item in chunks:
            if isinstance(item, InputError):  # raised in a worker (_InputErrorsAsItems)
                raise item
            chunk = unpack_batch(*item) if workers > 0 else item
            batches = [chunk] if batches_per_chunk == 1 and workers == 0 else \
                [{k: v[j] for k, v in chunk.items()} for j in range(batches_per_chunk)]
            for batch in batches:
                self.skipped += int(batch.pop("_skipped"))
                if self.skipped >= warn_at:  # at 1, 2, 4, 8, ... replacements: visible, never a flood
                    log.warning("data: %d corrupt or missing sample(s) replaced so far on rank %d (on_error=skip)",
                                self.skipped, self.rank)
                    warn_at = 2 * self.skipped
                self.batches += 1
                lang_ids = batch["lang_ids"].numpy().ravel()  # numpy: no torch threads competing with workers
                counts = np.bincount(lang_ids[lang_ids >= 0], minlength=len(self.languages))
                self.tokens_seen += torch.from_numpy(counts[:len(self.languages)])
                yield batch

    # --- reporting ------------------------------------------------------------------------------------------
    def realised_shares(self) -> dict[str, float]:
        total = int(self.tokens_seen.sum())
        return {lang: (int(self.tokens_seen[self.languages.index(lang)]) / total if total else 0.0)
                for lang in self.plan.languages}

    def mixture_report(self) -> str:
        """Target, planned and realised (so far, this rank) language shares, as a table."""
        return self.plan.table(self.realised_shares())


def build_train_loader(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                       transform: Callable[[dict], dict] | None = None) -> TrainLoader:
    """The trainer's loader for one rank (see the module docstring)."""
    cfg.validate()
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ConfigError("rank", f"{rank} is not in [0, world_size={world_size})")
    manifest = open_manifest(cfg.train_manifest, cfg, "train_manifest")
    if cfg.on_error == "raise":
        manifest.check_files(checksums=False)  # sizes now; sha256 lazily, per shard, when first read
    plan = build_plan(manifest, cfg)
    log.info("data: %d languages, %d samples per mixture epoch\n%s", len(plan.languages), plan.epoch_samples,
             plan.table())
    return TrainLoader(cfg, manifest, plan, batch_size, rank, world_size, transform)


def build_val_batches(cfg: DataConfig, batch_size: int, max_batches_per_language: int | None = None,
                      transform: Callable[[dict], dict] | None = None) -> dict[str, list[dict[str, torch.Tensor]]]:
    """{language: [batch, ...]} from the held-out split, in a fixed order (the manifest's), for per-language
    validation loss. The last batch of a language may be smaller. Language ids index the train manifest's
    `languages`, which the validation manifest must share."""
    cfg.validate()
    if cfg.val_manifest is None:
        raise ConfigError("val_manifest", "not set")
    manifest = open_manifest(cfg.val_manifest, cfg, "val_manifest")
    if remote.is_url(cfg.train_manifest) or Path(cfg.train_manifest).exists():
        train = load_manifest(cfg.train_manifest)
        if train.languages != manifest.languages:
            raise ManifestError(f"languages: val manifest {manifest.path} lists {manifest.languages} but train "
                                f"manifest {train.path} lists {train.languages}; language ids would disagree")
    languages = cfg.languages or manifest.languages
    per_lang = manifest.samples_per_language()
    missing = [lang for lang in languages if per_lang.get(lang, 0) == 0]
    if missing:
        raise DataError(f"languages: no validation samples for {missing} in {manifest.path}")
    transform = transform or default_transform
    out: dict[str, list[dict[str, torch.Tensor]]] = {}
    limit = None if max_batches_per_language is None else max_batches_per_language * batch_size
    for lang in languages:
        samples = []
        for shard in (s for s in manifest.shards if s.language == lang):
            reader = ShardReader(manifest, shard, cfg.verify_checksums, cfg.on_error)
            for i in range(len(reader)):
                if limit is not None and len(samples) >= limit:
                    break
                block = reader.read(i)
                if block is not None:
                    samples.append(transform(MixtureDataset._as_tensors(block)))
            reader.close()
        out[lang] = [{k: torch.stack([s[k] for s in samples[i:i + batch_size]]) for k in samples[0]}
                     for i in range(0, len(samples), batch_size)]
    return out


def describe_val(batches: dict[str, list[dict]]) -> str:
    rows = [[lang, len(b), sum(x["input_ids"].shape[0] for x in b)] for lang, b in batches.items()]
    return format_table(["lang", "batches", "samples"], rows)

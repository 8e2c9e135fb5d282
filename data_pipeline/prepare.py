"""All stages in one call: clean -> tokenizer -> pack -> shards, for the train and validation splits.

Used by the quickstart and by other rooms' tests (via tests/data_helpers.py). Layout of `out_dir`:

    clean/{train,valid}/<lang>.jsonl, clean/clean_report.json
    tokenizer/            HF tokenizer files (AutoTokenizer.from_pretrained loads it offline)
    train/manifest.json   + train-<lang>-NNNNN.tar shards
    valid/manifest.json   + valid-<lang>-NNNNN.tar shards
    prepare.json          the arguments and a ready DataConfig
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import NamedTuple

from fuxi.common.atomic import write_json
from fuxi.common.errors import ConfigError
from fuxi.common.staging import refuse_foreign, staged_folder
from fuxi.data_pipeline import remote
from fuxi.data_pipeline.clean import clean
from fuxi.data_pipeline.clean_report import CleanReport
from fuxi.data_pipeline.config import DataConfig
from fuxi.data_pipeline.corpus import bundled_corpus, find_splits
from fuxi.data_pipeline.dedup import DedupConfig
from fuxi.data_pipeline.engine import ExecutorConfig
from fuxi.data_pipeline.filters import FilterConfig
from fuxi.data_pipeline.job import default_work_dir, input_stamp, record_outcome, recorded_job
from fuxi.data_pipeline.langid import LangIdConfig
from fuxi.data_pipeline.manifest import MANIFEST_NAME, load_manifest
from fuxi.data_pipeline.pack import PackJob, pack
from fuxi.data_pipeline.packing import language_files
from fuxi.data_pipeline.tokenizer import TokenizerConfig
from fuxi.data_pipeline.tokenizer_stage import train_tokenizer_task

log = logging.getLogger(__name__)
PREPARE_FILE = "prepare.json"


class PreparedData(NamedTuple):
    """Where the dataset is: local paths, or URLs when prepare uploaded it."""
    tokenizer_dir: Path | str
    train_manifest: Path | str
    val_manifest: Path | str

    def data_config(self, **overrides) -> DataConfig:
        """A DataConfig that streams this dataset (seq_len read from the manifest)."""
        if "seq_len" not in overrides:
            overrides["seq_len"] = load_manifest(self.train_manifest).seq_len
        fields = {"train_manifest": str(self.train_manifest), "val_manifest": str(self.val_manifest),
                  "tokenizer": str(self.tokenizer_dir), **overrides}
        return DataConfig(**fields)


def prepare_dataset(out_dir: str | Path, corpus: str | Path | None = None, *, vocab_size: int = 4096,
                    seq_len: int = 256, backend: str = "bpe", max_docs_per_language: int | None = None,
                    tokenizer_docs_per_language: int = 1_000_000, languages: list[str] | None = None,
                    holdout_fraction: float = 0.05, shard_bytes: int = 4 << 20, num_proc: int | None = None,
                    seed: int = 0, filters: FilterConfig | None = None, dedup: DedupConfig | None = None,
                    langid: LangIdConfig | None = None, tokenizer_dir: str | Path | None = None,
                    progress: bool = False, executor: ExecutorConfig | None = None) -> PreparedData | None:
    """Build a ready-to-stream dataset from `corpus` (default: the bundled corpus).

    A corpus folder with train/ and valid/ keeps its split; otherwise `holdout_fraction` of each language's
    documents are held out. `max_docs_per_language` reads at most that many labelled documents per language
    from each input chunk of clean (8 MB of a file; a smaller file is one chunk): a quick subset, not a cap per
    language and split. `tokenizer_dir`: reuse an existing tokenizer (outside out_dir) instead of training one.
    executor: an `engine.ExecutorConfig` (default: local, `num_proc` processes). Locally, the stages build their
    folders in `.<out>.work` beside out_dir, which replaces out_dir as a whole when every stage has succeeded
    and is then removed; a re-run after a kill or failure skips the stages (and tasks) that had finished. With
    slurm or ray each stage is submitted when the one before has finished (each replaces its own folder when
    complete): None is returned after a submission; run the same call again when the jobs have finished
    (finished stages are not redone). A re-run of a finished prepare with the same corpus and settings does
    nothing (prepare.json records their hash). `corpus` may be a URL (`s3://...`, read from a local copy), and so
    may `out_dir` with the local executor: built in its local mirror, then uploaded (the URLs are returned).
    """
    executor = executor or ExecutorConfig(workers=num_proc, progress=progress)
    started = time.time()
    out_dir, upload_to = _output(out_dir, executor, tokenizer_dir)
    corpus_ref = str(corpus) if corpus is not None else str(bundled_corpus())
    corpus = remote.local_input(corpus) if corpus is not None else bundled_corpus()
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve().is_relative_to(out_dir.resolve()):
        raise ConfigError("tokenizer_dir", f"{tokenizer_dir} lies inside {out_dir}, which prepare replaces as a "
                              f"whole; use a tokenizer folder outside it")
    final = PreparedData(Path(tokenizer_dir) if tokenizer_dir is not None else out_dir / "tokenizer",
                         out_dir / "train" / MANIFEST_NAME, out_dir / "valid" / MANIFEST_NAME)
    published = final if upload_to is None else PreparedData(f"{upload_to}/tokenizer",
                                                             f"{upload_to}/train/{MANIFEST_NAME}",
                                                             f"{upload_to}/valid/{MANIFEST_NAME}")
    local = executor.executor == "local"
    settings = {"vocab_size": vocab_size, "seq_len": seq_len, "backend": backend,
                "max_docs_per_language": max_docs_per_language,
                "tokenizer_docs_per_language": tokenizer_docs_per_language, "languages": languages,
                "holdout_fraction": holdout_fraction, "shard_bytes": shard_bytes, "seed": seed,
                "filters": filters, "dedup": dedup, "langid": langid, "tokenizer_dir": tokenizer_dir}
    job = _prepare_hash(settings, [corpus] + ([Path(tokenizer_dir)] if tokenizer_dir is not None else []))
    if local:
        refuse_foreign(out_dir, OWNED)  # before the work, not after it
        if upload_to is not None:
            remote.refuse_foreign(upload_to, OWNED)
        if recorded_job(out_dir / PREPARE_FILE) == job and all(p.exists() for p in final):
            if upload_to is None or (remote.read_json(f"{upload_to}/{PREPARE_FILE}") or {}).get("job") == job:
                log.info("prepare: up to date (nothing to do): %s holds the output of these inputs and settings",
                         upload_to or out_dir)
                record_outcome("prepare", "up to date")
                return published
            log.info("prepare: %s is built (in %s) but not uploaded; uploading", upload_to, out_dir)
            remote.upload_folder(out_dir, upload_to, PREPARE_FILE)
            record_outcome("prepare", "done")
            return published
    # Locally the stages build their folders in `.<out>.work/`, beside out_dir and under a name that does not
    # change between runs: a killed run's finished stages (and finished tasks) are found there by the re-run.
    root = default_work_dir(out_dir) if local else out_dir
    root.mkdir(parents=True, exist_ok=True)
    result = _clean_tokenize_pack(root, corpus, executor, vocab_size=vocab_size, seq_len=seq_len, backend=backend,
                                  max_docs_per_language=max_docs_per_language,
                                  tokenizer_docs_per_language=tokenizer_docs_per_language, languages=languages,
                                  holdout_fraction=holdout_fraction, shard_bytes=shard_bytes, seed=seed,
                                  filters=filters, dedup=dedup, langid=langid, tokenizer_dir=tokenizer_dir)
    if result is None:
        return None
    report, manifests = result
    summary = {"job": job, "corpus": corpus_ref, "vocab_size": vocab_size, "seq_len": seq_len, "backend": backend,
               "max_docs_per_language": max_docs_per_language, "holdout_fraction": holdout_fraction, "seed": seed,
               "seconds": round(time.time() - started, 2),
               "data_config": asdict(published.data_config(seq_len=seq_len)),
               "report": stage_report(report, *manifests)}
    if not local:  # on a cluster each stage has replaced its own folder
        write_json(out_dir / PREPARE_FILE, summary)
        return final
    # One switch replaces out_dir as a whole (common/staging.py): a failure before it leaves an earlier dataset whole,
    # never a new tokenizer beside old shards.
    with staged_folder(out_dir, owned=OWNED) as staging:
        for name in ("clean", "train", "valid") + (("tokenizer",) if tokenizer_dir is None else ()):
            (root / name).rename(staging / name)  # same filesystem: both lie beside out_dir
        write_json(staging / PREPARE_FILE, summary)
    shutil.rmtree(root, ignore_errors=True)
    if upload_to is not None:
        remote.upload_folder(out_dir, upload_to, PREPARE_FILE)  # prepare.json last: it marks a whole upload
    log.info("prepare: done in %.1fs -> %s", time.time() - started, upload_to or out_dir)
    record_outcome("prepare", "done")
    return published


def _output(out_dir: str | Path, executor: ExecutorConfig,
            tokenizer_dir: str | Path | None) -> tuple[Path, str | None]:
    """(the local folder prepare builds, the URL it is uploaded to or None). A URL output is built in its local
    mirror ($FUXI_CACHE) and uploaded once whole, prepare.json last; on a cluster each stage switches its own
    folder in place, which an upload cannot do."""
    if not remote.is_url(out_dir):
        return Path(out_dir).absolute(), None
    if executor.executor != "local":
        raise ConfigError("out_dir", f"{out_dir}: with --executor {executor.executor} prepare builds a folder on "
                                     f"the shared file system; for an output at a URL run it locally, or run "
                                     f"`fuxi data clean`, `tokenizer` and `pack` with URL outputs")
    if tokenizer_dir is not None:
        raise ConfigError("tokenizer_dir", f"{tokenizer_dir}: the manifests at {out_dir} would name a tokenizer "
                                           f"outside the upload; for a given tokenizer run `fuxi data clean` and "
                                           f"`pack` with URL outputs")
    local, url = remote.local_output(out_dir)
    return local.absolute(), url


def _prepare_hash(settings: dict, inputs: list[Path]) -> str:
    """The hash of what a prepared folder depends on: the settings and the input stamp of the corpus (and of a
    given tokenizer). prepare.json records it under "job"; a re-run with the same one has nothing to do."""
    identity = {"stage": "prepare", "settings": {k: asdict(v) if is_dataclass(v) else v for k, v in settings.items()},
                "inputs": input_stamp(inputs)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()


OWNED = ("clean", "tokenizer", "train", "valid", PREPARE_FILE)


def _clean_tokenize_pack(root: Path, corpus: Path, executor: ExecutorConfig, *, vocab_size: int, seq_len: int,
                         backend: str, max_docs_per_language: int | None, tokenizer_docs_per_language: int,
                         languages: list[str] | None, holdout_fraction: float, shard_bytes: int, seed: int,
                         filters: FilterConfig | None, dedup: DedupConfig | None, langid: LangIdConfig | None,
                         tokenizer_dir: str | Path | None) -> tuple[CleanReport, list[Path]] | None:
    """clean -> tokenizer -> pack train and valid, each into its folder under `root` (each stage skips itself
    when its folder is up to date with its inputs and settings); None when a stage did not finish here."""
    report = clean(find_splits(corpus), root / "clean", filters=filters, dedup=dedup, langid=langid,
                   languages=languages, max_docs_per_language=max_docs_per_language,
                   holdout_fraction=holdout_fraction, executor=executor)
    if report is None:
        return None
    log.info("clean report\n%s", report.table())
    tok_config = TokenizerConfig(vocab_size=vocab_size, backend=backend,
                                 max_docs_per_language=tokenizer_docs_per_language, seed=seed,
                                 model_max_length=max(seq_len, 1024))
    tokenizer = Path(tokenizer_dir) if tokenizer_dir is not None else \
        train_tokenizer_task(root / "clean" / "train", root / "tokenizer", tok_config, executor)
    if tokenizer is None:
        return None
    pack_languages = sorted(language_files(root / "clean" / "train"))
    manifests = []
    for split in ("train", "valid"):
        # the manifests record the tokenizer relative to themselves, which moving root's folders preserves
        manifest = pack(root / "clean" / split, tokenizer, root / split, split=split, seq_len=seq_len,
                        languages=pack_languages, shard_bytes=shard_bytes, seed=seed, executor=executor)
        if manifest is None:
            return None
        manifests.append(manifest)
    return report, manifests


def stage_report(report, *manifests: Path) -> dict:
    """One report of the whole job: documents in and out per split, language and filter (clean), then per
    stage and task, and tokens per language and per pack task."""
    out = {"clean": {"per_language": report.stats, "tasks": report.tasks}}
    for path in manifests:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        tasks = json.loads((Path(path).parent / PackJob.record).read_text(encoding="utf-8"))["tasks"]
        out[f"pack_{data['split']}"] = {"tokens": {k: v["tokens"] for k, v in data["language_stats"].items()},
                                        "samples": {k: v["samples"] for k, v in data["language_stats"].items()},
                                        "tasks": tasks}
    return out

"""Stage 1, ingest and clean: Unicode NFC, language labels, heuristic filters, exact and near-duplicate removal.

`clean()` runs a `CleanJob` (job.py) as tasks of the data engine (engine.py: local processes, Slurm job arrays
or Ray), in stages that exchange files in a work folder (their steps: `clean_stages.py`, `dedup_stages.py`):

    plan      the input chunks (about --chunk-mb of input each)                                   (1 task)
    process   per input chunk: NFC, language ID, filters; documents that pass, their exact-duplicate keys,
              MinHash band keys and shingle sets                                            (--tasks tasks)
    buckets   per band: documents with equal band keys -> candidate pairs -> exact Jaccard -> edges; and the
              exact duplicates (the bands and the exact keys dealt to the tasks)            (--tasks)
    clusters  connected components of the edges; all but the first of each are near duplicates   (1 task)
    holdout   (with a holdout fraction) kept training documents per language before each chunk   (1 task)
    write     per chunk: drop duplicates, hold out, write kept documents per split and language (--tasks)
    gather    one file per split and language, in input order                                (--tasks)
    publish   the report, and the new output folder switched in place of the old one          (1 task)

Splits are processed validation first and duplicates are found across splits, so a training document that
repeats a validation document is removed (decontamination). Document ids follow input order, so the output
is the same for any number of tasks, processes or machines. Output: `<out_dir>/<split>/<lang>.jsonl` and
`<out_dir>/clean_report.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

from fuxi.common.errors import ConfigError
from fuxi.data_pipeline import remote
from fuxi.data_pipeline.clean_report import REPORT_NAME, CleanReport
from fuxi.data_pipeline.clean_stages import (Gather, HoldoutOffsets, PlanChunks, ProcessChunks, Publish,
                                             WriteKept)
from fuxi.data_pipeline.corpus import check_splits_read, find_splits
from fuxi.data_pipeline.dedup import DedupConfig
from fuxi.data_pipeline.dedup_stages import Clusters, FindDuplicates
from fuxi.data_pipeline.engine import ExecutorConfig, Stage
from fuxi.data_pipeline.filters import FilterConfig
from fuxi.data_pipeline.job import Job, input_stamp, run_job
from fuxi.data_pipeline.langid import LangIdConfig
from fuxi.data_pipeline.readers import RecordFields


@dataclass
class CleanJob(Job):
    """Everything the clean stages need (the steps read it as `self.job`)."""

    name: ClassVar[str] = "clean"
    record: ClassVar[str] = REPORT_NAME

    splits: dict[str, str]  # split -> input, validation first
    filters: FilterConfig
    dedup: DedupConfig
    langid: LangIdConfig
    languages: list[str] | None
    max_docs_per_language: int | None
    holdout_every: int
    chunk_bytes: int
    fields: RecordFields = RecordFields()  # where records keep their text and language

    def inputs(self) -> list[str]:
        return list(self.splits.values())

    def parallelism(self) -> int:
        """The input chunks, counted from file sizes (a file holds at least one)."""
        return sum(-(-size // self.chunk_bytes) or 1 for _, size, _ in input_stamp(self.inputs()))

    def owned(self) -> tuple[str, ...]:
        return (REPORT_NAME, "train", "valid", *self.splits, *_splits_of_earlier_run(self.out_dir))

    def stages(self, job_hash: str, tasks: int) -> list[Stage]:
        n_bands = self.dedup.bands[0] if self.dedup.near else 0
        stages = [Stage("plan", PlanChunks(self), 1, parallel=False),
                  Stage("process", ProcessChunks(self), tasks),
                  Stage("buckets", FindDuplicates(self, n_bands), min(tasks, n_bands + 1)),
                  Stage("clusters", Clusters(self, n_bands), 1, parallel=False)]
        if self.holdout_every:
            stages.append(Stage("holdout", HoldoutOffsets(self), 1, parallel=False))
        return stages + [Stage("write", WriteKept(self), tasks),
                         Stage("gather", Gather(self), tasks),
                         Stage("publish", Publish(self, job_hash), 1, parallel=False)]

    def result(self) -> CleanReport:
        return CleanReport.load(self.out_dir / REPORT_NAME)


def _splits_of_earlier_run(out_dir: Path) -> list[str]:
    """The split folders an earlier `clean` into out_dir wrote (its report lists them): ours to replace."""
    try:
        return list(json.loads((out_dir / REPORT_NAME).read_text(encoding="utf-8")).get("stats", {}))
    except (OSError, ValueError, AttributeError):
        return []


def clean(inputs: str | Path | Mapping[str, str | Path], out_dir: str | Path, *,
          filters: FilterConfig | None = None, dedup: DedupConfig | None = None,
          langid: LangIdConfig | None = None, languages: list[str] | None = None,
          max_docs_per_language: int | None = None, holdout_fraction: float = 0.0,
          num_proc: int | None = None, progress: bool = True, executor: ExecutorConfig | None = None,
          work_dir: str | Path | None = None, chunk_mb: float = 8.0, keep_work: bool = False,
          text_field: str = "text", lang_field: str | None = None) -> CleanReport | None:
    """Clean `inputs` into `out_dir/<split>/<lang>.jsonl`; returns the report (None when the job was submitted
    to a cluster).

    inputs: a corpus path (any layout of `corpus.py`; one holding splits is split accordingly) or {split: path}.
    text_field, lang_field: the record field (JSONL) or column (parquet, `datasets`) of the text and of the
    language (default: "lang", else "language"); a language given by the data is kept, not identified. Inputs and
    out_dir may be URLs (`s3://...`, remote.py): inputs are read from a local copy, and the output is built in
    a local folder and uploaded.
    languages: keep only these languages (after identification). max_docs_per_language: read at most this
    many labelled documents per language from each input chunk (quick subsets; a file smaller than `chunk_mb`
    is one chunk). holdout_fraction: when there is no "valid" split, move every round(1/fraction)-th kept
    training document of each language into one. executor: an `engine.ExecutorConfig` (default: local, with
    `num_proc` processes and as many tasks). work_dir: intermediate files (default: `.<out>.work` beside the
    output), removed after success unless `keep_work`.
    """
    filters = filters or FilterConfig()
    dedup = dedup or DedupConfig()
    langid = langid or LangIdConfig()
    filters.validate()
    dedup.validate()
    splits = {k: remote.local_input(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) \
        else find_splits(remote.local_input(inputs))
    if not splits:
        raise ConfigError("inputs", "no splits given")
    check_splits_read(splits)
    if not text_field or lang_field == "":
        raise ConfigError("text_field" if not text_field else "lang_field", "must not be empty")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError("holdout_fraction", f"must be in [0, 1), got {holdout_fraction}")
    if chunk_mb <= 0:
        raise ConfigError("chunk_mb", f"must be > 0, got {chunk_mb}")
    local_out, upload_to = remote.local_output(out_dir)
    job = CleanJob(
        out_dir=local_out, work_dir=work_dir, splits={k: str(Path(v).absolute()) for k, v in splits.items()},
        filters=filters, dedup=dedup, langid=langid, languages=list(languages) if languages else None,
        max_docs_per_language=max_docs_per_language,
        holdout_every=round(1.0 / holdout_fraction) if holdout_fraction > 0 and "valid" not in splits else 0,
        chunk_bytes=max(1, int(chunk_mb * (1 << 20))), fields=RecordFields(text_field, lang_field))
    return run_job(job, executor or ExecutorConfig(workers=num_proc, progress=progress), keep_work, upload_to)

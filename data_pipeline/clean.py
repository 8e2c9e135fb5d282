"""Stage 1, ingest and clean: Unicode NFC, language labels, heuristic filters, exact and near-duplicate removal.

Runs as tasks of the data engine (`engine.py`; local processes, Slurm job arrays or Ray), in six stages that
exchange files in a work folder (`clean_stages.py`, `dedup_stages.py`):

    process   per input chunk: NFC, language ID, filters; documents that pass, their exact-duplicate keys,
              MinHash band keys and shingle sets                                            (--tasks tasks)
    buckets   per band: documents with equal band keys -> candidate pairs -> exact Jaccard -> edges; and the
              exact duplicates (the bands and the exact keys dealt to the tasks)            (--tasks)
    clusters  connected components of the edges; all but the first of each are near duplicates   (1 task)
    write     per chunk: drop duplicates, hold out, write kept documents per split and language (--tasks)
    gather    one file per split and language, in input order                                (--tasks)
    publish   the report, and the new output folder switched in place of the old one          (1 task)

Splits are processed validation first and duplicates are found across splits, so a training document that
repeats a validation document is removed (decontamination). Document ids follow input order, so the output
is the same for any number of tasks, processes or machines. Output: `<out_dir>/<split>/<lang>.jsonl` and
`<out_dir>/clean_report.json`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from fuxi.common.errors import ConfigError
from fuxi.common.tables import format_table
from fuxi.data_pipeline.corpus import find_splits
from fuxi.data_pipeline.dedup import DedupConfig, exact_key
from fuxi.data_pipeline.filters import CODE_FILTERS, TEXT_FILTERS, DocumentFilter, FilterConfig
from fuxi.data_pipeline.io_utils import input_stamp
from fuxi.data_pipeline.textstats import nfc

log = logging.getLogger(__name__)
REPORT_NAME = "clean_report.json"


@dataclass
class LangIdConfig:
    # Fill missing/unknown labels with py3langid (its model ships inside the package).
    enabled: bool = True
    # Documents identified with a lower (normalised) probability are dropped as "langid_low_confidence".
    min_confidence: float = 0.5
    # Restrict the identifier to these ISO 639-1 codes (None: all 97 it knows).
    languages: list[str] | None = None


@dataclass
class CleanReport:
    # split -> language -> counter name -> count
    stats: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    # stage -> task -> figures (seconds, chunks, documents in and out, candidates, ...)
    tasks: dict[str, dict[str, dict]] = field(default_factory=dict)
    # what the output depends on (inputs and settings); a re-run with the same one has nothing to do
    fingerprint: str = ""

    def languages(self, split: str) -> list[str]:
        return sorted(self.stats.get(split, {}))

    def kept(self, split: str, lang: str) -> int:
        return self.stats.get(split, {}).get(lang, {}).get("kept", 0)

    def table(self) -> str:
        rows = []
        for split in self.stats:
            for lang in sorted(self.stats[split]):
                s = self.stats[split][lang]
                filtered = sum(s.get(f"filter_{name}", 0) for name in set(TEXT_FILTERS) | set(CODE_FILTERS))
                reasons = ", ".join(f"{k[7:]}={v}" for k, v in sorted(s.items()) if k.startswith("filter_") and v)
                rows.append([split, lang, s.get("input", 0), s.get("langid_filled", 0), filtered,
                             s.get("exact_dup", 0), s.get("near_dup", 0), s.get("kept", 0),
                             s.get("held_out", 0), reasons or "-"])
        return format_table(["split", "lang", "input", "lid", "filtered", "exact dup", "near dup", "kept",
                             "held out", "filters"], rows)

    def task_table(self) -> str:
        """One row per stage: tasks, seconds (sum and slowest task), documents in and out."""
        rows = []
        for stage, tasks in self.tasks.items():
            secs = [t.get("seconds", 0.0) for t in tasks.values()]
            rows.append([stage, len(tasks), round(sum(secs), 2), round(max(secs, default=0.0), 2),
                         sum(t.get("docs_in", 0) for t in tasks.values()),
                         sum(t.get("docs_out", 0) for t in tasks.values())])
        return format_table(["stage", "tasks", "task-seconds", "slowest task", "docs in", "docs out"], rows)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> "CleanReport":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data.get("stats", {}), data.get("tasks", {}), data.get("fingerprint", ""))


# --- per-document work ----------------------------------------------------------------------------------------

_IDENTIFIERS: dict[tuple[str, ...] | None, object] = {}  # module-level: forked workers inherit loaded ones


def identifier(languages: list[str] | None):
    """py3langid's identifier (its model ships in the package; loading takes about a second, so lazily)."""
    key = tuple(sorted(languages)) if languages else None
    if key not in _IDENTIFIERS:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
        ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        if languages:
            ident.set_languages(languages)
        _IDENTIFIERS[key] = ident
    return _IDENTIFIERS[key]


class DocumentProcessor:
    """NFC, language identification and the filters for one document: `(text, lang, filled, reason)`, reason
    None when the document is kept."""

    def __init__(self, filters: FilterConfig, langid: LangIdConfig):
        self.filter = DocumentFilter(filters)
        self.langid = langid

    def __call__(self, text: str, lang: str | None) -> tuple[str, str | None, bool, str | None]:
        text = nfc(text)
        if lang is None:
            if not self.langid.enabled:
                return text, None, False, "no_language"
            lang, confidence = identifier(self.langid.languages).classify(text)
            if confidence < self.langid.min_confidence:
                return text, lang, True, "langid_low_confidence"
            return text, lang, True, self.filter.reject_reason(text, lang)
        return text, lang, False, self.filter.reject_reason(text, lang)


def exact_key_words(text: str) -> tuple[int, int]:
    """The 128-bit exact-duplicate key as two 64-bit integers."""
    key = exact_key(text)
    return int.from_bytes(key[:8], "big"), int.from_bytes(key[8:], "big")


# --- the job --------------------------------------------------------------------------------------------------

@dataclass
class CleanSettings:
    """Everything the clean stages need; what the output depends on is its fingerprint."""
    splits: dict[str, str]
    out_dir: str
    work_dir: str
    filters: FilterConfig
    dedup: DedupConfig
    langid: LangIdConfig
    languages: list[str] | None
    max_docs_per_language: int | None
    holdout_every: int
    chunk_bytes: int

    def fingerprint(self) -> str:
        files = input_stamp(self.splits.values())
        content = {k: v for k, v in asdict(self).items() if k not in ("out_dir", "work_dir")}
        blob = json.dumps([content, files], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def clean(inputs: str | Path | Mapping[str, str | Path], out_dir: str | Path, *,
          filters: FilterConfig | None = None, dedup: DedupConfig | None = None,
          langid: LangIdConfig | None = None, languages: list[str] | None = None,
          max_docs_per_language: int | None = None, holdout_fraction: float = 0.0,
          num_proc: int | None = None, progress: bool = True, executor=None, work_dir: str | Path | None = None,
          chunk_mb: float = 8.0, keep_work: bool = False) -> CleanReport | None:
    """Clean `inputs` into `out_dir/<split>/<lang>.jsonl`; returns the report (None when the job was submitted
    to a cluster or only some of its tasks ran on this machine).

    inputs: a corpus path (a folder with train/ and valid/ is split accordingly) or {split: path}.
    languages: keep only these languages (after identification). max_docs_per_language: read at most this
    many labelled documents per language from each input chunk (quick subsets; a file smaller than `chunk_mb`
    is one chunk). holdout_fraction: when there is no "valid" split, move every round(1/fraction)-th kept
    training document of each language into one. executor: an `engine.ExecutorConfig` (default: local, with
    `num_proc` processes and as many tasks). work_dir: intermediate files (default: `.<out>.work` beside the
    output), removed after success unless `keep_work`.
    """
    from fuxi.data_pipeline.clean_stages import clean_stages
    from fuxi.data_pipeline.engine import ExecutorConfig, default_work_dir, prepare_work_dir, run_stages

    filters = filters or FilterConfig()
    dedup = dedup or DedupConfig()
    langid = langid or LangIdConfig()
    filters.validate()
    dedup.validate()
    splits = dict(inputs) if isinstance(inputs, Mapping) else find_splits(inputs)
    if not splits:
        raise ConfigError("inputs", "no splits given")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError("holdout_fraction", f"must be in [0, 1), got {holdout_fraction}")
    if chunk_mb <= 0:
        raise ConfigError("chunk_mb", f"must be > 0, got {chunk_mb}")
    executor = executor or ExecutorConfig(workers=num_proc, progress=progress)
    executor.validate()
    if executor.partial:
        raise ConfigError("local_tasks", "clean's stages exchange files through one work folder; run its tasks "
                              "on one machine, or on many with --executor slurm/ray and a shared work folder")
    out_dir = Path(out_dir).absolute()
    settings = CleanSettings(
        splits={k: str(Path(v).absolute()) for k, v in splits.items()}, out_dir=str(out_dir),
        work_dir=str(Path(work_dir).absolute() if work_dir else default_work_dir(out_dir)), filters=filters,
        dedup=dedup, langid=langid, languages=list(languages) if languages else None,
        max_docs_per_language=max_docs_per_language,
        holdout_every=round(1.0 / holdout_fraction) if holdout_fraction > 0 and "valid" not in splits else 0,
        chunk_bytes=max(1, int(chunk_mb * (1 << 20))))
    from fuxi.common.staging import refuse_foreign
    refuse_foreign(out_dir, (REPORT_NAME, "train", "valid", *settings.splits, *_splits_of_earlier_run(out_dir)))
    fingerprint = settings.fingerprint()
    report_path = out_dir / REPORT_NAME
    if report_path.is_file():
        previous = CleanReport.load(report_path)
        if previous.fingerprint == fingerprint:
            log.info("clean: %s is up to date with its inputs and settings", out_dir)
            return previous
    work = Path(settings.work_dir)
    prepare_work_dir(work, {"fingerprint": fingerprint, "tasks": executor.num_tasks, "stage": "clean"})
    done = run_stages(clean_stages(settings, fingerprint, executor.num_tasks), work, executor)
    if not done:
        return None
    report = CleanReport.load(report_path)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _splits_of_earlier_run(out_dir: Path) -> list[str]:
    """The split folders an earlier `clean` into out_dir wrote (its report lists them): ours to replace."""
    try:
        return list(json.loads((out_dir / REPORT_NAME).read_text(encoding="utf-8")).get("stats", {}))
    except (OSError, ValueError, AttributeError):
        return []


def merge_counters(into: dict, stats: Mapping) -> None:
    """Add split -> lang -> counter stats into `into`."""
    for split, langs in stats.items():
        for lang, counters in langs.items():
            target = into.setdefault(split, {}).setdefault(lang, Counter())
            target.update(counters)


def ordered_stats(stats: Mapping) -> dict:
    return {split: {lang: dict(c) for lang, c in sorted(langs.items())} for split, langs in stats.items()}


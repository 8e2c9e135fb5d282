"""Stage 1, ingest and clean: Unicode NFC, language labels, heuristic filters, exact and near-duplicate removal.

Input splits are processed in the order given (validation first), and duplicates are detected across splits,
so a training document that repeats a validation document is removed from training (decontamination).
Per-document work (NFC, language ID, filters, MinHash signatures) runs in worker processes; duplicate
decisions are made in document order in the parent, so the output is the same for any number of processes.
Output: `<out_dir>/<split>/<lang>.jsonl` and `<out_dir>/clean_report.json`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from tqdm import tqdm

from data_pipeline.corpus import Document, find_splits, iter_documents
from data_pipeline.dedup import DedupConfig, NearDuplicateIndex, exact_key, minhash_signature
from data_pipeline.errors import DataConfigError, DataError
from data_pipeline.filters import CODE_FILTERS, TEXT_FILTERS, DocumentFilter, FilterConfig
from data_pipeline.io_utils import atomic_write, write_json
from data_pipeline.staging import staged_folder
from data_pipeline.tables import format_table
from data_pipeline.textstats import nfc

log = logging.getLogger(__name__)
_BATCH = 128
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

    def to_dict(self) -> dict:
        return asdict(self)


# --- per-document work (runs in worker processes) ---------------------------------------------------------

_WORKER: dict = {}


_IDENTIFIERS: dict[tuple[str, ...] | None, object] = {}  # module-level: forked workers inherit loaded ones


def _init_worker(filters: FilterConfig, dedup: DedupConfig, langid: LangIdConfig) -> None:
    _WORKER["filter"] = DocumentFilter(filters)
    _WORKER["dedup"] = dedup
    _WORKER["langid"] = langid


def _identifier():
    """py3langid's identifier (its model ships in the package; loading takes about a second, so lazily)."""
    languages = _WORKER["langid"].languages
    key = tuple(sorted(languages)) if languages else None
    if key not in _IDENTIFIERS:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
        ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        if languages:
            ident.set_languages(languages)
        _IDENTIFIERS[key] = ident
    return _IDENTIFIERS[key]


def _process_batch(batch: list[tuple[str, str | None]]) -> list[tuple]:
    """(text, lang) -> (nfc text, lang, lang_was_filled, reject reason, exact key, minhash values)."""
    out = []
    doc_filter: DocumentFilter = _WORKER["filter"]
    dedup: DedupConfig = _WORKER["dedup"]
    langid: LangIdConfig = _WORKER["langid"]
    for text, lang in batch:
        text = nfc(text)
        filled = False
        reason = None
        if lang is None:
            if not langid.enabled:
                reason = "no_language"
            else:
                lang, confidence = _identifier().classify(text)
                filled = True
                if confidence < langid.min_confidence:
                    reason = "langid_low_confidence"
        if reason is None:
            reason = doc_filter.reject_reason(text, lang)
        key = exact_key(text) if dedup.exact and reason is None else None
        signature = minhash_signature(text, dedup) if dedup.near and reason is None else None
        out.append((text, lang, filled, reason, key, signature))
    return out


# --- orchestration ----------------------------------------------------------------------------------------

def _batches(docs: Iterable[tuple[str, Document]], size: int) -> Iterator[list[tuple[str, Document]]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def _capped(split: str, docs: Iterable[Document], cap: int | None) -> Iterator[tuple[str, Document]]:
    seen: Counter = Counter()
    for doc in docs:
        if cap is not None and doc.lang is not None:
            if seen[doc.lang] >= cap:
                continue
            seen[doc.lang] += 1
        yield split, doc


class _Selector:
    """The in-order decisions: language selection, exact and near duplicates, hold-out; counts everything."""

    def __init__(self, dedup: DedupConfig, keep: set[str] | None, holdout_every: int):
        self.dedup = dedup
        self.keep = keep
        self.holdout_every = holdout_every
        self.stats: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
        self.seen_exact: set[bytes] = set()
        self.near: dict[str, NearDuplicateIndex] = {}
        self.kept_train: Counter = Counter()

    def select(self, split: str, lang: str | None, text: str, filled: bool, reason: str | None,
               key: bytes | None, signature) -> str | None:
        """The split the document is written to, or None when it is dropped."""
        s = self.stats[split][lang or "unknown"]
        s["input"] += 1
        s["chars_in"] += len(text)
        s["langid_filled"] += int(filled)
        if reason is not None:
            s[f"filter_{reason}"] += 1
            return None
        if self.keep is not None and lang not in self.keep:
            s["not_selected"] += 1
            return None
        if key is not None:
            if key in self.seen_exact:
                s["exact_dup"] += 1
                return None
            self.seen_exact.add(key)
        if signature is not None:
            index = self.near.get(lang)
            if index is None:
                index = self.near[lang] = NearDuplicateIndex(self.dedup)
            if index.is_duplicate(signature):
                s["near_dup"] += 1
                return None
        target = split
        if split == "train" and self.holdout_every:
            if self.kept_train[lang] % self.holdout_every == 0:
                target = "valid"
                s["held_out"] += 1
            self.kept_train[lang] += 1
        s["kept"] += 1
        s["chars_kept"] += len(text)
        return target


def clean(inputs: str | Path | Mapping[str, str | Path], out_dir: str | Path, *,
          filters: FilterConfig | None = None, dedup: DedupConfig | None = None,
          langid: LangIdConfig | None = None, languages: list[str] | None = None,
          max_docs_per_language: int | None = None, holdout_fraction: float = 0.0,
          num_proc: int | None = None, progress: bool = True) -> CleanReport:
    """Clean `inputs` into `out_dir/<split>/<lang>.jsonl`.

    inputs: a corpus path (a folder with train/ and valid/ is split accordingly) or {split: path}.
    languages: keep only these languages (after identification). max_docs_per_language: read at most this
    many labelled documents per split and language (quick subsets). holdout_fraction: when there is no
    "valid" split, move every round(1/fraction)-th kept training document of each language into one.
    """
    filters = filters or FilterConfig()
    dedup = dedup or DedupConfig()
    langid = langid or LangIdConfig()
    filters.validate()
    dedup.validate()
    splits = dict(inputs) if isinstance(inputs, Mapping) else find_splits(inputs)
    if not splits:
        raise DataConfigError("inputs: no splits given")
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataConfigError(f"holdout_fraction: must be in [0, 1), got {holdout_fraction}")
    holdout_every = round(1.0 / holdout_fraction) if holdout_fraction > 0 and "valid" not in splits else 0
    out_dir = Path(out_dir)
    num_proc = max(1, num_proc or os.cpu_count() or 1)

    selector = _Selector(dedup, set(languages) if languages else None, holdout_every)

    def stream() -> Iterator[tuple[str, Document]]:
        for split, path in splits.items():
            yield from _capped(split, iter_documents(path), max_docs_per_language)

    # The whole output folder is built beside the old one and switched in when complete (staging.py): a
    # failure half way (a bad input file) leaves an earlier run's output exactly as it was.
    owned = (REPORT_NAME, "train", "valid", *splits, *_splits_of_earlier_run(out_dir))
    with staged_folder(out_dir, owned) as staging, contextlib.ExitStack() as stack:
        writers: dict[tuple[str, str], object] = {}

        def write(split: str, lang: str, record: dict) -> None:
            if (split, lang) not in writers:
                writers[split, lang] = stack.enter_context(atomic_write(staging / split / f"{lang}.jsonl"))
            writers[split, lang].write(json.dumps(record, ensure_ascii=False) + "\n")

        if num_proc > 1:
            pool = stack.enter_context(mp.get_context("fork").Pool(
                num_proc, initializer=_init_worker, initargs=(filters, dedup, langid)))
            mapper = pool.imap
        else:
            _init_worker(filters, dedup, langid)
            mapper = map
        bar = tqdm(desc="clean", unit="doc", disable=not progress)
        # Waves of a few batches per process bound the memory held in flight.
        for wave in _batches(_batches(stream(), _BATCH), num_proc * 4):
            payloads = [[(doc.text, doc.lang) for _, doc in batch] for batch in wave]
            for batch, results in zip(wave, mapper(_process_batch, payloads)):
                bar.update(len(batch))
                for (split, doc), (text, lang, filled, reason, key, signature) in zip(batch, results):
                    target = selector.select(split, lang, text, filled, reason, key, signature)
                    if target is not None:
                        record = {"text": text, "lang": lang}
                        if doc.source:
                            record["source"] = doc.source
                        write(target, lang, record)
        bar.close()
        stack.close()  # the per-language files are complete before the report and the switch
        report = CleanReport({split: {lang: dict(c) for lang, c in sorted(langs.items())}
                              for split, langs in selector.stats.items()})
        if not any(c.get("kept") for langs in report.stats.values() for c in langs.values()):
            raise DataError(f"clean: no document survived cleaning of {list(splits.values())}; see the report:\n"
                            f"{report.table()}")
        write_json(staging / REPORT_NAME, report.to_dict())
    return report


def _splits_of_earlier_run(out_dir: Path) -> list[str]:
    """The split folders an earlier `clean` into out_dir wrote (its report lists them): ours to replace."""
    try:
        return list(json.loads((out_dir / REPORT_NAME).read_text(encoding="utf-8")).get("stats", {}))
    except (OSError, ValueError, AttributeError):
        return []

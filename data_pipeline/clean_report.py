"""What `fuxi data clean` reports (`<out>/clean_report.json` and the printed tables): documents per split,
language and reason (input, language-ID fills, each filter, exact and near duplicates, kept, held out), and
per stage and task the figures the tasks saved.

"langid_filled" (the "lang ID" column) counts the documents whose language came from language ID: those the
data gave none (no language field, none from the folder, or "und"/"unknown"). A language the data gives is
never replaced, so that count is also every document that did not keep a language of its own."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from fuxi.common.tables import format_table
from fuxi.data_pipeline.filters import CODE_FILTERS, TEXT_FILTERS

REPORT_NAME = "clean_report.json"


@dataclass
class CleanReport:
    # split -> language -> counter name -> count
    stats: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    # stage -> task -> figures (seconds, chunks, documents in and out, candidates, ...)
    tasks: dict[str, dict[str, dict]] = field(default_factory=dict)
    # the hash of the job's inputs and settings (job.py); a re-run with the same one has nothing to do
    job: str = ""

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
        return format_table(["split", "lang", "input", "lang ID", "filtered", "exact dup", "near dup", "kept",
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
        return cls(data.get("stats", {}), data.get("tasks", {}), data.get("job", ""))


def merge_counters(into: dict, stats: Mapping) -> None:
    """Add split -> lang -> counter stats into `into`."""
    for split, langs in stats.items():
        for lang, counters in langs.items():
            target = into.setdefault(split, {}).setdefault(lang, Counter())
            target.update(counters)


def ordered_stats(stats: Mapping) -> dict:
    return {split: {lang: dict(c) for lang, c in sorted(langs.items())} for split, langs in stats.items()}

"""The shipped local tasks (pretrain/evaluation/tasks/, built by build_tasks.py): where they are, and the dataset
loader their YAMLs name (`custom_dataset: !function fuxi.pretrain.evaluation.local_tasks.load_dataset`).

The loader resolves `data_files` against the task folder, so the YAMLs work from any working directory, both
through `fuxi eval` and through the harness's own CLI (`lm_eval --include_path pretrain/evaluation/tasks`).
Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def load_dataset(data_files: dict[str, str] | None = None, **_metadata):
    """{split: JSONL path relative to the task folder} -> datasets.DatasetDict. The harness passes the task's
    metadata as keyword arguments too; they are not needed here."""
    import datasets

    if not data_files:
        raise ValueError("a local task needs dataset_kwargs.data_files")
    splits = {}
    for split, relative in data_files.items():
        path = (TASKS_DIR / relative).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: local task data missing; rebuild with "
                                    "`python -m fuxi.pretrain.evaluation.build_tasks`")
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        splits[split] = datasets.Dataset.from_list(records)
    return datasets.DatasetDict(splits)


def tasks_digest(tasks_dir: Path = TASKS_DIR) -> str:
    """sha256 over every task file (YAML and data): equal digests mean the same local tasks, so cached results
    stay valid; a rebuild from the same corpus gives the same digest."""
    h = hashlib.sha256()
    for path in sorted(p for p in tasks_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".jsonl", "")
                       and not p.name.startswith(".") and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(tasks_dir)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()

"""Every file the code, configs and docs cite exists in the repository: a reader who follows a reference finds it.

Scanned: paths under the repository's own folders (`model/moe.py`, `docs/methods.md`, `configs/train/x.yaml`)
and any mention of a `methods.md`, which must be the repository's docs/methods.md. A path that is a pattern
(followed by `*`, `-`, `<` or `{`, e.g. `configs/model/ghostrnn-*.yaml`) or written by a run is not a citation."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("model", "kernels", "data_pipeline", "pretrain", "checkpoints", "launch", "experiments", "common",
           "configs", "docs", "tests", ".ci")
EXTENSIONS = ("py", "md", "yaml", "sh", "sbatch", "json", "png", "txt", "cfg", "ini")
PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(re.escape(f) for f in FOLDERS)})/[\w./-]*?\.(?:{'|'.join(EXTENSIONS)}))"
                  r"(?![\w*<{-])")
METHODS = re.compile(r"(?<![\w/])((?:[\w.-]+/)*methods\.md)")
SKIP_SUFFIXES = (".jsonl", ".png", ".gz", ".tar", ".safetensors")
ABSENT_ON_PURPOSE = {"configs/model/nope.yaml"}  # tests/test_trainer_checks.py: a model file that is not there


def cited_paths(text: str) -> set[str]:
    paths = {m.group(1) for m in PATH.finditer(text)} | {m.group(1) for m in METHODS.finditer(text)}
    return {p for p in paths if "..." not in p}


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in listed if not f.endswith(SKIP_SUFFIXES) and "/corpus/" not in f
            and (REPO / f).is_file() and (REPO / f) != Path(__file__).resolve()]


def test_every_cited_file_exists():
    missing = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for ref in sorted(cited_paths(text)):
            if ref.endswith("methods.md") and ref != "docs/methods.md":
                missing.append(f"{path.relative_to(REPO)}: {ref} (the method notes are docs/methods.md)")
            elif not (REPO / ref).exists() and ref not in ABSENT_ON_PURPOSE:
                missing.append(f"{path.relative_to(REPO)}: {ref}")
    assert not missing, "\n".join(missing)


def test_the_scanner_finds_citations_and_skips_patterns():
    text = ("see model/moe.py and `docs/methods.md` §2.3, methods.md 4.2, ../shared/reference/methods.md;\n"
            "configs/model/ghostrnn-*.yaml, runs/x/metrics.jsonl, tests/test_data_*.py, docs/...png")
    assert cited_paths(text) == {"model/moe.py", "docs/methods.md", "methods.md", "../shared/reference/methods.md"}

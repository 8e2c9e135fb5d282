"""The measuring tools of `fuxi bench data --scale` (the benchmark itself is too long for CI)."""
from __future__ import annotations

import json
from pathlib import Path

from fuxi.data_pipeline.bench_scale import grow_corpus, measure
from fuxi.data_pipeline.corpus import bundled_corpus
from fuxi.data_pipeline.dedup import jaccard, shingles


def test_measure_counts_workers_that_outlive_their_parent():
    """A grandchild that burns 0.5 CPU-s after its parent exited is reaped by the subreaper and counted."""
    code = """
import os, time
if os.fork() == 0:
    if os.fork() == 0:
        t = time.process_time()
        while time.process_time() - t < 0.5:
            pass
        os._exit(0)
    os._exit(0)
os.wait()
"""
    result = measure(code)
    assert result["cpu_s"] >= 0.45
    assert result["peak_mb"] > 0


def test_measure_imports_the_code_its_pythonpath_names_not_the_working_directorys(tmp_path, monkeypatch):
    """"Today's" code comes from a baseline checkout on PYTHONPATH; run from our checkout (as the benchmark is),
    `python -c` would import our data_pipeline instead, and the comparison would measure ours twice."""
    baseline = tmp_path / "baseline" / "data_pipeline"
    baseline.mkdir(parents=True)
    (baseline / "__init__.py").write_text("")
    seen = tmp_path / "seen.txt"
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repository, which has its own data_pipeline
    measure(f"import data_pipeline, pathlib; pathlib.Path({str(seen)!r}).write_text(data_pipeline.__file__)",
            env={"PYTHONPATH": str(tmp_path / "baseline")})
    assert Path(seen.read_text()) == baseline / "__init__.py"


def test_grown_corpus_has_planted_pairs_and_reshuffled_copies(tmp_path):
    pairs = grow_corpus(bundled_corpus(), tmp_path, 2, seed=3, planted=0.2)
    en = [json.loads(line)["text"] for line in (tmp_path / "train" / "en.jsonl").read_text().splitlines()]
    original = [json.loads(line)["text"] for line in (bundled_corpus() / "train" / "en.jsonl").read_text().splitlines()]
    assert en[:len(original)] == original  # copy 0 is the corpus itself, then reshuffled copies, then planted
    assert len(en) > 2 * len(original)
    js = [jaccard(shingles(p["original"], 5), shingles(p["copy"], 5)) for p in pairs[:200]]
    assert all(p["copy"] != p["original"] for p in pairs)
    assert 0.5 < min(js) and max(js) < 1.0 and sum(j >= 0.8 for j in js) > 0.8 * len(js)

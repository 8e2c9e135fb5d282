"""The data stages as engine tasks: near-dup recall per script, resuming killed runs, many producers merged
into one dataset, the Slurm job scripts, and errors that name the file, line and task."""
from __future__ import annotations

import json
import os
import random
import signal
import stat
from collections import Counter
from pathlib import Path

import dill
import numpy as np
import pytest

from fuxi.common.errors import DataError
from fuxi.data_pipeline.chunks import plan_chunks, read_chunk
from fuxi.data_pipeline.clean import clean
from fuxi.data_pipeline.clean_stages import ProcessChunks, WriteKept
from fuxi.data_pipeline.corpus import bundled_corpus
from fuxi.data_pipeline.readers import iter_jsonl
from fuxi.data_pipeline.dedup import shingles
from fuxi.data_pipeline.engine import ExecutorConfig
from fuxi.data_pipeline.errors import ManifestError, ShardError, TaskError
from fuxi.data_pipeline.filters import DocumentFilter, FilterConfig
from fuxi.data_pipeline.manifest import load_manifest
from fuxi.data_pipeline.merge import merge_manifests
from fuxi.data_pipeline.pack import pack
from fuxi.data_pipeline.shards import ShardReader
from fuxi.data_pipeline.textstats import word_units
from data_helpers import tiny_dataset

LOCAL = dict(progress=False)
SCRIPTS = {"en": "Latin", "ru": "Cyrillic", "zh": "CJK", "ja": "CJK", "th": "Thai", "ar": "Arabic",
           "hi": "Devanagari"}


def _write(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def _true_jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a, 5).tolist()), set(shingles(b, 5).tolist())
    return len(sa & sb) / len(sa | sb)


def _edit(text: str, fraction: float, rng: random.Random) -> str:
    """Replace `fraction` of the word units (characters of CJK/Thai) by other units of the same text."""
    units = word_units(text)
    spaced = " " in text.strip() and len(text.split()) > len(units) / 2
    n = max(1, round(fraction * len(units)))
    for i in rng.sample(range(len(units)), n):
        units[i] = next((u for k in range(7, 7 + len(units)) if (u := units[(i + k) % len(units)]) != units[i]),
                        units[i] + "x") + ("x" if spaced else "")
    return " ".join(units) if spaced else "".join(units)


def _kept(out: Path) -> set[tuple[str, str, str]]:
    return {(p.parent.name, p.stem, json.loads(line)["text"]) for p in out.glob("*/*.jsonl")
            for line in p.read_text(encoding="utf-8").splitlines()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Real documents of seven scripts, each with a copy that has 0.3-2% of its word units edited."""
    root = tmp_path_factory.mktemp("planted")
    rng = random.Random(0)
    keep = DocumentFilter(FilterConfig())
    firsts, seconds, pairs = [], [], []
    for lang in SCRIPTS:
        originals = [d.text for d in iter_jsonl(bundled_corpus() / "train" / f"{lang}.jsonl")
                     if len(word_units(d.text)) >= 80 and keep.reject_reason(d.text, lang) is None][:5]
        for text in originals:
            copy = _edit(text, rng.uniform(0.003, 0.02), rng)
            firsts.append({"text": text, "lang": lang})
            seconds.append({"text": copy, "lang": lang})
            pairs.append((lang, text, copy, _true_jaccard(text, copy)))
    rng.shuffle(firsts)
    rng.shuffle(seconds)  # the originals come first (the first of a duplicate group is the one kept)
    _write(root / "in" / "train" / "mixed.jsonl", firsts + seconds)
    out = root / "out"
    report = clean(root / "in", out, executor=ExecutorConfig(tasks=3, workers=2, progress=False), chunk_mb=0.02)
    return pairs, out, report


def test_near_dup_recall_and_precision_in_every_script(planted):
    """Recall >= 95% (here: all) of planted pairs with true Jaccard >= 0.8 in each script; nothing else
    removed (precision 100%). The old 9x13 banding compared pairs at Jaccard 0.80-0.85 with probability
    0.40-0.69."""
    pairs, out, report = planted
    kept = {text for _, _, text in _kept(out)}
    by_script: dict[str, list[bool]] = {}
    for lang, original, copy, j in pairs:
        assert original in kept, (lang, j)  # the first of each pair always stays
        if j >= 0.8:
            by_script.setdefault(SCRIPTS[lang], []).append(copy not in kept)
    assert set(by_script) == set(SCRIPTS.values())
    assert sum(len(v) for v in by_script.values()) >= 25
    for script, found in by_script.items():
        assert sum(found) / len(found) >= 0.95, (script, found)
    removed = sum(s.get("near_dup", 0) for s in report.stats["train"].values())
    assert removed == sum(copy not in kept for _, _, copy, _ in pairs)  # only planted copies were removed
    assert report.tasks["process"] and report.tasks["buckets"]  # per-stage, per-task figures


def _corpus(tmp_path: Path) -> Path:
    docs = [d for lang in ("en", "de", "fr") for d in
            ({"text": t.text, "lang": lang} for t in iter_jsonl(bundled_corpus() / "train" / f"{lang}.jsonl"))][:60]
    docs += docs[:5]  # exact duplicates
    _write(tmp_path / "corpus" / "train" / "a.jsonl", docs[:30])
    _write(tmp_path / "corpus" / "train" / "b.jsonl", docs[30:])
    _write(tmp_path / "corpus" / "valid" / "v.jsonl", docs[40:44])
    return tmp_path / "corpus"


def test_killed_write_task_resumes_without_redoing_finished_tasks(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    clean(corpus, tmp_path / "fresh", chunk_mb=0.01, executor=ExecutorConfig(tasks=2, workers=1, **LOCAL))
    out = tmp_path / "out"
    calls: Counter = Counter()
    process, write = ProcessChunks.process, WriteKept.process

    def crashing_write(self, chunk):
        calls["write"] += 1
        if chunk.index == 3:
            raise RuntimeError("simulated crash")
        return write(self, chunk)

    monkeypatch.setattr(WriteKept, "process", crashing_write)
    with pytest.raises(TaskError, match=r"write: task \d of 2, .*a.jsonl bytes \d+-\d+: simulated crash"):
        clean(corpus, out, chunk_mb=0.01, executor=ExecutorConfig(tasks=2, workers=1, **LOCAL))
    assert not out.exists()  # nothing published
    work = tmp_path / ".out.work"
    assert sorted(p.name for p in (work / "logs" / "process" / "completions").iterdir()) == ["00000", "00001"]
    # a partial file left by a killed writer: a temp name, never read as a part
    (work / "parts" / "train" / "en").mkdir(parents=True, exist_ok=True)
    (work / "parts" / "train" / "en" / ".000003.jsonl.abc.tmp").write_text('{"text": "half a li')

    def counting_process(self, chunk):
        calls["process"] += 1
        return process(self, chunk)

    monkeypatch.setattr(ProcessChunks, "process", counting_process)
    monkeypatch.setattr(WriteKept, "process", lambda self, chunk: (calls.update(["rewrite"]), write(self, chunk))[1])
    report = clean(corpus, out, chunk_mb=0.01, executor=ExecutorConfig(tasks=2, workers=1, **LOCAL))
    assert calls["process"] == 0  # both process tasks had finished
    chunks = len(plan_chunks({"valid": corpus / "valid", "train": corpus / "train"}, int(0.01 * (1 << 20))))
    assert 1 <= calls["rewrite"] < chunks  # only the unfinished chunks of the crashed task
    assert _kept(out) == _kept(tmp_path / "fresh")
    assert report.stats == json.loads((tmp_path / "fresh" / "clean_report.json").read_text())["stats"]
    assert not work.exists()  # removed after success


def test_write_task_reads_the_holdout_offsets_once(tmp_path, monkeypatch):
    """The write stage loads holdout.json once per task, not once per chunk (quadratic at scale); the held-out
    documents are still every k-th kept training document."""
    corpus = _corpus(tmp_path) / "train"
    reads: Counter = Counter()
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (reads.update([self.name]),
                                                                   read_text(self, *a, **k))[1])
    report = clean(corpus, tmp_path / "out", chunk_mb=0.01, holdout_fraction=0.25,
                   executor=ExecutorConfig(tasks=1, workers=1, **LOCAL))
    assert len(plan_chunks({"train": corpus}, int(0.01 * (1 << 20)))) > 2
    assert reads["holdout.json"] == 1
    kept = sum(c["kept"] for c in report.stats["train"].values())
    held = sum(c["held_out"] for c in report.stats["train"].values())
    assert held == sum(-(-c["kept"] // 4) for c in report.stats["train"].values()) and 0 < held < kept


def test_dead_worker_is_reported_with_task_and_input_then_resumed(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    process = ProcessChunks.process

    def dying(self, chunk):
        if chunk.index == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies (as under the OOM killer)
        return process(self, chunk)

    monkeypatch.setattr(ProcessChunks, "process", dying)
    executor = ExecutorConfig(tasks=2, workers=2, **LOCAL)
    with pytest.raises(TaskError, match=r"process: a worker process died .*task \d of 2 \(\d+ chunks: .*b?\.jsonl"):
        clean(corpus, tmp_path / "out", chunk_mb=0.01, executor=executor)
    monkeypatch.setattr(ProcessChunks, "process", process)
    clean(corpus, tmp_path / "out", chunk_mb=0.01, executor=executor)
    clean(corpus, tmp_path / "ref", chunk_mb=0.01, executor=ExecutorConfig(tasks=1, workers=1, **LOCAL))
    assert _kept(tmp_path / "out") == _kept(tmp_path / "ref")


def test_bad_lines_name_file_and_line(tmp_path):
    good = json.dumps({"text": "word " * 40, "lang": "en"})
    path = tmp_path / "in" / "train" / "x.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(("\n".join([good] * 6 + ['{"text": broken']) + "\n").encode())
    chunks = plan_chunks({"train": path}, chunk_bytes=500)
    assert len(chunks) > 1 and chunks[-1].start > 0  # the bad line is in a chunk that starts mid-file
    with pytest.raises(DataError, match=rf"{path}:7: not valid JSON"):
        list(read_chunk(chunks[-1]))
    path.write_bytes((good + "\n" + good[:20]).encode() + b"\xff\xfe" + (good[20:] + "\n").encode())
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xff at column 21\)"):
        clean(tmp_path / "in", tmp_path / "out", executor=ExecutorConfig(tasks=1, workers=1, **LOCAL))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def test_four_machines_merged_equal_one_task(data, tmp_path):
    """Pack with --tasks 4, each task on its "own machine" writing its own folder, then merged: the same shards
    (hence the same tokens and samples) as one task; the loader's checks still apply."""
    clean_train = data.train_manifest.parent.parent / "clean" / "train"
    kw = dict(seq_len=64, docs_per_part=6, shard_bytes=40_000, languages=["ar", "en", "ja", "ru", "th", "zh"])
    one = load_manifest(pack(clean_train, data.tokenizer_dir, tmp_path / "one",
                             executor=ExecutorConfig(tasks=1, workers=1, **LOCAL), **kw))
    folders = []
    for rank in range(4):
        folders.append(tmp_path / f"machine{rank}")
        assert pack(clean_train, data.tokenizer_dir, folders[-1], **kw,
                    executor=ExecutorConfig(tasks=4, workers=1, local_tasks=1, rank_offset=rank, **LOCAL)) is None
    with pytest.raises(ManifestError, match=r"missing task manifests for \[3\]"):
        merge_manifests(folders[:3], tmp_path / "merged")
    merged = load_manifest(merge_manifests(folders, tmp_path / "merged"))
    assert [s.sha256 for s in merged.shards] == [s.sha256 for s in one.shards]
    assert merged.language_stats == one.language_stats
    assert merged.tokens_per_language() == one.tokens_per_language()
    for shard in merged.shards[:3]:
        assert ShardReader(merged, shard).read(0) is not None  # size and sha256 checked on open

    # a machine that packed with another tokenizer cannot join
    task = next(folders[1].glob("task-*.json"))
    meta = json.loads(task.read_text())
    task.write_text(json.dumps({**meta, "tokenizer_hash": "0" * 64}))
    with pytest.raises(ManifestError, match="tokenizer_hash"):
        merge_manifests(folders, tmp_path / "bad")
    task.write_text(json.dumps(meta))
    shard = folders[2] / json.loads(next(folders[2].glob("task-*.json")).read_text())["shards"][0]["path"]
    blob = bytearray(shard.read_bytes())
    blob[-2000] ^= 1
    shard.write_bytes(bytes(blob))
    with pytest.raises(ShardError, match=rf"{shard.name}: sha256"):
        merge_manifests(folders, tmp_path / "bad")


def test_prepare_writes_one_report_of_every_stage_and_task(data):
    report = json.loads((data.train_manifest.parent.parent / "prepare.json").read_text())["report"]
    clean_stats, train = report["clean"], report["pack_train"]
    assert set(clean_stats["tasks"]) >= {"process", "buckets", "clusters", "write", "gather"}
    kept = sum(c["kept"] for c in clean_stats["per_language"]["train"].values())
    assert kept == sum(t["docs_out"] for t in clean_stats["tasks"]["write"].values()) - \
        sum(c["kept"] for c in clean_stats["per_language"]["valid"].values())
    manifest = load_manifest(data.train_manifest)
    assert sum(t["tokens"] for t in train["tasks"].values()) == sum(train["tokens"].values()) == \
        sum(s.tokens for s in manifest.language_stats.values())


def test_slurm_scripts_render_and_their_pickled_tasks_run(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    executor = ExecutorConfig(executor="slurm", partition="cpu", tasks=3, time="2:00:00", dry_run=True, **LOCAL)
    assert clean(corpus, tmp_path / "out", executor=executor, chunk_mb=0.01) is None
    work = tmp_path / ".out.work"
    stages = ["plan", "process", "buckets", "clusters", "write", "gather", "publish"]
    tasks = {"plan": 1, "process": 3, "buckets": 3, "clusters": 1, "write": 3, "gather": 3, "publish": 1}
    for name in stages:
        script = (work / "logs" / name / "launch_script.slurm").read_text()
        assert script.startswith("#!/bin/bash\n")
        assert f"#SBATCH --array=0-{tasks[name] - 1}\n" in script and "#SBATCH --partition=cpu\n" in script
        assert "#SBATCH --time=2:00:00\n" in script and f"#SBATCH --job-name=fuxi-{name}\n" in script
        assert f"launch_pickled_pipeline {work / 'logs' / name / 'executor.pik'}" in script
    # what a node does: load the pickled executor and run its array tasks, stage after stage
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bin_dir / "scontrol").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    for name in stages:
        with open(work / "logs" / name / "executor.pik", "rb") as f:
            executor_on_node = dill.load(f)
        assert executor_on_node.depends_job_id or name == "plan"  # afterok on the previous stage's array
        for i in range(tasks[name]):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
            executor_on_node.run()
    clean(corpus, tmp_path / "local", chunk_mb=0.01, executor=ExecutorConfig(tasks=2, workers=1, **LOCAL))
    assert _kept(tmp_path / "out") == _kept(tmp_path / "local")


def test_rerun_after_success_is_a_no_op(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    executor = ExecutorConfig(tasks=1, workers=1, **LOCAL)
    first = clean(corpus, tmp_path / "out", executor=executor)
    monkeypatch.setattr(ProcessChunks, "process", lambda *a: pytest.fail("re-ran a finished job"))
    assert clean(corpus, tmp_path / "out", executor=executor).stats == first.stats
    np.testing.assert_equal(len(_kept(tmp_path / "out")), sum(c["kept"] for c in
                                                              (c for s in first.stats.values() for c in s.values())))


def _other_filesystem(tmp_path: Path) -> Path | None:
    """A writable folder on another filesystem than tmp_path (node-local scratch on a cluster; /dev/shm here)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        import tempfile

        return Path(tempfile.mkdtemp(dir=shm, prefix="fuxi-test-"))
    return None


def test_work_dir_on_another_filesystem(data, tmp_path):
    """Intermediate files on scratch, the output on the shared filesystem: the output switches in (a copy
    beside it, then the rename) and equals a run with the default work dir; nothing is left on scratch."""
    import shutil

    scratch = _other_filesystem(tmp_path)
    if scratch is None:
        pytest.skip("no writable /dev/shm on another filesystem")
    try:
        corpus = _corpus(tmp_path)
        executor = ExecutorConfig(tasks=2, workers=1, **LOCAL)
        clean(corpus, tmp_path / "here", executor=executor)
        clean(corpus, tmp_path / "there", executor=executor, work_dir=scratch / "clean")
        assert _kept(tmp_path / "there") == _kept(tmp_path / "here")
        clean_valid = data.val_manifest.parent.parent / "clean" / "valid"
        for name, work in (("shards_here", None), ("shards_there", scratch / "pack")):
            pack(clean_valid, data.tokenizer_dir, tmp_path / name, split="valid", seq_len=64, num_proc=1,
                 progress=False, work_dir=work)
        here, there = load_manifest(tmp_path / "shards_here"), load_manifest(tmp_path / "shards_there")
        assert [s.sha256 for s in there.shards] == [s.sha256 for s in here.shards]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        assert not any(p.is_file() for p in scratch.rglob("*"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

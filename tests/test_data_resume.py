"""Every data stage resumes (issue #22): clean, the tokenizer, pack and prepare, killed at about half, run again;
the re-run runs fewer tasks than the job has (counted task by task, and from datatrove's completion markers),
says "resuming: N of M tasks done", and ends with outputs byte-identical (sha256) to an uninterrupted run; the
reports count the whole job. One pack is killed for real (SIGKILL of the `fuxi data pack` process)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fuxi.data_pipeline.chunks import plan_chunks
from fuxi.data_pipeline.clean import clean
from fuxi.data_pipeline.clean_stages import ProcessChunks, assign
from fuxi.data_pipeline.engine import ExecutorConfig
from fuxi.data_pipeline.errors import TaskError
from fuxi.data_pipeline.local_executor import LocalExecutor
from fuxi.data_pipeline.pack import pack
from fuxi.data_pipeline.pack_stages import PackTasks
from fuxi.data_pipeline.status import status_report
from fuxi.data_pipeline.tokenizer import TokenizerConfig, tokenizer_hash
from fuxi.data_pipeline.tokenizer_stage import TrainTokenizer, train_tokenizer_task

from data_helpers import TINY, small_corpus, tiny_dataset

REPORTS = ("clean_report.json", "pack_report.json", "prepare.json")  # hold seconds and input paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def _sha256s(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in REPORTS}


@pytest.fixture
def ran(monkeypatch) -> Counter:
    """(stage, rank) of every task the local executor runs (one worker: in this process)."""
    tasks: Counter = Counter()
    run = LocalExecutor._run_for_rank

    def counting(self, rank, *args, **kwargs):
        tasks[self.stage, rank] += 1
        return run(self, rank, *args, **kwargs)

    monkeypatch.setattr(LocalExecutor, "_run_for_rank", counting)
    return tasks


def _kill_after(patch, cls, method: str, survivors: int) -> None:
    """`cls.method` dies on its call number survivors + 1 (the job dies there, as under a kill)."""
    original, calls = getattr(cls, method), Counter()

    def dying(self, *args):
        calls["n"] += 1
        if calls["n"] > survivors:
            raise RuntimeError("simulated kill")
        return original(self, *args)

    patch.setattr(cls, method, dying)


def _markers(work: Path) -> dict[str, int]:
    return {d.name: len(list((d / "completions").glob("*"))) for d in sorted((work / "logs").iterdir())
            if (d / "completions").is_dir()}


def test_clean_killed_half_way_resumes_and_reports_the_whole_job(tmp_path, monkeypatch, ran, caplog):
    corpus = small_corpus(tmp_path / "corpus", ("en", "de", "fr", "ru"), 40, 8, 3)
    executor = ExecutorConfig(tasks=4, workers=1, progress=False)
    chunk_mb = 0.01
    reference = clean(corpus, tmp_path / "reference", chunk_mb=chunk_mb, executor=executor)
    chunks = plan_chunks({"valid": corpus / "valid", "train": corpus / "train"}, int(chunk_mb * (1 << 20)))
    per_task = [len(c) for c in assign(chunks, 4)]
    assert len(chunks) >= 8 and min(per_task) >= 2
    # killed in task 2 of the process stage after its first chunk: tasks 0 and 1 done, task 2 half done
    done_before = per_task[0] + per_task[1] + 1
    out = tmp_path / "out"
    with monkeypatch.context() as patch, pytest.raises(TaskError, match="simulated kill"):
        _kill_after(patch, ProcessChunks, "process", done_before)
        clean(corpus, out, chunk_mb=chunk_mb, executor=executor)
    work = tmp_path / ".out.work"
    total = sum(json.loads((work / "job.json").read_text())["tasks"].values())
    assert _markers(work) == {"plan": 1, "process": 2}

    ran.clear()
    processed = Counter()
    process = ProcessChunks.process
    monkeypatch.setattr(ProcessChunks, "process", lambda self, c: (processed.update(["chunk"]), process(self, c))[1])
    with caplog.at_level(logging.INFO, logger="fuxi"):
        report = clean(corpus, out, chunk_mb=chunk_mb, executor=executor)
    assert f"clean: resuming: 3 of {total} tasks done (plan 1/1, process 2/4," in caplog.text
    assert {rank for stage, rank in ran if stage == "process"} == {2, 3} and ("plan", 0) not in ran
    assert sum(ran.values()) == total - 3 < total
    assert processed["chunk"] == len(chunks) - done_before  # the half-done task skipped its finished chunk
    assert _sha256s(out) == _sha256s(tmp_path / "reference")
    assert report.stats == reference.stats
    for stage in ("process", "write"):  # the task table counts every chunk, those finished before the kill too
        for key in ("docs_in", "docs_out"):
            assert sum(t[key] for t in report.tasks[stage].values()) == \
                sum(t[key] for t in reference.tasks[stage].values()) > 0
    assert sum(t.get("chunks_skipped", 0) for t in report.tasks["process"].values()) == 1


def test_tokenizer_killed_while_training_resumes_its_work_folder(data, tmp_path, monkeypatch, caplog):
    """The tokenizer stage is one task: killed while training, the re-run keeps the work folder (the same job:
    "resuming", not "belongs to another job; starting afresh") and writes the same files."""
    corpus = data.train_manifest.parent.parent / "clean" / "train"
    config = TokenizerConfig(vocab_size=300, max_docs_per_language=8)
    executor = ExecutorConfig(progress=False)
    reference = train_tokenizer_task(corpus, tmp_path / "reference", config, executor)
    with monkeypatch.context() as patch, pytest.raises(TaskError, match="simulated kill"):
        _kill_after(patch, TrainTokenizer, "finish", 0)
        train_tokenizer_task(corpus, tmp_path / "tok", config, executor)
    with caplog.at_level(logging.INFO, logger="fuxi"):
        out = train_tokenizer_task(corpus, tmp_path / "tok", config, executor)
    assert "tokenizer: resuming: 0 of 1 tasks done (tokenizer 0/1)" in caplog.text
    assert "starting afresh" not in caplog.text
    assert _sha256s(out) == _sha256s(reference) and len(_sha256s(out)) >= 3


def test_pack_killed_at_half_resumes_with_identical_shards(data, tmp_path, monkeypatch, ran, caplog):
    corpus = data.train_manifest.parent.parent / "clean" / "train"
    kw = dict(seq_len=64, docs_per_part=6, shard_bytes=40_000, languages=["ar", "en", "ja", "ru", "th", "zh"])
    executor = ExecutorConfig(tasks=8, workers=1, progress=False)
    reference = pack(corpus, data.tokenizer_dir, tmp_path / "reference", executor=executor, **kw)
    with monkeypatch.context() as patch, pytest.raises(TaskError, match="simulated kill"):
        _kill_after(patch, PackTasks, "run_task", 4)  # 4 of the 8 pack tasks finish
        pack(corpus, data.tokenizer_dir, tmp_path / "out", executor=executor, **kw)
    assert _markers(tmp_path / ".out.work") == {"plan": 1, "pack": 4}
    report = status_report(tmp_path / "out")  # `fuxi data status`: what a cluster user reads
    assert report.startswith(f"pack: 5 of 10 tasks done ({tmp_path / '.out.work'}, started ")
    lines = report.splitlines()
    assert [line.split() for line in lines[3:6]] == [["plan", "1", "1", "0"], ["pack", "4", "8", "1"],
                                                     ["merge", "0", "1", "0"]]
    assert lines[6].startswith("  pack task 4: ") and "simulated kill" in lines[6]
    assert lines[6].endswith(f"(log {tmp_path / '.out.work' / 'logs' / 'pack' / 'logs' / 'task_00004.log'})")
    ran.clear()
    with caplog.at_level(logging.INFO, logger="fuxi"):
        manifest = pack(corpus, data.tokenizer_dir, tmp_path / "out", executor=executor, **kw)
    assert "pack: resuming: 5 of 10 tasks done (plan 1/1, pack 4/8, merge 0/1)" in caplog.text
    assert sorted(ran) == [("merge", 0)] + [("pack", r) for r in range(4, 8)]  # 5 of 10 tasks re-run
    assert _sha256s(manifest.parent) == _sha256s(reference.parent)
    ours, theirs = (json.loads((p.parent / "pack_report.json").read_text())["tasks"] for p in (manifest, reference))
    assert sum(t["docs_in"] for t in ours.values()) == sum(t["docs_in"] for t in theirs.values()) > 0


def test_prepare_killed_half_way_through_packing_resumes(data, tmp_path, monkeypatch, ran, caplog, capsys):
    """prepare killed after half of the train split's pack tasks: the re-run runs no clean or tokenizer task and
    only the unfinished pack tasks, and ends with the shards of an uninterrupted prepare; run once more, it is
    up to date and runs nothing."""
    from fuxi.data_pipeline.job import watch_jobs
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.prepare import prepare_dataset

    executor = ExecutorConfig(tasks=4, workers=1, progress=False)
    out = tmp_path / "data"
    with monkeypatch.context() as patch, pytest.raises(TaskError, match="simulated kill"):
        _kill_after(patch, PackTasks, "run_task", 2)  # 2 of the train split's 4 pack tasks finish
        prepare_dataset(out, executor=executor, **TINY)
    # `fuxi data status` finds the stage's work folder inside prepare's: clean and the tokenizer have finished
    # (theirs are removed), the train split's pack has not
    from fuxi.launch.cli import main
    capsys.readouterr()
    assert main(["data", "status", str(out)]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"pack: 3 of 6 tasks done ({tmp_path / '.data.work' / '.train.work'}, started ")
    assert [line[:15] for line in report.splitlines() if line.startswith("  ")] == ["  pack task 2: "]
    ran.clear()
    with caplog.at_level(logging.INFO, logger="fuxi"):
        prepared = prepare_dataset(out, executor=executor, **TINY)
    assert "pack: resuming: 3 of 6 tasks done (plan 1/1, pack 2/4, merge 0/1)" in caplog.text
    # train: pack tasks 2 and 3 and its merge; valid: all of its tasks; nothing of clean or the tokenizer
    assert ran == Counter({("pack", 2): 2, ("pack", 3): 2, ("merge", 0): 2, ("plan", 0): 1, ("pack", 0): 1,
                           ("pack", 1): 1})
    for ours, theirs in ((prepared.train_manifest, data.train_manifest), (prepared.val_manifest, data.val_manifest)):
        assert [s.sha256 for s in load_manifest(ours).shards] == [s.sha256 for s in load_manifest(theirs).shards]
    assert tokenizer_hash(prepared.tokenizer_dir) == tokenizer_hash(data.tokenizer_dir)

    ran.clear()
    with watch_jobs() as outcomes, caplog.at_level(logging.INFO, logger="fuxi"):
        again = prepare_dataset(out, executor=executor, **TINY)
    assert again == prepared and not ran and outcomes == [("prepare", "up to date")]
    assert f"prepare: up to date (nothing to do): {out}" in caplog.text
    capsys.readouterr()
    assert main(["data", "status", str(out)]) == 2  # no work folder left: one line saying why
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: no work folder of a data job" in err and "up to date" in err


_SLOW_PACK = """
import sys, time
from fuxi.data_pipeline import pack_stages
run_task = pack_stages.PackTasks.run_task
def slow(self, rank, world_size):  # a pack task that takes a while, so the process can be killed among them
    time.sleep(0.4)
    return run_task(self, rank, world_size)
pack_stages.PackTasks.run_task = slow
from fuxi.launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_pack_command_resumes(data, tmp_path, ran, capsys):
    """`fuxi data pack` killed with SIGKILL once some pack tasks have their completion markers: the same command
    again says how many tasks were done, runs only the others, and writes the uninterrupted run's shards."""
    from fuxi.launch.cli import main

    corpus = data.train_manifest.parent.parent / "clean" / "train"
    args = ["data", "pack", str(corpus), str(data.tokenizer_dir), str(tmp_path / "out"), "--seq-len", "64",
            "--docs-per-part", "6", "--shard-mb", "0.04", "--tasks", "8", "--workers", "1"]
    script = tmp_path / "slow_pack.py"
    script.write_text(_SLOW_PACK)
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    completions = tmp_path / ".out.work" / "logs" / "pack" / "completions"
    deadline = time.time() + 120
    while not (completions.is_dir() and len(list(completions.iterdir())) >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(completions.iterdir()))
    assert 3 <= done < 8 and not (tmp_path / "out").exists()

    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"pack: resuming: {1 + done} of 10 tasks done (plan 1/1, pack {done}/8, merge 0/1)" in err
    assert sorted(r for stage, r in ran if stage == "pack") == list(range(done, 8))
    assert main([*args[:4], str(tmp_path / "reference"), *args[5:]]) == 0
    assert _sha256s(tmp_path / "out") == _sha256s(tmp_path / "reference")

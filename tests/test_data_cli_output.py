"""What `fuxi data ...` tells its user (issue #22): the entry point's logging shows each job's outcome and time;
a re-run of a finished job says it is up to date and prints no report again; the progress bar counts documents
and bytes (from forked workers too) with their rates; JSON errors give the position; and on a cluster --tasks
defaults to the job's parallelism instead of 1."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fuxi.common.errors import DataError
from fuxi.data_pipeline.clean import clean
from fuxi.data_pipeline.corpus import bundled_corpus, iter_jsonl
from fuxi.data_pipeline.engine import MAX_DEFAULT_TASKS, ExecutorConfig
from fuxi.data_pipeline.jsonl import parse_json_line
from fuxi.launch.cli import main
from data_helpers import tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def _corpus(root: Path, n: int = 30) -> tuple[Path, int]:
    """A train folder of three languages; (folder, documents)."""
    count = 0
    for lang in ("en", "de", "ru"):
        docs = [{"text": d.text, "lang": lang} for d in iter_jsonl(bundled_corpus() / "train" / f"{lang}.jsonl")][:n]
        path = root / f"{lang}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        count += len(docs)
    return root, count


def test_a_finished_job_run_again_is_up_to_date_and_prints_no_report(data, tmp_path, capsys):
    corpus, _ = _corpus(tmp_path / "corpus")
    clean_args = ["data", "clean", str(corpus), str(tmp_path / "clean"), "--tasks", "2", "--workers", "1"]
    assert main(clean_args) == 0
    out, err = capsys.readouterr()
    assert "exact dup" in out and "task-seconds" in out  # the report tables
    assert re.search(r"^\d\d:\d\d:\d\d clean: 7 stages \(plan 1 task, process 2 tasks, ", err, re.M)
    assert re.search(r"\d\d:\d\d:\d\d process: 2 tasks in \d+\.\ds\n", err)  # each stage's time (after its bar)
    assert re.search(r"^\d\d:\d\d:\d\d clean: done in \d+\.\ds -> ", err, re.M)

    assert main(clean_args) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"clean: up to date (nothing to do): {tmp_path / 'clean'} holds the output of these inputs" in err

    pack_args = ["data", "pack", str(tmp_path / "clean" / "train"), str(data.tokenizer_dir), str(tmp_path / "shards"),
                 "--seq-len", "64", "--tasks", "2", "--workers", "1", "--quiet"]
    assert main(pack_args) == 0
    out, err = capsys.readouterr()
    assert "manifest ->" in out and err == ""  # --quiet: no progress bar, no INFO lines
    assert main(pack_args[:-1]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "pack: up to date (nothing to do)" in err


def test_progress_bar_counts_documents_and_bytes_of_forked_workers(tmp_path, capsys):
    corpus, documents = _corpus(tmp_path / "corpus")
    size = sum(p.stat().st_size for p in corpus.iterdir())
    clean(corpus, tmp_path / "out", chunk_mb=0.01, executor=ExecutorConfig(tasks=3, workers=2, progress=True))
    err = capsys.readouterr().err
    # the last refresh of the process stage: every byte and document, counted in the worker processes
    shown = re.findall(r"process: +100%\|[^|]*\| ([\d.]+)k/([\d.]+)k \[[^,]+, +[\d.]+[kM]?B/s, "
                       r"([\d,]+) docs \([\d,]+/s\), tasks 3/3\]", err)
    assert shown, err[-2000:]
    done, total, docs = shown[-1]
    assert done == total and float(total) == pytest.approx(size / 1024, rel=0.01)  # tqdm shows 3 digits
    assert int(docs.replace(",", "")) == documents


def test_json_errors_give_the_position_in_full(tmp_path):
    with pytest.raises(DataError) as err:
        parse_json_line(b'{"text": "one two three", "lang" "en"}\n', "x.jsonl", 7)
    assert str(err.value) == ("x.jsonl:7: not valid JSON (Expecting ':' delimiter at column 34, near "
                              "'two three\", \"lang\" \"en\"}')")
    path = tmp_path / "train" / "bad.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"text": "word " * 30, "lang": "en"}) + '\n{"text": "a", "lang": en}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid JSON \(Expecting value at column 23, "
                                        rf"near '.*\"lang\": en}}'\)$"):
        clean(path.parent, tmp_path / "out", executor=ExecutorConfig(tasks=1, workers=1, progress=False))


def test_tasks_default_to_the_jobs_parallelism_on_a_cluster(data, tmp_path, capsys):
    local = ExecutorConfig(workers=3)
    assert local.tasks_for(100) == 3  # locally: one task per worker, as before
    ray = ExecutorConfig(executor="ray")
    assert ray.tasks_for(7) == 7 and ray.tasks_for(10_000) == MAX_DEFAULT_TASKS and ray.tasks_for(0) == 1
    assert ExecutorConfig(executor="ray", tasks=5).tasks_for(100) == 5

    corpus, _ = _corpus(tmp_path / "corpus", n=60)
    chunk_mb = 0.01
    chunks = sum(-(-p.stat().st_size // int(chunk_mb * (1 << 20))) for p in corpus.iterdir())
    assert chunks > 3
    slurm = ExecutorConfig(executor="slurm", partition="cpu", dry_run=True, progress=False)
    assert clean(corpus, tmp_path / "out", chunk_mb=chunk_mb, executor=slurm) is None
    logs = tmp_path / ".out.work" / "logs"
    assert f"#SBATCH --array=0-{chunks - 1}\n" in (logs / "process" / "launch_script.slurm").read_text()
    assert "#SBATCH --array=0-0\n" in (logs / "plan" / "launch_script.slurm").read_text()

    from fuxi.data_pipeline.pack import pack
    clean_train = data.train_manifest.parent.parent / "clean" / "train"
    assert pack(clean_train, data.tokenizer_dir, tmp_path / "shards", seq_len=64, executor=slurm) is None
    languages = len(list(clean_train.glob("*.jsonl")))
    script = (tmp_path / ".shards.work" / "logs" / "pack" / "launch_script.slurm").read_text()
    assert f"#SBATCH --array=0-{languages - 1}\n" in script and languages > 20

    with pytest.raises(SystemExit):
        main(["data", "clean", "--help"])
    assert "slurm and ray: one per input chunk" in " ".join(capsys.readouterr().out.split())

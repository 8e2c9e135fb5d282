"""Stages replace their output folder only when the new one is complete: a failure (here, invalid UTF-8 half way
through the input) leaves the dataset already there exactly as it was, and is a one-line error naming the file
and line (exit 2)."""
from __future__ import annotations

import shutil

import pytest

from fuxi.common.atomic import sha256_file
from fuxi.common.errors import DataError
from fuxi.common.staging import exchange, staged_folder, switch_folder
from fuxi.data_pipeline.cli import main
from fuxi.data_pipeline.manifest import load_manifest
from fuxi.data_pipeline.pack import pack
from data_helpers import tiny_dataset

LANGS = ["en", "hi", "ru", "zh"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`, hidden ones included."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def corrupt_utf8(path, line_no):
    """Put one invalid byte (0xff) inside the text of line `line_no` (1-based); returns its column."""
    lines = path.read_bytes().split(b"\n")
    column = lines[line_no - 1].index(b'"text": "') + len(b'"text": "') + 3
    lines[line_no - 1] = lines[line_no - 1][:column] + b"\xff" + lines[line_no - 1][column:]
    path.write_bytes(b"\n".join(lines))
    return column + 1


def test_failing_pack_leaves_the_dataset_in_its_folder_untouched(data, tmp_path, capsys):
    clean_train = data.train_manifest.parent.parent / "clean" / "train"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for lang in LANGS:
        shutil.copy(clean_train / f"{lang}.jsonl", corpus / f"{lang}.jsonl")
    out = tmp_path / "shards"
    pack(corpus, data.tokenizer_dir, out, seq_len=64, shard_bytes=20_000, docs_per_part=4, num_proc=2,
         progress=False)
    old = load_manifest(out / "manifest.json")
    assert len(old.shards) >= 12
    before = snapshot(out)

    # The same corpus with one bad byte in the last line of zh: every other part packs (and writes its
    # shards, under the same names as the old ones) before the failure.
    last = len((corpus / "zh.jsonl").read_bytes().rstrip(b"\n").split(b"\n"))
    column = corrupt_utf8(corpus / "zh.jsonl", last)
    code = main(["data", "pack", str(corpus), str(data.tokenizer_dir), str(out), "--seq-len", "64",
                 "--shard-mb", str(20_000 / (1 << 20)), "--num-proc", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: {corpus / 'zh.jsonl'}:{last}: not valid UTF-8 (byte 0xff at column {column})"
    assert snapshot(out) == before  # every old shard's sha256, the manifest, nothing added
    load_manifest(out / "manifest.json").check_files(checksums=True)
    # no staging left behind; the work folder stays so that a re-run resumes (it never looks like output)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] in ([], [".shards.work"])

    # A successful pack replaces the folder as a whole: shards of a language no longer packed are gone.
    (corpus / "zh.jsonl").unlink()
    pack(corpus, data.tokenizer_dir, out, seq_len=64, shard_bytes=20_000, docs_per_part=4, num_proc=1,
         progress=False)
    new = load_manifest(out / "manifest.json")
    assert new.languages == ["en", "hi", "ru"]
    assert {p.name for p in out.iterdir()} == {"manifest.json", "pack_report.json", *(s.path for s in new.shards),
                                               *(p.name for p in out.glob("task-*-of-*.manifest.json"))}
    new.check_files(checksums=True)


def test_failing_clean_names_file_and_line_and_keeps_the_old_output(data, tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    docs = (data.val_manifest.parent.parent / "clean" / "valid" / "de.jsonl").read_text().splitlines()
    (source / "docs.jsonl").write_text("\n".join(docs) + "\n")
    out = tmp_path / "clean"
    assert main(["data", "clean", str(source), str(out), "--num-proc", "1", "--quiet"]) == 0
    before = snapshot(out)
    assert "train/de.jsonl" in before and "clean_report.json" in before
    capsys.readouterr()

    column = corrupt_utf8(source / "docs.jsonl", 3)
    assert main(["data", "clean", str(source), str(out), "--num-proc", "1", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: {source / 'docs.jsonl'}:3: not valid UTF-8 (byte 0xff at column {column})"
    assert snapshot(out) == before


def test_a_folder_holding_other_files_is_refused_not_replaced(data, tmp_path):
    clean_valid = data.val_manifest.parent.parent / "clean" / "valid"
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"mixed: holds \['notes.txt'\], which this stage did not write"):
        pack(clean_valid, data.tokenizer_dir, out, split="valid", seq_len=64, num_proc=1, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_switch_exchanges_folders_and_falls_back_to_two_renames(tmp_path, monkeypatch):
    old, new = tmp_path / "out", tmp_path / "new"
    for folder, name in ((old, "a"), (new, "b")):
        folder.mkdir()
        (folder / name).write_text(name)
    if exchange(old, new):  # Linux on ext4/xfs/btrfs/tmpfs: one atomic call (False, nothing moved, elsewhere)
        assert [p.name for p in old.iterdir()] == ["b"] and [p.name for p in new.iterdir()] == ["a"]
        switch_folder(new, old)  # puts "a" back and deletes the other
        assert [p.name for p in old.iterdir()] == ["a"] and not new.exists()
    else:
        assert [p.name for p in old.iterdir()] == ["a"] and [p.name for p in new.iterdir()] == ["b"]

    import fuxi.common.staging as staging

    monkeypatch.setattr(staging, "exchange", lambda a, b: False)  # e.g. NFS
    with staged_folder(old, owned=("a", "c")) as tmp:
        (tmp / "c").write_text("c")
    assert [p.name for p in old.iterdir()] == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError):
        with staged_folder(old, owned=("c",)) as tmp:
            (tmp / "c").write_text("half")
            raise RuntimeError("a stage failed")
    assert (old / "c").read_text() == "c" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_killed_prepare_resumes_without_redoing_finished_stages(data, tmp_path, monkeypatch):
    """prepare killed while packing the valid split (after clean, the tokenizer and the train split finished):
    nothing is published, and the re-run packs only the valid split; the result equals an uninterrupted run."""
    from fuxi.data_pipeline.clean_stages import ProcessChunks
    from fuxi.data_pipeline.errors import TaskError
    from fuxi.data_pipeline.pack_stages import PackTasks
    from fuxi.data_pipeline.prepare import prepare_dataset
    from fuxi.data_pipeline.tokenizer import tokenizer_hash
    from fuxi.data_pipeline.tokenizer_stage import TrainTokenizer
    from data_helpers import TINY

    pack_task = PackTasks.run_task

    def killed_on_valid(self, rank, world_size):
        if self.job.split == "valid":
            raise RuntimeError("simulated kill")
        return pack_task(self, rank, world_size)

    out = tmp_path / "data"
    monkeypatch.setattr(PackTasks, "run_task", killed_on_valid)
    with pytest.raises(TaskError, match="simulated kill"):
        prepare_dataset(out, num_proc=1, **TINY)
    assert not out.exists()
    monkeypatch.setattr(ProcessChunks, "process", lambda *a: pytest.fail("clean ran again"))
    monkeypatch.setattr(TrainTokenizer, "run_task", lambda *a: pytest.fail("the tokenizer was trained again"))
    packed = []
    monkeypatch.setattr(PackTasks, "run_task",
                        lambda self, rank, n: (packed.append(self.job.split), pack_task(self, rank, n))[1])
    resumed = prepare_dataset(out, num_proc=1, **TINY)
    assert packed == ["valid"]
    assert tokenizer_hash(resumed.tokenizer_dir) == tokenizer_hash(data.tokenizer_dir)
    for ours, reference in ((resumed.train_manifest, data.train_manifest), (resumed.val_manifest, data.val_manifest)):
        assert [s.sha256 for s in load_manifest(ours).shards] == [s.sha256 for s in load_manifest(reference).shards]
        assert load_manifest(ours).shards[0].path == load_manifest(reference).shards[0].path
    assert load_manifest(resumed.train_manifest).tokenizer_path == "../tokenizer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the work folder is removed after success

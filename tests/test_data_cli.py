"""`fuxi data ...` sub-commands, called through the parser that `register` builds."""
from __future__ import annotations

import argparse
import json
import re

import pytest

import numpy as np

from fuxi.data_pipeline.cli import main, register
from fuxi.data_pipeline.pack import pack
from data_helpers import rewrite_shard, tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def test_register_adds_data_with_subcommands():
    parser = argparse.ArgumentParser(prog="fuxi")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "pack", "c", "t", "o", "--seq-len", "128"])
    assert args.command == "data" and args.data_command == "pack" and args.seq_len == 128 and callable(args.func)
    for argv in (["clean", "in", "out"], ["tokenizer", "c", "o"], ["train-tokenizer", "c", "o"],
                 ["fertility", "t", "c"], ["inspect", "m"], ["stats", "m"], ["mixture", "m"], ["prepare", "o"],
                 ["shard", "c", "t", "o"], ["build-corpus"]):
        assert callable(parser.parse_args(["data", *argv]).func)


def test_inspect_mixture_fertility(data, tmp_path, capsys):
    assert main(["data", "inspect", str(data.val_manifest), "--verify", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "bytes/token" in out and "---" in out
    assert main(["data", "mixture", str(data.train_manifest), "--max-epochs", "2", "--languages", "en", "hi"]) == 0
    assert "planned share" in capsys.readouterr().out
    assert main(["data", "mixture", str(data.train_manifest), "--stream", "3", "--num-workers", "0",
                 "--mixing", "weights", "--weights", "en=2", "hi=1"]) == 0
    assert "realised share" in capsys.readouterr().out
    png = tmp_path / "f.png"
    clean_valid = data.val_manifest.parent.parent / "clean" / "valid"
    assert main(["data", "fertility", str(data.tokenizer_dir), str(clean_valid), "--plot", str(png), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["en"]["tokens_per_word"] > 0 and png.stat().st_size > 1000


def test_clean_tokenizer_pack_commands(data, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    docs = [json.loads(line) for line in (data.val_manifest.parent.parent / "clean" / "valid" / "de.jsonl")
            .read_text().splitlines()]
    (src / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    assert main(["data", "clean", str(src), str(tmp_path / "clean"), "--num-proc", "1", "--quiet"]) == 0
    assert "exact dup" in capsys.readouterr().out
    assert main(["data", "tokenizer", str(tmp_path / "clean" / "train"), str(tmp_path / "tok"),
                 "--vocab-size", "400"]) == 0
    assert main(["data", "pack", str(tmp_path / "clean" / "train"), str(tmp_path / "tok"), str(tmp_path / "out"),
                 "--seq-len", "32", "--num-proc", "1", "--quiet"]) == 0
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert main(["data", "inspect", str(tmp_path / "missing.json")]) == 2  # a clear error, not a traceback
    assert "manifest not found" in capsys.readouterr().err


@pytest.mark.parametrize("fault, message", [
    (lambda t, lang, doc: (t.astype(np.int16), lang, doc), r"expected uint32\[65\], found int16\[65\]"),
    (lambda t, lang, doc: (t, lang.astype(np.float32), doc), r"expected uint16\[65\], found float32\[65\]"),
    (lambda t, lang, doc: (t[:-1], lang, doc), r"expected uint32\[65\], found uint32\[64\]"),
    (lambda t, lang, doc: (np.full_like(t, 5000), lang, doc), r"token id 5000 >= vocab size"),
    (lambda t, lang, doc: (t, np.full_like(lang, 7), doc), r"language index 7 >= 2 languages"),
    (lambda t, lang, doc: (t, 1 - lang, doc), r"tokens per language \{'th': \d+\} disagree"),
])
def test_inspect_verify_decodes_every_sample(data, tmp_path, capsys, fault, message):
    """Shards whose size and sha256 agree with the manifest but whose samples are wrong (dtype, length, id
    range, language): --verify reads every sample and names the shard and sample at fault, exit 2."""
    clean_train = data.train_manifest.parent.parent / "clean" / "train"
    path = pack(clean_train, data.tokenizer_dir, tmp_path / "shards", seq_len=64, languages=["hi", "th"],
                shard_bytes=40_000, num_proc=1, progress=False)
    assert main(["data", "inspect", str(path), "--verify", "--quiet"]) == 0
    capsys.readouterr()
    shard = rewrite_shard(path, 0, fault)
    assert main(["data", "inspect", str(path), "--verify", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and shard.name in err
    assert re.search(message, err), err
